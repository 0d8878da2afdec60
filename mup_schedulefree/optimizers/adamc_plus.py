"""ScheduleFree+ (arXiv 2605.19095): AdamC inside schedule-free averaging, with a Polyak step size.

The method keeps the three schedule-free sequences: z, the iterate the update moves; x, a
weighted running average of z and the point to evaluate; and y = beta_k x + (1 - beta_k) z, the
point where gradients are taken. One step, with g the gradient at y and f the loss there:

    polyak_lr = max(0, f + beta_k * sum over parameters of <g, z - x>) / D
    D         = sqrt(pi/2) * EMA (decay polyak_beta, bias-corrected) of the gradient's L1 norm
    lr_k      = max(lr, eps) * polyak_lr                       (every group's own lr)
    z        <- z - lr_k^2 * weight_decay * y                  (AdamC: decay coupled to lr squared)
    z        <- z - lr_k * m_hat / (sqrt(v_hat) + eps)         (Adam moments, betas, bias-corrected)
    x        <- (1 - ckp1) x + ckp1 z
    y        <- beta_k x + (1 - beta_k) z

beta_k is ``sf_beta1``, or, with ``sf_beta1_anneal_steps`` > 0, annealed toward ``sf_beta1_max``
geometrically in 1 - beta (:func:`~mup_schedulefree.schedule.annealed_momentum`). ckp1 is the
usual schedule-free weight (power ``r`` of the step, ``weight_lr_power`` of the largest lr_k so
far), except that it is 1 for the first ``c_warmup`` steps
(:func:`~mup_schedulefree.schedule.averaging_weight_c_warmup`). The Polyak rule assumes the loss's
minimum is 0. Since z - y = beta_k (z - x), the numerator is f(y) + <g, z - y>, the loss at z (the
iterate the step moves) to first order, that is its height above the minimum; the L1 norm is the
first-order decrease an Adam-like (about sign-like) step of size 1 buys. As upstream, the value carried
from one step's EMA to the next is the bias-corrected one (both ``grad_l1_ema`` and
``grad_l1_ema_corr`` hold it): D_k = (polyak_beta * D_(k-1) + (1 - polyak_beta) * sqrt(pi/2) *
|g_k|_1) / (1 - polyak_beta^(k+1)). One polyak_lr and one beta_k serve all groups: they come from
group 0's step count and its ``polyak_beta``, ``sf_beta1``, ``sf_beta1_max`` and
``sf_beta1_anneal_steps``, and every group logs them. Adam's bias corrections, c_warmup and ckp1
follow each group's own step count and values.

The loss has to reach the step: ``step_func(function_value)`` (upstream's interface), or
``step(closure)`` (the closure's loss), or ``step(function_value=loss)``.

Distributed training: when some gradient is a DTensor (FSDP2), the L1 norm, the inner products
and the loss are summed over ranks in one all-reduce and the loss is divided by the world size
(upstream averages it); plain tensors (one process, DDP's replicated gradients) are not reduced.

Per-group Polyak weights (for muP). A group may carry ``polyak_weight`` (default 1.0), and D
becomes sqrt(pi/2) times the EMA of the sum over groups G of polyak_weight_G * |g_G|_1. With
every weight 1 this is upstream's D exactly. Why muP needs it: under muP the per-entry gradient of
a hidden (matrix-like) weight is Theta(1/n) at width n, and the weight has about n^2 entries, so
its L1 norm grows like n, while the L1 norms of input, readout and bias (vector-like) weights stay
Theta(1). Adam's update is about sign-like, so the first-order decrease a group contributes is
about lr_G * |g_G|_1, and muP chooses each group's lr_G (hidden weights at lr / width_mult) so that
this stays Theta(1) per group. Upstream's global L1 norm therefore grows like the width, polyak_lr
shrinks like 1/width, and since polyak_lr multiplies every group's lr, also the vector-like
groups' lrs that muP keeps constant shrink: hyperparameters no longer transfer across widths.
Weighting each group's L1 norm by its muP lr multiplier (lr_G / base lr) makes every term of the
sum Theta(1), so D is width-independent and lr_G * polyak_lr scales as muP prescribes; at the base
width every multiplier is 1 and the step is upstream's.

Two forms, the same math:

* :class:`AdamCScheduleFreePlusPaper` stores x, y, z and both moments for every parameter,
  as upstream's class of that name does (upstream's semantics within float rounding).
* :class:`AdamCScheduleFreePlus` stores z and the moments only: the parameter holds y (x in eval
  mode) and x is recovered as (y - (1 - b) z) / b, with b the beta_k that built this parameter's
  y (kept per parameter as ``sf_beta1_y``, since annealing changes beta_k from step to step).
  Two fewer parameter-sized buffers.

Both keep their state in the parameter's dtype, as upstream does (no float32 master copy).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from .. import kernels
from ..schedule import annealed_momentum, averaging_weight_c_warmup
from ..validation import check_count, check_range, real_number
from .base import (Modes, check_each_group, check_is_state_dict, check_saved_state, check_state_shapes,
                   describe_parameter, local, real_view, stored_points_at_x, switch_stored_points, train_mode_closure)

SQRT_HALF_PI = math.sqrt(math.pi / 2)  # the Polyak denominator's constant: 1 / E|u| for a standard Gaussian u


# ----------------------------------------------------------------------------- the math
class PolyakStep(NamedTuple):
    """The Polyak step size of one step.

    Attributes:
        lr: polyak_lr, the factor on every group's lr (0.0 when the denominator is 0).
        l1_ema: the bias-corrected, sqrt(pi/2)-scaled EMA of the weighted L1 norm (the
            denominator, carried to the next step).
        numerator: f + ip, the loss at z to first order.
    """

    lr: float
    l1_ema: float
    numerator: float


def polyak_step_size(function_value: float, ip_term: float, l1: float, l1_ema: float, polyak_beta: float,
                     k: int) -> PolyakStep:
    """polyak_lr = max(0, f + ip) / D, D the bias-corrected EMA of sqrt(pi/2) * L1 norm.

    Args:
        function_value: the loss f at y (averaged over ranks).
        ip_term: beta_k * sum of <g, z - x> over the parameters that have state.
        l1: this step's (weighted) L1 norm of the gradient.
        l1_ema: the previous step's bias-corrected EMA (0.0 before the first step).
        polyak_beta: decay of the EMA, in [0, 1).
        k: number of steps already taken.

    Returns:
        The step size, the new denominator and the numerator.
    """
    ema = polyak_beta * l1_ema + (1.0 - polyak_beta) * l1 * SQRT_HALF_PI
    corrected = ema / (1.0 - polyak_beta ** (k + 1))
    numerator = function_value + ip_term
    lr = max(0.0, numerator) / corrected if corrected > 0.0 else 0.0
    return PolyakStep(lr, corrected, numerator)


def _accumulation_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def l1_norm(grad: torch.Tensor) -> torch.Tensor:
    """|grad|_1 as a 0-dim tensor, accumulated in float32 at least.

    Args:
        grad: a gradient (its local shard for a DTensor).

    Returns:
        The sum of absolute values.
    """
    return torch.linalg.vector_norm(grad, 1, dtype=_accumulation_dtype(grad))


def gap_inner(grad: torch.Tensor, z: torch.Tensor, point: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * <grad, z - point> as a 0-dim tensor, accumulated in float32 at least.

    With point = x and scale = beta_k this is a parameter's share of the Polyak correction; the
    lean form passes point = y and scale = beta_k / b, since z - x = (z - y) / b.

    Args:
        grad: the gradient.
        z: the parameter's z.
        point: x, or y.
        scale: the factor on the inner product.

    Returns:
        The scaled inner product.
    """
    dtype = _accumulation_dtype(grad)
    return scale * (grad.to(dtype) * (z.to(dtype) - point.to(dtype))).sum()


