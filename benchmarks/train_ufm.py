"""Training throughput: deepufm's fused trainer vs an eager autograd loop vs JAX jit + lax.scan.

One process, same initial point, same number of full-batch steps; prints steps/s, the ratios
and the relative difference of the final losses (so the comparison is of equal work).

    python benchmarks/train_ufm.py                 # all three configs, float64 and float32
    python benchmarks/train_ufm.py --steps 500 --configs 4,25,64,4

JAX is optional (``pip install jax jaxlib``); without it that column is skipped.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from deepufm import DeepUFM, UFMConfig
from deepufm.models import functional as Fn
from deepufm.training import FusedStep, TrainConfig, TrainState, train
from deepufm.training.gradients import step_engine, step_threads, torch_threads

CONFIGS = ((4, 5, 32, 4), (4, 25, 64, 4), (10, 100, 128, 4))
LR, LAM = 0.1, 1e-3


def default_steps(cfg: UFMConfig) -> int:
    """2,000 steps, fewer where an eager step costs milliseconds (keeps the run to minutes)."""
    return 2000 if cfg.d * cfg.d * cfg.N <= 64 * 64 * 100 else 400


def time_ours(cfg: UFMConfig, steps: int, engine: str = "auto") -> tuple[float, float]:
    """The fused step as `train()` drives it: one `run` call between probes, its thread policy;
    ``engine`` forces the library of the plain ReLU loop (`FusedStep`)."""
    model = DeepUFM.init(cfg)
    step = FusedStep(cfg, model.params, engine=engine)
    with torch.no_grad(), torch_threads(step_threads(cfg)):
        step.run(LR, 10)
        model = DeepUFM.init(cfg)
        step = FusedStep(cfg, model.params, engine=engine)
        t = time.perf_counter()
        step.run(LR, steps)
        dt = time.perf_counter() - t
    return steps / dt, float(model.total_loss())


def time_ours_with_probes(cfg: UFMConfig, steps: int) -> float:
    """End to end through `train()`: log-spaced probes (loss, gradient, NC1 per layer) included."""
    state = TrainState(DeepUFM.init(cfg))
    t = time.perf_counter()
    train(state, TrainConfig(lr=LR, epochs=steps))
    return steps / (time.perf_counter() - t)


def time_eager(cfg: UFMConfig, steps: int) -> tuple[float, float]:
    """What the field writes: autograd + torch.optim.SGD with weight decay, default threads."""
    model = DeepUFM.init(cfg)
    params = [p.clone().requires_grad_(True) for p in model.params]
    opt = torch.optim.SGD(params, lr=LR, weight_decay=LAM)
    Y = Fn.labels(cfg.K, cfg.n, params[0].dtype)

    def run(k: int) -> None:
        for _ in range(k):
            opt.zero_grad()
            X = params[0]
            for l, W in enumerate(params[1:], start=1):
                X = W @ X
                if cfg.activation == "relu" and l < cfg.L:
                    X = torch.relu(X)
            loss = 0.5 * ((X - Y) ** 2).sum() / cfg.N
            loss.backward()
            opt.step()

    run(10)
    with torch.no_grad():
        for p, q in zip(params, DeepUFM.init(cfg).params):
            p.copy_(q)
    t = time.perf_counter()
    run(steps)
    dt = time.perf_counter() - t
    with torch.no_grad():
        final = float(
            DeepUFM(cfg, params[0].detach(), [p.detach() for p in params[1:]]).total_loss()
        )
    return steps / dt, final


def time_jax(cfg: UFMConfig, steps: int, repeats: int) -> tuple[float, float, float] | None:
    """JAX ``jit`` of ``lax.scan`` over ``grad``: (median steps/s, final loss, compile s), or None."""
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        return None
    jax.config.update("jax_enable_x64", cfg.dtype == "float64")
    model = DeepUFM.init(cfg)
    params = [jnp.asarray(p.numpy()) for p in model.params]
    Y = jnp.asarray(Fn.labels(cfg.K, cfg.n, model.H1.dtype).numpy())

    def objective(ps):
        X = ps[0]
        for l, W in enumerate(ps[1:], start=1):
            X = W @ X
            if cfg.activation == "relu" and l < cfg.L:
                X = jnp.maximum(X, 0)
        return 0.5 * jnp.sum((X - Y) ** 2) / cfg.N + 0.5 * LAM * sum(jnp.sum(p**2) for p in ps)

    grad = jax.grad(objective)

    @jax.jit
    def run(ps):
        def body(ps, _):
            return [p - LR * g for p, g in zip(ps, grad(ps))], None

        return jax.lax.scan(body, ps, None, length=steps)[0]

    t = time.perf_counter()
    jax.block_until_ready(run(params))  # compile + one run
    compile_s = time.perf_counter() - t
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = jax.block_until_ready(run(params))
        rates.append(steps / (time.perf_counter() - t))
    return statistics.median(rates), float(objective(out)), compile_s


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--steps",
        type=int,
        default=None,
        help="full-batch steps per timing (default 2000; 400 at the largest configuration)",
    )
    ap.add_argument("--repeats", type=int, default=3, help="timings per cell (median reported)")
    ap.add_argument(
        "--configs", nargs="*", default=[",".join(map(str, c)) for c in CONFIGS], help="K,n,d,L"
    )
    ap.add_argument("--dtypes", nargs="*", default=["float64", "float32"])
    ap.add_argument("--activation", choices=["linear", "relu", "both"], default="both")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="pin the process to this many CPUs and set torch's threads to it, so that JAX's "
        "thread pool (sized from the CPU affinity) gets the same (default: all CPUs)",
    )
    args = ap.parse_args()
    if args.threads:
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])
        torch.set_num_threads(args.threads)
    acts = ["linear", "relu"] if args.activation == "both" else [args.activation]
    cells = [
        UFMConfig(K=K, n=n, d=d, L=L, lam=LAM, activation=act, dtype=dtype, device="cpu")
        for K, n, d, L in (map(int, spec.split(",")) for spec in args.configs)
        for act in acts
        for dtype in args.dtypes
    ]
    # PyTorch timings first, JAX last: XLA's worker threads would otherwise compete with torch.
    rows = []
    for cfg in cells:
        steps = args.steps or default_steps(cfg)
        # Interleaved, so that load from other processes hits both sides alike.
        # The NumPy engine's cells also time the same loop in torch (the "torch engine" column).
        two = step_engine(cfg, torch.device("cpu")) == "numpy"
        ours, eager, torch_engine = [], [], []
        for _ in range(args.repeats):
            ours.append(time_ours(cfg, steps))
            if two:
                torch_engine.append(time_ours(cfg, steps, engine="torch")[0])
            eager.append(time_eager(cfg, steps))
        probes = time_ours_with_probes(cfg, steps)
        rows.append(
            [cfg, steps, statistics.median(r for r, _ in ours), probes,
             statistics.median(r for r, _ in eager), ours[-1][1], eager[-1][1],
             statistics.median(torch_engine) if two else None]
        )  # fmt: skip
    for row in rows:
        row.append(time_jax(row[0], row[1], args.repeats))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpus} CPUs, "
        f"lr={LR}, lam={LAM}; median of {args.repeats}\n"
    )
    print(
        "| K | n | d | L | act | dtype | steps | deepufm steps/s | engine | torch engine steps/s "
        "(deepufm/it) | "
        "with probes | eager steps/s | JAX steps/s (compile s) | deepufm/eager | deepufm/JAX | "
        "max rel. loss diff |"
    )
    print("|---" * 16 + "|")
    for cfg, steps, ours, probes, eager, loss_ours, loss_eager, torch_eng, jx in rows:
        losses = [loss_ours, loss_eager] + ([jx[1]] if jx else [])
        diff = max(abs(x - loss_ours) / abs(loss_ours) for x in losses)
        jcol = f"{jx[0]:.0f} ({jx[2]:.1f})" if jx else "n/a"
        jratio = f"{ours / jx[0]:.1f}x" if jx else "n/a"
        print(
            f"| {cfg.K} | {cfg.n} | {cfg.d} | {cfg.L} | {cfg.activation} | {cfg.dtype} | {steps} | "
            f"{ours:.0f} | {'numpy' if torch_eng else 'torch'} | "
            f"{f'{torch_eng:.0f} ({ours / torch_eng:.2f}x)' if torch_eng else '='} | "
            f"{probes:.0f} | {eager:.0f} | {jcol} | {ours / eager:.1f}x | {jratio} | {diff:.1e} |"
        )


if __name__ == "__main__":
    main()
