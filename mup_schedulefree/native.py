"""Fused CPU kernels for the schedule-free steps: one pass over memory per step.

The eager update (``kernels.py``) reads and writes every state tensor several times; the kernels in
``csrc/sf_kernels.c`` do the whole step in one pass, over all tensors of a list in one OpenMP-parallel
call. They are a plain C file with no torch or Python headers, built with the system compiler at
first use and loaded with ``ctypes``. That keeps the cold build well under a second; a torch C++
extension costs half a minute of compiling torch headers, and ``torch.compile`` several seconds to
over a minute depending on the number of tensors. The library is loaded after torch, so with
torch's GNU OpenMP both share one thread pool; every call uses ``torch.get_num_threads()`` threads.

Cache: the shared library is written to ``$MUP_SCHEDULEFREE_CACHE`` (default
``~/.cache/mup_schedulefree``) under a name that hashes the source, the flags, the compiler's
description of itself and of the target, and this machine's identity (``platform.machine()`` and
the CPU's model and feature flags): ``-march=native`` builds for the CPU it runs on, so a cache on
a shared file system never hands a library to a CPU it was not built for. It is compiled to a
temporary file and moved into place with ``os.replace``, so concurrent processes never load a
partial file. A library is then loaded once in a child process, which resolves every symbol and
calls one kernel; only if that works is a manifest written next to it (``.json``: the library's
sha256, source hash, flags and machine), again atomically. A process loads a library only when its
checksum matches its manifest, or when a child process has just loaded it: a truncated or foreign
file costs a child process, never this one (dlopen of a truncated file can die of SIGBUS), and is
rebuilt. Later processes load a recorded library without compiling; without a compiler they load
the best recorded library built from the same source for this machine.

Fallback: the compiler is ``$MUP_SCHEDULEFREE_CC`` or the first of cc, gcc, clang on the PATH.
Flags the compiler rejects are dropped (``-march=native``, else ``-fopenmp``, else both). If no build
works and nothing usable is cached, or a library lacks one of the functions, ``available()`` is
False, one ``RuntimeWarning`` per process says so, and callers use the eager
path. Contiguous CPU float32 tensors are handled (see ``supports``), and bfloat16/float16
parameters with float32 masters (``*_lp_``, see ``supports_low_precision``); the kernels check their
inputs and raise rather than touch memory a tensor does not own. Each op is declared once in
``OPS`` (its tensor lists and named scalars), from which the ctypes signatures and the calls are
built: scalars are passed by name, so a missing or misnamed one raises.

Every function follows torch's rounding operation by operation (see the C file), so results match
an eager torch implementation of the same formulas to float32 rounding (bit for bit where the CPU has
FMA, except that torch's CPU sqrt may be 1 ulp off the correctly rounded one used here).
"""
from __future__ import annotations

import array
import ctypes
import functools
import hashlib
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
from torch.autograd.graph import increment_version

Tensors = Sequence[torch.Tensor]

_SOURCE = Path(__file__).with_name("csrc") / "sf_kernels.c"
# Best first. -ffp-contract=off: the C file places its fused multiply-adds where torch's kernels do.
_BASE_FLAGS = ("-O3", "-fno-math-errno", "-ffp-contract=off", "-shared", "-fPIC")
_FLAG_SETS = (
    _BASE_FLAGS + ("-fopenmp", "-march=native"),
    _BASE_FLAGS + ("-fopenmp",),
    _BASE_FLAGS + ("-march=native",),
    _BASE_FLAGS,
)
_BUILD_TIMEOUT_S = 120
_CHECK_TIMEOUT_S = 60
# /proc/cpuinfo keys that name the CPU and its instruction set (x86 and Arm spellings).
_CPU_KEYS = ("vendor_id", "cpu family", "model", "model name", "flags", "CPU implementer", "CPU architecture",
             "CPU variant", "CPU part", "Features")
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)



class TensorArg(NamedTuple):
    """One tensor list of a fused op: its name, whether the kernel writes it, and its element type.

    ``kind`` is "float32", or "low" for the bfloat16/float16 parameter lists (and their gradients),
    which must all share the first low list's dtype.
    """

    name: str
    written: bool
    kind: str = "float32"


class Op(NamedTuple):
    """One fused op of the C library, declared once: from it come the ctypes signature and the call.

    The C function takes, in order, one array of data pointers per tensor list, the element counts,
    the number of tensors, the scalars in the order given, then (for ops on low-precision
    parameters) the dtype code, and the thread count.
    """

    symbol: str
    tensors: tuple[TensorArg, ...]
    scalars: tuple[tuple[str, type], ...]

    @property
    def low_precision(self) -> bool:
        """Whether the op takes bfloat16/float16 parameters (and then a dtype code)."""
        return any(t.kind == "low" for t in self.tensors)

    def argtypes(self) -> tuple[type, ...]:
        """The ctypes argument types of the C function."""
        codes = (ctypes.c_int,) if self.low_precision else ()
        return ((ctypes.c_void_p,) * len(self.tensors) + (ctypes.c_void_p, ctypes.c_int64)
                + tuple(kind for _, kind in self.scalars) + codes + (ctypes.c_int,))


