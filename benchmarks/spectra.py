"""Layer-Hessian spectra: deepufm's structured forms vs curvlinops + eigsh vs dense autograd.

One run, side by side (K=10, n=50 so N=500, L=4, layer 2, float64, the seeded initial point):

  (a) linear MSE layer Hessian, d = 64 ... 4096: deepufm's full spectrum (all d^2 eigenvalues) plus
      the top-K^2 eigenvectors (materialised for d <= 256, Kronecker-factored u ⊗ w beyond);
  (b) the top-K^2 eigenvalues of the same matrix from curvlinops' HessianLinearOperator + scipy
      eigsh (d <= 256), and from dense torch.func.hessian + eigvalsh where it fits (d = 64);
  (c) ReLU MSE layer Hessian, d = 32, 64, 128: deepufm's exact full spectrum (eigenvalues only)
      and, in its own cell, its top-K^2 eigenpairs (block Lanczos on the structured product, the
      same k and tol as the peer: a like-for-like row) vs dense autograd and curvlinops + eigsh;
  (d) Papyan decomposition + the three knockout spectra, linear at d = 64 and ReLU at d = 64
      (p x p dense route, N K >= p) and d = 128 (N K x N K row-space route), vs the same from
      explicit Jacobian rows and dense matrices where those fit.

Every cell runs in its own subprocess after a small warm-up of the same code path, so its time
excludes first-call overheads and its peak memory is its own. deepufm's cells that take under a
second are repeated five times and report the median; the peers run once. ``peak MB`` is the
process's resident-set high-water mark (``resource.getrusage(RUSAGE_SELF).ru_maxrss``),
interpreter and torch included (the baseline in the header is a cell that only imports and builds
the model).

    python benchmarks/spectra.py              # everything (~10 min on 2 idle cores)
    python benchmarks/spectra.py --threads 1  # every cell on one pinned CPU (a shared machine)
    python benchmarks/spectra.py --quick      # d <= 128, no d = 256 peer

Peers are optional; install curvlinops without letting pip replace the CPU torch:
    pip install --no-deps curvlinops-for-pytorch backpack-for-pytorch einconv einops \
        linear_operator opt-einsum jaxtyping wadler-lindig
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from deepufm import DeepUFM, UFMConfig
from deepufm.matrices import layer_hessian, papyan_decomposition
from deepufm.models import functional as Fn
from deepufm.theory import dnc_constants, dnc_optimum

K, n, L, LAYER = 10, 50, 4, 2
K2 = K * K
TOL = 1e-10  # eigsh's relative residual tolerance, for curvlinops and for our Lanczos alike
DNC = "relu-dnc"  # the degenerate cells: ReLU at an exact Definition-2 DNC point
EIGENTHINGS_STEPS = 400  # its Lanczos has no restarts: a fixed Krylov dimension (ARPACK: ~300)


def ufm_config(d: int, activation: str) -> UFMConfig:
    act = "relu" if activation == DNC else activation
    return UFMConfig(K=K, n=n, d=d, L=L, lam=1e-3, activation=act, device="cpu")


def model_for(d: int, activation: str) -> DeepUFM:
    """The seeded initial point, or (``activation="relu-dnc"``) the exact DNC point of Definition
    2, whose layer Hessian has ``K^2`` exactly equal outliers ``Lambda_l`` (v2 Theorems 1 and 7)."""
    if activation == DNC:
        return dnc_optimum(ufm_config(d, activation), seed=0, nonnegative=True)
    return DeepUFM.init(ufm_config(d, activation))


def layer_loss(model: DeepUFM):
    """The data loss as a function of vec(W_LAYER) alone (the dense reference)."""
    cfg = model.config

    def f(w):
        Ws = list(model.W)
        Ws[LAYER - 1] = w.reshape(model.W[LAYER - 1].shape)
        return Fn.data_loss(Fn.forward(model.H1, Ws, cfg.activation)[-1], cfg.loss, cfg.K, cfg.n)

    return f


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> dict:
    """Wall and process-CPU seconds since ``start``. On a shared machine the CPU time is the
    load-independent one (every cell is pinned to the same number of threads)."""
    wall, cpu = _clock()
    return {"time": wall - start[0], "cpu": cpu - start[1]}


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- cells ------------------------------------------------------------------------------------------
def cell_baseline(d: int, activation: str) -> dict:
    model_for(d, activation)
    return {"time": 0.0, "cpu": 0.0}


def _ours(model: DeepUFM) -> dict:
    t = _clock()
    H = layer_hessian(model, LAYER)
    vals = H.eigvalsh()
    out = {"top": vals[:K2].tolist(), "count": vals.numel()}
    if model.config.activation == "linear":
        if model.config.d <= 256:
            top, vecs = H.topk(K2)
        else:  # 1.7e9 numbers at d = 4096: keep the eigenvectors as Kronecker factors
            top, U, W = H.topk_factors(K2)
            vecs = (U[:, :1].unsqueeze(1) * W[:, :1].unsqueeze(0)).reshape(-1, 1)
        # residual of the leading eigenvector, as a correctness check of the timed result
        out["resid"] = float((H.matvec(vecs[:, 0]) - top[0] * vecs[:, 0]).norm() / top[0])
    out.update(_since(t))
    return out


def _ours_topk(model: DeepUFM) -> dict:
    """The top-K² eigenpairs alone (block Lanczos on the structured product beyond p ~ 2000)."""
    t = _clock()
    H = layer_hessian(model, LAYER)
    res = H.topk(K2, tol=TOL)
    top, vecs = res
    elapsed = _since(t)
    # worst relative residual ||H x - theta x|| / theta over all K² pairs (what tol bounds)
    resid = (H.matmat(vecs) - vecs * top).norm(dim=0) / top.abs()
    cert = res.certificate
    return {
        **elapsed,
        "top": top.tolist(),
        "resid": float(resid.max()),
        "certified": cert.certified,
        "products": cert.products,
        "route": cert.method,
    }


def _median_of(fn, model: DeepUFM, repeats: int = 5) -> dict:
    """``fn(model)``, repeated when it takes under a second; median times (the machine is shared)."""
    runs = [fn(model)]
    while runs[0]["time"] < 1.0 and len(runs) < repeats:
        runs.append(fn(model))
    out = runs[0]
    for key in ("time", "cpu"):
        out[key] = statistics.median(r[key] for r in runs)
    out["repeats"] = len(runs)
    return out


def cell_ours(d: int, activation: str) -> dict:
    _ours(model_for(12, activation))  # warm-up
    return _median_of(_ours, model_for(d, activation))


def cell_ours_topk(d: int, activation: str) -> dict:
    _ours_topk(model_for(24, activation))  # warm-up: p = 576, already the Lanczos route
    return _median_of(_ours_topk, model_for(d, activation))


def _dense(model: DeepUFM) -> dict:
    t = _clock()
    Hd = torch.func.hessian(layer_loss(model))(model.W[LAYER - 1].reshape(-1))
    vals = torch.linalg.eigvalsh(Hd).flip(0)
    return {**_since(t), "top": vals[:K2].tolist()}


def cell_dense(d: int, activation: str) -> dict:
    _dense(model_for(10, activation))
    return _dense(model_for(d, activation))


def _head(model: DeepUFM):
    """``W_LAYER`` as the only parameter of a module, then the fixed downstream layers, and its
    data: the features entering layer ``LAYER`` ``(N, d_in)`` and the one-hot targets ``(N, K)``."""
    act = model.config.activation
    Hs = model.features()
    W = torch.nn.Parameter(model.W[LAYER - 1].clone())
    rest = [w.clone() for w in model.W[LAYER:]]

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.W = W

        def forward(self, x):  # x: (batch, d_in)
            z = x @ self.W.T
            for Wm in rest:
                if act == "relu":
                    z = torch.where(z >= 0, z, torch.zeros_like(z))
                z = z @ Wm.T
            return z

    X, Y = Hs[LAYER - 1].T.contiguous(), Fn.labels(K, n).T.contiguous()
    return Head(), W, X, Y


def _curvlinops(model: DeepUFM) -> dict:
    from curvlinops import HessianLinearOperator
    from scipy.sparse.linalg import LinearOperator, eigsh

    head, W, X, Y = _head(model)
    op = HessianLinearOperator(
        head, torch.nn.MSELoss(reduction="sum"), [W], [(X, Y)], check_deterministic=False
    ).to_scipy()
    count = [0]

    def mm(V):
        V = V.reshape(op.shape[0], -1)
        count[0] += V.shape[1]
        return op.matmat(V)

    counted = LinearOperator(op.shape, matvec=lambda v: mm(v).ravel(), matmat=mm, dtype=op.dtype)
    t = _clock()
    vals = eigsh(counted, k=min(K2, W.numel() - 2), which="LA", tol=TOL)[0]
    # MSELoss(sum) = 2N * D: its Hessian is 2N times ours
    top = sorted((float(v) / (2 * K * n) for v in vals), reverse=True)
    return {**_since(t), "top": top, "products": count[0]}


def _eigenthings(model: DeepUFM) -> dict:
    """hessian-eigenthings 1.0: ``HessianOperator`` (double backward) + its ``lanczos`` (full
    re-orthogonalisation, ``EIGENTHINGS_STEPS`` steps, no restarts)."""
    from hessian_eigenthings import HessianOperator, lanczos

    head, W, X, Y = _head(model)
    N = X.shape[0]
    op = HessianOperator(
        head, [(X, Y)], lambda m, b: 0.5 * (m(b[0]) - b[1]).pow(2).sum() / N
    )  # our data loss ||Z - Y||^2 / (2N) directly
    t = _clock()
    steps = min(EIGENTHINGS_STEPS, W.numel() - 1)
    res = lanczos(op, k=K2, max_iter=steps, which="LA", seed=0, reorthogonalize=True)
    top = sorted((float(v) for v in res.eigenvalues), reverse=True)
    return {**_since(t), "top": top, "products": int(res.iterations)}


def cell_eigenthings(d: int, activation: str) -> dict:
    _eigenthings(model_for(12, activation))
    return _eigenthings(model_for(d, activation))


def cell_curvlinops(d: int, activation: str) -> dict:
    _curvlinops(model_for(12, activation))
    return _curvlinops(model_for(d, activation))


def _papyan(model: DeepUFM) -> dict:
    t = _clock()
    dec = papyan_decomposition(model, LAYER)
    ranks = {k: int((M.eigvalsh() > 1e-10).sum()) for k, M in dec.components().items()}
    ko = {k: M.eigvalsh() for k, M in dec.knockouts().items()}  # = knockout_spectra(model, LAYER)
    top = [v for k in ("class", "cross", "within") for v in ko[k][:K2].tolist()]
    return {**_since(t), "ranks": ranks, "top": top}


def _papyan_dense(model: DeepUFM) -> dict:
    """The textbook route: explicit rows v_icc' (N K x p), dense p x p matrices, dense eigvalsh."""
    cfg = model.config
    t = _clock()
    Hd = torch.func.hessian(layer_loss(model))(model.W[LAYER - 1].reshape(-1))

    def logits(w):
        Ws = list(model.W)
        Ws[LAYER - 1] = w.reshape(model.W[LAYER - 1].shape)
        return Fn.forward(model.H1, Ws, cfg.activation)[-1]

    v = torch.func.jacrev(logits)(model.W[LAYER - 1].reshape(-1))  # (K, N, p)
    v = v.permute(1, 0, 2).reshape(cfg.K, cfg.n, cfg.K, -1)
    v_pair = v.mean(dim=1)
    v_c = v_pair.mean(dim=1)
    cross = (v_pair - v_c.unsqueeze(1)).reshape(-1, v.shape[-1])
    within = (v - v_pair.unsqueeze(1)).reshape(-1, v.shape[-1])
    parts = {
        "class": v_c.T @ v_c,
        "cross": cross.T @ cross / cfg.K,
        "within": within.T @ within / cfg.N,
    }
    ranks = {k: int((torch.linalg.eigvalsh(M) > 1e-10).sum()) for k, M in parts.items()}
    ko = {k: torch.linalg.eigvalsh(Hd - M).flip(0) for k, M in parts.items()}
    top = [v for k in ("class", "cross", "within") for v in ko[k][:K2].tolist()]
    return {**_since(t), "ranks": ranks, "top": top}