def polyak_sums(l1_norms: Sequence[torch.Tensor], weights: Sequence[float],
                inner_products: Sequence[torch.Tensor]) -> torch.Tensor:
    """[sum of weights[i] * l1_norms[i], sum of inner_products] as one float64 tensor of 2 entries.

    Args:
        l1_norms: 0-dim tensors, one per parameter with a gradient.
        weights: the ``polyak_weight`` of each one's group.
        inner_products: 0-dim tensors (see :func:`gap_inner`).

    Returns:
        The two sums, on the first term's device (CPU when there is none).
    """
    terms = [*l1_norms, *inner_products]
    device = terms[0].device if terms else torch.device("cpu")

    def total(values: Sequence[torch.Tensor], factors: Sequence[float] | None = None) -> torch.Tensor:
        if not values:
            return torch.zeros((), dtype=torch.float64, device=device)
        stacked = torch.stack([v.to(device=device, dtype=torch.float64) for v in values])
        if factors is not None:
            stacked = stacked * torch.tensor(factors, dtype=torch.float64, device=device)
        return stacked.sum()

    return torch.stack([total(l1_norms, weights), total(inner_products)])


def global_polyak_inputs(sums: torch.Tensor, function_value: float, distributed: bool) -> tuple[float, float, float]:
    """The weighted L1 norm, the inner-product term and the loss, over all ranks when sharded.

    Args:
        sums: the local result of :func:`polyak_sums`.
        function_value: this rank's loss.
        distributed: some gradient is a DTensor; when a process group is initialised, the three
            values are summed over ranks in one all-reduce and the loss divided by the world size.

    Returns:
        (l1, ip_term, function_value) as Python floats.
    """
    if distributed and dist.is_available() and dist.is_initialized():
        packed = torch.cat([sums, sums.new_tensor([function_value])])
        dist.all_reduce(packed)
        l1, ip_term, total = packed.tolist()
        return l1, ip_term, total / dist.get_world_size()
    l1, ip_term = sums.tolist()
    return l1, ip_term, function_value


