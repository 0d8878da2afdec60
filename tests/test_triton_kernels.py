"""The Triton CUDA kernels compute what the CPU kernels compute, bit for bit, checked through Triton's interpreter.

On a machine without a GPU, ``TRITON_INTERPRET=1`` runs the very kernels a GPU would run on CPU
tensors. The reference is the native CPU kernel (``csrc/sf_kernels.c``), which follows torch's
eager operations rounding for rounding; where it is not built, the eager path, within 4 ulps.
"""
from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

import mup_schedulefree as msf
from mup_schedulefree import kernels

pytest.importorskip("triton", reason="triton is not installed (it is a dev extra: pip install -e '.[dev]')")

SIZES = [(3,), (1100,), (7, 5), (0,)]
STEPS = 100


@pytest.fixture(scope="module")
def tk():
    """``mup_schedulefree.triton_kernels`` with its kernels built for the interpreter."""
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    name = "mup_schedulefree.triton_kernels"
    module = importlib.reload(sys.modules[name]) if name in sys.modules else importlib.import_module(name)
    yield module
    if before is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = before
    importlib.reload(module)


def reference_fused() -> bool:
    """The native CPU kernels are the bit-for-bit reference when they are built."""
    return kernels._native() is not None


def tensors(generator: torch.Generator, dtype=torch.float32) -> list[torch.Tensor]:
    return [torch.randn(size, generator=generator).to(dtype) for size in SIZES]


def clones(ts):
    return None if ts is None else [t.clone() for t in ts]


def assert_same(ours, reference):
    for a, b in zip(ours, reference):
        if reference_fused():
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=4 * torch.finfo(a.dtype).eps, atol=0)


@pytest.mark.parametrize("closure_form, inner, decay", [(False, False, 0.0), (False, True, 0.1), (True, False, 0.1),
                                                       (True, True, 0.0)],
                         ids=["primal", "primal-inner-momentum-decay", "closure-decay", "closure-inner-momentum"])
def test_adam_steps_match_the_cpu_kernel_over_100_steps(tk, closure_form, inner, decay):
    generator = torch.Generator().manual_seed(0)
    ys = tensors(generator)
    zs, vs = clones(ys), [torch.zeros_like(y) for y in ys]
    ms = [torch.zeros_like(y) for y in ys] if inner else None
    ours = [clones(ys), clones(zs), clones(vs), clones(ms)]
    for k in range(STEPS):
        grads = tensors(generator)
        scalars = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=decay, ckp1=1.0 / (k + 1),
                       bias_correction2=1 - 0.999 ** (k + 1), adaptive=k >= 3, closure_form=closure_form)
        if inner:
            scalars.update(inner_momentum=0.9, bias_correction1=1 - 0.9 ** (k + 1))
        kernels.adam_step_(ys, grads, zs, vs, ms, **scalars, fused=reference_fused())
        tk.adam_sf_step_(ours[0], grads, ours[1], ours[2], ours[3], **scalars)
    assert_same(ours[0] + ours[1] + ours[2], ys + zs + vs)


@pytest.mark.parametrize("closure_form", [False, True], ids=["primal", "closure"])
def test_sgd_steps_match_the_eager_path_bit_for_bit(tk, closure_form):
    generator = torch.Generator().manual_seed(1)
    ys = tensors(generator)
    zs = clones(ys)
    ours = [clones(ys), clones(zs)]
    for k in range(STEPS):
        grads = tensors(generator)
        scalars = dict(lr=0.1, momentum=0.9, weight_decay=0.01, ckp1=1.0 / (k + 1), closure_form=closure_form)
        kernels.sgd_step_(ys, grads, zs, **scalars, fused=False)
        tk.sgd_sf_step_(ours[0], grads, ours[1], **scalars)
    for a, b in zip(ours[0] + ours[1], ys + zs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_steps_round_like_the_cpu_kernel_and_adopt_written_parameters(tk, dtype):
    generator = torch.Generator().manual_seed(2)
    params = tensors(generator, dtype)
    masters = [p.float() for p in params]
    zs, vs = clones(masters), [torch.zeros_like(m) for m in masters]
    ours = [clones(params), clones(masters), clones(zs), clones(vs)]
    for k in range(STEPS):
        grads = tensors(generator, dtype)
        if k == 50:  # some code writes one parameter: its value, not the stale master, goes on
            params[1].add_(1.0)
            ours[0][1].add_(1.0)
        scalars = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.05, ckp1=1.0 / (k + 1),
                       bias_correction2=1 - 0.999 ** (k + 1))
        kernels.adam_step_(params, grads, zs, vs, **scalars, fused=reference_fused(), masters=masters)
        tk.adam_sf_step_(ours[0], grads, ours[2], ours[3], **scalars, masters=ours[1])
    assert_same(ours[0] + ours[1] + ours[2], params + masters + zs)
    assert all(torch.equal(p, m.to(dtype)) for p, m in zip(ours[0], ours[1]))


def test_the_bfloat16_rounding_is_to_nearest_even(tk):
    # ties go to the even neighbour (up for 1 + 3 2^-8, down for 1 + 2^-8), anything above a tie goes up
    values = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8), 1.0 + 2**-8 + 2**-20, 3.0e38,
                           float("nan")])
    param, master = [torch.zeros(len(values), dtype=torch.bfloat16)], [torch.zeros(len(values))]
    tk.lerp_(param, [values], weight=1.0, masters=master)  # a full step to the values: the master becomes them
    expected = values.to(torch.bfloat16)  # torch rounds to nearest, ties to even
    assert torch.equal(param[0][:-1], expected[:-1]) and param[0][-1].isnan()


