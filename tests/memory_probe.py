"""What torch's CPU allocator hands out while a function runs, from torch's profiler.

The profiler charges each allocation to the operator that made it (``self_cpu_memory_usage``,
children excluded so nothing counts twice) and each free to the operator, or the
``record_function`` scope, that was running when it happened; outside any scope a free is a
``[memory]`` event of its own. A scope's frees carry no time, so :func:`peak_temporary_bytes`
only works for code that opens no scope of its own (``Optimizer.step`` opens one: measure the
functions it calls, or use :func:`largest_allocation_bytes`).
"""
from __future__ import annotations

from typing import Callable

from torch.profiler import ProfilerActivity, profile


def _events(fn: Callable[[], object]) -> list:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return [e for e in prof.events() if e.self_cpu_memory_usage != 0]


def largest_allocation_bytes(fn: Callable[[], object]) -> int:
    """Bytes of the largest single allocation made while ``fn`` runs (0 if none)."""
    return max((e.self_cpu_memory_usage for e in _events(fn)), default=0)


def peak_temporary_bytes(fn: Callable[[], object]) -> int:
    """Largest running total of allocations minus frees, in time order, while ``fn`` runs.

    Raises:
        ValueError: if a ``record_function`` scope holds memory of its own (its frees cannot be
            placed in time).
    """
    events = _events(fn)
    if any(getattr(e, "is_user_annotation", False) for e in events):
        raise ValueError("fn opens a record_function scope that holds memory; its frees cannot be placed in time")
    held = peak = 0
    for event in sorted(events, key=lambda e: e.time_range.start):
        held += event.self_cpu_memory_usage
        peak = max(peak, held)
    return peak
