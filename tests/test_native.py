"""The native fused kernels compute the schedule-free steps exactly as an eager torch implementation does.

The reference implementations below are the specification: plain per-tensor torch operations in the
order the formulas are written, with no memory tricks. Comparisons are relative to each tensor's
scale, |native - reference| <= 1e-6 * max|reference|, because single elements near zero carry the
cancellation of y = lerp(y, z) + c u, and torch's CPU sqrt may be 1 ulp off a correctly rounded one.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from mup_schedulefree import ScheduleFreeWrapper, native

REPO = Path(__file__).resolve().parents[1]
RTOL = 1e-6
SIZES = [1, 7, 1_000_003, 2, 33, 255, 4097, 65_537, 131_073] + [3 + 97 * i for i in range(40)]
STEPS = 12

needs_native = pytest.mark.skipif(not native.available(), reason="native kernels could not be built here")


# ----------------------------------------------------------------------------- reference implementations
def reference_adam_step(ys, grads, zs, vs, *, lr, beta1, beta2, eps, weight_decay, ckp1, bias_correction2,
                        adaptive, closure_form):
    """Reference: schedule-free Adam, one tensor at a time, formulas in the written order."""
    for y, g, z, v in zip(ys, grads, zs, vs):
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        u = g / (v / bias_correction2).sqrt_().add_(eps) if adaptive else g
        if weight_decay:
            u = u.add(y, alpha=weight_decay)
        _reference_update(y, z, u, lr=lr, beta=beta1, ckp1=ckp1, closure_form=closure_form)


def reference_sgd_step(ys, grads, zs, *, lr, momentum, weight_decay, ckp1, closure_form):
    """Reference: schedule-free SGD, one tensor at a time, formulas in the written order."""
    for y, g, z in zip(ys, grads, zs):
        u = g.add(y, alpha=weight_decay) if weight_decay else g
        _reference_update(y, z, u, lr=lr, beta=momentum, ckp1=ckp1, closure_form=closure_form)


def _reference_update(y, z, u, *, lr, beta, ckp1, closure_form):
    if closure_form:  # y holds y on entry, x on exit
        y.lerp_(z, 1.0 - 1.0 / beta)
        z.sub_(u, alpha=lr)
        y.lerp_(z, ckp1)
    else:
        y.lerp_(z, ckp1).add_(u, alpha=lr * (beta * (1.0 - ckp1) - 1.0))
        z.sub_(u, alpha=lr)


def reference_wrapper_enter(ps, zs, *, decay, momentum):
    """Reference: the wrapper's entry as the published ScheduleFreeWrapper writes it, one tensor at a time:
    decay at y, move y to x, then swap the slots through a copy."""
    for p, z in zip(ps, zs):
        if decay:
            z.sub_(p, alpha=decay)
            p.mul_(1.0 - decay * (1.0 - momentum))
        p.lerp_(z, 1.0 - 1.0 / momentum)
        held = p.clone()
        p.copy_(z)
        z.copy_(held)


def reference_wrapper_exit(ps, zs, *, ckp1, momentum):
    """Reference: swap the slots back, average z into x, move x to y."""
    for p, z in zip(ps, zs):
        held = p.clone()
        p.copy_(z)
        z.copy_(held)
        p.lerp_(z, ckp1).lerp_(z, 1.0 - momentum)


# ----------------------------------------------------------------------------- helpers
def _randn_lists(count: int, seed: int) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(n, generator=gen) for n in SIZES] for _ in range(count)]


def _clone(ts):
    return [t.clone() for t in ts]


def _assert_matches(actual, expected, what):
    for i, (a, e) in enumerate(zip(actual, expected)):
        scale = e.abs().max().item()
        err = (a - e).abs().max().item()
        assert err <= RTOL * scale, f"{what}[{i}] (numel {e.numel()}): max error {err:.3g} > {RTOL} * {scale:.3g}"


def _schedule(k: int, beta2: float = 0.999) -> dict:
    """Scalars of step k as the optimizers produce them (warm-up lr, ckp1 = 1/(k+1) so step 0 has ckp1 = 1)."""
    return dict(lr=1e-2 * min(1.0, (k + 1) / 4), ckp1=1.0 / (k + 1), bias_correction2=1.0 - beta2 ** (k + 1))


# ----------------------------------------------------------------------------- claims
@needs_native
@pytest.mark.parametrize("closure_form", [False, True], ids=["primal", "closure"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("rectified", [False, True], ids=["adamw", "radam"])
def test_adam_step_matches_reference_over_many_steps(closure_form, weight_decay, rectified):
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    ys, zs = _randn_lists(2, seed=0)
    vs = [torch.zeros_like(y) for y in ys]
    ref_ys, ref_zs, ref_vs = _clone(ys), _clone(zs), _clone(vs)
    grad_lists = _randn_lists(STEPS, seed=1)
    kernel = native.adam_sf_closure_step_ if closure_form else native.adam_sf_step_
    for k, grads in enumerate(grad_lists):
        if closure_form:  # the closure is evaluated at y = lerp(x, z, 1 - beta1)
            native.lerp_(ys, zs, 1.0 - beta1)
            torch._foreach_lerp_(ref_ys, ref_zs, 1.0 - beta1)
        grads_before = _clone(grads)
        scalars = dict(beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                       adaptive=not rectified or k >= 4, **_schedule(k, beta2))
        kernel(ys, grads, zs, vs, **scalars)
        reference_adam_step(ref_ys, grads, ref_zs, ref_vs, closure_form=closure_form, **scalars)
        assert all(torch.equal(g, before) for g, before in zip(grads, grads_before)), "gradients were written"
    _assert_matches(ys, ref_ys, "x" if closure_form else "y")
    _assert_matches(zs, ref_zs, "z")
    _assert_matches(vs, ref_vs, "exp_avg_sq")


@needs_native
@pytest.mark.parametrize("closure_form", [False, True], ids=["primal", "closure"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_sgd_step_matches_reference_over_many_steps(closure_form, weight_decay):
    momentum = 0.9
    ys, zs = _randn_lists(2, seed=2)
    ref_ys, ref_zs = _clone(ys), _clone(zs)
    kernel = native.sgd_sf_closure_step_ if closure_form else native.sgd_sf_step_
    for k, grads in enumerate(_randn_lists(STEPS, seed=3)):
        if closure_form:
            native.lerp_(ys, zs, 1.0 - momentum)
            torch._foreach_lerp_(ref_ys, ref_zs, 1.0 - momentum)
        grads_before = _clone(grads)
        schedule = _schedule(k)
        scalars = dict(lr=schedule["lr"], ckp1=schedule["ckp1"], momentum=momentum, weight_decay=weight_decay)
        kernel(ys, grads, zs, **scalars)
        reference_sgd_step(ref_ys, grads, ref_zs, closure_form=closure_form, **scalars)
        assert all(torch.equal(g, before) for g, before in zip(grads, grads_before)), "gradients were written"
    _assert_matches(ys, ref_ys, "x" if closure_form else "y")
    _assert_matches(zs, ref_zs, "z")


@needs_native
@pytest.mark.parametrize("weight", [0.0, 0.1, -0.125, 0.5, 0.9, 1.0, 1.5])
def test_lerp_matches_torch_lerp_on_both_sides_of_one_half(weight):
    starts, ends = _randn_lists(2, seed=4)
    expected = torch._foreach_lerp(starts, ends, weight)
    ends_before = _clone(ends)
    native.lerp_(starts, ends, weight)
    _assert_matches(starts, expected, "starts")
    assert all(torch.equal(e, before) for e, before in zip(ends, ends_before)), "ends were written"


@needs_native
@pytest.mark.parametrize("decay", [0.0, 1e-3])
@pytest.mark.parametrize("momentum", [0.9, 0.3])
def test_wrapper_passes_match_the_swap_based_reference(decay, momentum):
    """Entry and exit around a stand-in base step (z -= lr g), 12 steps: parameters and z slots match the
    swap-based reference after entry (p = z, slot = x) and after exit (p = y, slot = z), within 1e-6
    relative. Both sides do the same float32 operations (bit for bit where the CPU has FMA)."""
    ps, zs = _randn_lists(2, seed=5)
    ref_ps, ref_zs = _clone(ps), _clone(zs)
    for k, grads in enumerate(_randn_lists(STEPS, seed=6)):
        schedule = _schedule(k)
        step_decay = decay * schedule["lr"]
        native.wrapper_enter_(ps, zs, decay=step_decay, y_scale=1.0 - step_decay * (1.0 - momentum),
                              to_x=1.0 - 1.0 / momentum)
        reference_wrapper_enter(ref_ps, ref_zs, decay=step_decay, momentum=momentum)
        _assert_matches(ps + zs, ref_ps + ref_zs, f"step {k} after entry: params + slots")
        torch._foreach_sub_(ps, grads, alpha=schedule["lr"])
        torch._foreach_sub_(ref_ps, grads, alpha=schedule["lr"])
        native.wrapper_exit_(ps, zs, ckp1=schedule["ckp1"], to_y=1.0 - momentum)
        reference_wrapper_exit(ref_ps, ref_zs, ckp1=schedule["ckp1"], momentum=momentum)
        _assert_matches(ps + zs, ref_ps + ref_zs, f"step {k} after exit: params + slots")


@needs_native
def test_parameters_and_empty_tensors_are_updated_in_place_and_autograd_sees_the_writes():
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.empty(0))]
    grads = [torch.ones_like(p) for p in params]
    zs = [torch.zeros_like(p) for p in params]
    storage = [p.data_ptr() for p in params]
    versions = [t._version for t in params + grads + zs]
    with torch.no_grad():
        native.sgd_sf_step_(params, grads, zs, lr=0.1, momentum=0.9, weight_decay=0.0, ckp1=1.0)
    assert [p.data_ptr() for p in params] == storage
    assert torch.equal(zs[0], torch.full((5, 3), -0.1))
    bumped = [t._version > v for t, v in zip(params + grads + zs, versions)]
    assert bumped == [True, True, False, False, True, True], "written tensors bump their version, gradients not"
    versions = [t._version for t in params + zs]
    with torch.no_grad():
        native.wrapper_enter_(params, zs, decay=0.0, y_scale=1.0, to_x=-0.125)
    assert all(t._version > v for t, v in zip(params + zs, versions)), "the wrapper passes write both lists"


def test_only_contiguous_cpu_float32_tensors_are_supported():
    ok = torch.randn(4, 6)
    rejected = {
        "transposed": ok.t(),
        "strided slice": torch.randn(12)[::2],
        "float64": torch.randn(6, dtype=torch.float64),
        "bfloat16": torch.randn(6, dtype=torch.bfloat16),
        "float16": torch.randn(6, dtype=torch.float16),
        "sparse": torch.randn(3, 3).to_sparse(),
        "negated view": torch._neg_view(torch.randn(6)),
    }
    assert native.supports(ok) and native.supports(torch.nn.Parameter(ok))
    for name, t in rejected.items():
        assert not native.supports(t), name


@needs_native
def test_unsupported_or_mismatched_inputs_raise_before_touching_memory():
    y = torch.randn(6)
    before = y.clone()
    with pytest.raises(TypeError, match=r"grads\[0\]"):
        native.sgd_sf_step_([y], [torch.randn(12)[::2]], [torch.zeros(6)], lr=0.1, momentum=0.9,
                            weight_decay=0.0, ckp1=0.5)
    with pytest.raises(ValueError, match="zs"):
        native.sgd_sf_step_([y], [torch.randn(6)], [torch.zeros(7)], lr=0.1, momentum=0.9,
                            weight_decay=0.0, ckp1=0.5)
    with pytest.raises(ValueError, match="ends"):
        native.lerp_([y], [], 0.5)
    assert torch.equal(y, before)


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with extra environment variables."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **env})


COUNT_WARNINGS = """
    import warnings
    import torch
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from mup_schedulefree import native
        results = [native.available() for _ in range(3)]
    print(results, sum("eager" in str(w.message) for w in caught))
