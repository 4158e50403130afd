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
    python benchmarks/full_hessian.py --degenerate --threads 1  # exact DNC points (below)

``--degenerate``: a deep linear UFM written as an ``nn.Module`` (bias-free ``nn.Linear`` layers,
the features ``H_1`` as data) at its exact DNC optimum (``deepufm.theory.dnc_optimum``). Its
Hessian with respect to one layer's weights has ``K^2`` *exactly equal* top eigenvalues
``Lambda_l`` (v1 Thm 4.1 / v2 Thm 1; the reference comes from ``dnc_constants``, not from a
solver). Each method's top ``K^2``: time, products, and how many copies of ``Lambda_l`` it
returned. deepufm here is :func:`deepufm.matrices.module_hessian` with its default options and
the public ``topk(k, tol)`` (certified).

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


# -- degenerate case: a linear UFM as an nn.Module at its exact DNC optimum ----------------------
DEGENERATE = {  # (K, n, d, L, layer): p = d^2, k = K^2
    "issue (K=3, d=65)": (3, 10, 65, 3, 2),
    "K=10, d=64": (10, 50, 64, 4, 2),
}


class LinearUFM(torch.nn.Module):
    """``Z = W_L ... W_1 X^T`` with bias-free layers; the input rows are the features ``H_1``."""

    def __init__(self, Ws):
        super().__init__()
        self.layers = torch.nn.ModuleList()
        for W in Ws:
            lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=False, dtype=W.dtype)
            lin.weight.data.copy_(W)
            self.layers.append(lin)

    def forward(self, x):
        for lin in self.layers:
            x = lin(x)
        return x


def dnc_module(K, n, d, L):
    from deepufm import UFMConfig
    from deepufm.theory import dnc_constants, dnc_optimum

    cfg = UFMConfig(K=K, n=n, d=d, L=L, lam=1e-3, activation="linear", device="cpu")
    ufm = dnc_optimum(cfg, seed=0)
    X = ufm.H1.T.contiguous()  # (N, d)
    y = torch.arange(K).repeat_interleave(n)
    return LinearUFM(list(ufm.W)), X, y, dnc_constants(cfg)


def _copies(vals, lam, rtol=1e-6):
    return int(np.sum(np.abs(np.asarray(vals) - lam) <= rtol * abs(lam)))


def degenerate(args) -> None:
    from deepufm.matrices import module_hessian

    print(
        f"Degenerate: linear UFM nn.Module at its exact DNC optimum, Hessian over one layer; "
        f"tol {args.tol:g}; {args.threads} threads; load average {os.getloadavg()[0]:.1f}\n"
    )
    print(
        "| case | p | k | method | products | time s (CPU s) | CPU ms / product "
        "| copies of Λ found / K² | max \\|θ − Λ\\| / Λ | certified |"
    )
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---|")
    for case, (K, n, d, L, layer) in DEGENERATE.items():
        model, X, y, consts = dnc_module(K, n, d, L)
        lam = consts.hessian_eigenvalue[layer - 1]
        k, name = K * K, f"layers.{layer - 1}.weight"
        loss = lambda Z, t: batch_data_loss(Z, t)  # noqa: E731  ||Z - Y||^2 / (2N)
        p = model.layers[layer - 1].weight.numel()
        v0 = np.random.default_rng(0).standard_normal(p)
        rows = []

        def clock():
            return time.perf_counter(), time.process_time()

        # deepufm: module_hessian's default options + the public certified topk
        H = module_hessian(model, loss, [(X, y)], params=[name])
        H.matmat(torch.ones(p, 1, dtype=torch.float64))  # warm-up
        counted = Counted(H.matmat)
        H.matmat = counted
        t = clock()
        res = H.topk(k, tol=args.tol)
        wall, cpu = time.perf_counter() - t[0], time.process_time() - t[1]
        cert = res.certificate
        ok = f"{'yes' if cert.certified else '**no**'} ({cert.method})"
        rows.append(
            (
                f"deepufm module_hessian(hvp={H.hvp}) + topk",
                counted.calls,
                wall,
                cpu,
                res.values.numpy(),
                ok,
            )
        )
        # curvlinops + eigsh on the same weights
        try:
            from curvlinops import HessianLinearOperator

            W = model.layers[layer - 1].weight
            Y = F.one_hot(y, K).to(X.dtype)
            op = HessianLinearOperator(
                model, torch.nn.MSELoss(reduction="sum"), [W], [(X, Y)], check_deterministic=False
            ).to_scipy()
            op.matvec(v0)
            c2 = Counted(op.matmat)
            lin = LinearOperator(
                op.shape, matvec=lambda v, c=c2: c(v.reshape(-1, 1)).ravel(), matmat=c2, dtype=float
            )
            t = clock()
            vals = eigsh(lin, k=k, which="LA", tol=args.tol, v0=v0, return_eigenvectors=False)
            wall, cpu = time.perf_counter() - t[0], time.process_time() - t[1]
            rows.append(
                (
                    "curvlinops HessianLinearOperator + eigsh",
                    c2.calls,
                    wall,
                    cpu,
                    np.sort(vals)[::-1] / (2 * X.shape[0]),
                    "— (no certificate)",
                )
            )
        except ImportError as exc:
            print(f"curvlinops not installed ({exc})")
        try:
            from hessian_eigenthings import HessianOperator, lanczos

            op = HessianOperator(
                model,
                [(X, y)],
                lambda m, b: batch_data_loss(m(b[0]), b[1]),
                param_filter=lambda nm, _, want=name: nm == want,
            )
            op.matvec(torch.ones(op.size, dtype=torch.float64))
            c3 = Counted(op.matvec)
            op.matvec = c3
            steps = min(max(4 * k, 40), p - 1)  # its Lanczos has no restarts: a fixed dimension
            t = clock()
            out = lanczos(op, k=k, max_iter=steps, which="LA", seed=0, reorthogonalize=True)
            wall, cpu = time.perf_counter() - t[0], time.process_time() - t[1]
            vals = np.sort(np.asarray(out.eigenvalues, dtype=np.float64))[::-1]
            rows.append(
                (
                    f"hessian-eigenthings HessianOperator + lanczos({steps})",
                    c3.calls,
                    wall,
                    cpu,
                    vals,
                    "— (no certificate)",
                )
            )
        except ImportError as exc:
            print(f"hessian-eigenthings not installed ({exc})")
        for method, prods, wall, cpu, vals, ok in rows:
            top = np.concatenate([vals[:k], np.zeros(max(0, k - len(vals)))])  # missing: 0
            err = float(np.max(np.abs(top - lam)) / lam)
            print(
                f"| {case} | {p} | {k} | {method} | {prods} | {wall:.3g} ({cpu:.3g}) "
                f"| {1e3 * cpu / prods:.2f} | {_copies(vals[:k], lam)} / {k} | {err:.1e} | {ok} |",
                flush=True,
            )


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
    parser.add_argument(
        "--degenerate", action="store_true", help="exact DNC points of a linear UFM module only"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.threads == 1 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:1])
    if args.degenerate:
        degenerate(args)
        return
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
