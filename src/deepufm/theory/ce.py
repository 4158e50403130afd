"""Cross-entropy deep linear UFM: the logit scale alpha and the Theorem-9 spectrum (v2 App. B)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy.optimize import brentq, minimize_scalar

from deepufm.errors import ConfigError
from deepufm.models.config import UFMConfig


def effective_lambda(config: UFMConfig) -> float:
    """``(lam_H prod_l lam_l)^{1/(L+1)}``: the single lam with the same product."""
    return (config.lam_H * math.prod(config.lam_W)) ** (1.0 / (config.L + 1))


def _alpha_equation(K: int, L: int, log_rhs: float):
    p = (L - 1) / (L + 1)

    def f(alpha: float) -> float:  # p log a - log(e^a + K - 1) - log(lam n^{1/(L+1)})
        return p * math.log(alpha) - (alpha + math.log1p((K - 1) * math.exp(-alpha))) - log_rhs

    return f


def ce_logit_scale(config: UFMConfig) -> float:
    """``alpha``: the larger root of ``alpha^{(L-1)/(L+1)} = lam n^{1/(L+1)} (e^alpha + K - 1)``.

    Solved in log form by Brent's method to the right of the maximiser of the left-minus-right
    side; raises ``ConfigError`` when there is no root (no DNC critical point).
    """
    K, n, L = config.K, config.n, config.L
    lam = effective_lambda(config)
    if lam <= 0:
        raise ConfigError(
            "lam", config.lam, "positive regularisation (alpha -> infinity as lam -> 0)"
        )
    log_rhs = math.log(lam) + math.log(n) / (L + 1)
    f = _alpha_equation(K, L, log_rhs)
    res = minimize_scalar(
        lambda t: -f(math.exp(t)), bounds=(-40.0, 8.0), method="bounded", options={"xatol": 1e-13}
    )
    a_star = math.exp(res.x)
    if f(a_star) < 0:
        raise ConfigError(
            "lam",
            config.lam if config.lam is not None else (list(config.lam_W), config.lam_H),
            "a regularisation for which the CE logit-scale equation has a root",
            f"max over alpha of the log-form equation is {f(a_star):.4g} < 0 (v2 eq. 9).",
        )
    hi = max(2 * a_star, 1.0)
    while f(hi) > 0:
        hi *= 2
    return brentq(f, a_star, hi, xtol=1e-15, rtol=1e-15, maxiter=500)


@dataclass(frozen=True)
class CEConstants:
    """Constants of the CE DNC critical point (v2 App. B), layer tuples indexed by ``l - 1``.

    ``s2[l]`` is the squared singular value of ``W_l`` (``K-1``-fold; ``s2_H`` that of ``H_1``),
    ``eps`` the off-class softmax probability ``1/(e^alpha + K - 1)``, ``lambda0[l]`` the mini-bulk
    eigenvalue ``alpha lam_l / K`` of the layer Hessian.
    """

    K: int
    n: int
    L: int
    alpha: float
    tau: float
    s2_H: float
    s2: tuple[float, ...]
    eps: float
    lambda0: tuple[float, ...]
    loss: float

    def hessian_spectrum(self, l: int) -> tuple[tuple[float, ...], tuple[int, ...]]:
        """Non-zero eigenvalues of the layer-``l`` Hessian and their multiplicities (rank (K-1)^2).

        ``lambda0 [1 + (1-K eps)(K-1)]`` once, ``lambda0 [1 + (1-K eps)(K-2)]`` ``K-1`` times and
        ``lambda0`` ``K^2-3K+1`` times. For ``K = 2`` the space is one-dimensional: only the first.
        """
        K, e, lam0 = self.K, self.eps, self.lambda0[l - 1]
        values = (lam0 * (1 + (1 - K * e) * (K - 1)), lam0 * (1 + (1 - K * e) * (K - 2)), lam0)
        if K == 2:
            return values[:1], (1,)
        return values, (1, K - 1, K * K - 3 * K + 1)


def ce_constants(config: UFMConfig) -> CEConstants:
    """Constants of the CE DNC critical point of ``config`` (linear model, v2 App. B)."""
    K, n, L = config.K, config.n, config.L
    alpha = ce_logit_scale(config)
    # Balanced singular values: lam_l s_l^2 = lam_H s_H^2 = tau, with s_H prod s_l = alpha sqrt(n).
    tau = (alpha * math.sqrt(n)) ** (2 / (L + 1)) * effective_lambda(config)
    eps = 1.0 / (math.exp(alpha) + K - 1)
    reg = 0.5 * (L + 1) * (K - 1) * tau
    return CEConstants(
        K=K,
        n=n,
        L=L,
        alpha=alpha,
        tau=tau,
        s2_H=tau / config.lam_H,
        s2=tuple(tau / lam for lam in config.lam_W),
        eps=eps,
        lambda0=tuple(alpha * lam / K for lam in config.lam_W),
        loss=math.log1p((K - 1) * math.exp(-alpha)) + reg,
    )
