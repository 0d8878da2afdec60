"""Helpers for the seams around a schedule-free optimizer: evaluation, checkpoints, BatchNorm.

A schedule-free model must be evaluated and saved at x, the averaged point, while training
happens at y. These helpers do the switching and put everything back as it was:

* :func:`eval_mode`: a context manager that puts model and optimizer in eval mode and restores both.
* :func:`state_dict_at_x`: the model's state dict at x, computed without moving anything.
* :func:`save_checkpoint` / :func:`load_checkpoint`: weights at x with the optimizer state and
  mode; written atomically, checked against model and optimizer before anything is loaded.
* :func:`recalibrate_batchnorm`: recompute BatchNorm running statistics at x. Statistics gathered
  during training were measured at y, on different weights than the ones evaluated.
"""
from __future__ import annotations

import contextlib
import errno
import itertools
import os
import pickle
import re
import zipfile
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from .files import replace_atomically

BATCHNORM = (nn.modules.batchnorm._BatchNorm,)
_EMPTY = object()
_WRAPPER_DEPTH = 8     # how many ``.optimizer`` attributes to look through
CHECKPOINT_KEYS = ("model", "model_at_y", "optimizer", "optimizer_class", "optimizer_was_training",
                   "optimizer_param_shapes")


def unwrap_optimizer(optimizer: Any, attribute: str = "points_at_x") -> Any:
    """The first of ``optimizer``, ``optimizer.optimizer``, ... that has ``attribute``, or None.

    Wrappers such as accelerate's ``AcceleratedOptimizer`` and Lightning's keep the optimizer they
    wrap there. With the default attribute this finds the schedule-free optimizer of this package.

    Args:
        optimizer: an optimizer, possibly wrapped.
        attribute: what the optimizer looked for has.

    Returns:
        That optimizer, or None if no optimizer in the chain has ``attribute``.
    """
    for _ in range(_WRAPPER_DEPTH):
        if optimizer is None or hasattr(optimizer, attribute):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def _optimizer_mode(optimizer: Any) -> bool | None:
    """The optimizer's train mode, or None for forms without one (closure forms hold x always)."""
    if not hasattr(optimizer, "eval") or not hasattr(optimizer, "train"):
        return None
    holder = unwrap_optimizer(optimizer, "train_mode")
    if holder is not None:
        return bool(holder.train_mode)
    groups = getattr(optimizer, "param_groups", [])
    return bool(groups) and all(group.get("train_mode", False) for group in groups)


def check_model_and_optimizer(model: Any, optimizer: Any) -> None:
    """Raise unless ``model`` is a module and ``optimizer`` an optimizer that holds some of its parameters.

    An optimizer of another model would otherwise be accepted, and the helpers below would save or
    evaluate the training point y as if it were x.

    Args:
        model: what the user passed as the model.
        optimizer: what the user passed as its optimizer (wrappers with ``.optimizer`` allowed).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or ``optimizer`` has no ``param_groups``.
        ValueError: none of the optimizer's parameters belongs to ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Invalid model: {type(model).__name__} (must be a torch.nn.Module)")
    holder = unwrap_optimizer(optimizer, "param_groups")
    if holder is None:
        raise TypeError(f"Invalid optimizer: {type(optimizer).__name__} (must be a torch.optim.Optimizer, "
                        "e.g. a schedule-free optimizer of mup_schedulefree)")
    owned = {id(p) for p in model.parameters()}
    if not any(id(p) in owned for group in holder.param_groups for p in group["params"]):
        raise ValueError("Invalid optimizer: it holds none of the model's parameters (is it the optimizer of "
                         "another model?)")


def _set_optimizer_mode(optimizer: Any, train: bool | None) -> None:
    if train is None:
        return
    optimizer.train() if train else optimizer.eval()


@contextlib.contextmanager
def eval_mode(model: nn.Module, optimizer: Any) -> Iterator[None]:
    """Evaluate at x: model.eval() and optimizer.eval() inside, both restored on exit.

    Every module's own ``training`` flag is restored, and the optimizer returns to the mode it
    was in (train or eval). Closure-form optimizers (no train/eval) are left alone.

    Example::

        with eval_mode(model, optimizer), torch.no_grad():
            val_loss = loss_fn(model(x_val), y_val)

    Args:
        model: the model being trained.
        optimizer: its schedule-free optimizer.
    """
    check_model_and_optimizer(model, optimizer)
    module_modes = [(module, module.training) for module in model.modules()]
    optimizer_mode = _optimizer_mode(optimizer)
    model.eval()
    _set_optimizer_mode(optimizer, False if optimizer_mode is not None else None)
    try:
        yield
    finally:
        _set_optimizer_mode(optimizer, optimizer_mode)
        for module, training in module_modes:
            module.training = training


def _at_x(model: nn.Module, optimizer: Any) -> tuple[dict[str, Any], list[str]]:
    """The model's state dict at x, and the keys whose current value differs from it (they hold y)."""
    holder = unwrap_optimizer(optimizer)
    if holder is None:
        return _at_x_by_round_trip(model, optimizer)
    points = {id(p): point for p, point in holder.points_at_x().items()}
    live = model.state_dict(keep_vars=True)
    placed = {id(value) for value in live.values()}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in points and id(p) not in placed:
            raise ValueError(f"model.state_dict() does not hold parameter {name!r} itself (a state_dict hook "
                             "replaces it), so its value at x has no key to go under")
    state = {key: points.get(id(value), value.detach() if isinstance(value, torch.Tensor) else value)
             for key, value in live.items()}
    return state, [key for key, value in live.items() if id(value) in points]


