"""bfloat16/float16 parameters with float32 masters take the native kernels in one pass.

The specification is what the optimizers did before, in separate steps: written parameters are
adopted by value, tensor by tensor (``kernels.adopt_written_``), the float32 native kernel runs on
the masters with the gradients widened to float32 copies, and each parameter gets its master
rounded by ``.to(dtype)`` (``copy_``). The native ``*_lp_`` kernels must give the same bits without
the copies, and round as torch does. (The eager path differs from any native one only by torch's
CPU sqrt, 1 ulp at times: see test_native.py.)
"""
from __future__ import annotations

import pytest
import torch

from memory_probe import largest_allocation_bytes
from mup_schedulefree import AdamWScheduleFree, SGDScheduleFree, SGDScheduleFreeClosure, kernels, native

needs_native = pytest.mark.skipif(not native.available(), reason="native kernels could not be built here")
LOW = [torch.bfloat16, torch.float16]
SIZES = [1, 7, 33, 4097, 140_000, 65_537, 3]  # 140_000 > one batch of the C code: a batch alone
STEPS = 12


def _finite_bit_patterns(count: int, seed: int) -> torch.Tensor:
    """Every kind of float32: random bit patterns (all exponents), with NaN, inf and zeros removed."""
    gen = torch.Generator().manual_seed(seed)
    bits = torch.randint(-2**31, 2**31, (count,), generator=gen, dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32)
    return x[x.isfinite() & (x != 0)]


@needs_native
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_rounding_equals_torch_to_dtype_bit_for_bit(dtype):
    """Masters at 0 lerped with weight 1 onto x become x exactly, so the parameters get round(x).
    Oracle: ``x.to(dtype)``, compared as integers (ties to even, subnormals, overflow to inf, and
    values just below and above the largest finite number and the halfway points)."""
    info = torch.finfo(dtype)
    halfway = torch.tensor([1.0 + info.eps / 2, 1.0 + 1.5 * info.eps, 2.0 + info.eps, info.tiny / 2,
                            float(info.max), float(info.max) * (1 + info.eps / 4), float(info.max) * (1 + info.eps / 2),
                            float(info.max) * 1.01, 3e38, -3e38, 1e-40, -1e-40, 5.96e-8, 2.98e-8, 2.99e-8])
    x = torch.cat([_finite_bit_patterns(200_000, seed=0), torch.randn(100_000), halfway])
    x = x[x.isfinite()]
    params, masters = [torch.zeros(x.numel(), dtype=dtype)], [torch.zeros(x.numel())]
    native.lerp_lp_(params, masters, [x], 1.0)
    assert torch.equal(masters[0], x)
    expected = x.to(dtype)
    mismatched = (params[0].view(torch.int16) != expected.view(torch.int16)).nonzero().flatten()
    assert mismatched.numel() == 0, f"{mismatched.numel()} roundings differ, e.g. {x[mismatched[:5]].tolist()}"


def _setup(dtype: torch.dtype, seed: int, moments: int) -> list[list[torch.Tensor]]:
    """[params, grads (set per step), masters, zs, *moments]; params hold their rounded masters."""
    gen = torch.Generator().manual_seed(seed)
    masters = [torch.randn(n, generator=gen) for n in SIZES]
    params = [m.to(dtype) for m in masters]
    zs = [torch.randn(n, generator=gen) for n in SIZES]
    extra = [[torch.rand(n, generator=gen) for n in SIZES] for _ in range(moments)]
    return [params, [], masters, zs, *extra]


def _clone(lists):
    return [[t.clone() for t in column] for column in lists]


def _reference_step(lists, grads, rule, closure_form, scalars):
    """Adopt, widen, float32 native kernel on the masters, round back: the separate steps."""
    params, _, masters, zs, *extra = lists
    kernels.adopt_written_(params, masters)
    wide = [g.float() for g in grads]
    if rule == "adam":
        kernel = native.adam_sf_closure_step_ if closure_form else native.adam_sf_step_
    else:
        kernel = native.sgd_sf_closure_step_ if closure_form else native.sgd_sf_step_
    kernel(masters, wide, zs, *extra, **scalars)
    for p, m in zip(params, masters):
        p.copy_(m)


