"""Reference forms: the schedule-free math with x, y and z all stored, one tensor at a time.

These trade memory (three extra buffers per parameter) for legibility: every line is one
equation of the method, and mode switches copy stored points instead of interpolating. The fast
forms are tested against them.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from .. import kernels
from ..schedule import warmup_multiplier
from .adamw import AdamWRule
from .base import ModalForm, advance_schedule, real_view
from .sgd import SGDRule


class _ReferenceForm(ModalForm):
    """Stores x, y, z for every parameter; the parameter holds y (train) or x (eval), and mode
    switches copy the stored point in. Complex parameters are updated as their real view."""

    def _align_state(self, group: dict[str, Any], p: torch.Tensor) -> None:
        """Keep every stored point and moment on the parameter's device and in its dtype."""
        state = self.state.get(p, {})  # .get: looking must not create an empty entry
        for key, value in state.items():
            if value.dtype != p.dtype or value.device != p.device:
                state[key] = value.to(device=p.device, dtype=p.dtype)

    def _switch(self, to_train: bool) -> None:
        key = "y" if to_train else "x"
        for group in self.param_groups:
            if group["train_mode"] != to_train:
                for p in group["params"]:
                    if key in self.state.get(p, ()):
                        p.copy_(self.state[p][key])
                group["train_mode"] = to_train

    @kernels.compile_disabled
    @torch.no_grad()
    def points_at_x(self) -> dict[torch.Tensor, torch.Tensor]:
        """Copies of the stored x of every parameter in a group that is in train mode.

        Returns:
            A dict mapping parameter -> its value at x (see :meth:`PrimalForm.points_at_x`).
        """
        return {p: self.state[p]["x"].clone() for group in self.param_groups if group["train_mode"]
                for p in group["params"] if "x" in self.state.get(p, ())}

    def _direction(self, group: dict[str, Any], state: dict[str, torch.Tensor], grad: torch.Tensor,
                   k: int) -> torch.Tensor:
        raise NotImplementedError

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
            k = group["k"]
            lr, ckp1 = advance_schedule(group, warmup_multiplier(k, group["warmup_steps"]))
            beta = self._beta(group)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "z" not in state:
                    for key in ("x", "y", "z"):
                        state[key] = p.detach().clone()
                    for key in self._moment_keys:
                        state[key] = torch.zeros_like(p)
                real = {key: real_view(value) for key, value in state.items()}
                x, y, z = real["x"], real["y"], real["z"]
                decay_point = z if group.get("decay_at_z", False) else y
                z.sub_(self._direction(group, real, real_view(p.grad), k) + group["weight_decay"] * decay_point,
                       alpha=lr)
                x.mul_(1.0 - ckp1).add_(z, alpha=ckp1)
                y.copy_(beta * x + (1.0 - beta) * z)
                real_view(p).copy_(y)
        return loss


class AdamWScheduleFreeReference(AdamWRule, _ReferenceForm):
    """Reference Schedule-Free AdamW (x, y, z stored). Same arguments as :class:`AdamWScheduleFree`,
    plus ``decay_at_z`` (take the weight decay at z instead of y). ``foreach``/``fused`` are
    accepted for signature compatibility and ignored.

    Example::

        opt = AdamWScheduleFreeReference(model.parameters(), lr=1e-3)
    """

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor = 0.0025,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0,
                 warmup_steps: int = 0, r: float = 0.0, weight_lr_power: float = 2.0, decay_at_z: bool = False,
                 foreach: bool | None = None, fused: bool | None = None) -> None:
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps, weight_decay=weight_decay, warmup_steps=warmup_steps,
                        r=r, weight_lr_power=weight_lr_power, decay_at_z=decay_at_z)
        self._validate(defaults)
        super(AdamWRule, self).__init__(params, defaults)

    def _direction(self, group, state, grad, k):
        beta2 = group["betas"][1]
        v = state["exp_avg_sq"]
        v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        return grad / ((v / (1.0 - beta2 ** (k + 1))).sqrt() + group["eps"])


class SGDScheduleFreeReference(SGDRule, _ReferenceForm):
    """Reference Schedule-Free SGD (x, y, z stored). Same arguments as :class:`SGDScheduleFree`;
    ``foreach``/``fused`` are accepted for signature compatibility and ignored.

    Example::

        opt = SGDScheduleFreeReference(model.parameters(), lr=0.5)
    """

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor = 1.0, momentum: float = 0.9,
                 weight_decay: float = 0, warmup_steps: int = 0, r: float = 0.0, weight_lr_power: float = 2,
                 foreach: bool | None = None, fused: bool | None = None) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, warmup_steps=warmup_steps, r=r,
                        weight_lr_power=weight_lr_power)
        self._validate(defaults)
        super(SGDRule, self).__init__(params, defaults)

    def _direction(self, group, state, grad, k):
        return grad
