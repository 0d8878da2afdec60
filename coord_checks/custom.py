"""Your own model in a coordinate check: load it, give it base shapes, find its readout, feed it.

A model is a factory ``make_model(width) -> nn.Module``, given as the callable itself or as the text
``"package.module:function"`` (or ``"path/to/file.py:function"``). Its parameters need mup base
shapes (``p.infshape``): either ``make_model`` sets them (``mup.set_base_shapes(model, base,
delta=delta)``), or ``prepare_model(..., base_width=B)`` sets them from the same factory at widths
``B`` and ``2 * B`` (built on the meta device, so they cost no memory).

``prepare_model`` checks the factory before anything trains and raises ``ArgumentError`` (a
ValueError whose ``argument`` attribute names the argument, and so the command-line flag) for a
factory that ignores its width, widths that change no parameter shape, or a model without base
shapes. It also finds the readout (the last ``mup.MuReadout``, else the last ``nn.Linear``) and the
attention-logit modules (submodules whose name ends in ``attn_logits``), which the verdict does not
judge at initialisation; both can be named instead.

Batches come from ``load_batches``: the built-in standard-library text (``"text"``: next-character
token sequences, for token models with ``coord_checks.data.VOCAB_SIZE`` inputs) or a function
``batches(n_batches, split) -> [(inputs, targets), ...]`` with ``split`` ``"train"`` or ``"eval"``.
Losses: ``"cross_entropy"``, ``"mse"`` or a function ``loss(output, targets) -> scalar``; the
built-in ones use ``output.logits`` when the model returns an object that has it (Hugging Face).
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import mup
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from coord_checks import data
from coord_checks.recording import check_widths, record_coords
from coord_checks.verdict import Verdict, judge

ModelFactory = Callable[[int], nn.Module]
LossFn = Callable[[Any, Tensor], Tensor]

#: Built-in batch sources.
BUILTIN_DATA: tuple[str, ...] = ("text",)
#: Built-in losses.
BUILTIN_LOSSES: tuple[str, ...] = ("cross_entropy", "mse")
#: Characters per sequence and sequences per batch of the built-in text.
TEXT_SEQ_LEN = 16
TEXT_BATCH_SIZE = 16
SPLITS: tuple[str, ...] = ("train", "eval")


class ArgumentError(ValueError):
    """A bad argument of a user-model check; ``argument`` names it (``model``, ``widths``,
    ``base_width``, ``data``, ``loss``, ``readout``, ``attention``), and so the flag ``--model`` &c.

    Args:
        argument: the argument's name.
        message: what is wrong, one line.
    """

    def __init__(self, argument: str, message: str) -> None:
        super().__init__(f"{argument}: {message}")
        self.argument = argument
        self.message = message


def first_line(error: BaseException) -> str:
    """``TypeName: first line of the message`` of an exception, for one-line reports.

    Args:
        error: any exception.

    Returns:
        One line.
    """
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def load_object(spec: str, argument: str) -> Any:
    """Import ``"package.module:name"`` or ``"path/to/file.py:name"`` and return the object.

    Args:
        spec: module (importable, or a ``.py`` file path) and attribute (may be dotted), joined by ``:``.
        argument: the argument's name, for errors.

    Returns:
        The object.

    Raises:
        ArgumentError: if ``spec`` has no ``:``, the module cannot be imported or lacks the name.
    """
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ArgumentError(argument, f"expected module:function, got {spec!r}")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise ArgumentError(argument, f"no such file: {module_name!r}")
            unique = "_coord_checks_user_" + re.sub(r"\W", "_", str(path.resolve()))
            module = sys.modules.get(unique)
            if module is None:
                module_spec = importlib.util.spec_from_file_location(unique, path)
                module = importlib.util.module_from_spec(module_spec)
                module_spec.loader.exec_module(module)
                sys.modules[unique] = module
        else:
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))  # as `python -m` does: the current folder imports
            module = importlib.import_module(module_name)
    except ArgumentError:
        raise
    except Exception as error:  # the user's module may raise anything while it imports
        raise ArgumentError(argument, f"cannot import {module_name!r}: {first_line(error)}") from None
    value: Any = module
    for part in attribute.split("."):
        if not hasattr(value, part):
            raise ArgumentError(argument, f"{module_name!r} has no attribute {attribute!r}")
        value = getattr(value, part)
    return value


def _label(factory: Callable, spec: Any) -> str:
    if isinstance(spec, str):
        return spec
    return getattr(factory, "__qualname__", None) or type(factory).__name__


def file_label(model: Any) -> str:
    """A short name for output files: ``"pkg.module:make_model"`` gives ``"module_make_model"``.

    Args:
        model: the model spec or factory.

    Returns:
        Letters, digits and underscores.
    """
    text = model if isinstance(model, str) else _label(model, model)
    module, _, name = text.rpartition(":")
    short = f"{Path(module).stem.rpartition('.')[2]}_{name}" if module else name
    return re.sub(r"\W+", "_", short).strip("_") or "model"


def _build(make: ModelFactory, width: int, label: str, meta: bool) -> nn.Module:
    """``make(width)`` on the meta device (no memory, no random draws) or on the CPU with the
    caller's random state left as found; a failure is an ``ArgumentError`` naming ``model``."""
    try:
        if meta:
            with torch.device("meta"):
                model = make(width)
        else:
            with torch.random.fork_rng():
                model = make(width)
    except ArgumentError:
        raise
    except Exception as error:  # the user's factory may raise anything
        raise ArgumentError("model", f"{label}({width}) raised {first_line(error)}") from None
    if not isinstance(model, nn.Module):
        raise ArgumentError("model", f"{label}({width}) returned {type(model).__name__}, not an nn.Module")
    return model


