"""ScheduleFreeWrapper: any torch optimizer made schedule-free, as a real ``torch.optim.Optimizer``.

The base optimizer runs on z: before its step the wrapper puts z into the parameter (keeping x
in z's slot), and after it rebuilds x and y from the new z:

    z     <- z - lr * weight_decay_at_y * y                 (optional decay taken at y)
    z     <- base_step(z, grad at y)
    x_new <- (1 - ckp1) x + ckp1 z
    y_new <- momentum x_new + (1 - momentum) z

Around the base step the wrapper makes one pass over y and z to enter (decay, move to x, trade
slots) and one to leave (average, move to y, trade back): each reads and writes both once, fused
into a single native kernel on CPU. That is 8 tensor-sized memory passes beyond the base's own,
the fewest possible while the base stays opaque and updates z in the parameter's own storage.

The wrapper shares its parameter-group dicts with the base optimizer, so LR schedulers and code
that edits ``optimizer.param_groups`` drive both. Its own per-group entries carry an ``sf_``
prefix (``weight_decay_at_y`` excepted) so they cannot collide with the base's.
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
from torch.optim import Optimizer

from .. import kernels
from ..validation import check_range
from .base import (SCHEDULE_DEFAULTS, Modes, advance_schedule, check_each_group, check_flags, check_saved_state,
                   local, share_lr_ratios, train_mode_closure, upgrade_saved_group)

PREFIX = "sf_"


def check_wrapper_group(group: dict[str, Any]) -> None:
    """Validate a wrapper's group: the base's lr, ``weight_decay_at_y`` and the ``sf_`` entries.

    Args:
        group: a parameter group with the wrapper's defaults filled in.
    """
    check_flags(group, PREFIX)
    if "lr" in group:  # the base's lr, in a group (the wrapper's defaults have none)
        check_range("lr", group["lr"], 0.0)
    check_range("weight_decay_at_y", group["weight_decay_at_y"], 0.0)
    check_range("momentum", group[PREFIX + "momentum"], 0.0, 1.0, low_open=True)
    check_range("r", group[PREFIX + "r"], 0.0)
    check_range("weight_lr_power", group[PREFIX + "weight_lr_power"], 0.0)


def check_plain_base(base: Any, own_keys: tuple[str, ...] = ()) -> None:
    """Raise TypeError unless ``base`` is a plain torch optimizer a wrapper can share groups with.

    Refused: anything that is not a ``torch.optim.Optimizer``, an optimizer that is already
    schedule-free (ours, the published ones, a wrapper: two averages would share their state), and
    one whose groups already hold a key the wrapper writes.

    Args:
        base: the optimizer to wrap.
        own_keys: group keys the wrapper writes besides its ``sf_`` ones.
    """
    if not isinstance(base, Optimizer):
        raise TypeError(f"base must be a torch.optim.Optimizer instance, got {type(base).__name__}")
    modal = callable(getattr(base, "train", None)) and callable(getattr(base, "eval", None))  # published ones
    if modal or callable(getattr(base, "points_at_x", None)) or any(key.startswith(PREFIX)
                                                                   for g in base.param_groups for key in g):
        raise TypeError(f"base is already schedule-free ({type(base).__name__}): wrap a plain torch optimizer "
                        "(the two would share their averaging state)")
    taken = sorted({key for g in base.param_groups for key in g if key in own_keys})
    if taken:
        raise TypeError(f"base {type(base).__name__} keeps {', '.join(map(repr, taken))} in its parameter groups, "
                        "where the wrapper keeps its own bookkeeping: wrap an optimizer without such keys")


class WrapperShell(Modes, Optimizer):
    """What both wrappers share: the base that owns the groups, group addition, the train/eval mode.

    A subclass sets ``self.base`` before ``Optimizer.__init__`` over ``base.param_groups`` and
    defines ``_switch(to_train)``, which moves the parameters of groups whose mode differs and
    records the new mode under ``sf_train_mode``.
    """

    base: Optimizer
    _mode_key = PREFIX + "train_mode"

    def __getstate__(self) -> dict[str, Any]:
        """Pickle/deepcopy state: torch's keeps defaults, state and groups; the base goes along."""
        return {**super().__getstate__(), "base": self.base}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the base optimizer and to the wrapper (validated before either changes).

        Args:
            param_group: dict with ``params`` and optional per-group hyperparameters of the base
                optimizer and ``weight_decay_at_y``.
        """
        if not any(param_group is g for g in self.base.param_groups):
            if not isinstance(param_group, dict):
                raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
            check_wrapper_group({**self.defaults, **param_group})
            mode = self.train_mode if self.param_groups else True
            self.base.add_param_group({**param_group, PREFIX + "train_mode": mode})
            param_group = self.base.param_groups[-1]
        check_wrapper_group({**self.defaults, **param_group})
        super().add_param_group(param_group)
        self._groups_changed()

    def _groups_changed(self) -> None:
        """Called after a group was added: drop whatever was derived from the groups."""


class ScheduleFreeWrapper(WrapperShell):
    """Make any ``torch.optim.Optimizer`` schedule-free.

    Call ``train()`` before training and ``eval()`` before evaluating or saving; a new wrapper
    starts in train mode. Turn off the base optimizer's own momentum (e.g. Adam's beta1=0): the
    wrapper's interpolation provides it. If the base step raises, the parameters get y back and
    the z slots z (the schedule does not advance) before the error propagates.

    Example::

        base = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.0, 0.999))
        opt = ScheduleFreeWrapper(base, momentum=0.9, weight_decay_at_y=0.01)

    Args:
        base: the optimizer that updates z; it must use ``group['lr']`` as its learning rate for
            the decay at y and the averaging weight to be right (its ``group['d']``, if any, is
            folded into the averaging weight as D-adaptation methods require).
        weight_decay_at_y: default decay taken at y, per group overridable with the
            ``weight_decay_at_y`` group key; decay set on the base optimizer acts at z instead.
        momentum: interpolation y = (1 - momentum) z + momentum x, 0 < momentum < 1 (default 0.9).
        weight_lr_power: power of the max lr in the averaging weight (default 2).
        r: polynomial weighting power of the average (default 0).
        foreach: list-wide ``_foreach`` ops for the wrapper's own eager passes (default: on for
            non-CPU devices). The base optimizer keeps its own flags.
        fused: native single-pass kernels for the wrapper's passes on CPU float32 tensors
            (default: on where available).
    """

    def __init__(self, base: Optimizer, weight_decay_at_y: float = 0.0, momentum: float = 0.9,
                 weight_lr_power: float = 2, r: float = 0, foreach: bool | None = None,
                 fused: bool | None = None) -> None:
        check_plain_base(base)
        self.base = base
        defaults = {PREFIX + key: value for key, value in SCHEDULE_DEFAULTS.items()}
        defaults.update({"weight_decay_at_y": weight_decay_at_y, PREFIX + "momentum": momentum,
                         PREFIX + "weight_lr_power": weight_lr_power, PREFIX + "r": r,
                         PREFIX + "foreach": foreach, PREFIX + "fused": fused, PREFIX + "train_mode": True})
        check_wrapper_group(defaults)
        super().__init__(base.param_groups, defaults)
        self.register_load_state_dict_pre_hook(check_saved_state)

    def _groups_changed(self) -> None:
        """A group was added: the plans no longer cover every group."""
        self._plans = None

    def _align_state(self) -> None:
        """Keep every z slot on its parameter's device and in its dtype (after ``model.to(...)``)."""
        for group in self.param_groups:
            for p in group["params"]:
                z = self.state.get(p, {}).get("z")
                if z is not None and (z.dtype != p.dtype or z.device != p.device):
                    self.state[p]["z"] = z.to(device=p.device, dtype=p.dtype)

    def _switch(self, to_train: bool) -> None:
        self._align_state()
        for group in self.param_groups:
            if group[PREFIX + "train_mode"] == to_train:
                continue
            beta = group[PREFIX + "momentum"]
            params = [p for p in group["params"] if "z" in self.state.get(p, ())]
            kernels.lerp_(*self._pair(params), 1.0 - beta if to_train else 1.0 - 1.0 / beta, **self._flags(group))
            group[PREFIX + "train_mode"] = to_train

    @kernels.compile_disabled
    @torch.no_grad()
    def points_at_x(self) -> dict[torch.Tensor, torch.Tensor]:
        """The values ``eval()`` would give the parameters, computed out of place on copies.

        Nothing is moved; parameters not listed already hold x (see
        :meth:`mup_schedulefree.optimizers.base.PrimalForm.points_at_x`).

        Returns:
            A dict mapping parameter -> its value at x.
        """
        points: dict[torch.Tensor, torch.Tensor] = {}
        for group in self.param_groups:
            params = [p for p in group["params"] if "z" in self.state.get(p, ())]
            if not group[PREFIX + "train_mode"] or not params:
                continue
            copies = [p.detach().clone(memory_format=torch.preserve_format) for p in params]
            kernels.lerp_([local(c) for c in copies], [local(self.state[p]["z"]) for p in params],
                          1.0 - 1.0 / group[PREFIX + "momentum"], **self._flags(group))
            points.update(zip(params, copies))
        return points

    def _pair(self, params: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The points and z slots of ``params``, as local shards of DTensors."""
        return [local(p) for p in params], [local(self.state[p]["z"]) for p in params]

    @staticmethod
    def _flags(group: dict[str, Any]) -> dict[str, bool | None]:
        """The wrapper's own kernel flags of ``group``, for ``kernels.route`` to resolve."""
        return dict(fused=group.get(PREFIX + "fused"), foreach=group.get(PREFIX + "foreach"))

    @kernels.compile_disabled
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one schedule-free step around one step of the base optimizer.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss.

        Returns:
            The closure's loss, or None.
        """
        loss = train_mode_closure(self, closure)
        check_each_group(self.param_groups, check_wrapper_group)  # groups may have been edited since
        passes = self._cached_passes()
        if passes is None:
            self._align_state()
            passes = []
            for group in self.param_groups:
                params = [p for p in group["params"] if p.grad is not None]
                for p in params:
                    if "z" not in self.state[p]:
                        self.state[p]["z"] = p.detach().clone(memory_format=torch.preserve_format)
                passes.append((self._pair(params), None, None))
            self._plans = None
        for group, (pair, enter, _) in zip(self.param_groups, passes):
            decay = float(group["lr"]) * group["weight_decay_at_y"]
            kernels.wrapper_enter_(*pair, decay=decay, momentum=group[PREFIX + "momentum"], **self._flags(group),
                                   prepared=enter)
        try:
            self.base.step()
        except BaseException:
            # Put y and z back where they belong (x unchanged, schedule not advanced) before raising.
            for group, (pair, _, leave) in zip(self.param_groups, passes):
                kernels.wrapper_exit_(*pair, ckp1=0.0, momentum=group[PREFIX + "momentum"], **self._flags(group),
                                      prepared=leave)
            raise
        share_lr_ratios(self.param_groups, PREFIX, PREFIX + "weight_lr_power")
        for group, (pair, _, leave) in zip(self.param_groups, passes):
            _, ckp1 = advance_schedule(group, float(group.get("d", 1.0)), r_key=PREFIX + "r",
                                       power_key=PREFIX + "weight_lr_power", prefix=PREFIX)
            kernels.wrapper_exit_(*pair, ckp1=ckp1, momentum=group[PREFIX + "momentum"], **self._flags(group),
                                  prepared=leave)
        if self._plans is None:
            self._plans = [self._plan(group) for group in self.param_groups]
        return loss

    def _plan(self, group: dict[str, Any]) -> tuple | None:
        """The group's entry and exit passes bound to its points and z slots, for the next steps.

        Reused by :meth:`_cached_passes` while the group's parameters are the same objects with the
        same storage, the same of them have gradients, their z slots are the same tensors on the same
        storage and the wrapper's flags are unchanged; ``load_state_dict`` and ``add_param_group``
        drop the plans.
        None where some pass would not run natively (the full path then runs every step).
        """
        lib = kernels._native()
        params = group["params"]
        has_grad = [p.grad is not None for p in params]
        active = [p for p, has in zip(params, has_grad) if has]
        if lib is None or any(local(p) is not p for p in active):  # DTensors: their shards are views made anew
            return None
        pair = self._pair(active)
        flags = self._flags(group)
        if any(r.path != "native" for r in kernels.route(list(pair), **flags)):
            return None
        try:
            enter, leave = lib.Prepared("wrapper_enter_", pair), lib.Prepared("wrapper_exit_", pair)
        except (TypeError, ValueError):
            return None
        return (params, tuple(params), has_grad, [p.data_ptr() for p in active], list(pair[1]),
                [z.data_ptr() for z in pair[1]], flags, (pair, enter, leave))

    def _cached_passes(self) -> list | None:
        """Every group's (points and z slots, entry call, exit call) from its plan, or None for the full path."""
        plans = getattr(self, "_plans", None)
        if plans is None or len(plans) != len(self.param_groups):
            return None
        passes = []
        for group, plan in zip(self.param_groups, plans):
            if plan is None:
                return None
            params_list, params_tuple, has_grad, pointers, zs, z_pointers, flags, bound = plan
            params = group["params"]
            if (params is not params_list or len(params) != len(params_tuple)
                    or not all(map(operator.is_, params, params_tuple))
                    or [p.grad is not None for p in params] != has_grad or self._flags(group) != flags):
                return None
            active = [p for p in params if p.grad is not None]
            if [p.data_ptr() for p in active] != pointers:
                return None
            if not all(map(operator.is_, (self.state[p].get("z") for p in active), zs)):
                return None
            if [z.data_ptr() for z in zs] != z_pointers:  # storage swapped under the same object
                return None
            passes.append(bound)
        return passes

    def state_dict(self) -> dict[str, Any]:
        """The wrapper's state (z, mode, averaging) with the base optimizer's under ``"base"``.

        Returns:
            A dict loadable by :meth:`load_state_dict`.
        """
        return {**super().state_dict(), "base": self.base.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load wrapper and base state; the two keep sharing their parameter-group dicts.

        Args:
            state_dict: a dict returned by :meth:`state_dict`.
        """
        if not isinstance(state_dict, dict) or "base" not in state_dict:
            raise ValueError("Invalid state_dict: it has no 'base' entry, so it was not saved by "
                             "ScheduleFreeWrapper.state_dict() (a published wrapper's does not say whether "
                             "the parameters held x or y)")
        self._plans = None
        own = {key: value for key, value in state_dict.items() if key != "base"}
        own["param_groups"] = [upgrade_saved_group(g, PREFIX, PREFIX + "weight_lr_power") for g in own["param_groups"]]
        super().load_state_dict(own)
        self.base.load_state_dict(state_dict["base"])
        for index, (mine, theirs) in enumerate(zip(self.param_groups, self.base.param_groups)):
            theirs.update({key: value for key, value in mine.items() if key != "params"})
            self.param_groups[index] = theirs
