"""One function, ``kernels.route``, decides the path of every tensor; each fused op is declared once.

``route`` buckets rows by device and dtype and sends to the native kernels exactly the rows they
can take; the optimizers, the wrapper and the step plans all ask it, and an optimizer's explicit
``fused=True`` raises when ``route`` would send a row elsewhere. ``native.OPS`` declares each op's
tensor lists and named scalars, from which the ctypes signatures and the calls are built.
"""
from __future__ import annotations

import inspect

import pytest
import torch

from mup_schedulefree import AdamWScheduleFree, AdamWScheduleFreeClosure, SGDScheduleFree, kernels, native

needs_native = pytest.mark.skipif(not native.available(), reason="native kernels could not be built here")


def _paths(routes):
    return [(r.path, r.rows) for r in routes]


@needs_native
def test_route_sends_exactly_the_rows_the_kernels_take_to_native():
    """A list mixing float32 contiguous, transposed, float64 and meta tensors: the float32 rows
    (whatever their place) go native together, the transposed one eager in the same bucket,
    float64 and meta in buckets of their own; meta takes foreach by default (off the CPU)."""
    f32 = [torch.randn(3, 4), torch.randn(4, 3).t(), torch.randn(5), torch.randn(2, dtype=torch.float64),
           torch.empty(3, device="meta")]
    other = [t.clone() if t.device.type != "meta" else torch.empty(3, device="meta") for t in f32]
    other[1] = torch.randn(3, 4)
    routes = kernels.route([f32, other], fused=None, foreach=None)
    assert _paths(routes) == [("native", [0, 2]), ("loop", [1]), ("loop", [3]), ("foreach", [4])]
    assert routes[0].lists[0][1] is f32[2] and routes[0].masters is None


@needs_native
@pytest.mark.parametrize("fused, foreach, expected", [(False, None, "loop"), (False, True, "foreach"),
                                                      (None, True, "native"), (True, False, "native")])
def test_route_follows_the_flags(fused, foreach, expected):
    """fused=False never goes native; foreach only chooses the eager form."""
    lists = [[torch.randn(4)], [torch.randn(4)]]
    assert [r.path for r in kernels.route(lists, fused=fused, foreach=foreach)] == [expected]


@needs_native
def test_route_takes_low_precision_rows_only_with_their_masters():
    """bfloat16 parameters go native with float32 masters (and gradients of their dtype when the
    op takes gradients); without masters, or with a float32 gradient, they go eager."""
    params = [torch.randn(4).bfloat16(), torch.randn(4).bfloat16()]
    grads = [torch.randn(4).bfloat16(), torch.randn(4)]
    masters = [p.float() for p in params]
    routes = kernels.route([params, grads], fused=None, foreach=None, masters=masters, low_precision_grads=True)
    assert _paths(routes) == [("native", [0]), ("loop", [1])] and routes[0].masters == [masters[0]]
    assert _paths(kernels.route([params, grads], fused=None, foreach=None)) == [("loop", [0, 1])]


def test_every_native_function_takes_the_scalars_its_op_declares():
    """Each public native function passes its keyword scalars to the op of the same name; the names
    must be the op's (a wrapper and a table that drifted apart would raise at the first call)."""
    for name, op in native.OPS.items():
        fn = getattr(native, name, None)
        if fn is None:  # the closure and lerp forms of the low-precision ops share one function
            continue
        lists = {t.name for t in op.tensors}
        scalars = [p for p in inspect.signature(fn).parameters if p not in lists and p != "closure_form"]
        assert scalars == [s for s, _ in op.scalars], name


def test_signatures_come_from_the_table():
    """The ctypes signature of each op: one pointer array per list, counts, the scalars in order,
    the dtype code for low-precision ops, the thread count."""
    op = native.OPS["adam_sf_step_lp_"]
    argtypes = op.argtypes()
    assert len(argtypes) == len(op.tensors) + 2 + len(op.scalars) + 2
    assert argtypes[len(op.tensors) + 2:-2] == tuple(kind for _, kind in op.scalars)
    assert len(native.OPS["lerp_"].argtypes()) == 2 + 2 + 1 + 1


FUSED_MAKERS = {"AdamW-SF": lambda ps, **kw: AdamWScheduleFree(ps, lr=1e-2, **kw),
                "SGD-SF": lambda ps, **kw: SGDScheduleFree(ps, lr=1e-2, **kw),
                "AdamW-SF closure": lambda ps, **kw: AdamWScheduleFreeClosure(ps, lr=1e-2, **kw)}


def _step(opt, params, seed):
    gen = torch.Generator().manual_seed(seed)

    def closure():
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        return 0.0

    if "Closure" in type(opt).__name__:
        return opt.step(closure)
    closure()
    return opt.step()


@needs_native
@pytest.mark.parametrize("name", list(FUSED_MAKERS))
@pytest.mark.parametrize("dtype, master_weights", [(torch.float64, True), (torch.bfloat16, False)],
                         ids=["float64", "bfloat16 without masters"])
def test_explicit_fused_true_on_tensors_the_kernels_cannot_take_raises_before_any_change(name, dtype, master_weights):
    """fused=True is a promise, as in torch: on float64 parameters, or bfloat16 ones without master
    weights, the step raises RuntimeError naming the parameter, and parameters, state and step count
    are as before (the closure form puts the parameters back at x). fused=None takes the eager path
    for them without a word; bfloat16 with masters is taken natively under fused=True."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3, generator=gen)), torch.nn.Parameter(torch.randn(5, generator=gen))]
    opt = FUSED_MAKERS[name](params, fused=True, master_weights=master_weights)
    _step(opt, params, 1)
    with torch.no_grad():
        params[1].data = params[1].data.to(dtype)
    before = [p.detach().clone() for p in params]
    k_before = opt.param_groups[0]["k"]
    with pytest.raises(RuntimeError, match=r"fused=True cannot be kept for parameter 1 of its group \(shape \(5,\)\)"):
        _step(opt, params, 2)
    assert opt.param_groups[0]["k"] == k_before
    for p, b in zip(params, before):
        assert p.dtype == b.dtype and torch.allclose(p, b, rtol=0, atol=1e-6)
    opt.param_groups[0]["fused"] = None
    _step(opt, params, 3)
    if dtype is torch.bfloat16:
        opt = FUSED_MAKERS[name]([torch.nn.Parameter(torch.randn(6).bfloat16())], fused=True)
        _step(opt, opt.param_groups[0]["params"], 4)
