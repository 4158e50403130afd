"""Layer-Hessian spectra: deepufm's structured forms vs curvlinops + eigsh vs dense autograd.

Each cell runs in its own subprocess so that its peak memory (max RSS) is its own; the driver
prints one Markdown table with times, ratios and peak memory. K=10, n=50 (N=500), L=4, layer 2,
float64, at the seeded initial point.

    python benchmarks/spectra.py              # all cells (a few minutes on 2 cores)
    python benchmarks/spectra.py --quick      # small sizes only

Peers (optional) are installed without letting pip replace the CPU torch:
    pip install --no-deps curvlinops-for-pytorch backpack-for-pytorch einconv einops linear_operator opt-einsum jaxtyping wadler-lindig
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from deepufm import DeepUFM, UFMConfig
from deepufm.matrices import knockout_spectra, layer_hessian, papyan_decomposition
from deepufm.models import functional as Fn

K, n, L, LAYER = 10, 50, 4, 2


def model_for(d: int, activation: str) -> DeepUFM:
    return DeepUFM.init(
        UFMConfig(K=K, n=n, d=d, L=L, lam=1e-3, activation=activation, device="cpu")
    )


def layer_loss(model: DeepUFM):
    """The data loss as a function of vec(W_layer) alone, for the dense reference."""
    cfg = model.config

    def f(w):
        Ws = list(model.W)
        Ws[LAYER - 1] = w.reshape(model.W[LAYER - 1].shape)
        return Fn.data_loss(Fn.forward(model.H1, Ws, cfg.activation)[-1], cfg.loss, cfg.K, cfg.n)

    return f


def _ours_once(model: DeepUFM, activation: str) -> list[float]:
    H = layer_hessian(model, LAYER)
    if activation == "linear" and H.size > 2**21:
        # 100 dense eigenvectors of length d^2 would not fit (13 GB at d=4096): they are returned
        # in Kronecker-factored form, which is what KroneckerGram.topk multiplies out.
        H.eigvalsh()
        (p_vals, _), (q_vals, _) = H.factor_eigh()
        return (
            torch.sort(torch.outer(p_vals, q_vals).reshape(-1), descending=True)
            .values[: K * K]
            .tolist()
        )
    if activation == "linear":
        H.eigvalsh()
        top, _vecs = H.topk(K * K)  # the top-K^2 eigenvectors are part of the timed work
        return top.tolist()
    vals, _vecs = H.eigh()  # one eigendecomposition gives the spectrum and the vectors
    return vals[: K * K].tolist()


def cell_ours_full(d: int, activation: str) -> dict:
    """Median of 3 timings after one untimed call (library and kernel warm-up at this size)."""
    model = model_for(d, activation)
    top = _ours_once(model, activation)
    times = []
    for _ in range(3 if d <= 1024 or activation == "linear" else 1):
        t = time.perf_counter()
        _ours_once(model, activation)
        times.append(time.perf_counter() - t)
    return {"time": sorted(times)[len(times) // 2], "top": top}


def cell_dense(d: int, activation: str) -> dict:
    model = model_for(d, activation)
    t = time.perf_counter()
    Hd = torch.func.hessian(layer_loss(model))(model.W[LAYER - 1].reshape(-1))
    vals = torch.linalg.eigvalsh(Hd).flip(0)
    return {"time": time.perf_counter() - t, "top": vals[: K * K].tolist()}


def cell_curvlinops(d: int, activation: str) -> dict:
    from curvlinops import HessianLinearOperator
    from scipy.sparse.linalg import eigsh

    model = model_for(d, activation)
    Hs = model.features()
    W = torch.nn.Parameter(model.W[LAYER - 1].clone())
    rest = [w.clone() for w in model.W[LAYER:]]

    class Head(torch.nn.Module):
        """W_LAYER as the only parameter, followed by the fixed downstream layers."""

        def __init__(self):
            super().__init__()
            self.W = W

        def forward(self, x):  # x: (batch, d_in) features of layer LAYER
            z = x @ self.W.T
            for Wm in rest:
                if activation == "relu":
                    z = torch.where(z >= 0, z, torch.zeros_like(z))
                z = z @ Wm.T
            return z

    net = Head()

    X, Y = Hs[LAYER - 1].T.contiguous(), Fn.labels(K, n).T.contiguous()
    # MSELoss(sum) = 2N * D, so its Hessian is 2N times ours.
    op = HessianLinearOperator(
        net, torch.nn.MSELoss(reduction="sum"), [W], [(X, Y)], check_deterministic=False
    ).to_scipy()
    t = time.perf_counter()
    vals = eigsh(op, k=K * K, which="LA", tol=1e-10, return_eigenvectors=False)
    dt = time.perf_counter() - t
    return {"time": dt, "top": sorted((v / (2 * K * n) for v in vals), reverse=True)}


def cell_papyan(d: int, activation: str) -> dict:
    model = model_for(d, activation)
    t = time.perf_counter()
    dec = papyan_decomposition(model, LAYER)
    ko = knockout_spectra(model, LAYER)
    return {
        "time": time.perf_counter() - t,
        "ranks": [int((p.eigvalsh() > 1e-10).sum()) for p in dec.components().values()],
        "top": ko["class"][:3].tolist(),
    }


CELLS = {
    "ours": cell_ours_full,
    "dense": cell_dense,
    "curvlinops": cell_curvlinops,
    "papyan": cell_papyan,
}


def run_cell(kind: str, d: int, activation: str, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--cell", kind, str(d), activation]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)
    except subprocess.TimeoutExpired:
        return {"time": float("inf"), "note": f"> {timeout:.0f} s"}
    except subprocess.CalledProcessError as exc:
        return {"time": float("nan"), "note": exc.stderr.strip().splitlines()[-1][:60]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--cell", nargs=3, metavar=("KIND", "D", "ACT"), help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="small sizes only")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per peer cell")
    args = ap.parse_args()
    if args.cell:
        kind, d, act = args.cell
        res = CELLS[kind](int(d), act)
        res["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(res))
        return
    rows = []
    lin = [64, 128] if args.quick else [64, 128, 256, 1024, 4096]
    for d in lin:
        ours = run_cell("ours", d, "linear", 600)
        peer = (
            run_cell("curvlinops", d, "linear", args.timeout)
            if d <= (128 if args.quick else 256)
            else None
        )
        dense = run_cell("dense", d, "linear", args.timeout) if d <= 64 else None
        rows.append(("(a/b) linear layer Hessian", d, ours, peer, dense))
    for d in [32, 64] if args.quick else [32, 64, 128]:
        ours = run_cell("ours", d, "relu", 600)
        peer = run_cell("curvlinops", d, "relu", args.timeout) if d <= 64 else None
        dense = run_cell("dense", d, "relu", args.timeout) if d <= 64 else None
        rows.append(("(c) ReLU layer Hessian", d, ours, peer, dense))
    rows.append(("(d) Papyan + 3 knockouts", 64, run_cell("papyan", 64, "linear", 600), None, None))

    def fmt(c):
        if c is None:
            return "—", "—"
        if "note" in c:
            return c["note"], "—"
        return f"{c['time']:.3g}", f"{c['peak_mb']:.0f}"

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; K={K}, n={n}, L={L}, layer {LAYER}, float64\n"
    )
    print(
        "| cell | d | params | deepufm s (full spectrum + top-K² vectors) | peak MB | curvlinops+eigsh s (top K²) | peak MB | "
        "dense autograd+eigh s | peak MB | curvlinops/deepufm | top-K² max rel. diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, d, ours, peer, dense in rows:
        o, p, de = fmt(ours), fmt(peer), fmt(dense)
        ratio = (
            f"{peer['time'] / ours['time']:.0f}x"
            if peer and "note" not in peer and "note" not in ours
            else "—"
        )
        diff = "—"
        ref = peer if peer and "top" in peer else dense if dense and "top" in dense else None
        if ref and "top" in ours:
            a, b = torch.tensor(ours["top"]), torch.tensor(ref["top"])
            diff = f"{float((a - b).abs().max() / b.abs().max()):.1e}"
        print(
            f"| {name} | {d} | {d * d} | {o[0]} | {o[1]} | {p[0]} | {p[1]} | {de[0]} | {de[1]} | {ratio} | {diff} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
