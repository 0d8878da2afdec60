"""Integrations with the trainers people use; each module imports its framework, none is required.

* :mod:`mup_schedulefree.integrations.transformers`: Hugging Face ``Trainer`` callback, a one-line
  ``optimizer_cls_and_kwargs`` for every factory, and the muP tied readout for language models
  (``pip install "mup_schedulefree[hf]"``).
* :mod:`mup_schedulefree.integrations.lightning`: Lightning callback (``pip install "mup_schedulefree[lightning]"``).

accelerate needs no module: see :func:`mup_schedulefree.eval_mode` around ``accelerator.save_state``.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import torch


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import an optional framework, or raise a one-line ImportError naming the extra that installs it.

    Args:
        module: the module to import, e.g. ``"transformers"``.
        extra: the extra of this package that installs it, e.g. ``"hf"``.
        feature: what needs it, for the message.

    Returns:
        The imported module.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"{feature} needs {module}, which is not importable ({error}): "
                          f'pip install "mup_schedulefree[{extra}]"') from error


def params_in_state_dict_order(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters in the order ``optimizer.state_dict()`` numbers them.

    Args:
        optimizer: a ``torch.optim.Optimizer``.

    Returns:
        The parameters of every group, group by group; index i is state_dict's key i.
    """
    return [p for group in optimizer.param_groups for p in group["params"]]


TRAIN_POINT = "schedule_free_train_point"


def with_train_points(optimizer: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
    """``optimizer``'s state dict with each parameter's training point y stored beside its state.

    A checkpoint that holds the model at x can only resume bit-identically if it also keeps y:
    recomputing y from x and z rounds. Nothing is added in eval mode (the parameters hold x and the
    state dict says so). The given dict and the optimizer's live state are not modified.

    Args:
        optimizer: the schedule-free optimizer (unwrapped) whose ``state_dict()`` this is.
        state_dict: the dict ``optimizer.state_dict()`` returned.

    Returns:
        A new state dict whose per-parameter entries carry ``TRAIN_POINT`` (the parameter's value,
        not a copy: save it before the next step), or ``state_dict`` itself in eval mode.
    """
    if not getattr(optimizer, "train_mode", False):
        return state_dict
    params = params_in_state_dict_order(optimizer)
    state = {index: {**entry, TRAIN_POINT: params[index].detach()} if isinstance(index, int) else entry
             for index, entry in state_dict["state"].items()}
    return {**state_dict, "state": state}


@torch.no_grad()
def restore_train_points(optimizer: Any) -> int:
    """Move parameters loaded at x back to the training point y stored by :func:`with_train_points`.

    Call after both the model (at x) and the optimizer state are loaded; every stored point is
    removed from the optimizer's state.

    Args:
        optimizer: the schedule-free optimizer (unwrapped) that loaded the state dict.

    Returns:
        The number of parameters restored.
    """
    count = 0
    for p in params_in_state_dict_order(optimizer):
        point = optimizer.state.get(p, {}).pop(TRAIN_POINT, None)
        if point is not None:
            p.copy_(point)
            count += 1
    return count