"""


def test_missing_compiler_means_unavailable_with_exactly_one_warning(tmp_path):
    result = _python(COUNT_WARNINGS, MUP_SCHEDULEFREE_CC="/nonexistent/cc", MUP_SCHEDULEFREE_CACHE=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["[False,", "False,", "False]", "1"]


@needs_native
def test_concurrent_cold_builds_leave_one_library_that_later_processes_reuse(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "MUP_SCHEDULEFREE_CACHE": str(tmp_path)}
    racers = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(COUNT_WARNINGS)], env=env, cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for racer in racers:
        out, err = racer.communicate(timeout=120)
        assert out.split() == ["[True,", "True,", "True]", "0"], err
    built = sorted(tmp_path.iterdir())
    assert [p.suffix for p in built] == [".json", ".so"] and built[0].stem == built[1].stem, built
    stamps = [p.stat().st_mtime_ns for p in built]
    result = _python(COUNT_WARNINGS, MUP_SCHEDULEFREE_CACHE=str(tmp_path))
    assert result.stdout.split() == ["[True,", "True,", "True]", "0"], result.stderr
    assert sorted(tmp_path.iterdir()) == built and [p.stat().st_mtime_ns for p in built] == stamps


# ----------------------------------------------------------------------------- a damaged or foreign cache
@pytest.fixture(scope="module")
def built_cache(tmp_path_factory) -> Path:
    """A cache holding one library and its manifest, built once by a child process."""
    cache = tmp_path_factory.mktemp("built") / "cache"
    result = _python(COUNT_WARNINGS, MUP_SCHEDULEFREE_CACHE=str(cache))
    assert result.stdout.split() == ["[True,", "True,", "True]", "0"], result.stderr
    return cache


@pytest.fixture
def cached(built_cache, tmp_path) -> tuple[Path, Path]:
    """A copy of ``built_cache`` at ``tmp_path / "cache"``: its library and its manifest."""
    (library,) = Path(shutil.copytree(built_cache, tmp_path / "cache")).glob("*.so")
    return library, library.with_suffix(".json")


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """The native module as a new process finds it, with its cache at ``tmp_path / "cache"``."""
    monkeypatch.setenv("MUP_SCHEDULEFREE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_tried", False)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@needs_native
@pytest.mark.parametrize("compiler", ["present", "absent"])
def test_truncated_cached_library_is_rebuilt_or_refused_with_one_warning_and_never_kills_the_process(
        cached, compiler):
    """dlopen of a truncated library can die of SIGBUS, so the probe runs in a child process: it must exit
    normally, with the library rebuilt (compiler present) or the eager path and one warning (absent)."""
    library, manifest = cached
    size = library.stat().st_size
    os.truncate(library, 8000)
    env = {"MUP_SCHEDULEFREE_CACHE": str(library.parent)}
    if compiler == "absent":
        env["MUP_SCHEDULEFREE_CC"] = "/nonexistent/cc"
    result = _python(COUNT_WARNINGS, **env)
    assert result.returncode == 0, f"the probe died with status {result.returncode}: {result.stderr[-2000:]}"
    if compiler == "present":
        assert result.stdout.split() == ["[True,", "True,", "True]", "0"], result.stderr
        assert library.stat().st_size == size
        assert json.loads(manifest.read_text())["sha256"] == _sha256(library)
    else:
        assert result.stdout.split() == ["[False,", "False,", "False]", "1"], result.stderr


@needs_native
@pytest.mark.parametrize("manifest_records", ["the old library", "the damaged library"])
def test_library_missing_a_function_is_never_used_and_step_raises_no_attribute_error(
        cached, fresh_native, make_model, make_batches, manifest_records):
    """A library lacking sf_wrapper_exit_f32 replaces the cached one. With the old checksum recorded it is
    loaded only by a child process, and rebuilt. With its own checksum recorded (a forged manifest) this
    process loads it and finds the gap at load time; it is rebuilt for later processes, and this one,
    which cannot load a second library from the same path, takes another flag set's library or the
    eager path with exactly one warning. Either way the steps run and raise nothing."""
    library, manifest = cached
    damaged = library.with_name("damaged.so")
    subprocess.run([native._compiler(), "-O1", "-shared", "-fPIC", "-Dsf_wrapper_exit_f32=renamed_exit",
                    str(native._SOURCE), "-o", str(damaged)], check=True, timeout=120)
    os.replace(damaged, library)
    if manifest_records == "the damaged library":
        manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "sha256": _sha256(library)}))
    model = make_model()
    opt = ScheduleFreeWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    before = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for inputs, target in make_batches(3):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(inputs), target).backward()
            opt.step()
        opt.eval()
    unavailable = [str(w.message) for w in caught if "native CPU kernels unavailable" in str(w.message)]
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before)), "a parameter did not move"
    if manifest_records == "the old library":
        assert native.available() and native._lib._name == str(library) and not unavailable, unavailable
    elif native.available():
        assert native._lib._name != str(library) and not unavailable, unavailable
    else:
        assert len(unavailable) == 1 and "lacks the function sf_wrapper_exit_f32" in unavailable[0], unavailable
    assert _sha256(library) == json.loads(manifest.read_text())["sha256"], "not rebuilt for later processes"
    assert native._check_in_child(library) is None


@needs_native
@pytest.mark.parametrize("hidden_by", ["MUP_SCHEDULEFREE_CC", "PATH"])
def test_cached_library_is_used_when_no_compiler_is_found(cached, tmp_path, hidden_by):
    library, manifest = cached
    stamps = [p.stat().st_mtime_ns for p in (library, manifest)]
    hide = {"MUP_SCHEDULEFREE_CC": "/nonexistent/cc"} if hidden_by == "MUP_SCHEDULEFREE_CC" else \
        {"MUP_SCHEDULEFREE_CC": "", "PATH": str(tmp_path / "no-such-dir")}
    result = _python(COUNT_WARNINGS, MUP_SCHEDULEFREE_CACHE=str(library.parent), **hide)
    assert result.stdout.split() == ["[True,", "True,", "True]", "0"], result.stderr
    assert [p.stat().st_mtime_ns for p in (library, manifest)] == stamps, "the cache was rewritten"


@needs_native
def test_without_a_compiler_a_library_recorded_for_another_cpu_is_not_loaded(cached, fresh_native, monkeypatch):
    monkeypatch.setenv("MUP_SCHEDULEFREE_CC", "/nonexistent/cc")
    monkeypatch.setattr(native, "_machine_id", lambda: "x86_64-another-cpu")
    with pytest.warns(RuntimeWarning, match="no library built from this source for this machine"):
        assert not native.available()
