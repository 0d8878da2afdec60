"""Time whole optimizer steps against torch's fused AdamW/SGD, measured in the same process.

    python benchmarks/bench_step.py [--device cpu|cuda] [--threads 1] [--rounds 15] [--steps 5]
        [--workloads 16x1M,transformer,800x16,200mixed,bf16-16x1M]

Each contender gets fresh parameters and gradients of the same shapes; contenders are interleaved
in rounds (so drifting machine load hits all of them alike). A round times ``--steps`` steps of
each contender and keeps their median. Reported per contender, over the rounds actually taken:
the minimum, median and maximum of those per-round times (exact order statistics, nothing
extrapolated), the median ratio to the baseline of its family timed in the same round (min and
max in brackets), and the minor page faults per step (a fresh buffer per step faults in its
pages: a step that allocates nothing shows 0). AdamW-style steps compare against
``torch.optim.AdamW(fused=True)``, SGD-style against ``torch.optim.SGD(momentum=0.9, fused=True)``,
on parameters of the workload's dtype. The wrappers' bases are timed alone too, so the wrappers'
own cost can be read off. The bf16 workload also times our AdamW-SF on float32 parameters of the
same shapes. A closing table checks the targets of issue 15 (median of the per-round ratios).
``--fresh-grads`` gives every parameter a new gradient tensor before each step (untimed), as a
training loop with ``zero_grad(set_to_none=True)`` does.

Threads: 1 by default. On a machine shared with other jobs, every parallel region of every
contender waits for the slowest core it was promised (a 1M ``copy_`` took 8 ms instead of 0.07 ms
at 2 threads on a loaded 2-core machine), so multi-thread ratios there measure the load, not the
code. ``--threads`` sets torch's threads, OMP_NUM_THREADS and so the native kernels' threads.
"""
from __future__ import annotations

import argparse
import os

if __name__ == "__main__":  # the thread count must be fixed before torch starts its OpenMP runtime
    _PARSER = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _PARSER.add_argument("--device", default="cpu")
    _PARSER.add_argument("--threads", type=int, default=1,
                         help="torch, OpenMP and native-kernel threads (default 1: see the module docstring)")
    _PARSER.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default 15)")
    _PARSER.add_argument("--steps", type=int, default=5, help="timed steps per contender per round (default 5)")
    _PARSER.add_argument("--workloads", default="16x1M,transformer,800x16,200mixed,bf16-16x1M")
    _PARSER.add_argument("--fresh-grads", action="store_true", help="give every parameter a new gradient tensor "
                         "before each step, untimed, as zero_grad(set_to_none=True) and backward do")
    _PARSER.add_argument("--contenders", default="", help="comma-separated substrings; only matching contenders "
                         "(and the baselines) run")
    ARGS = _PARSER.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(ARGS.threads)

import resource  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Callable, NamedTuple  # noqa: E402

import torch  # noqa: E402

from mup_schedulefree import AdamWScheduleFree, RAdamScheduleFree, ScheduleFreeWrapper, SGDScheduleFree  # noqa: E402


class Workload(NamedTuple):
    """Parameter shapes and their dtype."""

    shapes: list[tuple[int, ...]]
    dtype: torch.dtype


def workload(name: str) -> Workload:
    """Parameter shapes and dtype of a named workload.

    Args:
        name: "16x1M" (16 tensors of 2^20 floats); "transformer" (12 blocks of a d=512 model with
            embeddings and an untied readout with bias: 150 tensors of mixed sizes, 46.8M
            parameters); "800x16" (800 tensors of 16 elements: per-tensor overhead alone);
            "200mixed" (200 tensors of 256 to 65536 elements, sizes cycling through the powers of
            two); "bf16-16x1M" (16x1M in bfloat16).

    Returns:
        The shapes and dtype.
    """
    if name == "16x1M":
        return Workload([(1024, 1024)] * 16, torch.float32)
    if name == "bf16-16x1M":
        return Workload([(1024, 1024)] * 16, torch.bfloat16)
    if name == "800x16":
        return Workload([(16,)] * 800, torch.float32)
    if name == "200mixed":
        return Workload([(256 << (i % 9),) for i in range(200)], torch.float32)
    if name == "transformer":
        d, vocab, blocks = 512, 8192, 12
        shapes: list[tuple[int, ...]] = [(vocab, d), (1024, d)]
        for _ in range(blocks):
            shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
        return Workload(shapes + [(d,), (d,), (vocab, d), (vocab,)], torch.float32)
    raise ValueError(f"Invalid workload: {name!r} (choose 16x1M, transformer, 800x16, 200mixed or bf16-16x1M)")


