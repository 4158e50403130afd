"""``deepufm theory``: every closed-form constant and predicted eigenvalue, per layer."""

from __future__ import annotations

import argparse
import json

from deepufm.cli.common import MODEL_KEYS, add_model_arguments, given
from deepufm.models.config import UFMConfig
from deepufm.theory import ce_constants, check_admissible, dnc_constants
from deepufm.theory.predictions import theorem_label


def register(sub) -> None:
    """Add the ``deepufm theory`` subcommand and its options to ``sub``."""
    p = sub.add_parser(
        "theory",
        help="print the closed-form constants and predicted spectra of a configuration",
        description=(
            "Closed-form theory of the deep linear UFM at deep neural collapse (docs: "
            "Concepts, Predictions at the optimum): threshold, output scale c (MSE) or logit scale alpha (CE), optimum loss, and "
            "per layer the predicted eigenvalues of every matrix, with the theorem each comes "
            "from in the paper's v1 and v2 numbering."
        ),
    )
    add_model_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run)


def theory_summary(config: UFMConfig) -> dict:
    """The public JSON contract of ``deepufm theory --json``."""
    L = config.L
    if config.loss == "ce":
        k = ce_constants(config)
        layers = []
        for l in range(1, L + 1):
            values, mults = k.hessian_spectrum(l)
            layers.append(
                {
                    "layer": l,
                    "singular_value2": k.s2[l - 1],
                    "hessian_eigenvalues": list(values),
                    "hessian_multiplicities": list(mults),
                    "hessian_rank": (config.K - 1) ** 2,
                }
            )
        return {
            "loss_type": "ce",
            "alpha": k.alpha,
            "epsilon": k.eps,
            "loss": k.loss,
            "layers": layers,
        }
    k = dnc_constants(config)
    layers = [
        {
            "layer": l,
            "omega2": k.omega2[l - 1],
            "mean_norm2": k.mean_norm2[l - 1],
            "hessian_eigenvalue": k.hessian_eigenvalue[l - 1],
            "hessian_rank": config.K**2,
            "grad_cov_eigenvalue": k.grad_cov_eigenvalue(l),
            "backprop_eigenvalues": list(k.backprop_eigenvalues(l)),
            "feature_gram_eigenvalue": k.feature_gram_eigenvalue(l),
        }
        for l in range(1, L + 1)
    ]
    return {
        "loss_type": "mse",
        "b": k.b,
        "b_crit": k.b_crit,
        "c": k.c,
        "loss": k.loss,
        "output_mean_norm2": k.mean_norm2[-1],
        "block_gn_eigenvalue": k.block_gn_eigenvalue,
        "layers": layers,
    }


def _table(config: UFMConfig, s: dict) -> str:
    T = theorem_label  # every label from theory.predictions.THEOREMS
    K = config.K
    lines = [
        f"deep linear UFM, K={K}, n={config.n}, d={config.d}, L={config.L}, loss={config.loss}, "
        f"lam_W={list(config.lam_W)}, lam_H={config.lam_H}"
    ]
    if config.loss == "ce":
        lines += [
            f"  logit scale alpha ({T('ce_logit_scale')})          {s['alpha']:.10g}",
            f"  off-class probability eps             {s['epsilon']:.6g}",
            f"  loss at the DNC critical point        {s['loss']:.10g}",
            "",
            f"  layer  Hessian eigenvalues x multiplicity ({T('ce_layer_hessian')}, rank (K-1)^2)",
        ]
        for e in s["layers"]:
            pairs = ", ".join(
                f"{v:.6g} x{m}"
                for v, m in zip(e["hessian_eigenvalues"], e["hessian_multiplicities"])
            )
            lines.append(f"  {e['layer']:>5}  {pairs}")
        return "\n".join(lines)
    lines += [
        f"  b = K (n lam_H prod lam_l)^(1/(L+1))   {s['b']:.10g}   (threshold b_crit(L) = {s['b_crit']:.6g}; {T('threshold')})",
        f"  output scale c (Z = cY; {T('output_scale')})      {s['c']:.10g}",
        f"  loss at the optimum (1-c)(1+Lc)/2      {s['loss']:.10g}",
        f"  block Gauss-Newton eigenvalue          {s['block_gn_eigenvalue']:.10g}   (sum_l Lambda_l, x{K * K}; {T('block_gauss_newton')})",
        "",
        f"  columns: omega^2 = squared singular value of W_l ({T('weight')}, xK); ||mu||^2 = class-mean",
        f"  norm of the input H_l; Lambda = layer-Hessian eigenvalue ({T('layer_hessian')}, xK^2; also",
        f"  G_class xK and G_cross xK(K-1), {T('knockout')}); Sigma_g = gradient covariance "
        f"({T('gradient_covariance')},",
        f"  x(K-1)); Sigma_delta = back-propagated errors ({T('backprop_error')}, x(K-1) and x1); "
        f"Gram = H_l H_l^T ({T('feature_gram')}, xK)",
        "",
        f"  {'layer':>5} {'omega^2':>12} {'||mu||^2':>12} {'Lambda':>12} {'rank':>5} {'Sigma_g':>12} "
        f"{'Sigma_delta':>25} {'Gram':>12}",
    ]
    for e in s["layers"]:
        big, small = e["backprop_eigenvalues"]
        lines.append(
            f"  {e['layer']:>5} {e['omega2']:>12.6g} {e['mean_norm2']:>12.6g} {e['hessian_eigenvalue']:>12.6g} "
            f"{e['hessian_rank']:>5} {e['grad_cov_eigenvalue']:>12.6g} {big:>12.6g} {small:>12.6g} "
            f"{e['feature_gram_eigenvalue']:>12.6g}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """``deepufm theory``: print (or ``--json``) the closed-form constants of a configuration;
    returns the exit status."""
    config = UFMConfig.from_dict(given(args, MODEL_KEYS), source="option")
    check_admissible(config)
    summary = theory_summary(config)
    print(json.dumps(summary, indent=2) if args.json else _table(config, summary))
    return 0
