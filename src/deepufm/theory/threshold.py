"""Admissible regularisation: the MSE threshold ``b_crit`` and the CE root condition."""

from __future__ import annotations

import math

from scipy.optimize import minimize_scalar

from deepufm.errors import ConfigError
from deepufm.models.config import UFMConfig


def b_crit(L: int) -> float:
    """``b_crit(L) = (L-1)^{(L-1)/(L+1)} / L^{2L/(L+1)}`` (``0^0 = 1``)."""
    return (L - 1) ** ((L - 1) / (L + 1)) / L ** (2 * L / (L + 1))


def regularisation_b(config: UFMConfig) -> float:
    """``b = K (n lam_H prod_l lam_l)^{1/(L+1)}`` (single lam: ``K lam n^{1/(L+1)}``)."""
    prod = config.n * config.lam_H * math.prod(config.lam_W)
    return config.K * prod ** (1.0 / (config.L + 1))


def max_single_lambda(K: int, n: int, L: int) -> float:
    """The threshold on one ``lam``: ``b_crit(L) / (K n^{1/(L+1)})``."""
    return b_crit(L) / (K * n ** (1.0 / (L + 1)))


def _ce_log_gap(K: int, L: int) -> float:
    """``max_alpha [p log alpha - log(e^alpha + K - 1)]``, ``p = (L-1)/(L+1)`` (v2 eq. 9)."""
    p = (L - 1) / (L + 1)

    def neg(t: float) -> float:  # t = log alpha
        return -(p * t - (math.log1p((K - 1) * math.exp(-math.exp(t))) + math.exp(t)))

    res = minimize_scalar(neg, bounds=(-30.0, 8.0), method="bounded", options={"xatol": 1e-12})
    return -float(res.fun)


def check_admissible(config: UFMConfig, allow_trivial: bool = False) -> None:
    """Raise ``ConfigError`` when the regularisation leaves no non-trivial DNC solution.

    MSE: ``b >= b_crit(L)`` makes the zero solution the global optimum (v2 eq. 17). CE: the
    logit-scale equation (v2 eq. 9) has no root. Unregularised runs are always admissible.
    """
    if config.lam_H == 0 or any(lam == 0 for lam in config.lam_W) or allow_trivial:
        return
    param = "lam" if config.lam is not None else "lam_W/lam_H"
    value = config.lam if config.lam is not None else (list(config.lam_W), config.lam_H)
    L, K, n = config.L, config.K, config.n
    if config.loss == "mse":
        b, bc = regularisation_b(config), b_crit(L)
        if b >= bc:
            raise ConfigError(
                param,
                value,
                f"regularisation below the threshold b < b_crit(L={L}) = {bc:.6g}",
                f"Here b = K (n lam_H prod lam_l)^(1/(L+1)) = {b:.6g} is at or above the threshold, "
                f"so the zero solution is then the global optimum (v1 eq. 2, v2 eq. 17). The largest "
                f"admissible single lam for K={K}, n={n}, L={L} is {max_single_lambda(K, n, L):.6g}; "
                "pass --allow-trivial to train anyway.",
            )
        return
    lam_eff = (config.lam_H * math.prod(config.lam_W)) ** (1.0 / (L + 1))
    gap = _ce_log_gap(K, L)
    if math.log(lam_eff * n ** (1.0 / (L + 1))) > gap:
        lam_max = math.exp(gap) / n ** (1.0 / (L + 1))
        raise ConfigError(
            param,
            value,
            f"a regularisation for which the CE logit-scale equation has a root "
            f"(effective lam <= {lam_max:.6g} for K={K}, n={n}, L={L})",
            "Without a root there is no DNC critical point (v2 eq. 9); pass --allow-trivial "
            "to train anyway.",
        )