def make_params(shapes: list[tuple[int, ...]], device: str, dtype: torch.dtype) -> list[torch.nn.Parameter]:
    """Random parameters with random gradients attached."""
    generator = torch.Generator().manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=generator).to(device=device, dtype=dtype))
        p.grad = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
        params.append(p)
    return params


class Contender(NamedTuple):
    """A way to build an optimizer, the family of its baseline, and a dtype overriding the workload's."""

    family: str
    make: Callable[[list], torch.optim.Optimizer] | None
    dtype: torch.dtype | None = None


def _wrapped_adam(params: list) -> torch.optim.Adam:
    """The base the wrapper is meant to get: Adam without its own momentum (the wrapper supplies it)."""
    return torch.optim.Adam(params, lr=1e-3, betas=(0.0, 0.999), fused=True)


ADAM_BASELINE, SGD_BASELINE = "torch AdamW fused", "torch SGD fused"
FLOAT32_OURS = "ours AdamW-SF on float32"
CONTENDERS: dict[str, Contender] = {
    ADAM_BASELINE: Contender("adam", lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True)),
    "ours AdamW-SF": Contender("adam", lambda p: AdamWScheduleFree(p, lr=1e-3)),
    "ours RAdam-SF": Contender("adam", lambda p: RAdamScheduleFree(p, lr=1e-3)),
    "ours AdamW-SF eager": Contender("adam", lambda p: AdamWScheduleFree(p, lr=1e-3, fused=False)),
    "schedulefree AdamW-SF foreach": Contender("adam", None),
    "schedulefree AdamW-SF loop": Contender("adam", None),
    "torch Adam fused (wrapper's base)": Contender("adam", _wrapped_adam),
    "ours wrapper(Adam fused)": Contender("adam", lambda p: ScheduleFreeWrapper(_wrapped_adam(p))),
    "ours wrapper(Adam fused) eager": Contender("adam", lambda p: ScheduleFreeWrapper(_wrapped_adam(p), fused=False)),
    "schedulefree wrapper(Adam fused)": Contender("adam", None),
    SGD_BASELINE: Contender("sgd", lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, fused=True)),
    "ours SGD-SF": Contender("sgd", lambda p: SGDScheduleFree(p, lr=1e-2)),
    "torch SGD(momentum=0) fused (base)": Contender("sgd", lambda p: torch.optim.SGD(p, lr=1e-2, fused=True)),
    "ours wrapper(SGD(momentum=0) fused)": Contender("sgd", lambda p: ScheduleFreeWrapper(
        torch.optim.SGD(p, lr=1e-2, fused=True))),
}
LOW_PRECISION_EXTRA = {FLOAT32_OURS: Contender("adam", lambda p: AdamWScheduleFree(p, lr=1e-3), torch.float32)}

# (workload, contender, baseline, the largest ratio accepted): issue 15's targets.
TARGETS = [
    ("bf16-16x1M", "ours AdamW-SF", FLOAT32_OURS, 1.3),
    ("bf16-16x1M", "ours AdamW-SF", ADAM_BASELINE, 1.5),
    ("800x16", "ours SGD-SF", SGD_BASELINE, 1.5),
    ("800x16", "ours AdamW-SF", ADAM_BASELINE, 1.15),
    ("200mixed", "ours SGD-SF", SGD_BASELINE, 1.1),
    ("200mixed", "ours AdamW-SF", ADAM_BASELINE, 1.1),
]


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