def cell_papyan(d: int, activation: str) -> dict:
    _papyan(model_for(12, activation))
    return _median_of(_papyan, model_for(d, activation))


def cell_papyan_dense(d: int, activation: str) -> dict:
    _papyan_dense(model_for(12, activation))
    return _papyan_dense(model_for(d, activation))


CELLS = {
    "baseline": cell_baseline,
    "ours": cell_ours,
    "ours_topk": cell_ours_topk,
    "dense": cell_dense,
    "curvlinops": cell_curvlinops,
    "eigenthings": cell_eigenthings,
    "papyan": cell_papyan,
    "papyan_dense": cell_papyan_dense,
}


def pin_threads(threads: int) -> None:
    """This process on ``threads`` CPUs with as many torch threads (BLAS pools are sized by the
    environment that :func:`run_cell` passes)."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])
    torch.set_num_threads(threads)


def run_cell(
    kind: str, d: int, activation: str, timeout: float, threads: int | None = None
) -> dict | None:
    cmd = [sys.executable, __file__, "--cell", kind, str(d), activation]
    env = dict(os.environ)
    if threads:
        cmd += ["--threads", str(threads)]
        env.update({v: str(threads) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
    try:
        out = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, check=True, env=env
        )
    except subprocess.TimeoutExpired:
        return {"time": float("inf"), "note": f"> {timeout:.0f} s"}
    except subprocess.CalledProcessError as exc:
        lines = exc.stderr.strip().splitlines() or ["failed"]
        return {"time": float("nan"), "note": lines[-1][:60]}
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- table ------------------------------------------------------------------------------------------
def _t(c: dict | None) -> str:
    if c is None:
        return "—"
    return c["note"] if "note" in c else f"{c['time']:.3g} ({c['cpu']:.3g})"


def _mb(c: dict | None) -> str:
    return "—" if c is None or "note" in c else f"{c['peak_mb']:.0f}"


def _ratio(peer: dict | None, ours: dict) -> str:
    """Wall-time ratio (CPU-time ratio)."""
    if peer is None or "note" in ours:
        return "—"
    if "note" in peer:  # timed out: a lower bound
        return f"> {float(peer['note'].split()[1]) / ours['time']:.0f}x"
    return f"{peer['time'] / ours['time']:.0f}x ({peer['cpu'] / ours['cpu']:.0f}x)"


def _diff(ours: dict, *refs: dict | None) -> str:
    for ref in refs:
        if ref and "top" in ref and "top" in ours:
            a = torch.tensor(ours["top"], dtype=torch.float64)
            b = torch.tensor(ref["top"], dtype=torch.float64)
            m = min(a.numel(), b.numel())
            return f"{float((a[:m] - b[:m]).abs().max() / b.abs().max()):.1e}"
    return "—"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--cell", nargs=3, metavar=("KIND", "D", "ACT"), help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="d <= 128 only")
    ap.add_argument(
        "--degenerate", action="store_true", help="only the degenerate (exact DNC point) table"
    )
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds per peer cell")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="pin every cell (ours and the peers alike) to this many CPUs and BLAS/torch threads",
    )
    args = ap.parse_args()
    if args.threads:
        pin_threads(args.threads)
    if args.cell:
        kind, d, act = args.cell
        res = CELLS[kind](int(d), act)
        res["peak_mb"] = peak_mb()
        print(json.dumps(res))
        return

    def cell(kind: str, d: int, act: str, timeout: float) -> dict | None:
        return run_cell(kind, d, act, timeout, args.threads)

    if args.degenerate:
        degenerate_table(cell, [64] if args.quick else [32, 64])
        return
    base = cell("baseline", 64, "linear", 120)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; K={K}, n={n} (N={K * n}), "
        f"L={L}, layer {LAYER}, float64; baseline process peak {base['peak_mb']:.0f} MB\n",
        flush=True,
    )
    print(
        "| cell | d | p = d² | deepufm s (CPU s) | deepufm peak MB | curvlinops+eigsh top-K² s "
        "(CPU s) | peak MB | dense autograd s (CPU s) | peak MB | curvlinops / deepufm "
        "| dense / deepufm | top-K² max rel. diff | eigvec residual |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    goals = {}

    def row(name: str, d: int, ours: dict, peer: dict | None, dense: dict | None) -> None:
        resid = f"{ours['resid']:.0e}" if "resid" in ours else "—"
        print(
            f"| {name} | {d} | {d * d} | {_t(ours)} | {_mb(ours)} | {_t(peer)} | {_mb(peer)} "
            f"| {_t(dense)} | {_mb(dense)} | {_ratio(peer, ours)} | {_ratio(dense, ours)} "
            f"| {_diff(ours, peer, dense)} | {resid} |",
            flush=True,
        )

    for d in [64, 128] if args.quick else [64, 128, 256, 1024, 4096]:
        ours = cell("ours", d, "linear", 600)
        peer_max = 128 if args.quick else 256
        peer = cell("curvlinops", d, "linear", args.timeout) if d <= peer_max else None
        dense = cell("dense", d, "linear", args.timeout) if d <= 64 else None
        row("(a, b) linear: full spectrum + top-K² vectors", d, ours, peer, dense)
        goals[("linear", d)] = (ours, peer)
    for d in [32, 64, 128]:
        full = cell("ours", d, "relu", 600)
        topk = cell("ours_topk", d, "relu", 600)
        peer = cell("curvlinops", d, "relu", args.timeout) if d <= 64 or not args.quick else None
        dense = cell("dense", d, "relu", args.timeout) if d <= 64 else None
        row("(c) ReLU: exact full spectrum (eigenvalues)", d, full, peer, dense)
        row(f"(c) ReLU: top-K² eigenpairs (tol {TOL:g})", d, topk, peer, dense)
        goals[("relu", d)] = (full, topk, peer)
    papyan = {}
    for act, d in [("linear", 64), ("relu", 64), ("relu", 128)]:
        pap = cell("papyan", d, act, 600)
        pap_dense = cell("papyan_dense", d, act, 600) if d <= 64 else None
        row(f"(d) {act}: Papyan terms + ranks + 3 knockout spectra", d, pap, None, pap_dense)
        papyan[(act, d)] = (pap, pap_dense)
    print()
    for (act, d), (pap, pap_dense) in papyan.items():
        if "ranks" in pap:
            ref = pap_dense.get("ranks") if pap_dense else "—"
            print(f"Papyan ranks, {act}, d={d} (deepufm / dense): {pap['ranks']} / {ref}")

    print("\nGoals:")
    ours, peer = goals.get(("linear", 128), (None, None))
    if ours and peer and "note" not in ours:
        print(
            f"  full spectrum + top-K² vectors vs curvlinops top-K² at d=128: "
            f"{_ratio(peer, ours)} (goal >= 1000x)"
        )
    ours = goals.get(("linear", 4096), (None, None))[0]
    if ours and "note" not in ours:
        print(
            f"  full spectrum at d=4096 ({ours['count']:.3g} eigenvalues): {ours['time']:.2f} s "
            f"(goal < 10 s)"
        )
    full, topk, peer = goals.get(("relu", 64), (None, None, None))
    if full and peer:
        print(
            f"  ReLU top-K² vs curvlinops top-K² (same k, same tol) at d=64: {_ratio(peer, topk)}; "
            f"exact full spectrum vs curvlinops top-K²: {_ratio(peer, full)} (goal >= 100x)"
        )
    for (act, d), (pap, _) in papyan.items():
        print(f"  Papyan + 3 knockouts, {act}, d={d}: {_t(pap)} s")
    print()
    degenerate_table(cell, [32, 64])


def _copies(top: list[float], value: float, rtol: float = 1e-6) -> int:
    return sum(abs(v - value) <= rtol * abs(value) for v in top)


def degenerate_table(cell, dims: list[int]) -> None:
    """Top-K² of the ReLU layer Hessian at an exact DNC point: ``K^2`` exactly equal outliers
    ``Lambda_l`` (from ``dnc_constants``, not from any solver), the rest zero. Which methods
    return every copy?"""
    print(
        f"Degenerate: ReLU layer-{LAYER} Hessian at an exact Definition-2 DNC point, top K² = {K2}"
        f", tol {TOL:g}; reference Lambda_{LAYER} from the closed form (v2 Thm 1)\n"
    )
    print(
        "| d | p | method | time s (CPU s) | products | CPU ms / product | copies of Λ found / K² "
        "| max \\|θ − Λ\\| / Λ over the top K² | certified | CPU time / deepufm |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for d in dims:
        lam = dnc_constants(ufm_config(d, DNC)).hessian_eigenvalue[LAYER - 1]
        ours = cell("ours_topk", d, DNC, 600)
        peers = {
            "deepufm `layer_hessian(...).topk(K², tol)`": ours,
            "curvlinops `HessianLinearOperator` + eigsh": cell("curvlinops", d, DNC, 600),
            f"hessian-eigenthings + lanczos({EIGENTHINGS_STEPS})": cell("eigenthings", d, DNC, 600),
        }
        for name, c in peers.items():
            if c is None or "note" in c:
                print(f"| {d} | {d * d} | {name} | {_t(c)} | — | — | — | — | — | — |")
                continue
            top = c["top"][:K2] + [0.0] * (K2 - len(c["top"][:K2]))  # missing values: count as 0
            err = max(abs(v - lam) for v in top) / lam
            prods = c.get("products")
            ms = f"{1e3 * c['cpu'] / prods:.2f}" if prods else "—"
            cert = {True: "yes", False: "**no**"}.get(c.get("certified"), "— (no certificate)")
            if "route" in c:
                cert += f" ({c['route']})"
            ratio = f"{c['cpu'] / ours['cpu']:.1f}x" if "cpu" in ours else "—"
            print(
                f"| {d} | {d * d} | {name} | {_t(c)} | {prods or '—'} | {ms} "
                f"| {_copies(c['top'], lam)} / {K2} | {err:.1e} | {cert} | {ratio} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