_R, _W = False, True
_ADAM_SCALARS = tuple((name, ctypes.c_double) for name in (
    "lr", "beta1", "beta2", "eps", "weight_decay", "ckp1", "bias_correction2")) + (("adaptive", ctypes.c_int),)
_ADAM_INNER_SCALARS = _ADAM_SCALARS + (("inner_momentum", ctypes.c_double), ("bias_correction1", ctypes.c_double))
_SGD_SCALARS = tuple((name, ctypes.c_double) for name in ("lr", "momentum", "weight_decay", "ckp1"))
_LOW = (TensorArg("params", _W, "low"), TensorArg("grads", _R, "low"), TensorArg("masters", _W))
OPS: dict[str, Op] = {
    "adam_sf_step_": Op("sf_adam_step_f32", (TensorArg("ys", _W), TensorArg("grads", _R), TensorArg("zs", _W),
                                             TensorArg("exp_avg_sqs", _W)), _ADAM_SCALARS),
    "adam_sf_closure_step_": Op("sf_adam_closure_step_f32", (TensorArg("xs", _W), TensorArg("grads", _R),
                                                             TensorArg("zs", _W), TensorArg("exp_avg_sqs", _W)),
                                _ADAM_SCALARS),
    "adam_sf_inner_step_": Op("sf_adam_inner_step_f32", (TensorArg("ys", _W), TensorArg("grads", _R),
                                                         TensorArg("zs", _W), TensorArg("exp_avg_sqs", _W),
                                                         TensorArg("exp_avgs", _W)), _ADAM_INNER_SCALARS),
    "adam_sf_inner_closure_step_": Op("sf_adam_inner_closure_step_f32", (TensorArg("xs", _W), TensorArg("grads", _R),
                                                                         TensorArg("zs", _W),
                                                                         TensorArg("exp_avg_sqs", _W),
                                                                         TensorArg("exp_avgs", _W)),
                                      _ADAM_INNER_SCALARS),
    "sgd_sf_step_": Op("sf_sgd_step_f32", (TensorArg("ys", _W), TensorArg("grads", _R), TensorArg("zs", _W)),
                       _SGD_SCALARS),
    "sgd_sf_closure_step_": Op("sf_sgd_closure_step_f32", (TensorArg("xs", _W), TensorArg("grads", _R),
                                                           TensorArg("zs", _W)), _SGD_SCALARS),
    "lerp_": Op("sf_lerp_f32", (TensorArg("starts", _W), TensorArg("ends", _R)), (("weight", ctypes.c_double),)),
    "wrapper_enter_": Op("sf_wrapper_enter_f32", (TensorArg("params", _W), TensorArg("zs", _W)),
                         tuple((name, ctypes.c_double) for name in ("decay", "y_scale", "to_x"))),
    "wrapper_exit_": Op("sf_wrapper_exit_f32", (TensorArg("params", _W), TensorArg("zs", _W)),
                        tuple((name, ctypes.c_double) for name in ("ckp1", "to_y"))),
    "adam_sf_step_lp_": Op("sf_adam_step_lp", _LOW + (TensorArg("zs", _W), TensorArg("exp_avg_sqs", _W)),
                           _ADAM_SCALARS),
    "adam_sf_closure_step_lp_": Op("sf_adam_closure_step_lp", _LOW + (TensorArg("zs", _W),
                                                                      TensorArg("exp_avg_sqs", _W)), _ADAM_SCALARS),
    "adam_sf_inner_step_lp_": Op("sf_adam_inner_step_lp", _LOW + (TensorArg("zs", _W), TensorArg("exp_avg_sqs", _W),
                                                                  TensorArg("exp_avgs", _W)), _ADAM_INNER_SCALARS),
    "adam_sf_inner_closure_step_lp_": Op("sf_adam_inner_closure_step_lp",
                                         _LOW + (TensorArg("zs", _W), TensorArg("exp_avg_sqs", _W),
                                                 TensorArg("exp_avgs", _W)), _ADAM_INNER_SCALARS),
    "sgd_sf_step_lp_": Op("sf_sgd_step_lp", _LOW + (TensorArg("zs", _W),), _SGD_SCALARS),
    "sgd_sf_closure_step_lp_": Op("sf_sgd_closure_step_lp", _LOW + (TensorArg("zs", _W),), _SGD_SCALARS),
    "lerp_lp_": Op("sf_lerp_lp", (TensorArg("params", _W, "low"), TensorArg("masters", _W), TensorArg("ends", _R)),
                   (("weight", ctypes.c_double),)),
}
"""Every fused op, by the name of its Python function in this module."""

