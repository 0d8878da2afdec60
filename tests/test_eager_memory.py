"""The eager ``_foreach`` path keeps its temporaries bounded by a run of tensors, not by the model.

Its list-wide operations allocate a whole list of temporaries at once (the Adam direction holds two:
the denominator and the quotient). kernels.FOREACH_BUCKET_NUMEL cuts the lists into runs of
consecutive tensors, so on a device where ``foreach`` is the default the extra memory of a step is
that of a run. Cutting changes no number: every operation is elementwise.
"""
from __future__ import annotations

import pytest
import torch

from memory_probe import peak_temporary_bytes
from mup_schedulefree import kernels

COUNT, NUMEL = 8, 1 << 15           # 8 tensors of 128 KiB: 1 MiB per parameter-sized list
RUN = 2 * NUMEL                     # two tensors per run when cut
ADAM = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, ckp1=0.1, bias_correction2=0.5)


def _lists(count: int, seed: int) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [[torch.rand(NUMEL, generator=gen) for _ in range(COUNT)] for _ in range(count)]


def _adam_step(lists):
    kernels.adam_step_(*lists, **ADAM, foreach=True)


def _sgd_step(lists):
    kernels.sgd_step_(*lists, lr=0.1, momentum=0.9, weight_decay=0.01, ckp1=0.1, foreach=True)


def _wrapper_passes(lists):
    kernels.wrapper_enter_(*lists, decay=0.01, momentum=0.9, foreach=True)
    kernels.wrapper_exit_(*lists, ckp1=0.1, momentum=0.9, foreach=True)


STEPS = [(_adam_step, 4), (_sgd_step, 3), (_wrapper_passes, 2)]


def test_adam_direction_holds_two_runs_of_temporaries_not_two_models(monkeypatch):
    """AdamW-SF's foreach step, cut into runs of two tensors, peaks at two runs of temporaries
    (512 KiB); uncut, the control, it peaks at two parameter-sized lists (2 MiB)."""
    lists = _lists(4, seed=0)
    monkeypatch.setattr(kernels, "FOREACH_BUCKET_NUMEL", RUN)
    cut = peak_temporary_bytes(lambda: _adam_step(lists))
    monkeypatch.setattr(kernels, "FOREACH_BUCKET_NUMEL", COUNT * NUMEL)
    whole = peak_temporary_bytes(lambda: _adam_step(lists))
    assert cut <= 2 * RUN * 4, f"cut into runs: {cut} bytes"
    assert whole >= 2 * COUNT * NUMEL * 4, f"control, one run: {whole} bytes"


@pytest.mark.parametrize("step, count", STEPS, ids=[fn.__name__ for fn, _ in STEPS])
def test_cutting_into_runs_changes_no_number(monkeypatch, step, count):
    """The same step on the same tensors, cut into runs of two tensors or taken whole, leaves every
    tensor bitwise equal (a run of one tensor larger than the limit is taken alone)."""
    cut, whole = _lists(count, seed=1), _lists(count, seed=1)
    for column in range(count):  # index 3 of every list: one tensor three runs long
        large = torch.rand(3 * RUN, generator=torch.Generator().manual_seed(2 + column))
        cut[column][3], whole[column][3] = large, large.clone()
    monkeypatch.setattr(kernels, "FOREACH_BUCKET_NUMEL", RUN)
    step(cut)
    monkeypatch.setattr(kernels, "FOREACH_BUCKET_NUMEL", 1 << 40)
    step(whole)
    for a, b in zip(sum(cut, []), sum(whole, [])):
        assert torch.equal(a, b)
