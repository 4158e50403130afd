"""Top-K² eigenvalues of the full network Hessian: deepufm vs curvlinops vs hessian-eigenthings.

The network is the quick preset's (``deepufm.training.network.preset("quick")``: quarter-width
ResNet-20 + a 4-layer linear head of width 16, MNIST), either as trained in a run directory
(``--run DIR``, written by ``deepufm.training.network.train``) or at its seeded initial point. The
Hessian is that of the data loss ``||Z - Y||^2 / (2B)`` with respect to *every* parameter
(backbone convolutions, BatchNorm affine parameters, head), BatchNorm in eval mode, float64, on
``--per-class`` images of each class of the preset's training data (one batch).

Side by side, with the same start vector and tolerance:

* **deepufm**: :class:`deepufm.matrices.ModuleHessian` with classic double-backward products
  (``hvp="autograd"``) + :func:`deepufm.matrices.lanczos_topk` (block Lanczos: blocks of 8
  columns share one pass over the data);
* **curvlinops**: ``HessianLinearOperator(...).to_scipy()`` + scipy ``eigsh`` (its products
  are forward-over-reverse, ``jvp(jacrev)``); ``MSELoss(reduction="sum")`` is ``2B`` times our loss;
* **hessian-eigenthings** (1.0): ``HessianOperator`` (autograd double backward) + its ``lanczos``
  with full re-orthogonalisation and as many Lanczos steps as ``eigsh`` needed products for
  deepufm (it has no restart/tolerance loop: a fixed Krylov dimension).

Reported: products, wall time, time per product, the ratio to deepufm and the largest relative
difference of the top-K² eigenvalues from deepufm's. Also the cost of one product in deepufm's
``torch.func`` modes (``hvp="forward"``, forward-over-reverse; ``"reverse"``), for comparison.

    python benchmarks/full_hessian.py --run runs/quick-mnist
    python benchmarks/full_hessian.py --per-class 2          # the initial point, 20 images

Peers are optional; install them without letting pip replace the CPU torch:
    pip install --no-deps curvlinops-for-pytorch backpack-for-pytorch einconv einops \
        linear_operator opt-einsum jaxtyping wadler-lindig hessian-eigenthings
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import LinearOperator, eigsh

from deepufm.data import balanced_indices
from deepufm.matrices import ModuleHessian, lanczos_topk
from deepufm.models import curvature_mode
from deepufm.models.resnet import batch_data_loss
from deepufm.training.network import build_model, load_network_data, preset, read_network_config


class Counted:
    """Counts the products a solver asks of ``matmat``."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, V):
        self.calls += 1 if V.ndim == 1 else V.shape[-1]
        return self.fn(V)


def network_and_data(run: str | None, per_class: int):
    if run is None:
        config = preset("quick")
    else:
        config = read_network_config(run)[0]
    data = load_network_data(config)
    idx = torch.as_tensor(balanced_indices(data.y.numpy(), data.K, per_class, seed=0))
    X, y = data.X[idx].to(torch.float64), data.y[idx]
    model = build_model(config.replace(dtype="float64"), data)
    if run is not None:
        payload = torch.load(os.path.join(run, "checkpoint.pt"), weights_only=True)
        model.load_state_dict(payload["model"])  # float32 values copied into float64
    model.eval()
    return config, model, X, y, data.K


def ours(model, X, y, k, tol, v0, hvp="autograd"):
    with curvature_mode(model, "eval"):
        H = ModuleHessian(model, batch_data_loss, [(X, y)], hvp=hvp)
        H.matmat(torch.as_tensor(v0).reshape(-1, 1))  # warm-up
        counted = Counted(H.matmat)
        H.matmat = counted
        t = time.perf_counter()
        vals = lanczos_topk(H, k, tol=tol, seed=0)[0]
        return vals.numpy(), time.perf_counter() - t, counted.calls


def product_time(model, X, y, v0, hvp, repeat=3):
    with curvature_mode(model, "eval"):
        H = ModuleHessian(model, batch_data_loss, [(X, y)], hvp=hvp)
        V = torch.as_tensor(v0).reshape(-1, 1)
        H.matmat(V)
        t = time.perf_counter()
        for _ in range(repeat):
            H.matmat(V)
        return (time.perf_counter() - t) / repeat