def _shapes(make: ModelFactory, width: int, label: str) -> dict[str, torch.Size]:
    """Parameter shapes of ``make(width)``, built on the meta device when the factory allows."""
    try:
        model = _build(make, width, label, meta=True)
    except ArgumentError:
        model = _build(make, width, label, meta=False)
    return mup.get_shapes(model)


def find_readout(model: nn.Module) -> str | None:
    """The readout's name: the last ``mup.MuReadout`` (shared readouts included), else the last
    ``nn.Linear``.

    Args:
        model: the network.

    Returns:
        The qualified module name, or None if the model has neither.
    """
    named = [(name, module) for name, module in model.named_modules() if name]
    for kind in (mup.MuReadout, nn.Linear):
        names = [name for name, module in named if isinstance(module, kind)]
        if names:
            return names[-1]
    return None


def find_attention_logits(model: nn.Module) -> tuple[str, ...]:
    """Submodules that carry attention logits: those named ``attn_logits`` (an ``nn.Identity``
    through which the logits pass, as in ``coord_checks.models``) or ``*.attn_logits``.

    Args:
        model: the network.

    Returns:
        Their qualified names (empty if there are none; Hugging Face models compute their logits
        inside a function and have none).
    """
    return tuple(name for name, _ in model.named_modules() if name.split(".")[-1] == "attn_logits")


@dataclass(frozen=True)
class ModelSpec:
    """A user model ready for a check.

    Attributes:
        factory: ``width -> model`` with base shapes set.
        label: how errors and titles name the factory.
        readout: the readout module's name (None if the model has none).
        attention: the attention-logit modules' names.
    """

    factory: ModelFactory
    label: str
    readout: str | None
    attention: tuple[str, ...]

    @property
    def init_exempt(self) -> tuple[str, ...]:
        """Module names not judged at initialisation (the readout and attention logits)."""
        return (*((self.readout,) if self.readout else ()), *self.attention)


