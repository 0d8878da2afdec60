"""Helpers for the seams around a schedule-free optimizer: evaluation, checkpoints, BatchNorm.

A schedule-free model must be evaluated and saved at x, the averaged point, while training
happens at y. These helpers do the switching and put everything back as it was:

* :func:`eval_mode`: a context manager that puts model and optimizer in eval mode and restores both.
* :func:`save_checkpoint` / :func:`load_checkpoint`: weights at x with the optimizer state and mode.
* :func:`recalibrate_batchnorm`: recompute BatchNorm running statistics at x. Statistics gathered
  during training were measured at y, on different weights than the ones evaluated.
"""
from __future__ import annotations

import contextlib
import itertools
import os
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

BATCHNORM = (nn.modules.batchnorm._BatchNorm,)
_EMPTY = object()


def _optimizer_mode(optimizer: Any) -> bool | None:
    """The optimizer's train mode, or None for forms without one (closure forms hold x always)."""
    if not hasattr(optimizer, "eval") or not hasattr(optimizer, "train"):
        return None
    mode = getattr(optimizer, "train_mode", None)
    if mode is None:
        groups = getattr(optimizer, "param_groups", [])
        mode = bool(groups) and all(group.get("train_mode", False) for group in groups)
    return bool(mode)


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


def save_checkpoint(path: str | os.PathLike | Any, model: nn.Module, optimizer: Any, **extra: Any) -> None:
    """Save the weights at x, the optimizer state and its mode; training state is left as it was.

    The optimizer is switched to eval for the save and back afterwards, so the run that saves
    and continues and a run resumed from this file go through the same operations: resuming
    with :func:`load_checkpoint` continues bit-identically.

    Args:
        path: file path or writable binary file object (as for ``torch.save``).
        model: the model; its ``state_dict()`` is saved at x.
        optimizer: its schedule-free optimizer.
        **extra: further picklable entries to store (step counters, LR scheduler state, ...).
    """
    reserved = {"model", "optimizer", "optimizer_was_training"} & extra.keys()
    if reserved:
        raise ValueError(f"extra entries {sorted(reserved)} collide with the checkpoint's own keys")
    was_training = _optimizer_mode(optimizer)
    _set_optimizer_mode(optimizer, False if was_training is not None else None)
    try:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "optimizer_was_training": was_training, **extra}, path)
    finally:
        _set_optimizer_mode(optimizer, was_training)


def load_checkpoint(path: str | os.PathLike | Any, model: nn.Module, optimizer: Any | None = None,
                    map_location: Any = None) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` and restore the mode it was saved from.

    The model receives the weights at x; if an optimizer is given it receives its state and is
    put back in the mode the saving run was in (train: parameters move to y), ready to continue.
    Without an optimizer, the model is left at x, ready for evaluation or inference.

    Args:
        path: file path or readable binary file object.
        model: model to load the weights into.
        optimizer: optimizer to load the state into, or None.
        map_location: as for ``torch.load``.

    Returns:
        The checkpoint's extra entries.
    """
    checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    for key in ("model", "optimizer"):
        if key not in checkpoint:
            raise ValueError(f"checkpoint at {path!r} has no {key!r} entry: it was not written by save_checkpoint")
    model.load_state_dict(checkpoint["model"])
    if optimizer is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        _set_optimizer_mode(optimizer, checkpoint["optimizer_was_training"])
    return {k: v for k, v in checkpoint.items() if k not in ("model", "optimizer", "optimizer_was_training")}


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
    momentum None), with the optimizer in eval mode. Afterwards the optimizer returns to its mode
    (and the parameters to the point it implies) and every module to its own train/eval flag,
    keeping the new statistics. Nothing else in the model changes.

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
    with eval_mode(model, optimizer):
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