def _at_x_by_round_trip(model: nn.Module, optimizer: Any) -> tuple[dict[str, Any], list[str]]:
    """:func:`_at_x` for optimizers without ``points_at_x``: eval(), copy, train()."""
    if not _optimizer_mode(optimizer):
        return model.state_dict(), []
    optimizer.eval()
    try:
        state = {key: value.clone() if isinstance(value, torch.Tensor) else value
                 for key, value in model.state_dict().items()}
    finally:
        optimizer.train()
    now = model.state_dict()
    return state, [key for key, value in state.items()
                   if isinstance(value, torch.Tensor) and not torch.equal(value, now[key])]


@torch.no_grad()
def state_dict_at_x(model: nn.Module, optimizer: Any) -> dict[str, Any]:
    """The model's ``state_dict()`` with every parameter at x, the point to evaluate and export.

    Computed out of place: model and optimizer are left exactly as they are (no mode switch,
    nothing moved), whatever mode the optimizer is in. The values are new tensors, bit-identical
    to what ``optimizer.eval()`` would write; entries the optimizer does not move (buffers,
    parameters already at x) are the model's own tensors, detached, as ``state_dict()`` gives.
    Parameters are matched by identity, so tied weights get x under every name.

    An optimizer without ``points_at_x`` (the published ``schedulefree`` classes) is looked for
    through ``.optimizer`` attributes (accelerate's ``AcceleratedOptimizer``); if none has it and
    the optimizer is in train mode, this falls back to ``eval()``, a copy, ``train()``: that round
    trip may move the parameters by one rounding.

    Args:
        model: the model being trained.
        optimizer: its schedule-free optimizer (any form, or a wrapper around one).

    Returns:
        A state dict loadable with ``model.load_state_dict``.
    """
    check_model_and_optimizer(model, optimizer)
    return _at_x(model, optimizer)[0]


# ----------------------------------------------------------------------------- checkpoints
def _display(path: Any) -> Any:
    """What error messages call the file: the path as a string, or the file object."""
    return os.fspath(path) if isinstance(path, (str, os.PathLike)) else path


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _first_sentence(error: BaseException) -> str:
    return _first_line(error).split(". ")[0]


def _save_error(name: Any, error: BaseException) -> BaseException:
    """What a failed save raises: an interrupt as itself, else one line naming the file.

    torch's writer reports an exception raised by a file's ``write`` as a RuntimeError whose
    context is that exception; an interrupt (KeyboardInterrupt) is found there and an OS error
    keeps its errno.
    """
    chain = [e for e in (error, error.__cause__, error.__context__) if e is not None]
    interrupt = next((e for e in chain if not isinstance(e, Exception)), None)
    if interrupt is not None:
        return interrupt
    cause = next((e for e in chain if isinstance(e, OSError)), None)
    if cause is not None and cause.errno is not None:
        return OSError(cause.errno, f"could not save checkpoint to {name!r}: {cause.strerror or cause}")
    failure = OSError if cause is not None else RuntimeError
    return failure(f"could not save checkpoint to {name!r}: {type(error).__name__}: {_first_line(error)}")


def _save_to_file(checkpoint: dict[str, Any], temporary: str) -> None:
    with open(temporary, "wb") as file:
        torch.save(checkpoint, file)


def _write(checkpoint: dict[str, Any], path: Any) -> None:
    """``torch.save`` through :func:`replace_atomically` (a file object: in place), failures named."""
    if not isinstance(path, (str, os.PathLike)):
        torch.save(checkpoint, path)
        return
    name = os.fspath(path)
    try:
        replace_atomically(name, lambda temporary: _save_to_file(checkpoint, temporary))
    except BaseException as error:
        failure = _save_error(name, error)
        if failure is error:
            raise
        raise failure from (error if isinstance(failure, Exception) else None)


