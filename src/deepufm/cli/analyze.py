"""``deepufm analyze RUN_DIR``: every matrix and metric per layer, from ``params.npz`` alone.

``deepufm analyze --model PKG.MODULE:FACTORY [--weights FILE.pt] --data NAME|FILE.npz --loss
mse|ce --out DIR``: the same analysis for any PyTorch classifier (``deepufm.analyze``), written as
``Analysis.write`` writes it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from deepufm import validate as V
from deepufm.errors import ConfigError
from deepufm.metrics.layer_report import layer_report
from deepufm.models.config import resolve_device
from deepufm.training.probes import loss_probe
from deepufm.training.rundir import load_params


def register(sub) -> None:
    """Add the ``deepufm analyze`` subcommand and its options to ``sub``."""
    p = sub.add_parser(
        "analyze",
        help="measure the Hessian and related matrices of a trained run, per layer",
        description=(
            "Recompute, from config.json + params.npz of a run directory (or a directory holding "
            "only those two files), per layer l (the weight W_l, whose features are its input "
            "H_l): the layer-Hessian spectrum and rank, Papyan's class/cross/within ranks and "
            "knockouts, gradient coefficients, eigenvector alignment, projection proportion, "
            "weight singular values, gradient-covariance, back-propagated-error and feature-Gram "
            "spectra, NC1, frame distance, effective ranks and (ReLU) negative fractions."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        nargs="?",
        help="run directory with config.json and params.npz (optional with --model)",
    )
    g = p.add_argument_group("your own classifier (deepufm.analyze)")
    g.add_argument(
        "--model",
        metavar="PKG.MODULE:FACTORY",
        help="a factory returning the nn.Module, importable from the current directory or "
        "PYTHONPATH",
    )
    g.add_argument("--weights", metavar="FILE.pt", help="a state_dict, loaded strictly")
    g.add_argument(
        "--data",
        metavar="NAME|FILE.npz",
        help="a built-in data set (mnist-embedded, mnist, fashion-mnist, cifar10) or an .npz "
        "with X and y",
    )
    g.add_argument(
        "--loss",
        choices=["mse", "ce"],
        default="mse",
        help="data loss: mse = 1/(2N) sum ||z - e_y||^2 (K/2 x nn.MSELoss), ce = cross-entropy",
    )
    g.add_argument("--out", metavar="DIR", help="write results.json, figures/, report.html here")
    g.add_argument(
        "--linear",
        metavar="NAME",
        action="append",
        help="nn.Linear module to analyse, repeatable (default: every one, in forward order)",
    )
    g.add_argument("--batch-size", type=int, help="samples per forward pass (memory only)")
    g.add_argument("--data-dir", help="data directory of a built-in data set")
    g.add_argument("--per-class", type=int, help="images per class of a built-in data set")
    p.add_argument(
        "--layer", type=int, action="append", help="layer(s) to analyse, repeatable (default: all)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--full", action="store_true", help="all Hessian eigenvalues, not the top K^2+K")
    p.add_argument(
        "--rank-rtol",
        type=float,
        default=None,
        help="ranks count eigenvalues above this times the largest (default: p * eps of the "
        "run's dtype, the rank rule of deepufm.matrices.spectra)",
    )
    p.add_argument(
        "--relu-tol",
        type=float,
        default=0.0,
        help="pre-activations >= -tol*max|u| count as non-negative (sigma'(0)=1 always)",
    )
    p.add_argument(
        "--zero-below",
        type=float,
        default=0.0,
        help="set parameters with |value| below this to 0 first (the paper's ReLU practice)",
    )
    p.add_argument("--plot", metavar="DIR", help="also write the spectra as PNG figures into DIR")
    p.add_argument(
        "--device",
        default="cpu",
        help="device for the computation: auto, cpu, cuda or cuda:N (RUN_DIR form; with --model "
        "the factory's device)",
    )
    p.set_defaults(func=run)


def analyze(
    run_dir: Path,
    layers=None,
    full=False,
    rank_rtol=None,
    relu_tol=0.0,
    zero_below=0.0,
    device="cpu",
) -> dict:
    """The public JSON contract of ``deepufm analyze --json``."""
    # Every option is checked before the (possibly large) parameters are read.
    if rank_rtol is not None:
        rank_rtol = V.number("--rank-rtol", rank_rtol, 0, 1, hi_open=True)
    relu_tol = V.number("--relu-tol", relu_tol, 0)
    zero_below = V.number("--zero-below", zero_below, 0)
    model = load_params(run_dir, device=resolve_device(device, "--device"))
    L = model.config.L
    layers = list(range(1, L + 1)) if not layers else layers
    layers = [V.integer("--layer", l, 1, L) for l in layers]
    model = model.zeroed(zero_below)
    with torch.no_grad():
        totals = loss_probe(model, 0)
        reports = [layer_report(model, l, full, rank_rtol, relu_tol).to_dict() for l in layers]
    return {
        "loss": totals["loss"],
        "grad_norm": totals["grad_norm"],
        "config": model.config.to_dict(),
        "layers": reports,
    }


def _print_table(result: dict) -> None:
    print(f"loss {result['loss']:.10g}   gradient norm {result['grad_norm']:.3e}")
    for e in result["layers"]:
        K = len(e["gradient_coefficients"])
        diag = [e["gradient_coefficients"][c][c] for c in range(K)]
        f = [x for row in e["eigvec_alignment"] for x in row]
        print(f"\nlayer {e['layer']}")
        print(
            f"  Hessian top eigenvalues   {', '.join(f'{v:.6g}' for v in e['hessian_eigenvalues'][: K * K + 1])}"
        )
        print(
            f"  Hessian rank              {e['hessian_rank']}   effective rank {e['effective_rank_hessian']:.4g}"
        )
        print(f"  Papyan ranks              {e['papyan_ranks']}")
        for name, vals in e["knockout_eigenvalues"].items():
            print(f"  knockout {name:<7}          {', '.join(f'{v:.4g}' for v in vals[: K * K])}")
        print(
            f"  gamma diagonal            {', '.join(f'{v:.4f}' for v in diag)}   (1/K = {1 / K:.4f})"
        )
        print(f"  alignment f (min, max)    {min(f):.6f}, {max(f):.6f}")
        print(f"  projection proportion     {e['projection_proportion']:.6f}")
        print(
            f"  weight singular values    {', '.join(f'{v:.6g}' for v in e['weight_singular_values'][: K + 1])}   effective rank {e['effective_rank_weight']:.4g}"
        )
        print(
            f"  grad-cov top eigenvalues  {', '.join(f'{v:.4g}' for v in e['grad_cov_eigenvalues'])}"
        )
        print(
            f"  backprop top eigenvalues  {', '.join(f'{v:.4g}' for v in e['backprop_eigenvalues'])}"
        )
        print(
            f"  feature Gram top          {', '.join(f'{v:.6g}' for v in e['feature_gram_eigenvalues'])}"
        )
        print(
            f"  NC1 {e['nc1']:.3e}   frame distance {e['orthogonal_frame_distance']:.3e}"
            + (
                ""
                if e["negative_fraction"] is None
                else f"   negative fraction {e['negative_fraction']:.4f}"
            )
        )


def _plot(result: dict, out: Path) -> None:
    from deepufm.experiments.plotting import new_figure, save, spectrum_panel

    for e in result["layers"]:
        K = len(e["gradient_coefficients"])
        fig, axes = new_figure(ncols=2)
        spectrum_panel(
            axes[0, 0],
            torch.tensor(e["hessian_eigenvalues"]).clamp_min(0).numpy(),
            K * K,
            f"layer {e['layer']}: layer-Hessian spectrum",
        )
        spectrum_panel(
            axes[0, 1],
            torch.tensor(e["weight_singular_values"]).pow(2).numpy(),
            K,
            f"layer {e['layer']}: eigenvalues of W^T W",
        )
        save(fig, out, f"analyze-layer{e['layer']}")


def run_model(args: argparse.Namespace) -> int:
    """The ``--model`` form."""
    from deepufm.analysis import analyze as analyze_model
    from deepufm.analysis.loading import load_data, load_factory, load_weights
    from deepufm.analysis.report import check_out_dir

    if args.data is None:
        raise ConfigError("--data", None, "a built-in data set name or an .npz with X and y")
    if args.out:
        check_out_dir(Path(args.out), "--out")  # before the analysis, which may take long
    model = load_factory(args.model)
    if args.weights:
        load_weights(model, args.weights)
    X, y = load_data(args.data, model, args.data_dir, args.per_class)
    result = analyze_model(
        model,
        (X, y),
        args.loss,
        args.linear,
        batch_size=args.batch_size,
        full=args.full,
        rank_rtol=args.rank_rtol,
    )
    if args.out:
        html = result.write(args.out)
        if not args.json:
            print(f"wrote {html}")
    if args.json:
        print(result.to_json())
    elif not args.out:
        _print_model_table(result.to_dict())
    return 0


def _print_model_table(result: dict) -> None:
    cfg = result["config"]
    print(f"{cfg['model']}: loss {cfg['data_loss']:.10g}   accuracy {cfg['accuracy']:.4f}")
    for e in result["layers"]:
        K = len(e["gradient_coefficients"])
        print(f"\nlayer {e['layer']} ({e['name']}): {e['hessian_route']}")
        print(
            f"  Hessian top eigenvalues   {', '.join(f'{v:.6g}' for v in e['hessian_eigenvalues'][: K * K + 1])}"
        )
        print(f"  outliers {e['outlier_count']}   Papyan ranks {e['papyan_ranks']}")
        print(f"  NC1 {e['nc1']}   effective ranks H {e['effective_rank_hessian']:.4g}")


def run(args: argparse.Namespace) -> int:
    """``deepufm analyze``: measure the layers of a run directory or a model file; returns the
    exit status."""
    if args.model:
        if args.run_dir:
            raise ConfigError(
                "RUN_DIR", args.run_dir, "nothing with --model (the model comes from its factory)"
            )
        return run_model(args)
    if args.run_dir is None:
        raise ConfigError("RUN_DIR", None, "a run directory, or --model PKG.MODULE:FACTORY")
    result = analyze(
        Path(args.run_dir),
        args.layer,
        args.full,
        args.rank_rtol,
        args.relu_tol,
        args.zero_below,
        args.device,
    )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_table(result)
    if args.plot:
        _plot(result, Path(args.plot))
    return 0