LOW_PRECISION_CODES = {torch.bfloat16: 1, torch.float16: 2}
"""The C library's code for each low-precision parameter dtype."""

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def cache_dir() -> Path:
    """Where built libraries are kept.

    Returns:
        ``$MUP_SCHEDULEFREE_CACHE`` if set, else ``~/.cache/mup_schedulefree``.
    """
    configured = os.environ.get("MUP_SCHEDULEFREE_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "mup_schedulefree"


def _compiler() -> str:
    """Path of the C compiler; raises FileNotFoundError naming what was looked for."""
    configured = os.environ.get("MUP_SCHEDULEFREE_CC")
    candidates = [configured] if configured else ["cc", "gcc", "clang"]
    for name in candidates:
        found = shutil.which(name)
        if found:
            return found
    raise FileNotFoundError(f"no C compiler found (looked for {', '.join(candidates)})")


@functools.cache
def _machine_id() -> str:
    """``platform.machine()`` and a hash of the CPU's identity (model and feature flags from /proc/cpuinfo)."""
    identity = [platform.machine(), platform.processor()]
    try:
        first_cpu = Path("/proc/cpuinfo").read_text(errors="replace").split("\n\n", 1)[0]
    except OSError:
        first_cpu = ""
    for line in first_cpu.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in _CPU_KEYS:
            identity.append(f"{key.strip()}={value.strip()}")
    digest = hashlib.sha256("\n".join(identity).encode()).hexdigest()
    return f"{platform.machine()}-{digest[:16]}"


def _library_path(cc: str, flags: tuple[str, ...], source: bytes, directory: Path) -> Path | None:
    """Cache path for this source, flags, compiler/target and machine, or None if the compiler rejects the flags."""
    compile_only = [f for f in flags if f not in ("-shared", "-fPIC")]
    probe = subprocess.run([cc, "-v", "-E", "-x", "c", "-", "-o", os.devnull, *compile_only],
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=_BUILD_TIMEOUT_S)
    if probe.returncode != 0:
        return None
    key = hashlib.sha256(source + "\0".join(flags).encode() + probe.stderr + _machine_id().encode()).hexdigest()[:20]
    return directory / f"sf_kernels-{key}.so"


def _compile(cc: str, flags: tuple[str, ...], target: Path) -> str | None:
    """Compile the source to ``target`` atomically; returns None on success, else the compiler's complaint."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".sf_kernels-", suffix=".so.tmp")
    os.close(fd)
    try:
        result = subprocess.run([cc, *flags, str(_SOURCE), "-o", tmp], capture_output=True, text=True,
                                timeout=_BUILD_TIMEOUT_S)
        if result.returncode != 0:
            return result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"exit {result.returncode}"
        os.replace(tmp, target)
        return None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# Run by a child process: load the library, resolve every symbol, lerp four floats halfway (this runs
# the library's code, so a library built for another CPU fails here with SIGILL, not in the caller).
_CHILD_CHECK = """
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
for name in sys.argv[2:]:
    getattr(lib, name)
a, b = (ctypes.c_float * 4)(), (ctypes.c_float * 4)(2.0, 2.0, 2.0, 2.0)
lerp = lib.sf_lerp_f32
lerp.argtypes = (ctypes.c_void_p,) * 3 + (ctypes.c_int64, ctypes.c_double, ctypes.c_int)
status = lerp((ctypes.c_void_p * 1)(ctypes.addressof(a)), (ctypes.c_void_p * 1)(ctypes.addressof(b)),
              (ctypes.c_int64 * 1)(4), 1, 0.5, 1)
if status != 0 or list(a) != [1.0] * 4:
    sys.exit(f"sf_lerp_f32 returned {status} and {list(a)}, expected 0 and [1.0] * 4")
"""


def _check_in_child(path: Path) -> str | None:
    """Load ``path`` in a child Python; returns None if every symbol resolves and a kernel runs, else why not."""
    try:
        result = subprocess.run([sys.executable, "-I", "-S", "-c", _CHILD_CHECK, str(path),
                                 *(op.symbol for op in OPS.values())],
                                capture_output=True, text=True, timeout=_CHECK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"loading {path.name} in a child process took over {_CHECK_TIMEOUT_S} s"
    if result.returncode == 0:
        return None
    if result.returncode < 0:
        try:
            killer = signal.Signals(-result.returncode).name
        except ValueError:
            killer = f"signal {-result.returncode}"
        return f"a child process loading {path.name} was killed by {killer}"
    lines = result.stderr.strip().splitlines()
    return f"a child process could not load {path.name}: {lines[-1] if lines else f'exit {result.returncode}'}"


def _manifest_path(library: Path) -> Path:
    """The manifest recorded next to ``library``."""
    return library.with_suffix(".json")


def _read_manifest(path: Path) -> dict | None:
    """The manifest at ``path``, or None if it is missing or unreadable."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _write_manifest(library: Path, manifest: dict) -> None:
    """Write ``library``'s manifest atomically (temporary file, then ``os.replace``)."""
    fd, tmp = tempfile.mkstemp(dir=library.parent, prefix=".sf_kernels-", suffix=".json.tmp")
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(manifest, out, indent=1)
        os.chmod(tmp, 0o644)  # readable by whoever may load the library (mkstemp makes it 0600)
        os.replace(tmp, _manifest_path(library))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load(path: Path) -> ctypes.CDLL:
    """Open the library and declare every function's signature; OSError if one is missing."""
    lib = ctypes.CDLL(str(path))
    for op in OPS.values():
        try:
            fn = getattr(lib, op.symbol)
        except AttributeError:
            raise OSError(f"{path.name} lacks the function {op.symbol}") from None
        fn.argtypes = op.argtypes()
        fn.restype = ctypes.c_int
    return lib


def _open(library: Path, record: dict) -> ctypes.CDLL:
    """Load ``library`` once it is known to be sound; OSError saying why not otherwise.

    Sound means: its manifest matches ``record`` (source hash, flags, machine) and its current sha256,
    or a child process loads it now (then the manifest is written).
    """
    digest = hashlib.sha256(library.read_bytes()).hexdigest()
    manifest = _read_manifest(_manifest_path(library))
    if manifest != {**record, "sha256": digest}:
        complaint = _check_in_child(library)
        if complaint is not None:
            raise OSError(complaint)
        _write_manifest(library, {**record, "sha256": digest})
    return _load(library)


def _open_recorded(directory: Path, source_hash: str) -> ctypes.CDLL:
    """Load the best recorded library built from this source for this machine (best flags, then newest).

    Used when no compiler is found; raises OSError if none is usable.
    """
    ranked = []
    for manifest_path in directory.glob("sf_kernels-*.json"):
        manifest = _read_manifest(manifest_path)
        if manifest is None or manifest.get("source_sha256") != source_hash or manifest.get("machine") != _machine_id():
            continue
        flags = tuple(manifest.get("flags", ()))
        rank = _FLAG_SETS.index(flags) if flags in _FLAG_SETS else len(_FLAG_SETS)
        ranked.append((rank, -manifest_path.stat().st_mtime_ns, manifest_path.with_suffix(".so"), manifest))
    complaint = f"no library built from this source for this machine in {directory}"
    for _, _, library, manifest in sorted(ranked):
        try:
            return _open(library, {k: v for k, v in manifest.items() if k != "sha256"})
        except OSError as err:
            complaint = str(err)
    raise OSError(complaint)


def _build() -> ctypes.CDLL:
    """Load a sound cached build (best flags first), else compile one; raises RuntimeError/OSError saying why not."""
    source = _SOURCE.read_bytes()
    source_hash = hashlib.sha256(source).hexdigest()
    directory = cache_dir()
    try:
        cc = _compiler()
    except FileNotFoundError as missing:
        try:
            return _open_recorded(directory, source_hash)
        except OSError as err:
            raise FileNotFoundError(f"{missing}, and {err}") from None
    directory.mkdir(parents=True, exist_ok=True)
    candidates = []
    for flags in _FLAG_SETS:
        path = _library_path(cc, flags, source, directory)
        if path is None:
            continue
        record = {"source_sha256": source_hash, "flags": list(flags), "machine": _machine_id()}
        if path.exists():
            try:
                return _open(path, record)
            except OSError as err:
                _log.info("mup_schedulefree: rebuilding %s (%s)", path.name, err)
        candidates.append((flags, path, record))
    complaint = "the compiler rejected every flag set"
    for flags, path, record in candidates:
        complaint = _compile(cc, flags, path)
        if complaint is None:
            try:
                return _open(path, record)
            except OSError as err:
                complaint = str(err)
    raise RuntimeError(f"{cc} failed: {complaint}")


def _library() -> ctypes.CDLL | None:
    """The loaded library, building it on first use; warns once per process if that fails."""
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            try:
                _lib = _build()
            except (OSError, RuntimeError, subprocess.SubprocessError) as err:
                warnings.warn(f"mup_schedulefree: native CPU kernels unavailable ({err}); "
                              "using the eager torch path instead.", RuntimeWarning, stacklevel=3)
            _tried = True
    return _lib


def available() -> bool:
    """Whether the native kernels are built and loaded (builds them on the first call).

    Returns:
        True if the fused functions of this module can be called.
    """
    return _library() is not None


def _plain(t: torch.Tensor) -> bool:
    """A plain, contiguous, strided CPU tensor without a pending negation."""
    return (type(t) in _PLAIN_TYPES and t.is_cpu and t.layout is torch.strided and t.is_contiguous()
            and not t.is_neg())


def supports(t: torch.Tensor) -> bool:
    """Whether the float32 kernels can update ``t`` in place.

    Args:
        t: a plain tensor or Parameter (pass ``.to_local()`` of a DTensor).

    Returns:
        True for contiguous, strided, float32 CPU tensors without a pending negation.
    """
    return t.dtype is torch.float32 and _plain(t)


def supports_low_precision(t: torch.Tensor) -> bool:
    """Whether the ``*_lp_`` kernels can take ``t`` as a parameter (with a float32 master) or its gradient.

    Args:
        t: a plain tensor or Parameter.

    Returns:
        True for contiguous, strided, bfloat16 or float16 CPU tensors without a pending negation.
    """
    return t.dtype in LOW_PRECISION_CODES and _plain(t)


def _check_lists(op: Op, lists: Sequence[Tensors]) -> torch.dtype | None:
    """Raise unless ``lists`` fit ``op`` (counts, kinds, sizes); returns the low-precision dtype, if any."""
    names = [t.name for t in op.tensors]
    if len(lists) != len(op.tensors):
        raise TypeError(f"{op.symbol} takes the lists {names}, got {len(lists)} lists")
    count = len(lists[0])
    low = None
    for arg, ts in zip(op.tensors, lists):
        if len(ts) != count:
            raise ValueError(f"{arg.name} has {len(ts)} tensors, expected {count} like {names[0]}")
        if arg.kind == "low":
            for i, t in enumerate(ts):
                if not supports_low_precision(t):
                    raise TypeError(f"{arg.name}[{i}] is not a contiguous CPU bfloat16/float16 tensor (got "
                                    f"{type(t).__name__}, {t.dtype}, {t.device}); check supports_low_precision() first")
                if low is None:
                    low = t.dtype
                elif t.dtype is not low:
                    raise TypeError(f"{arg.name}[{i}] is {t.dtype}, expected {low} like {names[0]}[0]")
        else:
            for i, t in enumerate(ts):
                if not supports(t):
                    raise TypeError(f"{arg.name}[{i}] is not a contiguous CPU float32 tensor "
                                    f"(got {type(t).__name__}, {t.dtype}, {t.device}); check supports() first")
    numels = [t.numel() for t in lists[0]]
    for arg, ts in zip(op.tensors[1:], lists[1:]):
        if [t.numel() for t in ts] != numels:
            raise ValueError(f"{arg.name} and {names[0]} differ in tensor sizes")
    return low


class Prepared:
    """One fused op bound to its tensor lists: checked once, its pointer arrays built once.

    Calling it runs the op over all the tensors with the given scalars, which must be exactly the op's
    named scalars (a missing, extra or misspelt name raises TypeError; nothing is positional). The
    binding stays valid while every tensor keeps its storage; whoever holds it decides when to
    prepare again (the optimizers do when a parameter's storage, dtype or gradient changes).

    Lists named in ``rebind`` (the gradients, which autograd may reallocate every step) are not
    kept: they must be bound with :meth:`bind` before every call, so a call never reads memory a
    freed gradient owned, and the op holds no reference that would keep a gradient alive.

    Args:
        name: the op's name in :data:`OPS`.
        lists: parallel lists of tensors, in the order of the op's ``tensors``.
        rebind: names of read-only lists to be bound before each call.
    """

    __slots__ = ("op", "_fn", "_pointers", "_numels", "_count", "_code", "_written", "_scalar_names", "_low",
                 "_rebind", "_unbound")

    def __init__(self, name: str, lists: Sequence[Tensors], rebind: tuple[str, ...] = ()) -> None:
        lib = _library()
        if lib is None:
            raise RuntimeError("native kernels are not available; check available() first")
        self.op = op = OPS[name]
        low = _check_lists(op, lists)
        self._fn = getattr(lib, op.symbol)
        self._count = len(lists[0])
        self._numels = array.array("q", [t.numel() for t in lists[0]])
        self._pointers = [array.array("Q", [t.data_ptr() for t in ts]) for ts in lists]
        self._code = () if low is None else (LOW_PRECISION_CODES[low],)
        self._low = low
        self._written = [list(ts) for arg, ts in zip(op.tensors, lists) if arg.written]
        self._scalar_names = tuple(name for name, _ in op.scalars)
        names = [arg.name for arg in op.tensors]
        for listed in rebind:
            if listed not in names or op.tensors[names.index(listed)].written:
                raise ValueError(f"{listed!r} is not a read-only list of {op.symbol}")
        self._rebind = frozenset(names.index(listed) for listed in rebind)
        self._unbound = set(self._rebind)

    def bind(self, name: str, tensors: Tensors) -> bool:
        """Bind one of the ``rebind`` lists for the next call, after checking every tensor.

        Args:
            name: the list's name in the op's ``tensors``.
            tensors: the tensors, one per tensor of the other lists.

        Returns:
            True if they were bound; False, binding nothing, if one is not of the kind, size or dtype
            the op takes here (the caller then takes another path).
        """
        index = next(i for i, arg in enumerate(self.op.tensors) if arg.name == name)
        if index not in self._rebind:
            raise ValueError(f"{name!r} was not named in rebind when this op was prepared")
        dtype = torch.float32 if self._low is None else self._low
        if len(tensors) != self._count or not all(
                type(t) in _PLAIN_TYPES and t.dtype is dtype and t.is_cpu and t.layout is torch.strided
                and t.is_contiguous() and not t.is_neg() and t.numel() == n for t, n in zip(tensors, self._numels)):
            return False
        self._pointers[index] = array.array("Q", [t.data_ptr() for t in tensors])
        self._unbound.discard(index)
        return True

    def __call__(self, **scalars: float) -> None:
        """Run the op once; bump the versions of the tensors it writes, as torch's in-place ops do.

        Args:
            **scalars: the op's named scalars.
        """
        if scalars.keys() != set(self._scalar_names):
            missing = [n for n in self._scalar_names if n not in scalars]
            extra = [n for n in scalars if n not in self._scalar_names]
            raise TypeError(f"{self.op.symbol} takes the scalars {list(self._scalar_names)}; "
                            f"missing {missing}, unexpected {extra}")
        if self._unbound:
            unbound = [self.op.tensors[i].name for i in sorted(self._unbound)]
            raise RuntimeError(f"{self.op.symbol}: bind {unbound} before each call")
        self._unbound.update(self._rebind)
        if not self._count:
            return
        status = self._fn(*(p.buffer_info()[0] for p in self._pointers), self._numels.buffer_info()[0], self._count,
                          *(scalars[n] for n in self._scalar_names), *self._code, torch.get_num_threads())
        if status != 0:
            raise MemoryError(f"{self.op.symbol} could not allocate its work plan for {self._count} tensors")
        for ts in self._written:
            increment_version(ts)


def run(name: str, lists: Sequence[Tensors], **scalars: float) -> None:
    """Check the lists, run the fused op ``name`` of :data:`OPS` over all of them once.

    Args:
        name: the op's name.
        lists: parallel lists of tensors, in the order of the op's ``tensors``.
        **scalars: the op's named scalars.
    """
    Prepared(name, lists)(**scalars)


def adam_sf_step_(
    ys: Tensors,
    grads: Tensors,
    zs: Tensors,
    exp_avg_sqs: Tensors,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    ckp1: float,
    bias_correction2: float,
    adaptive: bool = True,
) -> None:
    """One schedule-free Adam step, in place, with y held in the parameters.

    v = beta2 v + (1 - beta2) g g;  u = (adaptive ? g / (sqrt(v / bias_correction2) + eps) : g) + weight_decay y;
    y = lerp(y, z, ckp1) + lr (beta1 (1 - ckp1) - 1) u;  z = z - lr u.

    Args:
        ys: parameters holding y; updated.
        grads: gradients at y; read only.
        zs: base iterates; updated.
        exp_avg_sqs: second moments v; updated (also when not adaptive).
        lr: learning rate of this step.
        beta1: interpolation between z and x that defines y.
        beta2: second-moment decay.
        eps: added to the root of the bias-corrected second moment.
        weight_decay: decay coefficient, applied at y.
        ckp1: averaging weight of the new z into x.
        bias_correction2: 1 - beta2^(k+1).
        adaptive: divide by the second-moment root (False in RAdam-SF's first steps).
    """
    run("adam_sf_step_", (ys, grads, zs, exp_avg_sqs), lr=lr, beta1=beta1, beta2=beta2, eps=eps,
        weight_decay=weight_decay, ckp1=ckp1, bias_correction2=bias_correction2, adaptive=int(bool(adaptive)))


def adam_sf_closure_step_(
    xs: Tensors,
    grads: Tensors,
    zs: Tensors,
    exp_avg_sqs: Tensors,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    ckp1: float,
    bias_correction2: float,
    adaptive: bool = True,
) -> None:
    """One schedule-free Adam step in closure form: the parameters hold y on entry and x on exit.

    u as in ``adam_sf_step_``;  x = lerp(y, z, 1 - 1/beta1);  z = z - lr u;  x = lerp(x, z, ckp1).

    Args:
        xs: parameters holding y (formed before the closure); hold x on return.
        grads: gradients at y; read only.
        zs: base iterates; updated.
        exp_avg_sqs: second moments v; updated.
        lr: learning rate of this step.
        beta1: interpolation between z and x that defined y.
        beta2: second-moment decay.
        eps: added to the root of the bias-corrected second moment.
        weight_decay: decay coefficient, applied at y.
        ckp1: averaging weight of the new z into x.
        bias_correction2: 1 - beta2^(k+1).
        adaptive: divide by the second-moment root.
    """
    run("adam_sf_closure_step_", (xs, grads, zs, exp_avg_sqs), lr=lr, beta1=beta1, beta2=beta2, eps=eps,
        weight_decay=weight_decay, ckp1=ckp1, bias_correction2=bias_correction2, adaptive=int(bool(adaptive)))


def adam_sf_inner_step_(
    ys: Tensors,
    grads: Tensors,
    zs: Tensors,
    exp_avg_sqs: Tensors,
    exp_avgs: Tensors,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    ckp1: float,
    bias_correction2: float,
    adaptive: bool = True,
    inner_momentum: float,
    bias_correction1: float,
) -> None:
    """``adam_sf_step_`` with inner momentum: the direction's numerator is the bias-corrected EMA of g.

    m = inner_momentum m + (1 - inner_momentum) g;  u = (m / bias_correction1) / (sqrt(v / bias_correction2)
    + eps) + weight_decay y (without the root when not adaptive); y and z then move as in ``adam_sf_step_``.

    Args:
        ys: parameters holding y; updated.
        grads: gradients at y; read only.
        zs: base iterates; updated.
        exp_avg_sqs: second moments v; updated.
        exp_avgs: first moments m (the EMA of g); updated.
        lr: learning rate of this step.
        beta1: interpolation between z and x that defines y.
        beta2: second-moment decay.
        eps: added to the root of the bias-corrected second moment.
        weight_decay: decay coefficient, applied at y.
        ckp1: averaging weight of the new z into x.
        bias_correction2: 1 - beta2^(k+1).
        adaptive: divide by the second-moment root.
        inner_momentum: decay of the EMA of g, in (0, 1).
        bias_correction1: 1 - inner_momentum^(k+1).
    """
    run("adam_sf_inner_step_", (ys, grads, zs, exp_avg_sqs, exp_avgs), lr=lr, beta1=beta1, beta2=beta2, eps=eps,
        weight_decay=weight_decay, ckp1=ckp1, bias_correction2=bias_correction2, adaptive=int(bool(adaptive)),
        inner_momentum=inner_momentum, bias_correction1=bias_correction1)


def adam_sf_inner_closure_step_(
    xs: Tensors,
    grads: Tensors,
    zs: Tensors,
    exp_avg_sqs: Tensors,
    exp_avgs: Tensors,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    ckp1: float,
    bias_correction2: float,
    adaptive: bool = True,
    inner_momentum: float,
    bias_correction1: float,
) -> None:
    """``adam_sf_inner_step_`` in closure form: the parameters hold y on entry and x on exit.

    u as in ``adam_sf_inner_step_``; x and z then move as in ``adam_sf_closure_step_``.

    Args:
        xs: parameters holding y (formed before the closure); hold x on return.
        grads: gradients at y; read only.
        zs: base iterates; updated.
        exp_avg_sqs: second moments v; updated.
        exp_avgs: first moments m (the EMA of g); updated.
        lr: learning rate of this step.
        beta1: interpolation between z and x that defined y.
        beta2: second-moment decay.
        eps: added to the root of the bias-corrected second moment.
        weight_decay: decay coefficient, applied at y.
        ckp1: averaging weight of the new z into x.
        bias_correction2: 1 - beta2^(k+1).
        adaptive: divide by the second-moment root.
        inner_momentum: decay of the EMA of g, in (0, 1).
        bias_correction1: 1 - inner_momentum^(k+1).
    """
    run("adam_sf_inner_closure_step_", (xs, grads, zs, exp_avg_sqs, exp_avgs), lr=lr, beta1=beta1, beta2=beta2,
        eps=eps, weight_decay=weight_decay, ckp1=ckp1, bias_correction2=bias_correction2,
        adaptive=int(bool(adaptive)), inner_momentum=inner_momentum, bias_correction1=bias_correction1)


def sgd_sf_step_(
    ys: Tensors, grads: Tensors, zs: Tensors, *, lr: float, momentum: float, weight_decay: float, ckp1: float
) -> None:
    """One schedule-free SGD step, in place, with y held in the parameters.

    u = g + weight_decay y;  y = lerp(y, z, ckp1) + lr (momentum (1 - ckp1) - 1) u;  z = z - lr u.

    Args:
        ys: parameters holding y; updated.
        grads: gradients at y; read only.
        zs: base iterates; updated.
        lr: learning rate of this step.
        momentum: interpolation between z and x that defines y.
        weight_decay: decay coefficient, applied at y.
        ckp1: averaging weight of the new z into x.
    """
    run("sgd_sf_step_", (ys, grads, zs), lr=lr, momentum=momentum, weight_decay=weight_decay, ckp1=ckp1)


def sgd_sf_closure_step_(
    xs: Tensors, grads: Tensors, zs: Tensors, *, lr: float, momentum: float, weight_decay: float, ckp1: float
) -> None:
    """One schedule-free SGD step in closure form: the parameters hold y on entry and x on exit.

    u = g + weight_decay y;  x = lerp(y, z, 1 - 1/momentum);  z = z - lr u;  x = lerp(x, z, ckp1).

    Args:
        xs: parameters holding y (formed before the closure); hold x on return.
        grads: gradients at y; read only.
        zs: base iterates; updated.
        lr: learning rate of this step.
        momentum: interpolation between z and x that defined y.
        weight_decay: decay coefficient, applied at y.
        ckp1: averaging weight of the new z into x.
    """
    run("sgd_sf_closure_step_", (xs, grads, zs), lr=lr, momentum=momentum, weight_decay=weight_decay, ckp1=ckp1)


def lerp_(starts: Tensors, ends: Tensors, weight: float) -> None:
    """starts = lerp(starts, ends, weight), in place, rounded as ``torch._foreach_lerp_``.

    Args:
        starts: tensors moved in place.
        ends: targets; read only.
        weight: interpolation weight (may lie outside [0, 1]).
    """
    run("lerp_", (starts, ends), weight=weight)


def wrapper_enter_(params: Tensors, zs: Tensors, *, decay: float, y_scale: float, to_x: float) -> None:
    """ScheduleFreeWrapper before the base step: the parameters take z, the z slots take x.

    If decay != 0: z = z - decay y and y = y y_scale first. Then x = lerp(y, z, to_x); p = z; zslot = x.

    Args:
        params: parameters holding y; hold z on return.
        zs: the wrapper's z slots; hold x on return.
        decay: lr times the decay taken at y.
        y_scale: factor applied to y with the decay, 1 - decay (1 - momentum).
        to_x: weight 1 - 1/momentum that moves y to x.
    """
    run("wrapper_enter_", (params, zs), decay=decay, y_scale=y_scale, to_x=to_x)


def wrapper_exit_(params: Tensors, zs: Tensors, *, ckp1: float, to_y: float) -> None:
    """ScheduleFreeWrapper after the base step: average, move to y, and put z back in its slot.

    x = lerp(x, z, ckp1); y = lerp(x, z, to_y); p = y; zslot = z.

    Args:
        params: parameters holding the new z; hold y on return.
        zs: the wrapper's z slots holding x; hold z on return.
        ckp1: averaging weight of the new z into x.
        to_y: weight 1 - momentum that moves x to y.
    """
    run("wrapper_exit_", (params, zs), ckp1=ckp1, to_y=to_y)


def adam_sf_step_lp_(params: Tensors, grads: Tensors, masters: Tensors, zs: Tensors, exp_avg_sqs: Tensors, *,
                     lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, ckp1: float,
                     bias_correction2: float, adaptive: bool = True, closure_form: bool = False) -> None:
    """``adam_sf_step_`` (or its closure form) for bfloat16/float16 parameters with float32 masters, in one pass.

    Each master first takes its parameter's value if the parameter no longer equals the master
    rounded to its dtype (someone wrote it); then y (closure form: y on entry, x on exit) is the
    master, updated with z and the second moment in float32 from the widened gradient, and the
    parameter gets the new master rounded to nearest, ties to even, as ``.to(dtype)`` rounds.

    Args:
        params: bfloat16 or float16 parameters; hold the rounded new master on return.
        grads: their gradients, of the same dtype; read only.
        masters: float32 master copies of the parameters; updated.
        zs: float32 base iterates; updated.
        exp_avg_sqs: float32 second moments; updated.
        lr: learning rate of this step.
        beta1: interpolation between z and x that defines y.
        beta2: second-moment decay.
        eps: added to the root of the bias-corrected second moment.
        weight_decay: decay coefficient, applied at y.
        ckp1: averaging weight of the new z into x.
        bias_correction2: 1 - beta2^(k+1).
        adaptive: divide by the second-moment root.
        closure_form: the masters hold y on entry and x on exit.
    """
    run("adam_sf_closure_step_lp_" if closure_form else "adam_sf_step_lp_", (params, grads, masters, zs, exp_avg_sqs),
        lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, ckp1=ckp1,
        bias_correction2=bias_correction2, adaptive=int(bool(adaptive)))


def adam_sf_inner_step_lp_(params: Tensors, grads: Tensors, masters: Tensors, zs: Tensors, exp_avg_sqs: Tensors,
                           exp_avgs: Tensors, *, lr: float, beta1: float, beta2: float, eps: float,
                           weight_decay: float, ckp1: float, bias_correction2: float, adaptive: bool = True,
                           inner_momentum: float, bias_correction1: float, closure_form: bool = False) -> None:
    """``adam_sf_inner_step_`` (or its closure form) for bfloat16/float16 parameters with float32 masters, in one pass.

    Masters and parameters are handled as in :func:`adam_sf_step_lp_`.

    Args:
        params: bfloat16 or float16 parameters; hold the rounded new master on return.
        grads: their gradients, of the same dtype; read only.
        masters: float32 master copies of the parameters; updated.
        zs: float32 base iterates; updated.
        exp_avg_sqs: float32 second moments; updated.
        exp_avgs: float32 first moments (the EMA of g); updated.
        lr: learning rate of this step.
        beta1: interpolation between z and x that defines y.
        beta2: second-moment decay.
        eps: added to the root of the bias-corrected second moment.
        weight_decay: decay coefficient, applied at y.
        ckp1: averaging weight of the new z into x.
        bias_correction2: 1 - beta2^(k+1).
        adaptive: divide by the second-moment root.
        inner_momentum: decay of the EMA of g, in (0, 1).
        bias_correction1: 1 - inner_momentum^(k+1).
        closure_form: the masters hold y on entry and x on exit.
    """
    run("adam_sf_inner_closure_step_lp_" if closure_form else "adam_sf_inner_step_lp_",
        (params, grads, masters, zs, exp_avg_sqs, exp_avgs), lr=lr, beta1=beta1, beta2=beta2, eps=eps,
        weight_decay=weight_decay, ckp1=ckp1, bias_correction2=bias_correction2, adaptive=int(bool(adaptive)),
        inner_momentum=inner_momentum, bias_correction1=bias_correction1)


def sgd_sf_step_lp_(params: Tensors, grads: Tensors, masters: Tensors, zs: Tensors, *, lr: float, momentum: float,
                    weight_decay: float, ckp1: float, closure_form: bool = False) -> None:
    """``sgd_sf_step_`` (or its closure form) for bfloat16/float16 parameters with float32 masters, in one pass.

    Masters and parameters are handled as in :func:`adam_sf_step_lp_`.

    Args:
        params: bfloat16 or float16 parameters; hold the rounded new master on return.
        grads: their gradients, of the same dtype; read only.
        masters: float32 master copies of the parameters; updated.
        zs: float32 base iterates; updated.
        lr: learning rate of this step.
        momentum: interpolation between z and x that defines y.
        weight_decay: decay coefficient, applied at y.
        ckp1: averaging weight of the new z into x.
        closure_form: the masters hold y on entry and x on exit.
    """
    run("sgd_sf_closure_step_lp_" if closure_form else "sgd_sf_step_lp_", (params, grads, masters, zs),
        lr=lr, momentum=momentum, weight_decay=weight_decay, ckp1=ckp1)


def lerp_lp_(params: Tensors, masters: Tensors, ends: Tensors, weight: float) -> None:
    """masters = lerp(masters, ends, weight) and params = the rounded masters, for bfloat16/float16 parameters.

    A master whose parameter was written since (it no longer equals the rounded master) takes the
    parameter's value first, as in :func:`adam_sf_step_lp_`.

    Args:
        params: bfloat16 or float16 parameters; hold the rounded new master on return.
        masters: their float32 masters; moved in place.
        ends: float32 targets; read only.
        weight: interpolation weight (may lie outside [0, 1]).
    """
    run("lerp_lp_", (params, masters, ends), weight=weight)
