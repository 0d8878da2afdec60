"""Time the native schedule-free steps against torch's fused AdamW/SGD and the published schedulefree AdamW.

Usage:
    python benchmarks/bench_kernels.py [--threads 1] [--rounds 15] [--steps 3]

All timings run in one process with the same thread count on every side (OMP_NUM_THREADS and
torch.set_num_threads, which the native kernels follow). One thread by default: on a machine shared
with other jobs every parallel region waits for the slowest core it was promised, so multi-thread
ratios there measure the load. The machine may be shared and noisy, so contenders run interleaved,
a few steps each per round, and the script reports the minimum, median and maximum over rounds of
each round's median step time (exact order statistics of the rounds taken), and the median (min,
max) over rounds of the per-round ratio to the baseline (fused AdamW for the Adam-like steps,
fused SGD for the SGD-like ones). Every
contender owns fresh tensors; gradients that schedulefree overwrites in place are restored, untimed,
before each of its steps.

Also printed: the one-time cold build of the native library (fresh cache directory, fresh process),
its warm load, and the transient memory of one step (peak resident set minus resident set before
the step, in a child process where large allocations are returned to the system when freed), which
shows that the native steps allocate no parameter-sized temporaries.
"""
from __future__ import annotations

import argparse
import os
import sys

if __name__ == "__main__":  # thread count must be fixed before torch starts its OpenMP runtime
    _ARGS = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    _ARGS.add_argument("--threads", type=int, default=1,
                       help="torch and OpenMP threads, both sides (default 1: see the module docstring)")
    _ARGS.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default 15)")
    _ARGS.add_argument("--steps", type=int, default=3, help="timed steps per contender per round (default 3)")
    _ARGS.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    ARGS = _ARGS.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(ARGS.threads)

import gc  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import textwrap  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mup_schedulefree import native  # noqa: E402

LR, BETA1, BETA2, EPS, WEIGHT_DECAY, MOMENTUM = 1e-3, 0.9, 0.999, 1e-8, 0.01, 0.9
ADAM_BASELINE, SGD_BASELINE = "torch AdamW fused", "torch SGD fused"


def workloads() -> dict[str, list[tuple[int, ...]]]:
    """Parameter shapes: 16 x 1M, and a GPT-like stack (d=320, 12 layers) of 196 tensors, 17.5M elements."""
    d, layers, vocab, context = 320, 12, 8192, 512
    layer = [(d,), (d,)]  # ln1
    for _ in range(4):  # q, k, v, out projections with biases
        layer += [(d, d), (d,)]
    layer += [(d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]  # ln2, mlp
    transformer = [(vocab, d), (context, d)] + layer * layers + [(d,), (d,)]
    return {"16 x 1M": [(1024, 1024)] * 16, f"transformer {len(transformer)} tensors": transformer}


class Contender:
    """One optimizer implementation with its own tensors; ``step()`` is the timed call."""

    def __init__(self, name: str, shapes: list[tuple[int, ...]], seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.name = name
        self.params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
        self.grads = [torch.randn(s, generator=gen) for s in shapes]
        self.prepare: Callable[[], None] = lambda: None
        self.k = 0
        if name.startswith("torch") or name.startswith("schedulefree"):
            for p, g in zip(self.params, self.grads):
                p.grad = g
        if name == ADAM_BASELINE:
            self.opt = torch.optim.AdamW(self.params, lr=LR, betas=(BETA1, BETA2), eps=EPS,
                                         weight_decay=WEIGHT_DECAY, fused=True)
        elif name == SGD_BASELINE:
            self.opt = torch.optim.SGD(self.params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, fused=True)
        elif name.startswith("schedulefree"):
            import schedulefree

            self.opt = schedulefree.AdamWScheduleFree(self.params, lr=LR, betas=(BETA1, BETA2), eps=EPS,
                                                      weight_decay=WEIGHT_DECAY, foreach="foreach" in name)
            self.opt.train()
            pristine = [g.clone() for g in self.grads]  # schedulefree divides the gradients in place
            self.prepare = lambda: torch._foreach_copy_(self.grads, pristine)
        elif name.startswith("native"):
            self.ys = [p.detach() for p in self.params]
            self.zs = [y.clone() for y in self.ys]
            self.vs = [torch.zeros_like(y) for y in self.ys]
        else:
            raise ValueError(f"unknown contender: {name!r}")

    def step(self) -> None:
        ckp1, bias_correction2 = 1.0 / (self.k + 1), 1.0 - BETA2 ** (self.k + 1)
        self.k += 1
        if self.name == "native AdamW-SF":
            native.adam_sf_step_(self.ys, self.grads, self.zs, self.vs, lr=LR, beta1=BETA1, beta2=BETA2, eps=EPS,
                                 weight_decay=WEIGHT_DECAY, ckp1=ckp1, bias_correction2=bias_correction2)
        elif self.name == "native SGD-SF":
            native.sgd_sf_step_(self.ys, self.grads, self.zs, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                                ckp1=ckp1)
        else:
            self.opt.step()


CONTENDERS = {  # name -> baseline for its ratio
    ADAM_BASELINE: ADAM_BASELINE,
    SGD_BASELINE: SGD_BASELINE,
    "schedulefree AdamW foreach": ADAM_BASELINE,
    "schedulefree AdamW loop": ADAM_BASELINE,
    "native AdamW-SF": ADAM_BASELINE,
    "native SGD-SF": SGD_BASELINE,
}


def time_workload(shapes: list[tuple[int, ...]], rounds: int, steps: int) -> dict[str, dict[str, float]]:
    """Interleaved timing; per contender the min/median/max over rounds of the round's median step (ms) and of
    the per-round ratio to its baseline."""
    contenders = [Contender(name, shapes) for name in CONTENDERS]
    for c in contenders:  # warm-up: creates optimizer state, faults in pages
        for _ in range(2):
            c.prepare()
            c.step()
    per_round: dict[str, list[float]] = {c.name: [] for c in contenders}
    for r in range(rounds):
        order = contenders[r % len(contenders):] + contenders[:r % len(contenders)]
        for c in order:
            mine = []
            for _ in range(steps):
                c.prepare()
                start = time.perf_counter()
                c.step()
                mine.append(time.perf_counter() - start)
            per_round[c.name].append(statistics.median(mine))
    result = {}
    for name, baseline in CONTENDERS.items():
        ratios = [mine / base for mine, base in zip(per_round[name], per_round[baseline])]
        ms = [1e3 * t for t in per_round[name]]
        result[name] = {"ms": spread(ms, 3), "ratio": spread(ratios), "baseline": baseline}
    return result


def spread(values: list[float], digits: int = 2) -> str:
    """'median [min, max]' of the values, with ``digits`` decimals."""
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}, {max(values):.{digits}f}]"


