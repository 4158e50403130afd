"""The constant ``c`` and every derived constant of the DNC optimum (Concepts: *Deep neural
collapse*).

All formulas hold for per-layer ``lam_l`` and a separate ``lam_H``; the single-lambda forms of the
paper (v2) are the specialisation ``lam_l = lam_H = lam``. Layers are 1-based in names
(``omega2[l-1]`` belongs to ``W_l``); feature norms run over ``l = 1 .. L+1``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

from scipy.optimize import brentq

from deepufm.errors import ConfigError
from deepufm.models.config import UFMConfig
from deepufm.theory.threshold import b_crit, regularisation_b


def fold_point(L: int) -> tuple[float, float]:
    """``(c_m, g(c_m))``: the maximiser of ``g(c) = (1-c) c^p``, ``p = (L-1)/(L+1)``, and its value."""
    p = (L - 1) / (L + 1)
    c_m = p / (1 + p)
    return c_m, (1 - c_m) * c_m**p


def dnc_constant(b: float, L: int) -> float:
    """``c``: the larger root in ``(0, 1)`` of ``(1-c) c^{(L-1)/(L+1)} = b`` (v2 Theorem 1).

    Solved for ``s = 1 - c`` in log form, ``log s + p log(1-s) = log b``, by Brent's method on
    ``(0, 1 - c_m]``, which keeps full relative accuracy of ``1 - c`` when ``b`` is small.
    Raises ``ConfigError`` when there is no root (``b`` above the fold ``g(c_m)``); warns when the
    root exists but ``b >= b_crit(L)``, where the zero solution is the better one.
    """
    if not (math.isfinite(b) and b > 0):
        raise ConfigError("b", b, "a finite number > 0 (every lam must be positive)")
    p = (L - 1) / (L + 1)
    c_m, g_max = fold_point(L)
    bc = b_crit(L)
    if L == 1:
        if b >= 1:
            raise ConfigError("b", b, "b < b_crit(1) = 1 (no non-zero critical point)")
        return 1.0 - b
    if b > g_max:
        raise ConfigError(
            "b",
            b,
            f"b <= {g_max:.6g}, the fold of (1-c) c^p (b_crit(L={L}) = {bc:.6g})",
            "There is no non-zero critical point: the zero solution is the only optimum.",
        )
    if b >= bc:
        warnings.warn(
            f"b = {b:.6g} >= b_crit(L={L}) = {bc:.6g}: the DNC critical point exists but the zero "
            "solution has lower loss (v1 eq. 2, v2 eq. 17).",
            stacklevel=2,
        )
    if b == g_max:
        return c_m
    # s = 1 - c satisfies s (1-s)^p = b with (1-s)^p <= 1, so s >= b: [b, 1 - c_m] brackets it.
    f = lambda s: math.log(s) + p * math.log1p(-s) - math.log(b)  # noqa: E731
    s = brentq(f, min(b, 1 - c_m), 1 - c_m, xtol=1e-300, rtol=1e-15, maxiter=500)
    return 1.0 - s


def reduced_loss(c: float, b: float, L: int) -> float:
    """Loss after optimal balancing, ``f(c) = (1-c)^2/2 + (L+1)/2 b c^{2/(L+1)}``."""
    return 0.5 * (1 - c) ** 2 + 0.5 * (L + 1) * b * c ** (2 / (L + 1))


@dataclass(frozen=True)
class DNCConstants:
    """Constants of the linear-MSE DNC optimum for one configuration (Concepts: *Deep neural
    collapse*, *Predictions at the optimum*).

    Attributes (tuples indexed by layer ``l - 1``):
        b, b_crit, c: threshold quantity, its critical value, the output scale (``Z = cY``).
        tau: balance constant ``lam_l omega_l^2 = lam_H n ||mu^(1)||^2 = c(1-c)/K``.
        omega2: squared singular value of ``W_l`` (``K``-fold), ``l = 1..L``.
        mean_norm2: ``||mu^(l)_c||^2`` for ``l = 1..L+1`` (``L+1`` entries; the last is ``c^2``).
        beta: ``c / ||mu^(l)||^2`` for ``l = 1..L+1`` (rows of ``A^(l)`` are ``beta_l mu^(l)_c``).
        hessian_eigenvalue: ``Lambda_l = c lam_l / (1-c)`` (v2 Thm 1 / v1 Thm 4.1), ``l = 1..L``.
        loss: the total objective at the optimum, ``(1-c)(1+Lc)/2``.
    """

    K: int
    n: int
    L: int
    b: float
    b_crit: float
    c: float
    tau: float
    omega2: tuple[float, ...]
    mean_norm2: tuple[float, ...]
    beta: tuple[float, ...]
    hessian_eigenvalue: tuple[float, ...]
    lam_W: tuple[float, ...]
    loss: float

    @property
    def block_gn_eigenvalue(self) -> float:
        """Non-zero eigenvalue of the block Gauss–Newton matrix over all layers: ``sum_l Lambda_l`` (v2 Thm 5)."""
        return sum(self.hessian_eigenvalue)

    def grad_cov_eigenvalue(self, l: int) -> float:
        """``(1-c)^2 Lambda_l = c(1-c) lam_l`` (``K-1``-fold; v2 Thm 10 / v1 E.1)."""
        return (1 - self.c) ** 2 * self.hessian_eigenvalue[l - 1]

    def backprop_eigenvalues(self, l: int) -> tuple[float, float]:
        """``((1+c^2) c^2/||mu'||^2, (1-c)^2 c^2/||mu'||^2)``, multiplicities ``K-1`` and 1 (v2 Thm 11)."""
        scale = self.c**2 / self.mean_norm2[l]
        return (1 + self.c**2) * scale, (1 - self.c) ** 2 * scale

    def feature_gram_eigenvalue(self, l: int) -> float:
        """``n ||mu^(l)||^2``: the ``K``-fold eigenvalue of ``H_l H_l^T`` (v1 E.3)."""
        return self.n * self.mean_norm2[l - 1]


def _positive_lams(config: UFMConfig) -> None:
    if config.lam_H <= 0 or any(lam <= 0 for lam in config.lam_W):
        value = config.lam if config.lam is not None else (list(config.lam_W), config.lam_H)
        raise ConfigError("lam", value, "positive regularisation (the DNC optimum needs lam > 0)")


def dnc_constants(config: UFMConfig) -> DNCConstants:
    """Every constant of the linear-MSE DNC optimum of ``config`` (Concepts: *Deep neural
    collapse*)."""
    _positive_lams(config)
    K, n, L = config.K, config.n, config.L
    b = regularisation_b(config)
    c = dnc_constant(b, L)
    tau = c * (1 - c) / K
    omega2 = tuple(tau / lam for lam in config.lam_W)
    norms = [tau / (n * config.lam_H)]
    for w2 in omega2:
        norms.append(w2 * norms[-1])
    return DNCConstants(
        K=K,
        n=n,
        L=L,
        b=b,
        b_crit=b_crit(L),
        c=c,
        tau=tau,
        omega2=omega2,
        mean_norm2=tuple(norms),
        beta=tuple(c / m for m in norms),
        hessian_eigenvalue=tuple(c * lam / (1 - c) for lam in config.lam_W),
        lam_W=tuple(config.lam_W),
        loss=0.5 * (1 - c) * (1 + L * c),
    )