def adam_direction_(grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, beta1: float,
                    beta2: float, k: int, eps: float) -> torch.Tensor:
    """Update Adam's moments with ``grad`` in place; return m_hat / (sqrt(v_hat) + eps).

    Args:
        grad: the gradient.
        exp_avg: first moment m, updated to beta1 m + (1 - beta1) g.
        exp_avg_sq: second moment v, updated to beta2 v + (1 - beta2) g^2.
        beta1: first-moment decay.
        beta2: second-moment decay.
        k: number of steps already taken (the bias corrections are 1 - beta^(k+1)).
        eps: added to sqrt(v_hat).

    Returns:
        A new tensor: the Adam direction.
    """
    exp_avg.lerp_(grad, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    denom = (exp_avg_sq / (1.0 - beta2 ** (k + 1))).sqrt_().add_(eps)
    return (exp_avg / (1.0 - beta1 ** (k + 1))).div_(denom)


class StepScalars(NamedTuple):
    """The scalars of one group's update.

    Attributes:
        lr: lr_k = max(lr, eps) * polyak_lr.
        weight_decay: the AdamC decay coefficient (applied as lr_k^2 * weight_decay).
        beta1: Adam's first-moment decay.
        beta2: Adam's second-moment decay.
        k: the group's number of steps already taken.
        eps: Adam's eps.
        ckp1: the averaging weight of the new z into x.
        sf_beta1: beta_k, the interpolation y = beta_k x + (1 - beta_k) z of this step.
    """

    lr: float
    weight_decay: float
    beta1: float
    beta2: float
    k: int
    eps: float
    ckp1: float
    sf_beta1: float


def reference_update_(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, grad: torch.Tensor,
                      exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, s: StepScalars) -> None:
    """One ScheduleFree+ update of a parameter whose x, y and z are all stored (in place).

    Args:
        x: the average.
        y: the gradient point.
        z: the iterate.
        grad: the gradient at y.
        exp_avg: Adam's first moment.
        exp_avg_sq: Adam's second moment.
        s: the group's scalars.
    """
    z.sub_(y, alpha=s.lr * s.lr * s.weight_decay)
    z.sub_(adam_direction_(grad, exp_avg, exp_avg_sq, s.beta1, s.beta2, s.k, s.eps), alpha=s.lr)
    x.lerp_(z, s.ckp1)
    y.copy_(x).lerp_(z, 1.0 - s.sf_beta1)


def lean_update_(y: torch.Tensor, z: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                 exp_avg_sq: torch.Tensor, s: StepScalars, sf_beta1_y: float) -> None:
    """One ScheduleFree+ update of a parameter that stores z only: x is recovered from y and z.

    Args:
        y: the gradient point (the parameter), replaced by the new y.
        z: the iterate.
        grad: the gradient at y.
        exp_avg: Adam's first moment.
        exp_avg_sq: Adam's second moment.
        s: the group's scalars.
        sf_beta1_y: the beta that built ``y`` (the previous step's beta_k).
    """
    x = y.lerp(z, 1.0 - 1.0 / sf_beta1_y)
    z.sub_(y, alpha=s.lr * s.lr * s.weight_decay)
    z.sub_(adam_direction_(grad, exp_avg, exp_avg_sq, s.beta1, s.beta2, s.k, s.eps), alpha=s.lr)
    y.copy_(x.lerp_(z, s.ckp1).lerp_(z, 1.0 - s.sf_beta1))


def check_group(group: dict[str, Any]) -> None:
    """Validate a ScheduleFree+ group's hyperparameters (raise naming the argument).

    Args:
        group: a parameter group with defaults filled in.

    Raises:
        TypeError: a value that is not a number (a step count that is not an int).
        ValueError: a value out of its range.
    """
    check_range("lr", group["lr"], 0.0)
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r} (must be a pair (beta1, beta2))")
    check_range("betas[0]", betas[0], 0.0, 1.0)
    check_range("betas[1]", betas[1], 0.0, 1.0)
    check_range("sf_beta1", group["sf_beta1"], 0.0, 1.0, low_open=True)
    check_range("eps", group["eps"], 0.0)
    check_range("weight_decay", group["weight_decay"], 0.0)
    check_range("r", group["r"], 0.0)
    check_range("polyak_beta", group["polyak_beta"], 0.0, 1.0)
    check_count("c_warmup", group["c_warmup"])
    check_count("sf_beta1_anneal_steps", group["sf_beta1_anneal_steps"])
    check_range("sf_beta1_max", group["sf_beta1_max"], 0.0, 1.0, low_open=True)
    check_range("weight_lr_power", group["weight_lr_power"], 0.0)
    check_range("polyak_weight", group.get("polyak_weight", 1.0), 0.0)