def python_overhead_us(count: int, repeats: int = 2000) -> float:
    """Median time of one native Adam call on ``count`` one-element tensors: the Python + ctypes cost."""
    ys, gs, zs, vs = ([torch.zeros(1) for _ in range(count)] for _ in range(4))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        native.adam_sf_step_(ys, gs, zs, vs, lr=LR, beta1=BETA1, beta2=BETA2, eps=EPS, weight_decay=WEIGHT_DECAY,
                             ckp1=0.5, bias_correction2=0.5)
        samples.append(time.perf_counter() - start)
    return 1e6 * statistics.median(samples)


LOAD_TIME = """
    import time, torch
    from mup_schedulefree import native
    start = time.perf_counter()
    ok = native.available()
    print(time.perf_counter() - start, ok)
"""


def build_times() -> tuple[float, float]:
    """Seconds for ``available()`` in a fresh process: with an empty cache (cold), then again (warm)."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "MUP_SCHEDULEFREE_CACHE": cache, "PYTHONPATH": str(REPO)}
        seconds = []
        for _ in range(2):
            out = subprocess.run([sys.executable, "-c", textwrap.dedent(LOAD_TIME)], env=env, capture_output=True,
                                 text=True, check=True).stdout.split()
            if out[1] != "True":
                raise RuntimeError("native build failed in the timing subprocess")
            seconds.append(float(out[0]))
    return seconds[0], seconds[1]


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def memory_child(shapes_by_workload: dict[str, list[tuple[int, ...]]]) -> None:
    """Print, per workload and contender, the transient MiB of one warm step (peak RSS minus RSS before)."""
    for workload, shapes in shapes_by_workload.items():
        for name in CONTENDERS:
            c = Contender(name, shapes)
            for _ in range(2):
                c.prepare()
                c.step()
            c.prepare()
            gc.collect()
            before = _status_kb("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
                f.write("5")
            c.step()
            print(f"{workload}\t{name}\t{(_status_kb('VmHWM') - before) / 1024:.1f}")
            del c
            gc.collect()


def transient_memory(shapes_by_workload: dict[str, list[tuple[int, ...]]], threads: int) -> dict[tuple[str, str], str]:
    """Run ``memory_child`` in a process whose freed large blocks go back to the system at once."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    out = subprocess.run([sys.executable, __file__, "--memory-child", "--threads", str(threads)], env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        return {}
    rows = (line.split("\t") for line in out.stdout.splitlines())
    return {(workload, name): mib for workload, name, mib in rows}


def main() -> None:
    """Run every workload and print times, ratios, build cost and memory."""
    torch.set_num_threads(ARGS.threads)
    shapes_by_workload = workloads()
    if ARGS.memory_child:
        memory_child(shapes_by_workload)
        return
    if not native.available():
        sys.exit("native kernels unavailable: nothing to benchmark")
    cold, warm = build_times()
    print(f"torch {torch.__version__}; torch threads {torch.get_num_threads()}, "
          f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}; {ARGS.rounds} rounds x {ARGS.steps} steps, interleaved")
    print(f"native build: cold {cold:.2f} s (empty cache, fresh process), warm load {1e3 * warm:.0f} ms")
    print(f"native call overhead (Python + ctypes, 196 one-element tensors): {python_overhead_us(196):.0f} us")
    memory = transient_memory(shapes_by_workload, ARGS.threads)
    for workload, shapes in shapes_by_workload.items():
        numel = sum(torch.Size(s).numel() for s in shapes)
        print(f"\n{workload}: {len(shapes)} tensors, {numel / 1e6:.1f}M float32 "
              f"({4 * numel / 2**20:.0f} MiB per parameter-sized buffer)")
        print(f"  {'contender':28s} {'ms median [min, max]':>28s} {'ratio median [min, max]':>24s}  {'vs':18s} "
              f"{'step transient MiB':>18s}")
        for name, row in time_workload(shapes, ARGS.rounds, ARGS.steps).items():
            print(f"  {name:28s} {row['ms']:>28s} {row['ratio']:>24s}  {row['baseline']:18s} "
                  f"{memory.get((workload, name), 'n/a'):>18s}")


if __name__ == "__main__":
    main()
