"""Upstream schedule-free's own test file, run against our classes (``../shared/oracles/schedulefree_head``).

Upstream HEAD ships ``schedulefree/test_schedulefree.py`` (Apache-2.0). It is not copied here: it is
loaded at collection time from the shared oracle folder, with ``schedulefree`` in ``sys.modules``
replaced, only for the duration of that import, by a shim module whose attributes are our classes
under upstream's names; ``sys.modules`` is then restored, so the installed ``schedulefree`` 1.4.1 and
``schedulefree_head`` (``test_parity_head.py``) are untouched. Each upstream ``test_*`` function then
runs as one pytest test, named by the function. A user's clone has no ``../shared``: the module skips.

Every name upstream's test file imports resolves to ``mup_schedulefree``'s class of the same name, so
where upstream compares one of its classes against another (fast form against reference, a wrapper
against SGD), both sides are ours:

- ``SGDScheduleFree``, ``AdamWScheduleFree``, ``RAdamScheduleFree``: our train/eval forms, on the path
  our ``foreach``/``fused`` defaults choose (the native CPU kernel where it builds); upstream's explicit
  ``foreach=True``/``False`` select our ``_foreach`` and per-tensor paths.
- ``SGDScheduleFreeClosure``, ``AdamWScheduleFreeClosure``, ``RAdamScheduleFreeClosure``: our closure forms.
- ``SGDScheduleFreeReference``, ``AdamWScheduleFreeReference``: our reference forms (x, y and z stored).
- ``ScheduleFreeWrapper``, ``ScheduleFreeWrapperReference``: our wrappers (``torch.optim.Optimizer``
  subclasses around a base optimizer).
- ``AdamCScheduleFreePlusPaper``: our paper form of ScheduleFree+ (x, y and z stored), not the lean
  ``AdamCScheduleFreePlus``, which upstream does not have.

Outcomes: every upstream test passes but one, which is a documented difference and is marked
``xfail(strict=True)`` (it fails here and must keep failing). No upstream test needs CUDA or a process
group. Upstream's tests draw from the global RNG without a seed; here each runs under
``torch.manual_seed(0)`` inside ``torch.random.fork_rng``, so results are deterministic and the global
RNG is left as found. The whole module takes about 2 s, most of it the first native-kernel call.
"""
from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable

import pytest
import torch

import mup_schedulefree

ORACLE = Path(__file__).resolve().parents[1].parent / "shared" / "oracles" / "schedulefree_head" / "schedulefree"
UPSTREAM_TESTS_FILE = ORACLE / "test_schedulefree.py"

if not UPSTREAM_TESTS_FILE.is_file():
    pytest.skip(f"upstream's test file not found at {UPSTREAM_TESTS_FILE} (it lives in ../shared, which a user's "
                "clone lacks)", allow_module_level=True)

# Upstream tests that fail against our classes because of a documented difference (README, "What differs
# from the published package"): they must keep failing, so a change in either side shows.
DOCUMENTED_DIFFERENCES = {
    "test_adamc_schedulefree_polyak_requires_train_mode": (
        "documented difference: a new optimizer of ours is in train mode, so step_func() before train() "
        "steps; upstream's optimizers start in eval mode and raise. Ours raise RuntimeError in eval mode "
        "(tests/test_adamc_plus.py)"),
}
# Upstream tests that cannot run here (CUDA, a process group): none at upstream commit 70785b5.
UNAVAILABLE: dict[str, str] = {}


def _upstream_exports() -> list[str]:
    """The class names upstream's package exports (its ``__init__.py``'s relative imports)."""
    tree = ast.parse((ORACLE / "__init__.py").read_text())
    return [alias.name for node in tree.body if isinstance(node, ast.ImportFrom) and node.level == 1
            for alias in node.names]


def _names_the_tests_import() -> list[str]:
    """The names upstream's test file imports from ``schedulefree``."""
    tree = ast.parse(UPSTREAM_TESTS_FILE.read_text())
    return [alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module == "schedulefree"
            for alias in node.names]


def _shim() -> ModuleType:
    """A module named ``schedulefree`` holding our class for each upstream export we have."""
    shim = ModuleType("schedulefree", "mup_schedulefree's classes under upstream schedulefree's names")
    for name in _upstream_exports():
        if hasattr(mup_schedulefree, name):
            setattr(shim, name, getattr(mup_schedulefree, name))
    return shim