def save_checkpoint(path: str | os.PathLike | Any, model: nn.Module, optimizer: Any, **extra: Any) -> None:
    """Save the weights at x, the optimizer state and its mode, without moving anything.

    The weights at x come from :func:`state_dict_at_x`, out of place: saving changes neither the
    parameters nor the optimizer, so a run (or a replica) that saves continues exactly as one that
    does not. The optimizer state is saved as it is, together with the values the moved parameters
    hold now (y, in train mode), so :func:`load_checkpoint` resumes bit-identically.

    A path is written atomically: to a temporary file in the same folder, flushed and fsynced, then
    renamed over ``path`` (a symbolic link is followed). If anything fails (a full disk, an entry
    that cannot be pickled, KeyboardInterrupt), the previous file at ``path`` is untouched and the
    temporary file is removed. A file object is written in place, as ``torch.save`` does: no
    atomic rename is possible there.

    Args:
        path: file path, or writable binary file object (as for ``torch.save``).
        model: the model; its state dict is saved at x.
        optimizer: its schedule-free optimizer (or a wrapper around one, see :func:`state_dict_at_x`).
        **extra: further entries to store (step counters, LR scheduler state, ...). Tensors, numbers,
            strings and containers of them load with ``weights_only=True``; other objects need
            ``load_checkpoint(..., weights_only=False)``.

    Raises:
        ValueError: an ``extra`` name is one of the checkpoint's own keys.
        OSError: the file could not be written (errno kept, e.g. ENOSPC); names ``path``.
        RuntimeError: any other failure while writing (e.g. pickling); names ``path``.
    """
    reserved = set(CHECKPOINT_KEYS) & extra.keys()
    if reserved:
        raise ValueError(f"extra entries {sorted(reserved)} collide with the checkpoint's own keys")
    check_model_and_optimizer(model, optimizer)
    was_training = _optimizer_mode(optimizer)
    at_x, moved = _at_x(model, optimizer)
    now = model.state_dict()
    checkpoint = {
        "model": at_x,
        "model_at_y": {key: now[key] for key in moved},
        "optimizer": optimizer.state_dict(),
        "optimizer_was_training": was_training,
        "optimizer_class": _class_name(optimizer),
        "optimizer_param_shapes": [[tuple(p.shape) for p in group["params"]] for group in optimizer.param_groups],
        **extra,
    }
    _write(checkpoint, path)


def _check_crcs(path: Any, name: Any) -> None:
    """Raise ValueError naming the file if a record of its zip archive fails its CRC-32.

    torch's reader does not check them, so a flipped bit inside a tensor would load as a wrong
    number. Costs one read of the file. A file object is checked if it can seek, then rewound.
    """
    if not isinstance(path, (str, os.PathLike)) and not (hasattr(path, "seek") and hasattr(path, "tell")):
        return
    start = None if isinstance(path, (str, os.PathLike)) else path.tell()
    try:
        if not zipfile.is_zipfile(path):
            return
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError, RuntimeError):
        return  # torch's reader reports a damaged archive with its own error, translated in _read
    finally:
        if start is not None:
            path.seek(start)
    if bad is not None:
        raise ValueError(f"checkpoint {name!r} is corrupted: record {bad!r} fails its CRC check")


def _read(path: Any, map_location: Any, weights_only: bool) -> Any:
    """``torch.load``, with one error naming the file for a truncated, corrupted or refused one."""
    name = _display(path)
    _check_crcs(path, name)
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as error:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if refused:
            raise ValueError(f"checkpoint {name!r} holds {refused.group(1)}, which weights_only=True refuses to "
                             "unpickle: pass weights_only=False only for a file you trust") from error
        raise ValueError(f"checkpoint {name!r} is truncated or corrupted: {_first_sentence(error)}") from error
    except EOFError as error:
        raise ValueError(f"checkpoint {name!r} is truncated or corrupted: it ends early") from error
    except OSError as error:
        if error.errno != errno.EINVAL:      # a cut zip directory points torch's reader past the end
            raise
        raise ValueError(f"checkpoint {name!r} is truncated or corrupted: {_first_sentence(error)}") from error
    except RuntimeError as error:
        if "PytorchStreamReader" not in str(error):
            raise
        raise ValueError(f"checkpoint {name!r} is truncated or corrupted: {_first_sentence(error)}") from error
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as error:  # a damaged or foreign pickle
        raise ValueError(f"checkpoint {name!r} is not a checkpoint or is corrupted: "
                         f"{type(error).__name__}: {_first_line(error)}") from error