def curvlinops_eigsh(model, X, y, k, tol, v0):
    from curvlinops import HessianLinearOperator

    B = X.shape[0]
    Y = F.one_hot(y, model.K).to(X.dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    op = HessianLinearOperator(
        model, torch.nn.MSELoss(reduction="sum"), params, [(X, Y)], check_deterministic=False
    ).to_scipy()
    op.matvec(v0)  # warm-up
    counted = Counted(op.matmat)
    wrapped = LinearOperator(
        op.shape, matvec=lambda v: counted(v.reshape(-1, 1)).ravel(), matmat=counted, dtype=float
    )
    t = time.perf_counter()
    vals = eigsh(wrapped, k=k, which="LA", tol=tol, v0=v0, return_eigenvectors=False)
    return np.sort(vals)[::-1] / (2 * B), time.perf_counter() - t, counted.calls


def eigenthings_lanczos(model, X, y, k, steps):
    from hessian_eigenthings import HessianOperator, lanczos

    op = HessianOperator(model, [(X, y)], lambda m, b: batch_data_loss(m(b[0]), b[1]))
    op.matvec(torch.ones(op.size, dtype=torch.float64))  # warm-up
    counted = Counted(op.matvec)
    op.matvec = counted
    t = time.perf_counter()
    res = lanczos(op, k=k, max_iter=steps, which="LA", seed=0, reorthogonalize=True)
    vals = np.sort(np.asarray(res.eigenvalues, dtype=np.float64))[::-1]
    return vals, time.perf_counter() - t, counted.calls


def rel_diff(a, b):
    return float(np.max(np.abs(a - b) / np.abs(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="a quick-preset network run directory")
    parser.add_argument("--per-class", type=int, default=2, help="images per class in the batch")
    parser.add_argument("--tol", type=float, default=1e-10, help="eigsh relative tolerance")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-peers", action="store_true")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config, model, X, y, K = network_and_data(args.run, args.per_class)
    k = K * K
    p = sum(q.numel() for q in model.parameters())
    v0 = np.random.default_rng(0).standard_normal(p)
    print(
        f"network: quick preset ({'trained: ' + args.run if args.run else 'initial point'}), "
        f"width {config.width}, blocks {config.blocks}, head d={config.d} L={config.L}; "
        f"p={p} parameters; batch {X.shape[0]} images; k=K^2={k}; tol={args.tol}; float64; "
        f"{args.threads} threads; {platform.processor() or platform.machine()}; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    results = {"p": p, "batch": int(X.shape[0]), "k": k, "tol": args.tol}
    ref, t_ours, n_ours = ours(model, X, y, k, args.tol, v0)
    results["deepufm"] = {"seconds": t_ours, "products": n_ours, "eigenvalues": ref.tolist()}
    t_fwd = product_time(model, X, y, v0, "forward")
    t_rev = product_time(model, X, y, v0, "reverse")
    results["deepufm_forward_product_seconds"] = t_fwd
    results["deepufm_reverse_product_seconds"] = t_rev
    rows = [("deepufm ModuleHessian(autograd) + block Lanczos", t_ours, n_ours, 0.0)]
    print(
        f"deepufm: {t_ours:.1f} s, {n_ours} products; forward product {1e3 * t_fwd:.0f} ms",
        flush=True,
    )
    if not args.skip_peers:
        try:
            vals, t, n = curvlinops_eigsh(model, X, y, k, args.tol, v0)
            results["curvlinops"] = {"seconds": t, "products": n, "eigenvalues": vals.tolist()}
            rows.append(("curvlinops HessianLinearOperator + eigsh", t, n, rel_diff(vals, ref)))
        except ImportError as exc:
            print(f"curvlinops not installed ({exc})")
        try:
            vals, t, n = eigenthings_lanczos(model, X, y, k, n_ours)
            results["hessian_eigenthings"] = {
                "seconds": t,
                "products": n,
                "eigenvalues": vals.tolist(),
            }
            rows.append(
                ("hessian-eigenthings HessianOperator + lanczos", t, n, rel_diff(vals, ref))
            )
        except ImportError as exc:
            print(f"hessian-eigenthings not installed ({exc})")
    print()
    print("| method | products | time s | ms / product | time / deepufm | top-K² max rel. diff |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, t, n, diff in rows:
        print(f"| {name} | {n} | {t:.1f} | {1e3 * t / n:.1f} | {t / t_ours:.2f}x | {diff:.1e} |")
    print(f"\none deepufm product: forward {1e3 * t_fwd:.0f} ms, reverse {1e3 * t_rev:.0f} ms")
    print(f"top eigenvalue {ref[0]:.6g}, K²-th {ref[k - 1]:.6g}, ratio {ref[0] / ref[k - 1]:.3g}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
