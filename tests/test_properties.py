"""Property-based agreement of the fast optimizers with the reference forms (x, y, z stored).

Oracle: ``AdamWScheduleFreeReference`` / ``SGDScheduleFreeReference``, which state each equation of
the method one tensor at a time. Hypothesis draws tensor shapes (scalars included), how tensors are
spread over 1-3 groups (each with its own lr factor, weight decay and warmup), the hyperparameters,
the number of steps, where an eval()/train() switch happens, and whether the fast form runs the
fused, foreach or per-tensor path.

Gradients are those of a weakly curved quadratic plus step noise, g = noise_k + 0.1 (p - target),
evaluated at each optimizer's own y: the runs feed back through their gradients, but contractively,
so float32 rounding differences do not grow. Tolerance: per tensor, max |fast - reference| <= 1e-5 *
max |reference| + 1e-6 (parameters and targets are O(1); the atol covers tensors that are all near 0).
"""
from __future__ import annotations

from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mup_schedulefree import (
    AdamWScheduleFree,
    AdamWScheduleFreeReference,
    SGDScheduleFree,
    SGDScheduleFreeReference,
)

RTOL, ATOL = 1e-5, 1e-6
LR_FACTORS = (1.0, 1.0 / 3.0, 2.0)

shapes = st.lists(st.lists(st.integers(1, 5), max_size=3).map(tuple), min_size=1, max_size=4)


@st.composite
def layouts(draw) -> dict[str, Any]:
    """Shapes, a group index per tensor, per-group decay and warmup, steps, a switch step, a path."""
    tensor_shapes = draw(shapes)
    n_groups = draw(st.integers(1, 3))
    return dict(
        shapes=tensor_shapes,
        group_of=[draw(st.integers(0, n_groups - 1)) for _ in tensor_shapes],
        decays=[draw(st.sampled_from([0.0, 0.01, 0.1])) for _ in range(n_groups)],
        warmups=[draw(st.integers(0, 6)) for _ in range(n_groups)],
        steps=draw(st.integers(3, 25)),
        switch_at=draw(st.integers(1, 25)),
        path=draw(st.sampled_from(["fused", "foreach", "single"])),
        seed=draw(st.integers(0, 2**16)),
    )


common_hypers = dict(r=st.sampled_from([0.0, 0.5, 2.0]), weight_lr_power=st.sampled_from([0.0, 1.0, 2.0]))
PROPERTY_SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None)


def _path_flags(path: str) -> dict[str, bool]:
    return {"fused": dict(fused=True, foreach=False), "foreach": dict(fused=False, foreach=True),
            "single": dict(fused=False, foreach=False)}[path]


def _run_pair(fast_cls, ref_cls, layout: dict[str, Any], hypers: dict[str, Any]) -> None:
    gen = torch.Generator().manual_seed(layout["seed"])
    init = [torch.randn(shape, generator=gen) for shape in layout["shapes"]]
    targets = [torch.randn(shape, generator=gen) for shape in layout["shapes"]]
    noise = [[torch.randn(shape, generator=gen) for shape in layout["shapes"]] for _ in range(layout["steps"])]
    fast_params = [torch.nn.Parameter(t.clone()) for t in init]
    ref_params = [torch.nn.Parameter(t.clone()) for t in init]

    def groups(params):
        out = []
        for g, (decay, warmup) in enumerate(zip(layout["decays"], layout["warmups"])):
            members = [p for p, owner in zip(params, layout["group_of"]) if owner == g]
            if members:
                out.append({"params": members, "lr": hypers["lr"] * LR_FACTORS[g], "weight_decay": decay,
                            "warmup_steps": warmup})
        return out

    fast = fast_cls(groups(fast_params), **hypers, **_path_flags(layout["path"]))
    ref = ref_cls(groups(ref_params), **hypers)
    for k in range(layout["steps"]):
        for opt, params in ((fast, fast_params), (ref, ref_params)):
            for p, n, t in zip(params, noise[k], targets):
                p.grad = n + 0.1 * (p.detach() - t)
            opt.step()
        if k + 1 == layout["switch_at"]:
            for opt in (fast, ref):
                opt.eval()
                opt.train()
    _assert_close(fast_params, ref_params, "y", layout, hypers)
    fast.eval()
    ref.eval()
    _assert_close(fast_params, ref_params, "x", layout, hypers)


def _assert_close(fast_params, ref_params, point: str, layout, hypers) -> None:
    for i, (a, b) in enumerate(zip(fast_params, ref_params)):
        err = (a - b).abs().max().item()
        tol = RTOL * b.abs().max().item() + ATOL
        assert err <= tol, f"{point}[{i}]: {err:.3g} > {tol:.3g} ({layout}, {hypers})"


@PROPERTY_SETTINGS
@given(layout=layouts(), lr=st.sampled_from([1e-3, 1e-2, 0.05]), beta1=st.sampled_from([0.5, 0.9, 0.95]),
       beta2=st.sampled_from([0.9, 0.99, 0.999]), **common_hypers)
def test_adamw_schedulefree_matches_reference(layout, lr, beta1, beta2, r, weight_lr_power):
    """AdamWScheduleFree agrees with AdamWScheduleFreeReference at y and at x (tolerance in module doc)."""
    hypers = dict(lr=lr, betas=(beta1, beta2), r=r, weight_lr_power=weight_lr_power)
    _run_pair(AdamWScheduleFree, AdamWScheduleFreeReference, layout, hypers)


@PROPERTY_SETTINGS
@given(layout=layouts(), lr=st.sampled_from([1e-2, 0.1, 0.5]), momentum=st.sampled_from([0.5, 0.9, 0.95]),
       **common_hypers)
def test_sgd_schedulefree_matches_reference(layout, lr, momentum, r, weight_lr_power):
    """SGDScheduleFree agrees with SGDScheduleFreeReference at y and at x (tolerance in module doc)."""
    hypers = dict(lr=lr, momentum=momentum, r=r, weight_lr_power=weight_lr_power)
    _run_pair(SGDScheduleFree, SGDScheduleFreeReference, layout, hypers)
