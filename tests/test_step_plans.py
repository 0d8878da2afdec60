"""The per-group step plans (checked, bucketed lists bound to native calls) change no number.

ScheduleFreeWrapper keeps plans of its entry and exit passes the same way (``_cached_passes``).

A primal-form step reuses the plan built after its last full-path step while nothing it was built
from changed. Each test makes one change between steps and compares the run with the same run in
which plans are never used (``_cached_step_plans`` returns None, so every step takes the full
path). The oracle is bitwise equality of parameters and every state tensor. Each test also
checks which path the step after the change took, so a test cannot pass by never caching.
"""
from __future__ import annotations

import gc
import weakref
from typing import Callable

import pytest
import torch

from mup_schedulefree import AdamWScheduleFree, RAdamScheduleFree, ScheduleFreeWrapper, SGDScheduleFree, native

needs_native = pytest.mark.skipif(not native.available(), reason="native kernels could not be built here")
OPTIMIZERS = {"AdamW-SF": lambda ps: AdamWScheduleFree(ps, lr=1e-2, weight_decay=0.01),
              "RAdam-SF": lambda ps: RAdamScheduleFree(ps, lr=1e-2),
              "SGD-SF": lambda ps: SGDScheduleFree(ps, lr=1e-2, weight_decay=0.01)}
SHAPES = [(5, 3), (7,), (40, 40), (1,), (33,)]


def _params(dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]


def _give_grads(params, step: int, skip: tuple[int, ...] = ()) -> None:
    """New gradient tensors every step (as ``zero_grad(set_to_none=True)`` and backward make)."""
    gen = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(params):
        g = torch.randn(p.shape, generator=gen).to(p.dtype)
        p.grad = None if i in skip else g


class PathCounter:
    """Counts, per step, whether the cached plans were taken (``cached=False``: never take them)."""

    def __init__(self, opt, cached: bool):
        self.taken: list[bool] = []
        name = "_cached_passes" if isinstance(opt, ScheduleFreeWrapper) else "_cached_step_plans"
        original = getattr(opt, name)

        def wrapped():
            ready = original() if cached else None
            self.taken.append(ready is not None)
            return ready

        setattr(opt, name, wrapped)


def _state(opt) -> list[torch.Tensor]:
    return [t for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)]


Change = Callable[[list, object], None]


def _run(make, change: Change, at: int, cached: bool, steps: int = 6, dtype=torch.float32,
         skips: dict[int, tuple[int, ...]] | None = None):
    params = _params(dtype)
    opt = make(params[:4])
    counter = PathCounter(opt, cached)
    for k in range(steps):
        if k == at:
            params = change(params, opt) or params
        _give_grads(params, k, skip=(skips or {}).get(k, ()))
        opt.step()
    opt.eval()
    return [p.detach().clone() for p in params] + [t.clone() for t in _state(opt)], counter.taken


def _same_as_uncached(make, change: Change, at: int = 3, **kwargs) -> list[bool]:
    got, taken = _run(make, change, at, cached=True, **kwargs)
    expected, _ = _run(make, change, at, cached=False, **kwargs)
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected)):
        assert a.dtype == b.dtype and torch.equal(a, b), f"tensor {i} differs from the run without plans"
    return taken


def _add_group(params, opt):
    opt.add_param_group({"params": [params[4]]})


def _load_state(params, opt):
    opt.load_state_dict(opt.state_dict())


def _new_storage(params, opt):
    with torch.no_grad():
        params[1].data = params[1].data.clone() * 0.5


def _to_bfloat16(params, opt):
    for p in params:
        p.data = p.data.bfloat16()


def _replace_state_tensor(params, opt):
    opt.state[params[0]]["z"] = opt.state[params[0]]["z"].clone() + 1.0


def _swap_state_storage(params, opt):
    """Same tensor objects, new storage (as ``state["z"].data = ...`` in an ``optimizer_to(device)``
    snippet); the old storage is freed, so a call still bound to it would write into freed memory."""
    for value in opt.state[params[0]].values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            value.data = value.data.clone()


def _replace_state_dict(params, opt):
    opt.state[params[2]] = {key: value.clone() for key, value in opt.state[params[2]].items()}


def _eager_flag(params, opt):
    opt.param_groups[0]["fused"] = False


def _nothing(params, opt):
    return None


CHANGES = {"add_param_group": _add_group, "load_state_dict": _load_state, "parameter storage": _new_storage,
           "dtype to bfloat16": _to_bfloat16, "a state tensor replaced": _replace_state_tensor,
           "state storage swapped under the same tensors": _swap_state_storage,
           "a state dict replaced": _replace_state_dict, "fused=False set in the group": _eager_flag}


@needs_native
@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("change", list(CHANGES))
def test_a_change_between_steps_sends_the_next_step_through_the_full_path(name, change):
    """Steps 1-2 reuse the plan; the step after the change takes the full path (the plan no longer
    matches), the one after reuses a new plan unless the change made the group uncacheable; and the
    run equals the run without plans, bit for bit."""
    taken = _same_as_uncached(OPTIMIZERS[name], CHANGES[change])
    assert taken[:3] == [False, True, True] and taken[3] is False, taken
    assert taken[4] is (change != "fused=False set in the group"), taken


@needs_native
@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("skip", [(1,), (0, 3)], ids=["one vanishes", "two vanish"])
def test_gradients_that_vanish_and_reappear_are_followed(name, skip):
    """At steps 2 and 3 some parameters get no gradient (they keep their point, their state stays),
    from step 4 on they have one again: each change sends one step through the full path, the
    plan is rebuilt for the set with gradients, and the run equals the run without plans."""
    taken = _same_as_uncached(OPTIMIZERS[name], _nothing, steps=7, skips={2: skip, 3: skip})
    assert taken == [False, True, False, True, False, True, True], taken