@needs_native
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("rule", ["adam", "sgd"])
@pytest.mark.parametrize("closure_form", [False, True], ids=["primal", "closure"])
def test_fused_low_precision_step_equals_the_eager_master_path_bit_for_bit(dtype, rule, closure_form):
    """12 steps, with weight decay, and writes into the parameters between steps: at step 4 every
    element of parameter 1 (scaled), at step 8 a single element of parameter 4 (a tensor of two
    batches). Oracle: the separate steps on copies. Parameters, masters, z and moments
    must be bitwise equal after every step. Adopting element by element instead of tensor by
    tensor fails at step 8 (the other elements of parameter 4 keep their unrounded masters)."""
    moments = 1 if rule == "adam" else 0
    fused = _setup(dtype, seed=0, moments=moments)
    eager = _clone(fused)
    gen = torch.Generator().manual_seed(1)
    for k in range(STEPS):
        grads = [torch.randn(n, generator=gen).to(dtype) for n in SIZES]
        if k == 4:
            for lists in (fused, eager):
                lists[0][1].mul_(1.5)
        if k == 8:
            for lists in (fused, eager):
                lists[0][4][1234] = 0.5
        scalars = dict(lr=1e-2, weight_decay=0.1, ckp1=1.0 / (k + 1))
        if rule == "adam":
            scalars.update(beta1=0.9, beta2=0.999, eps=1e-8, bias_correction2=1.0 - 0.999 ** (k + 1))
            native.adam_sf_step_lp_(*fused[:1], grads, *fused[2:], closure_form=closure_form, **scalars)
        else:
            scalars.update(momentum=0.9)
            native.sgd_sf_step_lp_(*fused[:1], grads, *fused[2:], closure_form=closure_form, **scalars)
        _reference_step(eager, grads, rule, closure_form, scalars)
        for name, a, b in zip(["params", "grads", "masters", "zs", "exp_avg_sqs"], fused, eager):
            for i, (x, y) in enumerate(zip(a, b)):
                assert torch.equal(x, y), f"step {k}: {name}[{i}] differs from the separate steps"


@needs_native
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_fused_low_precision_lerp_equals_the_eager_master_path(dtype):
    """The train/eval moves: both lerp formulas (|w| < 0.5 and not), after a write into one parameter.
    Oracle: the eager path with masters; bitwise equal."""
    fused = _setup(dtype, seed=2, moments=0)
    eager = _clone(fused)
    for lists in (fused, eager):
        lists[0][2].neg_()
    for weight in (0.1, -9.0, 0.9):
        for lists, use_native in ((fused, True), (eager, False)):
            kernels.lerp_(lists[0], lists[3], weight, fused=use_native, masters=lists[2])
        for a, b in zip(fused[0] + fused[2], eager[0] + eager[2]):
            assert torch.equal(a, b)


@needs_native
@pytest.mark.parametrize("make", [lambda p: AdamWScheduleFree(p, lr=1e-3), lambda p: SGDScheduleFree(p, lr=1e-2)],
                         ids=["AdamW-SF", "SGD-SF"])
def test_a_bfloat16_step_with_masters_allocates_nothing_parameter_sized(make):
    """After the first step (state creation), a step allocates no tensor as large as a parameter.
    Before the kernels took bfloat16, every step allocated a float32 copy of every gradient
    (4 MiB each here) and a bfloat16 temporary for each master check."""
    params = [torch.nn.Parameter(torch.randn(1 << 20).bfloat16()) for _ in range(4)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = make(params)
    opt.step()
    assert largest_allocation_bytes(opt.step) < 1 << 20


@needs_native
def test_closure_form_on_bfloat16_matches_its_eager_form():
    """The closure form moves x -> y -> x around each step through the masters: with fused=None
    (native) and fused=False (eager) SGD-SF's runs are bitwise equal over 5 steps (SGD has no sqrt,
    so its eager and native forms agree bit for bit where the CPU has FMA)."""
    runs = []
    for fused in (None, False):
        torch.manual_seed(0)
        model = torch.nn.Linear(64, 32).bfloat16()
        opt = SGDScheduleFreeClosure(model.parameters(), lr=0.1, weight_decay=0.01, fused=fused)
        gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            x = torch.randn(8, 64, generator=gen).bfloat16()

            def closure():
                opt.zero_grad()
                loss = model(x).float().pow(2).mean()
                loss.backward()
                return loss

            opt.step(closure)
        runs.append([p.detach().clone() for p in model.parameters()] +
                    [s["param_fp32"].clone() for s in opt.state.values()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)