def prepare_model(
    model: str | ModelFactory,
    widths: Sequence[int],
    base_width: int | None = None,
    readout: str | None = None,
    attention: Sequence[str] | None = None,
) -> ModelSpec:
    """Check a model factory and give it base shapes if asked.

    Args:
        model: ``make_model(width) -> nn.Module`` or ``"module:function"`` naming it.
        widths: the widths the check will use (at least two distinct).
        base_width: if given, base shapes are set from ``make_model(base_width)`` and
            ``make_model(2 * base_width)`` (``mup.set_base_shapes(model, base, delta=delta)``);
            otherwise ``make_model`` must set them itself.
        readout: the readout's module name (default: found by ``find_readout``).
        attention: the attention-logit modules' names (default: ``find_attention_logits``).

    Returns:
        A ``ModelSpec``.

    Raises:
        ArgumentError: naming ``model`` for a factory that cannot be imported or called, that
            ignores its width, or whose models lack base shapes (or mark no dimension as
            width-dependent); ``widths`` for widths that change no parameter shape; ``base_width``
            for a non-positive one; ``readout``/``attention`` for names that are not submodules.
    """
    make = load_object(model, "model") if isinstance(model, str) else model
    if not callable(make):
        raise ArgumentError("model", f"expected a callable width -> nn.Module, got {type(make).__name__}")
    label = _label(make, model)
    try:
        widths = check_widths(widths)
    except (TypeError, ValueError) as error:
        raise ArgumentError("widths", str(error)) from None
    if base_width is not None and (isinstance(base_width, bool) or not isinstance(base_width, int)
                                   or base_width <= 0):
        raise ArgumentError("base_width", f"expected a positive int, got {base_width!r}")
    distinct = sorted(set(widths))
    shapes = {w: _shapes(make, w, label) for w in distinct}
    if all(shapes[w] == shapes[distinct[0]] for w in distinct):
        probes = [w for w in (distinct[0] // 2, 2 * distinct[-1]) if w >= 1]
        changes = [w for w in probes if _shapes(make, w, label) != shapes[distinct[0]]]
        if not changes:
            raise ArgumentError("model", f"{label} ignores its width: every parameter has the same shape "
                                         f"at widths {', '.join(map(str, [*distinct, *probes]))}")
        raise ArgumentError("widths", f"widths {distinct} change no parameter shape of {label} "
                                      f"(width {changes[0]} does)")
    if base_width is not None:
        base, delta = _shapes(make, base_width, label), _shapes(make, 2 * base_width, label)
        if base == delta:
            raise ArgumentError("base_width", f"{label} has the same parameter shapes at widths "
                                              f"{base_width} and {2 * base_width}")
        factory = _with_base_shapes(make, base, delta, label)
    else:
        factory = make
    example = _build(factory, distinct[0], label, meta=False)
    _check_base_shapes(example, label, distinct[0])
    modules = dict(example.named_modules())
    if readout is not None and readout not in modules:
        raise ArgumentError("readout", f"{readout!r} is not a submodule of {label}({distinct[0]})")
    missing = [name for name in attention or () if name not in modules]
    if missing:
        raise ArgumentError("attention", f"{missing} are not submodules of {label}({distinct[0]})")
    return ModelSpec(
        factory=factory,
        label=label,
        readout=find_readout(example) if readout is None else readout,
        attention=find_attention_logits(example) if attention is None else tuple(attention),
    )


def _with_base_shapes(make: ModelFactory, base: dict, delta: dict, label: str) -> ModelFactory:
    def factory(width: int) -> nn.Module:
        model = make(width)
        try:
            return mup.set_base_shapes(model, base, delta=delta)
        except AssertionError as error:  # mup's check for a plain nn.Linear readout
            raise ArgumentError("model", f"mup.set_base_shapes refused {label}({width}): "
                                         f"{first_line(error).removeprefix('AssertionError: ')}") from None

    factory.__qualname__ = label
    return factory


def _check_base_shapes(model: nn.Module, label: str, width: int) -> None:
    unshaped = [name for name, p in model.named_parameters() if not hasattr(p, "infshape")]
    if unshaped:
        raise ArgumentError("model", f"{label}({width}) has no base shapes (parameter {unshaped[0]!r} has no "
                                     "infshape): call mup.set_base_shapes in it, or pass a base width "
                                     "(--base-width)")
    if not any(p.infshape.ninf() for p in model.parameters()):
        raise ArgumentError("model", f"the base shapes of {label}({width}) mark no dimension as "
                                     "width-dependent (every width_mult is 1, as after "
                                     "mup.set_base_shapes(model, None)); set them from a base and a delta "
                                     "model, or pass a base width (--base-width)")


@lru_cache(maxsize=1)
def _text_tokens() -> tuple[Tensor, Tensor]:
    return data.split_tokens(data.encode(data.stdlib_text()))


def load_batches(source: str | Callable[[int, str], Sequence[data.Batch]], n_batches: int,
                 split: str = "train") -> list[data.Batch]:
    """Batches from the built-in text or from the user's function.

    Args:
        source: ``"text"`` (next-character sequences of ``TEXT_SEQ_LEN`` tokens, ``TEXT_BATCH_SIZE``
            per batch: int64 inputs and targets of shape ``(batch, seq)``, vocabulary
            ``coord_checks.data.VOCAB_SIZE``), a ``"module:function"`` naming a function, or the
            function ``(n_batches, split) -> [(inputs, targets), ...]`` itself.
        n_batches: batches wanted (a function may return fewer; the loops cycle them).
        split: ``"train"`` or ``"eval"`` (the text's held-out last tenth).

    Returns:
        A list of ``(inputs, targets)`` tensor pairs.

    Raises:
        ArgumentError: naming ``data`` for an unknown name, a function that raises, or a result
            that is not a non-empty list of tensor pairs.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if source == "text":
        tokens = _text_tokens()[SPLITS.index(split)]
        return data.char_sequence_batches(tokens, TEXT_SEQ_LEN, TEXT_BATCH_SIZE, n_batches, seed=0)
    if isinstance(source, str) and ":" not in source:
        raise ArgumentError("data", f"expected one of {BUILTIN_DATA} or module:function, got {source!r}")
    fn = load_object(source, "data") if isinstance(source, str) else source
    label = source if isinstance(source, str) else _label(fn, fn)
    try:
        batches = fn(n_batches, split)
    except Exception as error:  # the user's function may raise anything
        raise ArgumentError("data", f"{label}({n_batches}, {split!r}) raised {first_line(error)}") from None
    if isinstance(batches, tuple) and len(batches) == 2 and all(isinstance(t, Tensor) for t in batches):
        batches = [batches]
    ok = isinstance(batches, (list, tuple)) and len(batches) > 0 and all(
        isinstance(b, (list, tuple)) and len(b) == 2 and all(isinstance(t, Tensor) for t in b) for b in batches)
    if not ok:
        raise ArgumentError("data", f"{label}({n_batches}, {split!r}) returned {type(batches).__name__}; "
                                    "expected a non-empty list of (inputs, targets) tensor pairs")
    return [tuple(b) for b in batches]


def model_output(output: Any) -> Tensor:
    """The tensor a built-in loss compares: ``output.logits`` if the output has it (Hugging Face
    models), the first element of a tuple, or the output itself.

    Args:
        output: what the model returned.

    Returns:
        A tensor.
    """
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


def cross_entropy(output: Any, targets: Tensor) -> Tensor:
    """Mean cross-entropy over every position; classes in the last dimension.

    Args:
        output: logits ``(..., classes)`` or an object with ``.logits``.
        targets: class indices with the leading shape of the logits.

    Returns:
        A scalar loss.
    """
    logits = model_output(output)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def mse(output: Any, targets: Tensor) -> Tensor:
    """Mean squared error.

    Args:
        output: predictions with the shape of ``targets``, or an object with ``.logits``.
        targets: regression targets.

    Returns:
        A scalar loss.
    """
    return F.mse_loss(model_output(output), targets)


def resolve_loss(loss: str | LossFn) -> LossFn:
    """A loss function from its name, a ``"module:function"``, or the function itself.

    Args:
        loss: ``"cross_entropy"``, ``"mse"``, ``"module:function"`` or a callable
            ``(output, targets) -> scalar``.

    Returns:
        The function.

    Raises:
        ArgumentError: naming ``loss`` for an unknown name or a non-callable.
    """
    if callable(loss):
        return loss
    if loss in BUILTIN_LOSSES:
        return {"cross_entropy": cross_entropy, "mse": mse}[loss]
    if ":" not in loss:
        raise ArgumentError("loss", f"expected one of {BUILTIN_LOSSES} or module:function, got {loss!r}")
    fn = load_object(loss, "loss")
    if not callable(fn):
        raise ArgumentError("loss", f"{loss!r} is not callable")
    return fn


def log_spaced_steps(last: int, per_octave: int = 2) -> list[int]:
    """Steps 1 .. ``last`` spaced evenly in log2, always including 1 and ``last``.

    Args:
        last: the final step (positive).
        per_octave: points per doubling of the step.

    Returns:
        Increasing distinct steps, e.g. ``[1, 2, 3, 4, 6, 8, 11, 16, ..., 128, 181, 200]`` for 200.

    Raises:
        ValueError: for a non-positive ``last`` or ``per_octave``.
    """
    if not isinstance(last, int) or last < 1:
        raise ValueError(f"last must be a positive int, got {last!r}")
    if per_octave < 1:
        raise ValueError(f"per_octave must be at least 1, got {per_octave}")
    n = int(math.floor(math.log2(last) * per_octave)) + 1
    steps = {round(2.0 ** (i / per_octave)) for i in range(n)} | {last}
    return sorted(s for s in steps if 1 <= s <= last)


class CheckResult(NamedTuple):
    """What ``check_model`` returns.

    Attributes:
        frame: the recording frame (``coord_checks.recording.COLUMNS``).
        verdict: its ``Verdict``.
        spec: the checked model (its factory, readout and attention-logit modules).
    """

    frame: pd.DataFrame
    verdict: Verdict
    spec: ModelSpec


def check_model(
    model: str | ModelFactory,
    widths: Sequence[int],
    data: str | Callable[[int, str], Sequence[data.Batch]] = "text",
    loss: str | LossFn = "cross_entropy",
    optimizer: str = "adamw",
    lr: float | None = None,
    steps: int | None = None,
    horizon: int | None = None,
    base_width: int | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    batches: str = "fixed",
    readout: str | None = None,
    attention: Sequence[str] | None = None,
    statistic: str = "l1",
    sequences: Sequence[str] = ("y", "x"),
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> CheckResult:
    """Coordinate check of your own model in muP, in one call.

    Args:
        model: ``make_model(width) -> nn.Module`` or ``"module:function"`` (see ``prepare_model``).
        widths: at least two distinct widths.
        data: ``"text"``, ``"module:function"`` or a function ``(n_batches, split) -> batches``.
        loss: ``"cross_entropy"``, ``"mse"``, ``"module:function"`` or ``(output, targets) -> loss``.
        optimizer: a name of ``coord_checks.optimizers.OPTIMIZER_NAMES`` (its muP factory).
        lr: base-width learning rate (default ``coord_checks.optimizers.DEFAULT_LRS``).
        steps: recorded steps, step 1 being the initialisation (default 4, 10 for radam).
        horizon: instead of ``steps``: train this many steps, record log-spaced ones and judge each
            module over time (``judge(..., over_time=True)``).
        base_width: set base shapes from the factory at this width and twice it.
        seeds: initialisation seeds.
        batches: ``"fixed"`` (one batch) or ``"streaming"`` (a new batch per step).
        readout: the readout's module name (default: found).
        attention: the attention-logit modules' names (default: found).
        statistic: statistic to record and judge.
        sequences: ``"y"`` and/or ``"x"``.
        device: where to train.
        progress: show a tqdm bar.

    Returns:
        A ``CheckResult`` (frame, verdict, spec).

    Raises:
        ArgumentError: naming the argument at fault (see ``prepare_model``, ``load_batches``,
            ``resolve_loss``; ``steps``/``horizon`` when both are given).
    """
    from coord_checks.optimizers import DEFAULT_LRS, optimizer_factory  # imports the optimizers

    if steps is not None and horizon is not None:
        raise ArgumentError("horizon", f"give steps or horizon, not both (got {steps} and {horizon})")
    if batches not in ("fixed", "streaming"):
        raise ArgumentError("batches", f"expected 'fixed' or 'streaming', got {batches!r}")
    spec = prepare_model(model, widths, base_width, readout, attention)
    total = horizon or steps or (10 if optimizer == "radam" else 4)
    train = load_batches(data, 1 if batches == "fixed" else total, "train")
    frame = record_coords(
        model_factory=spec.factory,
        optimizer_factory=optimizer_factory(optimizer, "mup", DEFAULT_LRS.get(optimizer) if lr is None else lr),
        widths=list(widths), batches=train, loss_fn=resolve_loss(loss), steps=total, seeds=seeds,
        statistics=(statistic,), sequences=sequences, device=device, parametrization="mup",
        progress=progress, record_steps=log_spaced_steps(horizon) if horizon else None,
    )
    verdict = judge(frame, statistic=statistic, init_exempt=spec.init_exempt, over_time=horizon is not None)
    return CheckResult(frame, verdict, spec)
