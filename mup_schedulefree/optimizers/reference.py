"""Reference forms: the schedule-free math with x, y and z all stored, one tensor at a time.

These trade memory (three extra buffers per parameter) for legibility: every line is one
equation of the method, and mode switches copy stored points instead of interpolating. The fast
forms are tested against them.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from torch.optim import Optimizer

from .. import kernels
from .base import (IGNORED_FLAGS_DOC, SCHEDULE_DEFAULTS, ModalForm, advance_schedule, check_each_group,
                   check_is_state_dict, check_saved_state, check_state_shapes, real_view, share_lr_ratios,
                   stored_points_at_x, switch_stored_points, train_mode_closure)
from .rules import (ADAMW, ADAMW_ARGS_DOC, ADAMW_PAPER, ADAMW_PAPER_ARGS_DOC, ADAMW_PAPER_UPDATE_DOC,
                    ADAMW_UPDATE_DOC, INNER_MOMENTUM_DOC, PARAMS_DOC, RADAM, RADAM_ARGS_DOC, RADAM_UPDATE_DOC,
                    SGD, SGD_ARGS_DOC, SGD_UPDATE_DOC, SILENT_SGD_PHASE_DOC)
from .wrapper import PREFIX, WrapperShell, check_plain_base, check_wrapper_group


class _ReferenceForm(ModalForm):
    """Stores x, y, z for every parameter; the parameter holds y (train) or x (eval), and mode
    switches copy the stored point in. Complex parameters are updated as their real view. The
    step's scalars come from the class's rule, and so does the direction of each tensor."""

    def _align_state(self, group: dict[str, Any], p: torch.Tensor) -> None:
        """Keep every stored point and moment on the parameter's device and in its dtype."""
        state = self.state.get(p, {})  # .get: looking must not create an empty entry
        for key, value in state.items():
            if value.dtype != p.dtype or value.device != p.device:
                state[key] = value.to(device=p.device, dtype=p.dtype)

    def _switch(self, to_train: bool) -> None:
        switch_stored_points(self, to_train)

    @kernels.compile_disabled
    @torch.no_grad()
    def points_at_x(self) -> dict[torch.Tensor, torch.Tensor]:
        """Copies of the stored x of every parameter in a group that is in train mode.

        Returns:
            A dict mapping parameter -> its value at x (see :meth:`PrimalForm.points_at_x`).
        """
        return stored_points_at_x(self)

    @kernels.compile_disabled
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one step: z -= lr (direction + decay at y); x averages z; y = beta x + (1 - beta) z.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss.

        Returns:
            The closure's loss, or None.
        """
        loss = self._begin_step(closure)
        for group in self.param_groups:
            scalars = self.rule.advance(group)
            lr, ckp1 = scalars["lr"], scalars["ckp1"]
            beta = self.rule.beta(group)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "z" not in state:
                    for key in ("x", "y", "z"):
                        state[key] = p.detach().clone()
                for key in self.rule.moment_keys(group):  # all on the first step; inner momentum once switched on
                    if key not in state:
                        state[key] = torch.zeros_like(p)
                real = {key: real_view(value) for key, value in state.items()}
                x, y, z = real["x"], real["y"], real["z"]
                decay_point = z if group.get("decay_at_z", False) else y
                z.sub_(self.rule.direction(real, real_view(p.grad), scalars) + group["weight_decay"] * decay_point,
                       alpha=lr)
                x.mul_(1.0 - ckp1).add_(z, alpha=ckp1)
                y.copy_(beta * x + (1.0 - beta) * z)
                real_view(p).copy_(y)
        return loss


class AdamWScheduleFreeReference(_ReferenceForm):
    __doc__ = f"""Reference Schedule-Free AdamW (x, y, z stored).

    {ADAMW_UPDATE_DOC}

    Example::

        opt = AdamWScheduleFreeReference(model.parameters(), lr=1e-3)

    Args:
        {PARAMS_DOC}
        {ADAMW_ARGS_DOC}
        decay_at_z: take the weight decay at z instead of y (default False).
        {INNER_MOMENTUM_DOC}
        {IGNORED_FLAGS_DOC}
    """

    rule = ADAMW
    mup_rule = ADAMW.mup_rule  # the muP scaling rule (see scaling.py) that fits this update

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor = 0.0025,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0,
                 warmup_steps: int = 0, r: float = 0.0, weight_lr_power: float = 2.0, decay_at_z: bool = False,
                 inner_momentum: float = 0.0, foreach: bool | None = None, fused: bool | None = None) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power,
                                      decay_at_z=decay_at_z, inner_momentum=inner_momentum))


class SGDScheduleFreeReference(_ReferenceForm):
    __doc__ = f"""Reference Schedule-Free SGD (x, y, z stored).

    {SGD_UPDATE_DOC}

    Example::

        opt = SGDScheduleFreeReference(model.parameters(), lr=0.5)

    Args:
        {PARAMS_DOC}
        {SGD_ARGS_DOC}
        {IGNORED_FLAGS_DOC}
    """

    rule = SGD
    mup_rule = SGD.mup_rule

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor = 1.0, momentum: float = 0.9,
                 weight_decay: float = 0, warmup_steps: int = 0, r: float = 0.0, weight_lr_power: float = 2,
                 foreach: bool | None = None, fused: bool | None = None) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, warmup_steps=warmup_steps,
                                      r=r, weight_lr_power=weight_lr_power))


class RAdamScheduleFreeReference(_ReferenceForm):
    __doc__ = f"""Reference Schedule-Free RAdam (x, y, z stored).

    {RADAM_UPDATE_DOC}

    Example::

        opt = RAdamScheduleFreeReference(model.parameters(), lr=1e-3)

    Args:
        {PARAMS_DOC}
        {RADAM_ARGS_DOC}
        {SILENT_SGD_PHASE_DOC}
        {IGNORED_FLAGS_DOC}
    """

    rule = RADAM
    mup_rule = RADAM.mup_rule

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor = 0.0025,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0,
                 r: float = 0.0, weight_lr_power: float = 2.0, foreach: bool | None = None,
                 silent_sgd_phase: bool = True, fused: bool | None = None) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, r=r,
                                      weight_lr_power=weight_lr_power, silent_sgd_phase=silent_sgd_phase))


class AdamWScheduleFreePaperReference(_ReferenceForm):
    __doc__ = f"""Reference Schedule-Free AdamW of the paper's experiments (x, y, z stored).

    {ADAMW_PAPER_UPDATE_DOC}

    Example::

        opt = AdamWScheduleFreePaperReference(model.parameters(), lr=1e-3, warmup_steps=100)

    Args:
        {PARAMS_DOC}
        {ADAMW_PAPER_ARGS_DOC}
        {IGNORED_FLAGS_DOC}
    """

    rule = ADAMW_PAPER
    mup_rule = ADAMW_PAPER.mup_rule

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor = 0.0025,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0,
                 warmup_steps: int = 0, r: float = 0.0, weight_lr_power: float = 2.0,
                 foreach: bool | None = None, fused: bool | None = None) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power))


# Group keys of the averaging bookkeeping, under the published reference wrapper's names (k, lr_max,
# weight_sum) so that either package continues the other's run, and this package's beside them.
SCHEDULE_KEYS = ("k", "lr_max", "weight_sum", "averaging", "scheduled_lr", "lr_ratio")
POINTS = ("x", "y", "z")


class ScheduleFreeWrapperReference(WrapperShell):
    """Reference schedule-free wrapper: any ``torch.optim.Optimizer`` on z, with x, y and z stored.

    The math of :class:`ScheduleFreeWrapper` one equation a line, for experiments that combine
    schedule-free averaging with another optimizer. Each step, for every parameter with a gradient:

        p     <- z - lr * weight_decay_at_y * y       (the base optimizer steps from here)
        z     <- base_step(p, grad at y)
        x     <- (1 - ckp1) x + ckp1 z
        y     <- momentum x + (1 - momentum) z;  p <- y

    ``train()``/``eval()`` copy the stored y or x into the parameters. Call ``train()`` before
    training and ``eval()`` before evaluating or saving; a new wrapper starts in train mode. Turn
    off the base optimizer's own momentum (e.g. Adam's beta1=0): the interpolation provides it.
    If the base step raises, the parameters get y back, nothing else of the wrapper changes, and
    the error propagates.

    The wrapper shares its parameter-group dicts with the base (LR schedulers drive both). Its
    averaging state sits in each group under the published names ``k``, ``lr_max`` and
    ``weight_sum``, and ``state_dict()`` has the published layout (the base's state dict with x,
    y, z added to each parameter's state), so a state dict of the published
    ``ScheduleFreeWrapperReference`` loads here and one of ours loads there. Its own
    hyperparameters are kept per group as ``sf_momentum``, ``sf_r``, ``sf_weight_lr_power`` and
    ``weight_decay_at_y``; the mode as ``sf_train_mode``.

    Example::

        base = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.0, 0.999))
        opt = ScheduleFreeWrapperReference(base, momentum=0.9, weight_decay_at_y=0.01)

    Args:
        base: the optimizer that updates z; its ``group['lr']`` is the lr of the decay at y and of
            the averaging weight (times ``group['d']``, if any, as D-adaptation methods require).
        momentum: interpolation y = (1 - momentum) z + momentum x, 0 < momentum < 1 (default 0.9).
        weight_decay_at_y: default decay taken at y, per group overridable with the
            ``weight_decay_at_y`` group key; decay set on the base optimizer acts at z instead.
        r: polynomial weighting power of the average (default 0).
        weight_lr_power: power of the max lr in the averaging weight (default 2).
    """

    def __init__(self, base: Optimizer, momentum: float = 0.9, weight_decay_at_y: float = 0.0, r: float = 0,
                 weight_lr_power: float = 2) -> None:
        check_plain_base(base, SCHEDULE_KEYS)
        self.base = base
        defaults = dict(SCHEDULE_DEFAULTS)
        defaults.update({"weight_decay_at_y": weight_decay_at_y, PREFIX + "momentum": momentum, PREFIX + "r": r,
                         PREFIX + "weight_lr_power": weight_lr_power, PREFIX + "train_mode": True})
        check_wrapper_group(defaults)
        super().__init__(base.param_groups, defaults)
        self.register_load_state_dict_pre_hook(check_saved_state)

    def _align_state(self) -> None:
        """Keep every stored point on its parameter's device and in its dtype (after ``model.to(...)``)."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p, {})  # .get: looking must not create an empty entry
                for key, value in state.items():
                    if value.dtype != p.dtype or value.device != p.device:
                        state[key] = value.to(device=p.device, dtype=p.dtype)

    def _switch(self, to_train: bool) -> None:
        self._align_state()
        switch_stored_points(self, to_train, PREFIX + "train_mode")

    @kernels.compile_disabled
    @torch.no_grad()
    def points_at_x(self) -> dict[torch.Tensor, torch.Tensor]:
        """Copies of the stored x of every parameter in a group that is in train mode.

        Returns:
            A dict mapping parameter -> its value at x (see :meth:`PrimalForm.points_at_x`).
        """
        self._align_state()
        return stored_points_at_x(self, PREFIX + "train_mode")

    def _check_before_step(self) -> None:
        """Raise, naming the group or parameter, before a step that could not complete; change nothing."""
        check_each_group(self.param_groups, check_wrapper_group)  # groups may have been edited since
        check_state_shapes(self)
        self._align_state()

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
        self._check_before_step()
        active = [[p for p in group["params"] if p.grad is not None] for group in self.param_groups]
        created = [p for params in active for p in params if "z" not in self.state.get(p, ())]
        for p in created:
            self.state[p].update({key: p.detach().clone(memory_format=torch.preserve_format) for key in POINTS})
        for group, params in zip(self.param_groups, active):
            decay = float(group["lr"]) * group["weight_decay_at_y"]
            for p in params:
                p.copy_(self.state[p]["z"])
                if decay != 0.0:
                    p.sub_(self.state[p]["y"], alpha=decay)
        try:
            self.base.step()
        except BaseException:
            for p in (p for params in active for p in params):
                p.copy_(self.state[p]["y"])
            for p in created:
                del self.state[p]
            raise
        share_lr_ratios(self.param_groups, power_key=PREFIX + "weight_lr_power")
        for group, params in zip(self.param_groups, active):
            _, ckp1 = advance_schedule(group, float(group.get("d", 1.0)), r_key=PREFIX + "r",
                                       power_key=PREFIX + "weight_lr_power")
            for p in params:
                x, y, z = (self.state[p][key] for key in POINTS)
                z.copy_(p)
                x.lerp_(z, ckp1)
                y.copy_(x).lerp_(z, 1.0 - group[PREFIX + "momentum"])
                p.copy_(y)
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict with each parameter's x, y and z added to its state.

        The published ``ScheduleFreeWrapperReference`` saves the same layout (it keeps its points in
        the base's state), so either class loads the other's.

        Returns:
            A dict loadable by :meth:`load_state_dict`.
        """
        own, base = super().state_dict(), self.base.state_dict()
        state = dict(base["state"])
        for index, points in own["state"].items():
            clash = sorted(set(state.get(index, {})) & set(POINTS))
            if clash:
                raise ValueError(f"{type(self.base).__name__} keeps {clash} in its per-parameter state, where "
                                 f"{type(self).__name__} keeps its points: the state dict cannot hold both")
            state[index] = {**state.get(index, {}), **points}
        return {**base, "state": state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the points into the wrapper and the rest into the base; the two keep sharing groups.

        A state dict without the mode (the published class saves none) keeps the current mode: the
        step reads only the stored points, so either mode continues the run.

        Args:
            state_dict: a dict returned by :meth:`state_dict`, or by the published class's.
        """
        check_is_state_dict(self, state_dict)
        check_each_group(state_dict["param_groups"], lambda saved: check_wrapper_group({**self.defaults, **saved}),
                         saved=True)
        mode = self.train_mode
        own_state = {index: {key: value for key, value in entry.items() if key in POINTS}
                     for index, entry in state_dict["state"].items()}
        base_state = {index: {key: value for key, value in entry.items() if key not in POINTS}
                      for index, entry in state_dict["state"].items()}
        super().load_state_dict({"state": {i: s for i, s in own_state.items() if s},
                                 "param_groups": state_dict["param_groups"]})
        self.base.load_state_dict({**state_dict, "state": {i: s for i, s in base_state.items() if s}})
        for index, (mine, theirs) in enumerate(zip(self.param_groups, self.base.param_groups)):
            theirs.update({key: value for key, value in mine.items() if key != "params"})
            theirs.setdefault(PREFIX + "train_mode", mode)
            for key, value in self.defaults.items():
                theirs.setdefault(key, value)
            self.param_groups[index] = theirs