def _shape(value: Any) -> tuple[int, ...] | None:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _check_model_fits(name: Any, model: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Raise ValueError, naming the first offending entry, unless the saved weights fit ``model``."""
    expected = model.state_dict()
    saved = checkpoint["model"]
    missing = next((key for key in expected if key not in saved), None)
    if missing is not None:
        raise ValueError(f"checkpoint {name!r} does not fit this model: it has no {missing!r}")
    for source in (saved, checkpoint.get("model_at_y") or {}):
        for key, value in source.items():
            if key not in expected:
                raise ValueError(f"checkpoint {name!r} does not fit this model: the model has no {key!r}")
            if _shape(value) != _shape(expected[key]):
                raise ValueError(f"checkpoint {name!r} does not fit this model: {key!r} has shape {_shape(value)} "
                                 f"in the checkpoint and {_shape(expected[key])} in the model")


def _class_name(optimizer: Any) -> str:
    """The name of the optimizer class inside framework wrappers: what a checkpoint records."""
    return type(unwrap_optimizer(optimizer, "param_groups")).__name__


def _check_optimizer_fits(name: Any, model: nn.Module, optimizer: Any, checkpoint: dict[str, Any]) -> None:
    """Raise ValueError unless the saved optimizer state pairs with ``optimizer``'s parameters.

    Pairs group by group, parameter by parameter, as ``Optimizer.load_state_dict`` does, and
    compares each parameter's shape with the one recorded at save time.
    """
    saved_class, this_class = checkpoint.get("optimizer_class"), _class_name(optimizer)
    if saved_class is not None and saved_class != this_class:
        raise ValueError(f"checkpoint {name!r} holds the state of a {saved_class}, this optimizer is a {this_class}")
    saved_groups = checkpoint["optimizer"].get("param_groups") if isinstance(checkpoint["optimizer"], dict) else None
    if not isinstance(saved_groups, list):
        raise ValueError(f"checkpoint {name!r} has no optimizer param_groups: it was not written by save_checkpoint")
    groups = optimizer.param_groups
    if len(saved_groups) != len(groups):
        raise ValueError(f"checkpoint {name!r} holds {len(saved_groups)} optimizer parameter groups, "
                         f"this optimizer has {len(groups)}")
    names = {id(p): key for key, p in reversed(list(model.named_parameters(remove_duplicate=False)))}
    shapes = checkpoint.get("optimizer_param_shapes") or [[None] * len(g["params"]) for g in saved_groups]
    for index, (saved, group, saved_shapes) in enumerate(zip(saved_groups, groups, shapes)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(f"checkpoint {name!r} holds {len(saved['params'])} parameters in optimizer group "
                             f"{index}, this optimizer's group {index} has {len(group['params'])}")
        for position, (shape, p) in enumerate(zip(saved_shapes, group["params"])):
            if shape is not None and tuple(shape) != tuple(p.shape):
                label = repr(names[id(p)]) if id(p) in names else f"parameter {position}"
                raise ValueError(f"checkpoint {name!r} does not fit this optimizer: group {index} holds "
                                 f"{label} of shape {tuple(p.shape)}, its saved state is for shape {tuple(shape)}")


def _switch_to(optimizer: Any, train: bool | None) -> None:
    """Put the optimizer in mode ``train`` unless it reports being there already."""
    mode = _optimizer_mode(optimizer)
    if train is not None and mode is not None and mode != train:
        _set_optimizer_mode(optimizer, train)


def load_checkpoint(path: str | os.PathLike | Any, model: nn.Module, optimizer: Any | None = None,
                    map_location: Any = None, weights_only: bool = True) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` and restore the mode it was saved from.

    With an optimizer, model and optimizer come back exactly as they were saved (train mode:
    parameters at y), ready to continue bit-identically. Without one, the model receives the
    weights at x, ready for evaluation or inference.

    Everything is checked before anything is modified: names and shapes of the weights against
    the model, and the optimizer state, group by group and parameter by parameter, against the
    shapes of the parameters it will attach to (a checkpoint of another width fails here, not at
    the first step). If the optimizer refuses the state anyway, its previous state is put back
    and the model is untouched.

    Args:
        path: file path or readable binary file object.
        model: model to load the weights into.
        optimizer: optimizer to load the state into, or None.
        map_location: as for ``torch.load``.
        weights_only: unpickle only tensors, numbers, strings and containers of them (torch's
            safe loader). Pass False for a trusted file whose ``extra`` entries hold other objects.

    Returns:
        The checkpoint's extra entries.

    Raises:
        ValueError: the file is truncated or corrupted, holds objects ``weights_only`` refuses,
            was not written by ``save_checkpoint``, or does not fit the model or optimizer; the
            message names the file (and the first offending parameter with both shapes).
    """
    name = _display(path)
    checkpoint = _read(path, map_location, weights_only)
    if not isinstance(checkpoint, dict) or any(key not in checkpoint for key in ("model", "optimizer")):
        raise ValueError(f"checkpoint {name!r} has no 'model' and 'optimizer' entries: "
                         "it was not written by save_checkpoint")
    if optimizer is not None:
        check_model_and_optimizer(model, optimizer)
    elif not isinstance(model, nn.Module):
        raise TypeError(f"Invalid model: {type(model).__name__} (must be a torch.nn.Module)")
    _check_model_fits(name, model, checkpoint)
    if optimizer is None:
        model.load_state_dict(checkpoint["model"])
    else:
        _check_optimizer_fits(name, model, optimizer, checkpoint)
        before = optimizer.state_dict()
        try:
            optimizer.load_state_dict(checkpoint["optimizer"])
        except BaseException:
            optimizer.load_state_dict(before)
            raise
        was_training = checkpoint.get("optimizer_was_training")
        at_y = checkpoint.get("model_at_y")
        # Files that do not store y were saved in eval mode: load x in eval, then switch.
        _switch_to(optimizer, was_training if at_y is not None else False)
        model.load_state_dict({**checkpoint["model"], **(at_y or {})})
        _switch_to(optimizer, was_training)
    return {key: value for key, value in checkpoint.items() if key not in CHECKPOINT_KEYS}


@contextlib.contextmanager
def _parameters_at_x(model: nn.Module, optimizer: Any) -> Iterator[None]:
    """Parameters hold x inside; on exit each gets back its exact previous bits. The optimizer is
    not switched. Optimizers without ``points_at_x`` fall back to :func:`eval_mode`."""
    holder = unwrap_optimizer(optimizer)
    if holder is None:
        with eval_mode(model, optimizer):
            yield
        return
    points = holder.points_at_x()
    held = {p: p.detach().clone() for p in points}
    try:
        with torch.no_grad():
            for p, point in points.items():
                p.copy_(point)
        yield
    finally:
        with torch.no_grad():
            for p, value in held.items():
                p.copy_(value)


def _default_forward(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    if isinstance(batch, dict):
        return model(**batch)
    return model(batch)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, optimizer: Any, batches: Iterable[Any],
                          forward: Callable[[nn.Module, Any], Any] | None = None) -> int:
    """Recompute every BatchNorm's running statistics at x, the point that will be evaluated.

    Running statistics are reset and re-estimated as an exact average over ``batches`` (BatchNorm
    momentum None), with the parameters at x (computed out of place, see :func:`state_dict_at_x`).
    Afterwards every parameter holds exactly what it held before (its bits, not a recomputation),
    the optimizer is untouched, and every module has its own train/eval flag back, keeping the
    new statistics. Nothing else in the model changes.

    Example::

        recalibrate_batchnorm(model, optimizer, (x for x, _ in itertools.islice(train_loader, 50)))
        with eval_mode(model, optimizer):
            accuracy = evaluate(model)

    Args:
        model: the model.
        optimizer: its schedule-free optimizer.
        batches: training batches; a tuple/list batch passes its first element to the model, a
            dict is passed as keyword arguments.
        forward: optional ``forward(model, batch)`` replacing that convention.

    Returns:
        The number of batches used.
    """
    check_model_and_optimizer(model, optimizer)
    norms = [m for m in model.modules() if isinstance(m, BATCHNORM) and m.track_running_stats]
    if not norms:
        return 0
    iterator = iter(batches)
    first = next(iterator, _EMPTY)
    if first is _EMPTY:
        raise ValueError("batches is empty: BatchNorm statistics need at least one batch to re-estimate")
    forward = forward or _default_forward
    module_modes = [(module, module.training) for module in model.modules()]
    momenta = [norm.momentum for norm in norms]
    count = 0
    model.eval()
    with _parameters_at_x(model, optimizer):
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None
            norm.train()
        try:
            for batch in itertools.chain([first], iterator):
                forward(model, batch)
                count += 1
        finally:
            for norm, momentum in zip(norms, momenta):
                norm.momentum = momentum
    for module, training in module_modes:
        module.training = training
    return count
