"""Time whole optimizer steps against torch's fused AdamW/SGD, measured in the same process.

    python benchmarks/bench_step.py [--device cpu|cuda] [--rounds 15] [--workloads 16x1M,transformer]

Each contender gets fresh parameters and gradients of the same shapes; contenders are
interleaved in rounds (so drifting machine load hits all of them alike). Reported per contender:
the median time per step, its 10th percentile (closer to a quiet machine), and the median over
rounds of the ratio to the baseline of its family timed in the same round: AdamW-style steps
against ``torch.optim.AdamW(fused=True)``, SGD-style against ``torch.optim.SGD(momentum=0.9,
fused=True)``. The wrappers' bases are timed alone too, so the wrappers' own cost can be read off.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from mup_schedulefree import AdamWScheduleFree, RAdamScheduleFree, ScheduleFreeWrapper, SGDScheduleFree


def workload(name: str) -> list[tuple[int, ...]]:
    """Parameter shapes of a named workload.

    Args:
        name: "16x1M" (16 tensors of 2^20 floats) or "transformer" (12 blocks of a d=512 model with
            embeddings and an untied readout with bias: 150 tensors of mixed sizes, 46.8M parameters).

    Returns:
        The list of shapes.
    """
    if name == "16x1M":
        return [(1024, 1024)] * 16
    if name == "transformer":
        d, vocab, blocks = 512, 8192, 12
        shapes: list[tuple[int, ...]] = [(vocab, d), (1024, d)]
        for _ in range(blocks):
            shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
        return shapes + [(d,), (d,), (vocab, d), (vocab,)]
    raise ValueError(f"Invalid workload: {name!r} (choose 16x1M or transformer)")


def make_params(shapes: list[tuple[int, ...]], device: str) -> list[torch.nn.Parameter]:
    """Random parameters with random gradients attached."""
    generator = torch.Generator().manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=generator).to(device))
        p.grad = torch.randn(shape, generator=generator).to(device)
        params.append(p)
    return params


CONTENDERS: dict[str, tuple[str, Callable[[list], torch.optim.Optimizer]]] = {
    "torch AdamW fused": ("adam", lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True)),
    "ours AdamW-SF": ("adam", lambda p: AdamWScheduleFree(p, lr=1e-3)),
    "ours RAdam-SF": ("adam", lambda p: RAdamScheduleFree(p, lr=1e-3)),
    "ours AdamW-SF eager": ("adam", lambda p: AdamWScheduleFree(p, lr=1e-3, fused=False)),
    "schedulefree AdamW-SF foreach": ("adam", None),
    "schedulefree AdamW-SF loop": ("adam", None),
    "torch Adam fused (wrapper's base)": ("adam", lambda p: _wrapped_adam(p)),
    "ours wrapper(Adam fused)": ("adam", lambda p: ScheduleFreeWrapper(_wrapped_adam(p))),
    "ours wrapper(Adam fused) eager": ("adam", lambda p: ScheduleFreeWrapper(_wrapped_adam(p), fused=False)),
    "schedulefree wrapper(Adam fused)": ("adam", None),
    "torch SGD fused": ("sgd", lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, fused=True)),
    "ours SGD-SF": ("sgd", lambda p: SGDScheduleFree(p, lr=1e-2)),
    "torch SGD(momentum=0) fused (base)": ("sgd", lambda p: torch.optim.SGD(p, lr=1e-2, fused=True)),
    "ours wrapper(SGD(momentum=0) fused)": ("sgd", lambda p: ScheduleFreeWrapper(
        torch.optim.SGD(p, lr=1e-2, fused=True))),
}


def _wrapped_adam(params: list) -> torch.optim.Adam:
    """The base the wrapper is meant to get: Adam without its own momentum (the wrapper supplies it)."""
    return torch.optim.Adam(params, lr=1e-3, betas=(0.0, 0.999), fused=True)


def published(foreach: bool) -> Callable[[list], torch.optim.Optimizer] | None:
    """The published schedulefree AdamW-SF (in train mode), or None when it is not installed."""
    try:
        import schedulefree
    except ImportError:
        return None

    def make(params: list) -> torch.optim.Optimizer:
        opt = schedulefree.AdamWScheduleFree(params, lr=1e-3, foreach=foreach)
        opt.train()
        return opt

    return make


def published_wrapper() -> Callable[[list], torch.optim.Optimizer] | None:
    """The published schedulefree wrapper around the same fused Adam, or None when it is not installed.

    It keeps its z in the base's state, so Adam's state is created before its first step (torch's Adam
    initialises a parameter's state only when that state is empty).
    """
    try:
        import schedulefree
    except ImportError:
        return None

    def make(params: list) -> torch.optim.Optimizer:
        base = _wrapped_adam(params)
        for p in params:
            base.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                             "exp_avg_sq": torch.zeros_like(p)}
        opt = schedulefree.ScheduleFreeWrapper(base)
        opt.train()
        return opt

    return make


def time_steps(opt: torch.optim.Optimizer, steps: int, device: str) -> float:
    """Median wall time of one step, in ms."""
    times = []
    for _ in range(steps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    """Run the benchmark and print a table per workload."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per contender per round")
    parser.add_argument("--workloads", default="16x1M,transformer")
    args = parser.parse_args()
    CONTENDERS["schedulefree AdamW-SF foreach"] = ("adam", published(True))
    CONTENDERS["schedulefree AdamW-SF loop"] = ("adam", published(False))
    CONTENDERS["schedulefree wrapper(Adam fused)"] = ("adam", published_wrapper())
    contenders = {name: spec for name, spec in CONTENDERS.items() if spec[1] is not None}
    print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()}")
    for name in args.workloads.split(","):
        shapes = workload(name)
        numel = sum(torch.Size(s).numel() for s in shapes)
        optimizers = {}
        for label, (_, make) in contenders.items():
            optimizers[label] = make(make_params(shapes, args.device))
            optimizers[label].step()  # warm-up: state creation, native build/load
        samples: dict[str, list[float]] = {label: [] for label in contenders}
        for _ in range(args.rounds):
            for label, opt in optimizers.items():
                samples[label].append(time_steps(opt, args.steps, args.device))
        baselines = {"adam": samples["torch AdamW fused"], "sgd": samples["torch SGD fused"]}
        print(f"\nworkload {name}: {len(shapes)} tensors, {numel / 1e6:.1f}M parameters")
        print(f"{'contender':38s} {'ms/step':>9s} {'p10 ms':>8s} {'ratio':>7s}  baseline")
        for label, (family, _) in contenders.items():
            base = "AdamW fused" if family == "adam" else "SGD fused"
            ratio = statistics.median(t / b for t, b in zip(samples[label], baselines[family]))
            p10 = statistics.quantiles(samples[label], n=10)[0]
            print(f"{label:38s} {statistics.median(samples[label]):9.2f} {p10:8.2f} {ratio:7.2f}  {base}")

if __name__ == "__main__":
    main()