def test_switches_and_wrapper_passes_match_the_eager_path_bit_for_bit(tk):
    generator = torch.Generator().manual_seed(3)
    starts, ends = tensors(generator), tensors(generator)
    ours = clones(starts)
    for weight in (0.3, 0.7, -9.0):
        kernels.lerp_(starts, ends, weight, fused=False)
        tk.lerp_(ours, ends, weight=weight)
    params, zs = tensors(generator), tensors(generator)
    our_params, our_zs = clones(params), clones(zs)
    for decay, ckp1 in ((0.0, 0.5), (0.01, 0.2), (0.02, 1.0)):
        kernels.wrapper_enter_(params, zs, decay=decay, momentum=0.9, fused=False)
        tk.wrapper_enter_(our_params, our_zs, decay=decay, y_scale=1.0 - decay * (1.0 - 0.9), to_x=1.0 - 1.0 / 0.9)
        kernels.wrapper_exit_(params, zs, ckp1=ckp1, momentum=0.9, fused=False)
        tk.wrapper_exit_(our_params, our_zs, ckp1=ckp1, to_y=1.0 - 0.9)
    for a, b in zip(ours + our_params + our_zs, starts + params + zs):
        assert torch.equal(a, b)


def test_one_launch_covers_every_tensor_of_a_list(tk):
    generator = torch.Generator().manual_seed(4)
    columns = [tensors(generator), tensors(generator)]
    table = tk._Table(columns)
    # a block per 1024 elements of each tensor, none for the empty one
    assert table.n_blocks == sum(-(-t.numel() // tk.BLOCK) for t in columns[0])
    starts = table.block_start.tolist()
    owners = table.block_tensor.tolist()
    assert sorted(zip(owners, starts)) == [(i, s) for i, t in enumerate(columns[0])
                                          for s in range(0, t.numel(), tk.BLOCK)]


def test_tensors_the_kernels_cannot_take_are_refused(tk):
    strided = torch.zeros(4, 4).t()
    with pytest.raises(ValueError, match="not supported"):
        tk.lerp_([strided], [torch.zeros(4, 4)], weight=0.5)
    with pytest.raises(ValueError, match="need float32 masters"):
        tk.lerp_([torch.zeros(4, dtype=torch.bfloat16)], [torch.zeros(4)], weight=0.5)
    with pytest.raises(ValueError, match="float32 parameters take no masters"):
        tk.lerp_([torch.zeros(4)], [torch.zeros(4)], weight=0.5, masters=[torch.zeros(4)])


@pytest.fixture
def cpu_as_triton_device(tk, monkeypatch):
    """Route CPU buckets to the Triton kernels, as CUDA buckets are routed on a GPU."""
    monkeypatch.setattr(kernels, "TRITON_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(kernels, "_triton", lambda: tk)


def train(make, dtype=torch.float32, steps=12, closure=False):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(dtype)
    optimizer = make(model.parameters())
    inputs, targets = torch.randn(16, 6).to(dtype), torch.randn(16, 3).to(dtype)

    def loss_fn():
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        return loss

    if hasattr(optimizer, "train"):
        optimizer.train()
    for _ in range(steps):
        if closure:
            optimizer.step(loss_fn)
        else:
            loss_fn()
            optimizer.step()
    if hasattr(optimizer, "eval"):
        optimizer.eval()
    return [p.detach().clone() for p in model.parameters()]


OPTIMIZERS = {
    "adamw": (lambda ps: msf.AdamWScheduleFree(ps, lr=1e-2, warmup_steps=3, weight_decay=0.1), False),
    "adamw-inner": (lambda ps: msf.AdamWScheduleFree(ps, lr=1e-2, weight_decay=0.1, inner_momentum=0.9), False),
    "radam": (lambda ps: msf.RAdamScheduleFree(ps, lr=1e-2, weight_decay=0.1), False),
    "sgd": (lambda ps: msf.SGDScheduleFree(ps, lr=0.1, warmup_steps=3, weight_decay=0.01), False),
    "adamw-closure": (lambda ps: msf.AdamWScheduleFreeClosure(ps, lr=1e-2, weight_decay=0.1), True),
    "sgd-closure": (lambda ps: msf.SGDScheduleFreeClosure(ps, lr=0.1, weight_decay=0.01), True),
    "wrapper": (lambda ps: msf.ScheduleFreeWrapper(torch.optim.SGD(ps, lr=0.1), weight_decay_at_y=0.01), False),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_optimizer_routed_to_triton_ends_where_the_cpu_path_does(tk, name, cpu_as_triton_device, monkeypatch):
    make, closure = OPTIMIZERS[name]
    via_triton = train(make, closure=closure)
    monkeypatch.setattr(kernels, "TRITON_DEVICES", ("cuda",))
    on_cpu = train(make, closure=closure)
    assert_same(via_triton, on_cpu)


def test_bfloat16_models_routed_to_triton_keep_their_masters_as_the_cpu_path_does(tk, cpu_as_triton_device,
                                                                                   monkeypatch):
    make = OPTIMIZERS["adamw"][0]
    via_triton = train(make, dtype=torch.bfloat16)
    monkeypatch.setattr(kernels, "TRITON_DEVICES", ("cuda",))
    assert_same(via_triton, train(make, dtype=torch.bfloat16))


def test_the_router_sends_supported_rows_to_triton_and_the_rest_to_eager(tk, cpu_as_triton_device):
    good, strided = torch.zeros(8), torch.zeros(4, 4).t()
    routes = kernels.route([[good, strided], [torch.zeros(8), torch.zeros(4, 4)]], fused=None, foreach=None)
    assert [(r.path, r.rows) for r in routes] == [("triton", [0]), ("loop", [1])]  # eager on the CPU: a loop
    assert [r.path for r in kernels.route([[good], [good]], fused=False, foreach=None)] == ["loop"]