@needs_native
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_bfloat16_parameters_with_masters_take_the_plans(name):
    """bfloat16 parameters with masters: plans bind the low-precision kernel; bitwise equal."""
    taken = _same_as_uncached(OPTIMIZERS[name], _new_storage, dtype=torch.bfloat16)
    assert taken == [False, True, True, False, True, True], taken


@needs_native
def test_a_gradient_the_kernels_cannot_take_falls_back_without_changing_anything():
    """A non-contiguous gradient at step 3 cannot be bound: that step takes the full path (which runs
    it eagerly) and the result equals the run without plans."""
    runs = []
    for cached in (True, False):
        params = _params()
        opt = AdamWScheduleFree(params, lr=1e-2)
        counter = PathCounter(opt, cached)
        for k in range(5):
            _give_grads(params, k)
            if k == 3:
                params[0].grad = torch.randn(3, 5, generator=torch.Generator().manual_seed(7)).t()
            opt.step()
        runs.append(([p.detach().clone() for p in params] + _state(opt), counter.taken))
    assert runs[0][1] == [False, True, True, False, False]
    for a, b in zip(runs[0][0], runs[1][0]):
        assert torch.equal(a, b)


@needs_native
def test_plans_keep_no_gradient_alive():
    """After a cached step, a gradient the user drops is freed: the plan holds no reference to it
    (binding the gradients of each step by reference would keep a whole model's gradients alive)."""
    params = _params()
    opt = AdamWScheduleFree(params, lr=1e-2)
    for k in range(3):
        _give_grads(params, k)
        opt.step()
    refs = [weakref.ref(p.grad) for p in params]
    for p in params:
        p.grad = None
    gc.collect()
    assert all(r() is None for r in refs)


@needs_native
def test_prepared_calls_take_scalars_by_name_and_need_their_gradients_bound():
    """Scalars are named: a misspelt or missing one raises TypeError naming both lists; a prepared
    call whose gradients were not bound for this call raises instead of reading freed memory."""
    ys, gs, zs = [torch.zeros(4)], [torch.ones(4)], [torch.zeros(4)]
    prepared = native.Prepared("sgd_sf_step_", [ys, gs, zs], rebind=("grads",))
    scalars = dict(lr=0.1, momentum=0.9, weight_decay=0.0, ckp1=0.5)
    with pytest.raises(RuntimeError, match=r"bind \['grads'\]"):
        prepared(**scalars)
    assert prepared.bind("grads", gs)
    with pytest.raises(TypeError, match=r"missing \['momentum'\], unexpected \['beta'\]"):
        prepared(lr=0.1, beta=0.9, weight_decay=0.0, ckp1=0.5)
    prepared(**scalars)
    assert torch.equal(zs[0], torch.full((4,), -0.1))
    with pytest.raises(RuntimeError, match="bind"):
        prepared(**scalars)
    assert not prepared.bind("grads", [torch.ones(5)]), "a gradient of another size is refused"
    assert not prepared.bind("grads", [torch.ones(4, dtype=torch.float64)]), "another dtype is refused"


def test_plans_are_not_pickled_with_the_optimizer():
    """Plans hold raw pointers; a deepcopy must never reuse them (it rebuilds its own)."""
    import copy

    params = _params()
    opt = SGDScheduleFree(params, lr=1e-2)
    for k in range(3):
        _give_grads(params, k)
        opt.step()
    clone = copy.deepcopy(opt)
    assert getattr(clone, "_plans", None) is None


def _wrapper_flag(params, opt):
    opt.param_groups[0]["sf_fused"] = False


WRAPPERS = {"wrapper(SGD)": lambda ps: ScheduleFreeWrapper(torch.optim.SGD(ps, lr=0.1), weight_decay_at_y=0.01),
            "wrapper(Adam)": lambda ps: ScheduleFreeWrapper(torch.optim.Adam(ps, lr=1e-2, betas=(0.0, 0.999)))}
# change -> whether the step after the one that rebuilt the plan takes a plan again
WRAPPER_CHANGES = {"add_param_group": (_add_group, True), "load_state_dict": (_load_state, True),
                   "parameter storage": (_new_storage, True), "a z slot replaced": (_replace_state_tensor, True),
                   "z storage swapped under the same tensor": (_swap_state_storage, True),
                   "a state dict replaced": (_replace_state_dict, True), "dtype to bfloat16": (_to_bfloat16, False),
                   "sf_fused=False set in the group": (_wrapper_flag, False)}


@needs_native
@pytest.mark.parametrize("name", list(WRAPPERS))
@pytest.mark.parametrize("change", list(WRAPPER_CHANGES))
def test_the_wrapper_passes_follow_every_change_and_match_the_run_without_plans(name, change):
    """As for the optimizers: the step after each change takes the full path, the run equals the run
    without plans bit for bit, and plans come back unless the change took the passes off the native
    kernels (bfloat16 z slots, sf_fused=False)."""
    how, cached_again = WRAPPER_CHANGES[change]
    if name == "wrapper(Adam)" and change == "dtype to bfloat16":
        pytest.skip("torch's Adam keeps its state in the old dtype and fails on its own")
    taken = _same_as_uncached(WRAPPERS[name], how)
    assert taken[:4] == [False, True, True, False] and taken[4] is cached_again, taken


@needs_native
def test_the_wrapper_follows_gradients_that_vanish_and_reappear():
    """Gradients missing at steps 2 and 3: each change of the set takes the full path; bitwise equal."""
    taken = _same_as_uncached(WRAPPERS["wrapper(Adam)"], _nothing, steps=7, skips={2: (1,), 3: (1,)})
    assert taken == [False, True, False, True, False, True, True], taken