def check_function_value(value: Any) -> float:
    """The loss passed to a step as a float; raise naming ``function_value`` unless it is finite.

    Args:
        value: a real number or a 1-element tensor.

    Returns:
        The value as a Python float.

    Raises:
        ValueError: None (nothing was passed) or a value that is not finite.
        TypeError: anything else that is not a real number.
    """
    if value is None:
        raise ValueError("Invalid function_value: None (pass the loss at the current parameters, "
                         "step(function_value=loss) or step_func(loss), or a closure that returns it)")
    number = real_number("function_value", value)
    if not math.isfinite(number):
        raise ValueError(f"Invalid function_value: {value!r} (must be a finite real number)")
    return number


# ----------------------------------------------------------------------------- the classes
_ARGS_DOC = """
    Args:
        params: iterable of parameters or of dicts defining parameter groups; a group may set
            ``polyak_weight`` (default 1.0, >= 0), its L1 norm's weight in the Polyak denominator.
        lr: base learning rate (default 1.0); each step uses max(lr, eps) * polyak_lr.
        betas: Adam's (beta1, beta2) moment decays (default (0.9, 0.95)), each in [0, 1).
        sf_beta1: schedule-free interpolation y = sf_beta1 x + (1 - sf_beta1) z (default 0.9),
            in (0, 1).
        eps: added to Adam's sqrt(v_hat), and the floor of lr (default 1e-8).
        weight_decay: AdamC decay of z at y, applied as lr_k^2 * weight_decay (default 0); values
            like 20 to 50 play the role of AdamW's 0.1.
        r: polynomial weighting power of the average (default 0).
        polyak_beta: EMA decay of the L1 norm in the Polyak denominator (default 0: this
            step's norm), in [0, 1).
        c_warmup: number of initial steps with ckp1 = 1, x following z (default 0).
        sf_beta1_anneal_steps: steps over which sf_beta1 anneals toward sf_beta1_max, geometric
            in 1 - beta (default 0: no annealing).
        sf_beta1_max: the annealing's final sf_beta1 (default 0.965), in (0, 1).
        weight_lr_power: power of the largest lr_k so far in the averaging weight (default 2).

    Raises:
        TypeError: a hyperparameter that is not a number, or a step count that is not an int.
        ValueError: a hyperparameter out of its range.
"""