def fresh_grads(opt: torch.optim.Optimizer) -> None:
    """Give every parameter a new gradient tensor with the values of its current one."""
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = p.grad.clone()


def time_steps(opt: torch.optim.Optimizer, steps: int, device: str, fresh: bool = False) -> tuple[float, float]:
    """Median wall time of one step in ms, and minor page faults per step (``fresh``: new gradients, untimed)."""
    times = []
    faults = 0
    for _ in range(steps):
        if fresh:
            fresh_grads(opt)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
        faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    return statistics.median(times), faults / steps


def spread(values: list[float], digits: int = 2) -> str:
    """'median [min, max]' of the values, with ``digits`` decimals."""
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}, {max(values):.{digits}f}]"


def run_workload(name: str, contenders: dict[str, Contender], args: argparse.Namespace
                 ) -> dict[str, list[float]]:
    """Time every contender on one workload, print its table, return the per-round times in ms."""
    shapes, dtype = workload(name)
    numel = sum(torch.Size(s).numel() for s in shapes)
    if dtype != torch.float32:
        contenders = {**contenders, **LOW_PRECISION_EXTRA}
    optimizers = {}
    for label, spec in contenders.items():
        optimizers[label] = spec.make(make_params(shapes, args.device, spec.dtype or dtype))
        optimizers[label].step()  # warm-up: state creation, native build/load
    samples: dict[str, list[float]] = {label: [] for label in contenders}
    faults: dict[str, list[float]] = {label: [] for label in contenders}
    labels = list(optimizers)
    for r in range(args.rounds):
        for label in labels[r % len(labels):] + labels[:r % len(labels)]:
            ms, per_step = time_steps(optimizers[label], args.steps, args.device, args.fresh_grads)
            samples[label].append(ms)
            faults[label].append(per_step)
    baselines = {"adam": samples[ADAM_BASELINE], "sgd": samples[SGD_BASELINE]}
    print(f"\nworkload {name}: {len(shapes)} tensors, {numel / 1e6:.2f}M parameters, {dtype}; "
          f"{args.rounds} rounds x {args.steps} steps{', fresh gradients' if args.fresh_grads else ''}")
    print(f"{'contender':38s} {'ms/step median [min, max]':>28s} {'ratio median [min, max]':>24s} "
          f"{'faults/step':>11s}  baseline")
    for label, spec in contenders.items():
        ratios = [t / b for t, b in zip(samples[label], baselines[spec.family])]
        base = ADAM_BASELINE if spec.family == "adam" else SGD_BASELINE
        print(f"{label:38s} {spread(samples[label], 3):>28s} {spread(ratios):>24s} "
              f"{statistics.median(faults[label]):11.0f}  {base}")
    return samples


def main() -> None:
    """Run the benchmark, print a table per workload, then the targets that could be checked."""
    args = ARGS
    torch.set_num_threads(args.threads)
    CONTENDERS["schedulefree AdamW-SF foreach"] = Contender("adam", published(True))
    CONTENDERS["schedulefree AdamW-SF loop"] = Contender("adam", published(False))
    CONTENDERS["schedulefree wrapper(Adam fused)"] = Contender("adam", published_wrapper())
    wanted = [w for w in args.contenders.split(",") if w]
    contenders = {name: spec for name, spec in CONTENDERS.items() if spec.make is not None and (
        not wanted or name in (ADAM_BASELINE, SGD_BASELINE) or any(w in name for w in wanted))}
    print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}")
    results = {name: run_workload(name, contenders, args) for name in args.workloads.split(",")}
    checked = [t for t in TARGETS if t[0] in results and t[1] in results[t[0]] and t[2] in results[t[0]]]
    if checked:
        print("\ntargets (median over rounds of the per-round ratio; min and max in brackets)")
        for name, label, base, limit in checked:
            ratios = [t / b for t, b in zip(results[name][label], results[name][base])]
            verdict = "met" if statistics.median(ratios) <= limit else "MISSED"
            print(f"  {name:11s} {label:16s} / {base:26s} {spread(ratios):>22s}  <= {limit:.2f}  {verdict}")


if __name__ == "__main__":
    main()