def _load_upstream_tests(shim: ModuleType) -> tuple[ModuleType | None, BaseException | None]:
    """Import upstream's test file with ``schedulefree`` resolving to ``shim``; restore ``sys.modules`` after.

    Returns:
        The loaded module (not registered in ``sys.modules``) and ``None``, or ``None`` and the error
        the import raised (e.g. a name we lack).
    """
    missing = object()
    saved = sys.modules.get("schedulefree", missing)
    sys.modules["schedulefree"] = shim
    try:
        spec = importlib.util.spec_from_file_location("upstream_test_schedulefree", UPSTREAM_TESTS_FILE)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module, None
    except Exception as error:  # reported by test_upstream_test_file_imports_against_ours
        return None, error
    finally:
        if saved is missing:
            del sys.modules["schedulefree"]
        else:
            sys.modules["schedulefree"] = saved


SHIM = _shim()
UPSTREAM, LOAD_ERROR = _load_upstream_tests(SHIM)
UPSTREAM_TESTS: dict[str, Callable[[], None]] = {} if UPSTREAM is None else {
    name: value for name, value in vars(UPSTREAM).items() if name.startswith("test_") and callable(value)}


def _case(name: str):
    """One upstream test as a pytest parameter, with its xfail or skip mark."""
    marks = []
    if name in DOCUMENTED_DIFFERENCES:
        marks.append(pytest.mark.xfail(strict=True, reason=DOCUMENTED_DIFFERENCES[name]))
    if name in UNAVAILABLE:
        marks.append(pytest.mark.skip(reason=UNAVAILABLE[name]))
    return pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("name", [_case(name) for name in UPSTREAM_TESTS])
def test_upstream_test_passes_against_ours(name):
    """Upstream's test of this name, with every upstream class replaced by ours, seeded."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        UPSTREAM_TESTS[name]()


def test_upstream_test_file_imports_against_ours():
    """Upstream's test file imports with our classes in place of its own, and defines tests."""
    assert LOAD_ERROR is None, f"importing {UPSTREAM_TESTS_FILE} against our classes raised {LOAD_ERROR!r}"
    assert UPSTREAM_TESTS, f"no test_* functions found in {UPSTREAM_TESTS_FILE}"


def test_every_upstream_class_has_ours_of_the_same_name():
    """Each class upstream's package exports exists in ``mup_schedulefree`` under the same name."""
    missing = [name for name in _upstream_exports() if not hasattr(mup_schedulefree, name)]
    assert not missing, f"upstream exports classes we lack: {missing}"


def test_every_name_upstream_tests_import_is_ours():
    """In the loaded test module each imported name is ``mup_schedulefree``'s object, never upstream's."""
    names = _names_the_tests_import()
    assert names, "upstream's test file no longer imports from schedulefree: update this module"
    for name in names:
        assert getattr(UPSTREAM, name) is getattr(mup_schedulefree, name), name
        assert getattr(UPSTREAM, name).__module__.startswith("mup_schedulefree."), name


def test_loading_leaves_sys_modules_as_found():
    """After the load the shim is gone from ``sys.modules`` and ``import schedulefree`` is the installed one."""
    assert all(module is not SHIM for module in sys.modules.values())
    assert "upstream_test_schedulefree" not in sys.modules
    import schedulefree

    assert schedulefree is not SHIM
    assert Path(schedulefree.__file__).resolve().parent != ORACLE.resolve()


def test_marked_upstream_tests_exist():
    """Every xfail or skip entry names a test upstream's file still has (a rename would orphan it)."""
    stale = sorted((set(DOCUMENTED_DIFFERENCES) | set(UNAVAILABLE)) - set(UPSTREAM_TESTS))
    assert not stale, f"marked upstream tests no longer in {UPSTREAM_TESTS_FILE}: {stale}"


def test_eval_mode_error_carries_upstreams_train_mode_wording():
    """The upstream test above, in the mode where ours raises too: code matching upstream's wording finds ours."""
    weight = torch.zeros(3, 2, requires_grad=True)
    optimizer = mup_schedulefree.AdamCScheduleFreePlusPaper([weight], lr=1.0)
    optimizer.eval()
    weight.grad = torch.ones_like(weight)
    with pytest.raises(RuntimeError) as raised:
        optimizer.step_func(function_value=1.0)
    assert "train mode" in str(raised.value)