class _PolyakShell(Modes, Optimizer):
    """What both ScheduleFree+ forms share: arguments, checks, the Polyak step size, the mode.

    A form defines ``_state_keys`` (the tensors a parameter's state holds), ``_new_state(p,
    beta)``, ``_inner(p, state, grad, beta)`` (the parameter's share of the Polyak correction),
    ``_update(p, state, grad, scalars)``, ``_switch(to_train)`` and ``points_at_x()``.
    """

    mup_rule = "adam"   # the muP scaling rule (see scaling.py) that fits this update
    decay_lr_power = 2  # the decay is multiplied by lr_k^2 (AdamC)
    needs_function_value = True  # step() needs the loss: step(function_value=loss) (coord_checks reads this)
    _state_keys: tuple[str, ...] = ()

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor = 1.0,
                 betas: tuple[float, float] = (0.9, 0.95), sf_beta1: float = 0.9, eps: float = 1e-8,
                 weight_decay: float = 0, r: float = 0, polyak_beta: float = 0, c_warmup: int = 0,
                 sf_beta1_anneal_steps: int = 0, sf_beta1_max: float = 0.965, weight_lr_power: float = 2) -> None:
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, sf_beta1=sf_beta1, eps=eps,
                        weight_decay=weight_decay, r=r, polyak_beta=polyak_beta, c_warmup=c_warmup,
                        sf_beta1_anneal_steps=sf_beta1_anneal_steps, sf_beta1_max=sf_beta1_max,
                        weight_lr_power=weight_lr_power)
        check_group(defaults)
        # the step's logged scalars start at 0.0, so a group can be read before its first step
        defaults.update(k=0, train_mode=True, weight_sum=0.0, lr_max=eps, scheduled_lr=0.0, grad_l1_ema=0.0,
                        grad_l1_ema_corr=0.0, function_value_ema=0.0, ip_term=0.0, polyak_lr=0.0,
                        polyak_denom_ema=0.0)  # never used: upstream's step reads it, so it loads our state dicts
        super().__init__(params, defaults)
        self.register_load_state_dict_pre_hook(check_saved_state)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; it is validated first and joins the optimizer's current mode.

        Args:
            param_group: dict with ``params`` and optional per-group hyperparameters.

        Raises:
            TypeError, ValueError: an invalid hyperparameter, named.
        """
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        check_group({**self.defaults, **param_group})
        mode = self.param_groups[0]["train_mode"] if self.param_groups else True
        super().add_param_group({**param_group, "train_mode": mode})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this class; its groups are checked before anything is loaded.

        Args:
            state_dict: a dict returned by :meth:`state_dict`.

        Raises:
            ValueError: not a state dict, state of another model, or an invalid group value.
        """
        check_is_state_dict(self, state_dict)
        check_each_group(state_dict["param_groups"], lambda saved: check_group({**self.defaults, **saved}),
                         saved=True)
        super().load_state_dict(state_dict)

    @kernels.compile_disabled
    @torch.no_grad()
    def step_func(self, function_value: Any = None) -> Any:
        """Take one step, given the loss at the current parameters (upstream's interface).

        Args:
            function_value: this rank's loss at y (a number or a 1-element tensor).

        Returns:
            ``function_value``, as passed.

        Raises:
            RuntimeError: the optimizer is in eval mode, or a gradient is sparse.
            ValueError: ``function_value`` is missing or not finite, or a group value is invalid.
        """
        train_mode_closure(self, None)
        self._step(check_function_value(function_value))
        return function_value

    @kernels.compile_disabled
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, function_value: Any = None) -> Any:
        """Take one step; the Polyak rule needs the loss, from ``closure`` or ``function_value``.

        Args:
            closure: callable that zeroes the gradients, computes the loss at the current
                parameters, calls backward and returns the loss (run with gradients enabled).
            function_value: the loss at the current parameters, when the gradients are already
                computed (pass this or ``closure``).

        Returns:
            The closure's loss, or ``function_value``.

        Raises:
            ValueError: neither or both of ``closure`` and ``function_value``, or an invalid loss
                or group value.
            RuntimeError: the optimizer is in eval mode, or a gradient is sparse.
        """
        if closure is not None and function_value is not None:
            raise ValueError(f"Invalid function_value: {function_value!r} (pass it or a closure, not both)")
        loss = train_mode_closure(self, closure)
        value = loss if closure is not None else function_value
        self._step(check_function_value(value))
        return value

    def _check_before_step(self) -> None:
        """Raise before a step that could not complete, naming the group or parameter; change nothing.

        Parameters moved to another device or dtype get their state along.
        """
        check_each_group(self.param_groups, check_group)
        for group in self.param_groups:
            for index, p in enumerate(group["params"]):
                if p.grad is not None and p.grad.layout != torch.strided:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients "
                                       f"({describe_parameter(group, index, p)} has a {p.grad.layout} gradient)")
        check_state_shapes(self)
        self._align_state()

    def _align_state(self) -> None:
        """Keep every state tensor on its parameter's device and in its dtype (after ``model.to(...)``)."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p, {})  # .get: looking must not create an empty entry
                for key in self._state_keys:
                    value = state.get(key)
                    if value is not None and (value.dtype != p.dtype or value.device != p.device):
                        state[key] = value.to(device=p.device, dtype=p.dtype)

    def _step(self, function_value: float) -> None:
        """One step with the loss already checked: the Polyak step size, then every group's update."""
        self._check_before_step()
        first = self.param_groups[0]
        k = first["k"]
        beta = annealed_momentum(k, first["sf_beta1"], first["sf_beta1_max"], first["sf_beta1_anneal_steps"])
        norms, weights, inners, distributed = [], [], [], False
        for group in self.param_groups:
            weight = float(group.get("polyak_weight", 1.0))
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = local(p.grad)
                distributed = distributed or grad is not p.grad
                norms.append(l1_norm(real_view(grad)))
                weights.append(weight)
                state = self.state.get(p, {})
                if "z" in state:
                    inners.append(self._inner(p, state, real_view(grad), beta))
        l1, ip_term, value = global_polyak_inputs(polyak_sums(norms, weights, inners), function_value, distributed)
        polyak = polyak_step_size(value, ip_term, l1, first["grad_l1_ema"], first["polyak_beta"], k)
        for group in self.param_groups:
            lr = max(float(group["lr"]), group["eps"]) * polyak.lr
            group_k = group["k"]
            averaging = averaging_weight_c_warmup(group_k, lr, group["lr_max"], group["weight_sum"], group["r"],
                                                  group["weight_lr_power"], group["c_warmup"])
            group.update(grad_l1_ema=polyak.l1_ema, grad_l1_ema_corr=polyak.l1_ema, function_value_ema=polyak.numerator,
                         ip_term=ip_term, polyak_lr=polyak.lr, scheduled_lr=lr, lr_max=averaging.lr_max,
                         weight_sum=averaging.weight_sum)
            beta1, beta2 = group["betas"]
            scalars = StepScalars(lr, group["weight_decay"], beta1, beta2, group_k, group["eps"], averaging.ckp1, beta)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if "z" not in self.state.get(p, ()):
                    self.state[p].update(self._new_state(p, beta))
                self._update(p, self.state[p], real_view(local(p.grad)), scalars)
            group["k"] = group_k + 1

    def _new_state(self, p: torch.Tensor, beta: float) -> dict[str, Any]:
        raise NotImplementedError

    def _inner(self, p: torch.Tensor, state: dict[str, Any], grad: torch.Tensor, beta: float) -> torch.Tensor:
        raise NotImplementedError

    def _update(self, p: torch.Tensor, state: dict[str, Any], grad: torch.Tensor, scalars: StepScalars) -> None:
        raise NotImplementedError


def _copy(p: torch.Tensor) -> torch.Tensor:
    return p.detach().clone(memory_format=torch.preserve_format)


def _zeros(p: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(p, memory_format=torch.preserve_format)


def _real(state: dict[str, Any], key: str) -> torch.Tensor:
    return real_view(local(state[key]))


class AdamCScheduleFreePlusPaper(_PolyakShell):
    __doc__ = """ScheduleFree+ with x, y and z all stored: upstream's ``AdamCScheduleFreePlusPaper``.

    Same arguments, defaults and group keys as upstream's class, and the same updates within
    float rounding. Differences, as everywhere in this package: a new optimizer is in train mode,
    ``step()`` in eval mode raises RuntimeError, invalid hyperparameters and losses raise naming
    the argument, and ``step(closure)`` / ``step(function_value=...)`` exist beside ``step_func``.
    Call ``optimizer.train()`` before training and ``optimizer.eval()`` before evaluating or
    saving. The muP form of the Polyak denominator (``polyak_weight``) is explained in the
    module's docstring.

    Example::

        opt = AdamCScheduleFreePlusPaper(model.parameters(), lr=1.0, c_warmup=100)
        for inputs, targets in loader:
            opt.zero_grad(); loss = loss_fn(model(inputs), targets); loss.backward()
            opt.step_func(loss.item())
        opt.eval()   # parameters now hold the average x
    """ + _ARGS_DOC

    _state_keys = ("x", "y", "z", "exp_avg", "exp_avg_sq")

    def _new_state(self, p: torch.Tensor, beta: float) -> dict[str, Any]:
        return dict(z=_copy(p), x=_copy(p), y=_copy(p), exp_avg=_zeros(p), exp_avg_sq=_zeros(p))

    def _inner(self, p: torch.Tensor, state: dict[str, Any], grad: torch.Tensor, beta: float) -> torch.Tensor:
        return gap_inner(grad, _real(state, "z"), _real(state, "x"), beta)

    def _update(self, p: torch.Tensor, state: dict[str, Any], grad: torch.Tensor, scalars: StepScalars) -> None:
        x, y, z, exp_avg, exp_avg_sq = (_real(state, key) for key in self._state_keys)
        reference_update_(x, y, z, grad, exp_avg, exp_avg_sq, scalars)
        p.copy_(state["y"])

    def _switch(self, to_train: bool) -> None:
        self._align_state()
        switch_stored_points(self, to_train)

    @kernels.compile_disabled
    @torch.no_grad()
    def points_at_x(self) -> dict[torch.Tensor, torch.Tensor]:
        """Copies of the stored x of every parameter in a group that is in train mode.

        Returns:
            A dict mapping parameter -> its value at x; parameters not listed already hold x.
        """
        self._align_state()
        return stored_points_at_x(self)


class AdamCScheduleFreePlus(_PolyakShell):
    __doc__ = """ScheduleFree+ storing z and Adam's moments only; the parameter holds y (x in eval mode).

    The math of :class:`AdamCScheduleFreePlusPaper` (they agree within float rounding) with two
    fewer parameter-sized buffers: x is recovered as (y - (1 - b) z) / b, where b, the beta_k
    that built the parameter's y, is kept in its state as ``sf_beta1_y``. ``train()``/``eval()``
    interpolate y and z instead of copying stored points. Call ``optimizer.train()`` before
    training and ``optimizer.eval()`` before evaluating or saving; a new optimizer is in train
    mode.

    Example::

        opt = AdamCScheduleFreePlus(model.parameters(), lr=1.0, c_warmup=100)
        def closure():
            opt.zero_grad(); loss = loss_fn(model(inputs), targets); loss.backward(); return loss
        loss = opt.step(closure)
        opt.eval()   # parameters now hold the average x
    """ + _ARGS_DOC

    _state_keys = ("z", "exp_avg", "exp_avg_sq")

    def _new_state(self, p: torch.Tensor, beta: float) -> dict[str, Any]:
        return dict(z=_copy(p), exp_avg=_zeros(p), exp_avg_sq=_zeros(p), sf_beta1_y=beta)

    def _inner(self, p: torch.Tensor, state: dict[str, Any], grad: torch.Tensor, beta: float) -> torch.Tensor:
        return gap_inner(grad, _real(state, "z"), real_view(local(p)), beta / state["sf_beta1_y"])

    def _update(self, p: torch.Tensor, state: dict[str, Any], grad: torch.Tensor, scalars: StepScalars) -> None:
        z, exp_avg, exp_avg_sq = (_real(state, key) for key in self._state_keys)
        lean_update_(real_view(local(p)), z, grad, exp_avg, exp_avg_sq, scalars, state["sf_beta1_y"])
        state["sf_beta1_y"] = scalars.sf_beta1

    def _switch(self, to_train: bool) -> None:
        self._align_state()
        for group in self.param_groups:
            if group["train_mode"] == to_train:
                continue
            for p in group["params"]:
                state = self.state.get(p, {})
                if "z" in state:
                    beta = state["sf_beta1_y"]
                    real_view(local(p)).lerp_(_real(state, "z"), 1.0 - beta if to_train else 1.0 - 1.0 / beta)
            group["train_mode"] = to_train

    @kernels.compile_disabled
    @torch.no_grad()
    def points_at_x(self) -> dict[torch.Tensor, torch.Tensor]:
        """The values ``eval()`` would give the parameters, computed out of place.

        Returns:
            A dict mapping parameter -> its value at x, for the parameters with state in groups
            in train mode; parameters not listed already hold x.
        """
        self._align_state()
        points = {}
        for group in self.param_groups:
            if not group["train_mode"]:
                continue
            for p in group["params"]:
                state = self.state.get(p, {})
                if "z" in state:
                    point = _copy(p)
                    real_view(local(point)).lerp_(_real(state, "z"), 1.0 - 1.0 / state["sf_beta1_y"])
                    points[p] = point
        return points
