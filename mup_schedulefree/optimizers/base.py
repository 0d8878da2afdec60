"""Shared shell of the schedule-free optimizers: mode, lazy state, schedules, serialization.

What every optimizer in this package guarantees, and where the published package differs:

* ``step()`` reads ``p.grad`` and never writes it.
* State (z and the rule's moments) is created for a parameter on the first step that sees its
  gradient. A step skips parameters without a gradient, and train()/eval() move only parameters
  that have state, so a parameter that never got a gradient keeps exactly what was written to it.
* The train/eval mode belongs to the optimizer: a new optimizer is ready to train, the mode is
  stored in every group (so ``state_dict``/``load_state_dict`` carry it), a group added later
  joins the current mode, and ``step()`` outside train mode raises.
* Low-precision (float16/bfloat16) parameters keep a float32 master copy of the point they hold
  and float32 state by default (``master_weights=True``), so small updates are not rounded away;
  ``load_state_dict`` keeps each state tensor in the dtype it was saved with.
"""
from __future__ import annotations

import operator
from itertools import chain
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, NamedTuple

import torch
from torch.optim import Optimizer

from .. import kernels
from ..schedule import averaging_weight

if TYPE_CHECKING:
    from .rules import Rule

LOW_PRECISION = (torch.float16, torch.bfloat16)
MASTER = "param_fp32"
_MASTER_STAND_IN = torch.empty(0)  # what a master made at the first step looks like to kernels.route


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2 parameters and their state), else ``t`` itself.

    The schedule-free update is elementwise with scalars shared by all ranks, so updating each
    rank's shard in place updates the DTensor, and plain local tensors can take the fused path.
    """
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def real_view(t: torch.Tensor) -> torch.Tensor:
    """A complex tensor as real pairs (``torch.view_as_real``), else ``t`` itself.

    Complex parameters are updated as their real view, as torch's optimizers do: Adam's second
    moment then tracks the squares of the real and imaginary parts separately.
    """
    return torch.view_as_real(t) if t.is_complex() else t


def describe_parameter(group: dict[str, Any], index: int, p: torch.Tensor) -> str:
    """How error messages name a parameter: its name where the group records names, else its place.

    Args:
        group: the parameter's group (the factories record ``param_names``).
        index: the parameter's index in the group.
        p: the parameter.
    """
    names = group.get("param_names")
    if names is not None and index < len(names):
        return f"parameter {names[index]!r} (shape {tuple(p.shape)})"
    return f"parameter {index} of its group (shape {tuple(p.shape)})"


# Docstring fragments (Args entries) of the kernel flags, formatted into each class's docstring.
FLAGS_DOC = """foreach: list-wide ``_foreach`` ops for the eager path (default: on for non-CPU devices).
        fused: native single-pass kernel for CPU float32 tensors (default: on where available).
        master_weights: float32 master copy and state for float16/bfloat16 parameters (default True)."""
IGNORED_FLAGS_DOC = "foreach, fused: accepted for signature compatibility and ignored."

OPTIONAL_FLAGS = ("foreach", "fused")
SWITCHES = ("master_weights", "silent_sgd_phase", "decay_at_z")


def check_flags(group: dict[str, Any], prefix: str = "") -> None:
    """Validate the group's kernel flags (None, True or False) and switches (True or False).

    Args:
        group: a parameter group with defaults filled in.
        prefix: prefix of the flag keys (the wrapper's are ``sf_foreach``/``sf_fused``).
    """
    for key in OPTIONAL_FLAGS:
        value = group.get(prefix + key)
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"Invalid {key}: {value!r} (must be None, True or False)")
    for key in SWITCHES:
        value = group.get(key, False)
        if not isinstance(value, bool):
            raise TypeError(f"Invalid {key}: {value!r} (must be True or False)")


AVERAGING = "averaging"


def relative_averaging(group: dict[str, Any], prefix: str = "", power_key: str = "weight_lr_power") -> dict[str, Any]:
    """The group's averaging state in units of its reference lr, valid at its current step count.

    Each group keeps the published package's bookkeeping (``k``, ``lr_max``, ``weight_sum``, in
    learning-rate units, so either package can continue from the other's state dict) and, under
    ``averaging``, the same sums in units of its reference lr (the first non-zero lr it stepped
    with): ``{"k", "lr_ref", "lr_max", "weight_sum"}``. ckp1 comes from the relative sums, which
    are bit-identical across groups whose lrs differ by a constant factor, as muP's do. When the
    relative record is missing (a new optimizer, a state dict of the published package) or was
    written at another step count (the published package stepped since), it is rebuilt from the
    published sums, taking the group's current lr as the reference.

    Args:
        group: a parameter group.
        prefix: prefix of the bookkeeping keys (the wrapper's are ``sf_``).
        power_key: group key of the lr power in the averaging weight.

    Returns:
        A dict with keys ``k``, ``lr_ref`` (None until a non-zero lr is seen), ``lr_max`` and
        ``weight_sum``; never the group's own object when it had to be rebuilt.
    """
    k = group[prefix + "k"]
    record = group.get(prefix + AVERAGING)
    if record is not None and record.get("k") == k:
        return record
    lr, lr_max, weight_sum = float(group["lr"]), group[prefix + "lr_max"], group[prefix + "weight_sum"]
    ref = lr if lr > 0.0 else (lr_max if lr_max > 0.0 else None)
    if ref is None or lr_max < 0.0:
        return dict(k=k, lr_ref=ref, lr_max=lr_max, weight_sum=weight_sum)
    return dict(k=k, lr_ref=ref, lr_max=lr_max / ref, weight_sum=weight_sum / ref ** group[power_key])


def lr_ratio(group: dict[str, Any], prefix: str = "", power_key: str = "weight_lr_power") -> float:
    """Current lr of ``group`` relative to its reference lr (see :func:`relative_averaging`).

    Exactly 1.0 while the lr is unchanged, so the averaging weight of groups that differ only by
    a constant lr factor is bit-identical. 0.0 while the group has only seen lr = 0.

    Args:
        group: a parameter group.
        prefix: prefix of the bookkeeping keys.
        power_key: group key of the lr power in the averaging weight.
    """
    lr = float(group["lr"])
    ref = relative_averaging(group, prefix, power_key)["lr_ref"]
    if ref is None:
        return 0.0 if lr == 0.0 else 1.0
    return 1.0 if lr == ref else lr / ref


def share_lr_ratios(groups: Iterable[dict[str, Any]], prefix: str = "", power_key: str = "weight_lr_power") -> None:
    """Store each group's lr ratio (see :func:`lr_ratio`) for this step, sharing equal ones.

    A scheduler that multiplies every group's lr by the same factor (LambdaLR warmup) gives ratios
    that agree only up to rounding, since each group rounds its own product. Ratios within 1e-12
    (relative) of one already seen this step take that value, so ckp1 stays bit-identical across
    muP's groups under a schedule too.

    Args:
        groups: the optimizer's parameter groups; each gets ``<prefix>lr_ratio``.
        prefix: prefix of the bookkeeping keys.
        power_key: group key of the lr power in the averaging weight.
    """
    seen: list[float] = []
    for group in groups:
        ratio = lr_ratio(group, prefix, power_key)
        ratio = next((r for r in seen if abs(r - ratio) <= 1e-12 * abs(r)), ratio)
        if ratio not in seen:
            seen.append(ratio)
        group[prefix + "lr_ratio"] = ratio


def advance_schedule(group: dict[str, Any], multiplier: float, *, r_key: str = "r",
                     power_key: str = "weight_lr_power", prefix: str = "") -> tuple[float, float]:
    """Advance a group's step count and averaging sums (both units, see :func:`relative_averaging`).

    Args:
        group: the parameter group (its bookkeeping entries are updated in place; the
            ``averaging`` record is replaced, never mutated, so a state dict taken earlier keeps
            its values).
        multiplier: schedule factor on the group lr for this step (warmup, rectification).
        r_key: group key of the polynomial weighting power.
        power_key: group key of the lr power in the averaging weight.
        prefix: prefix of the bookkeeping keys (the wrapper shares groups with its base).

    Returns:
        The scheduled learning rate and ckp1 of this step.
    """
    k = group[prefix + "k"]
    lr = float(group["lr"]) * multiplier
    r, power = group[r_key], group[power_key]
    record = relative_averaging(group, prefix, power_key)
    ratio = group.pop(prefix + "lr_ratio", None)
    if ratio is None:
        ratio = lr_ratio(group, prefix, power_key)
    ref = record["lr_ref"] if record["lr_ref"] is not None else (float(group["lr"]) or None)
    relative = averaging_weight(k, multiplier * ratio, record["lr_max"], record["weight_sum"], r, power)
    published = averaging_weight(k, lr, group[prefix + "lr_max"], group[prefix + "weight_sum"], r, power)
    group[prefix + AVERAGING] = dict(k=k + 1, lr_ref=ref, lr_max=relative.lr_max, weight_sum=relative.weight_sum)
    group[prefix + "scheduled_lr"] = lr
    group[prefix + "lr_max"] = published.lr_max
    group[prefix + "weight_sum"] = published.weight_sum
    group[prefix + "k"] = k + 1
    return lr, relative.ckp1


def upgrade_saved_group(group: dict[str, Any], prefix: str = "", power_key: str = "weight_lr_power") -> dict[str, Any]:
    """A saved parameter group in today's format (a copy), whatever version of ours saved it.

    Before version 0.2 the groups kept ``weight_sum`` in relative units beside ``lr_ref`` and
    ``relative_lr_max``; they become the ``averaging`` record, and ``weight_sum`` is converted to
    the published (learning-rate) units. Groups in today's format, and the published package's
    groups, are returned unchanged.

    Args:
        group: a saved group (from ``state_dict()["param_groups"]``).
        prefix: prefix of the bookkeeping keys.
        power_key: group key of the lr power in the averaging weight.

    Returns:
        The group to load.
    """
    if prefix + "relative_lr_max" not in group:
        return group
    group = dict(group)
    ref = group.pop(prefix + "lr_ref", None)
    relative_lr_max = group.pop(prefix + "relative_lr_max")
    relative_sum = group[prefix + "weight_sum"]
    group[prefix + AVERAGING] = dict(k=group[prefix + "k"], lr_ref=ref, lr_max=relative_lr_max, weight_sum=relative_sum)
    if ref is not None:
        group[prefix + "weight_sum"] = relative_sum * ref ** group[power_key]
    return group


def check_each_group(groups: Iterable[dict[str, Any]], check: Callable[[dict[str, Any]], None], *,
                     saved: bool = False) -> None:
    """Run ``check`` on every group; its TypeError/ValueError gains the group's index.

    Args:
        groups: parameter groups (live ones, or a state dict's).
        check: raises TypeError/ValueError naming the argument at fault.
        saved: the groups come from a state dict being loaded (the message says so).
    """
    for index, group in enumerate(groups):
        try:
            check(group)
        except (TypeError, ValueError) as error:
            if saved:
                raise type(error)(f"Invalid state_dict: {error} in its param_groups[{index}]") from None
            raise type(error)(f"{error} in param_groups[{index}]") from None


def check_is_state_dict(optimizer: Optimizer, state_dict: Any) -> None:
    """Raise ValueError naming the argument unless ``state_dict`` looks like an optimizer's state dict.

    Args:
        optimizer: the optimizer about to load.
        state_dict: what the user passed to ``load_state_dict``.
    """
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
        raise ValueError(f"Invalid state_dict: a dict with 'state' and 'param_groups' (as returned by "
                         f"{type(optimizer).__name__}.state_dict()) is needed, got {type(state_dict).__name__}")


def check_saved_state(optimizer: Optimizer, state_dict: dict[str, Any]) -> None:
    """Raise before loading a state dict whose state does not fit the parameters.

    torch pairs saved state with parameters by position; a state dict of another model (another
    width) would attach tensors of other shapes and fail only at the first step. Every saved
    tensor shaped like a parameter (any tensor with dimensions) must have its parameter's shape.
    Registered as a ``load_state_dict`` pre-hook, so a check of the grouping registered with
    ``prepend=True`` (the muP factories') speaks first.

    Args:
        optimizer: the optimizer about to load.
        state_dict: the state dict being loaded.
    """
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        return  # torch's own check names the mismatch
    for saved, group in zip(saved_groups, optimizer.param_groups):
        if len(saved["params"]) != len(group["params"]):
            return
        for index, (saved_id, p) in enumerate(zip(saved["params"], group["params"])):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != p.shape:
                    raise ValueError(f"Invalid state_dict: its {key!r} for {describe_parameter(group, index, p)} "
                                     f"has shape {tuple(value.shape)}: was it saved from another model?")


SCHEDULE_DEFAULTS = dict(k=0, lr_max=-1.0, weight_sum=0.0, scheduled_lr=0.0, averaging=None)


class GroupPlan(NamedTuple):
    """What a group's step reuses while nothing it was built from changed (see ``ScheduleFreeCore._plan``).

    ``calls`` is None when the group cannot take the cached path (some tensor needs the eager path,
    a complex or distributed parameter); the group then steps through the full path every time.
    """

    params_list: list                      # the group's own "params" list object
    params: tuple                          # its parameters, in order
    has_grad: list                         # which of them had a gradient
    pointers: list                         # the data pointers of those that had one
    states: list                           # their state dicts
    state_tensors: dict                    # state key -> the tensors the calls were bound to
    state_pointers: dict                   # state key -> their data pointers (``.data =`` keeps the object)
    flags: tuple                           # the group's fused, foreach, master_weights, inner_momentum
    calls: list | None                     # (native.Prepared, rows of the active parameters it takes,
                                           #  its lists with None for the gradients, its masters)


def _pointers(tensors: Iterable[torch.Tensor | None]) -> list:
    """Data pointers of ``tensors`` (None stays None): what a bound native call writes through."""
    return [None if t is None else t.data_ptr() for t in tensors]


def _flags(group: dict[str, Any]) -> tuple:
    """The group entries a step plan depends on besides its tensors: fused, foreach, master_weights,
    and inner_momentum (whether it is on picks the op and the moments the calls are bound to)."""
    return group.get("fused"), group.get("foreach"), group.get("master_weights"), group.get("inner_momentum")


class ScheduleFreeCore(Optimizer):
    """State, schedules and serialization shared by every schedule-free form.

    A class names its update rule as ``rule``, a :class:`~mup_schedulefree.optimizers.rules.Rule`
    record: the validation of its hyperparameters, beta, the moments it keeps, its schedule and its
    kernel. A form (:class:`PrimalForm`, :class:`ClosureForm`, the reference form) defines where the
    parameter sits and how ``step`` is driven; the class declares its arguments and docstring.
    """

    rule: ClassVar[Rule]

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        """Validate the hyperparameters with the class's rule (a list of betas becomes a tuple), then
        build the groups with the schedule's bookkeeping beside them.

        Args:
            params: iterable of parameters or of dicts defining parameter groups.
            defaults: the class's hyperparameters, as its arguments gave them.
        """
        if isinstance(defaults.get("betas"), list):
            defaults = {**defaults, "betas": tuple(defaults["betas"])}
        self.rule.validate(defaults)
        super().__init__(params, {**SCHEDULE_DEFAULTS, **defaults})
        self.register_load_state_dict_pre_hook(check_saved_state)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group; its hyperparameters are validated before anything changes.

        Args:
            param_group: dict with ``params`` and optional per-group hyperparameters.
        """
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        self.rule.validate({**self.defaults, **param_group})
        super().add_param_group(param_group)
        self._plans = None

    def _point(self, p: torch.Tensor) -> torch.Tensor:
        """The tensor the math updates for ``p``: its float32 master copy if it has one, else ``p``.

        If ``p`` no longer holds its master rounded to its dtype, someone wrote it since the
        optimizer did (``load_state_dict``, clamping, weight tying, ``p.data`` writes), and the
        master takes the written value, as a float32 parameter would. The comparison is by value,
        so every way of writing a tensor is seen.
        """
        master = self.state[p].get(MASTER)
        if master is None:
            return p
        held, kept = local(p), local(master)
        if not torch.equal(held, kept.to(held.dtype)):
            kept.copy_(held)
        return master

    def _align_state(self, group: dict[str, Any], p: torch.Tensor) -> None:
        """Bring ``p``'s state to the device and dtype its parameter has now.

        A model moved after its optimizer state was created or loaded (``model.to(torch.float64)``,
        ``model.cuda()``) keeps training instead of failing on mismatched tensors; the state is
        converted as ``torch.optim.Optimizer.load_state_dict`` converts it.
        """
        state = self.state.get(p)
        if state is None or "z" not in state:  # .get: looking must not create an empty entry
            return
        master = group.get("master_weights", True) and p.dtype in LOW_PRECISION
        state_dtype = torch.float32 if master else p.dtype
        if master and MASTER not in state:
            state[MASTER] = p.detach().to(torch.float32, copy=True)
        elif not master:
            state.pop(MASTER, None)
        for key in ("z", *self.rule.moment_keys(group), *((MASTER,) if master else ())):
            tensor = state.get(key)  # a moment switched on since the last step is created by _init_state
            if tensor is not None and (tensor.dtype != state_dtype or tensor.device != p.device):
                state[key] = tensor.to(device=p.device, dtype=state_dtype)

    def _check_groups(self) -> None:
        """Validate every group's hyperparameters again before a step; change nothing if one fails.

        Groups can be edited between steps (``param_groups[i]["lr"] = ...``, a scheduler, a loaded
        state dict), and a value that fails half way through a step would leave earlier groups
        stepped and later ones not. The error names the group.
        """
        check_each_group(self.param_groups, self.rule.validate)

    def _check_state(self) -> None:
        """Raise, naming the parameter, if some state no longer fits its parameter; change nothing.

        A state dict of another model (another width) fails here, before anything moves, not half
        way through an update. Parameters moved to another device or dtype get their state along.
        """
        check_state_shapes(self)
        for group in self.param_groups:
            for p in group["params"]:
                self._align_state(group, p)

    def _check_gradients(self) -> None:
        """Raise, naming the parameter, before a step whose gradients cannot be used; change nothing.

        Sparse gradients are refused, and so is ``fused=True`` where the fused kernels cannot take
        a parameter or its gradient (as torch's ``fused=True`` raises): the flag is a promise, and
        ``fused=None`` lets such tensors take the eager path.
        """
        for group in self.param_groups:
            for index, p in enumerate(group["params"]):
                grad = p.grad
                if grad is not None and grad.layout != torch.strided:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients "
                                       f"({describe_parameter(group, index, p)} has a {grad.layout} gradient)")
        for group in self.param_groups:
            if group.get("fused") is True:
                self._check_fused(group)

    def _check_fused(self, group: dict[str, Any]) -> None:
        """Raise RuntimeError, naming the parameter, if ``kernels.route`` would not send it to the native kernels."""
        indices = [i for i, p in enumerate(group["params"]) if p.grad is not None]
        params = [group["params"][i] for i in indices]
        if not params:
            return
        masters = [None if p.dtype not in LOW_PRECISION or not group.get("master_weights", True)
                   else self.state.get(p, {}).get(MASTER, _MASTER_STAND_IN) for p in params]
        lists = [[real_view(local(p)) for p in params], [real_view(local(p.grad)) for p in params]]
        for path, _, _, rows in kernels.route(lists, fused=True, foreach=group.get("foreach"), masters=masters,
                                              low_precision_grads=True):
            if path not in ("native", "triton"):
                p = params[rows[0]]
                cuda = p.device.type in kernels.TRITON_DEVICES
                missing = kernels._triton() is None if cuda else kernels._native() is None
                why = (("triton is not installed" if cuda else "the native kernels are unavailable here") if missing
                       else "the fused kernels take contiguous float32 tensors (CPU: native, CUDA: Triton), and "
                       "bfloat16/float16 ones with master_weights=True, with gradients of their dtype")
                raise RuntimeError(f"{type(self).__name__}: fused=True cannot be kept for "
                                   f"{describe_parameter(group, indices[rows[0]], p)}, {p.dtype} on {p.device} "
                                   f"with a {p.grad.dtype} gradient: {why}. Pass fused=None to let such tensors "
                                   "take the eager path.")

    def _init_state(self, group: dict[str, Any], p: torch.Tensor) -> None:
        """Create what ``p``'s state lacks: z (and its master) on its first step, and every moment the
        group calls for now (all of them then, or one switched on since, as inner momentum)."""
        state = self.state[p]
        if "z" not in state:
            state_dtype = p.dtype
            if group.get("master_weights", True) and p.dtype in LOW_PRECISION:
                state_dtype = torch.float32
                state[MASTER] = p.detach().to(torch.float32, copy=True)
            state["z"] = p.detach().to(state_dtype, copy=True)
        for key in self.rule.moment_keys(group):
            if key not in state:
                state[key] = torch.zeros_like(p, dtype=state["z"].dtype, memory_format=torch.preserve_format)

    def _lists(self, group: dict[str, Any], params: list[torch.Tensor]) -> list[list[torch.Tensor | None]]:
        """Parallel lists [parameters, gradients, z, *moments, masters] of the group's ``params`` (a master
        is None where there is none; the moments are those of ``rule.moment_keys(group)``)."""
        keys = self.rule.moment_keys(group)
        points, grads, zs, masters = [], [], [], []
        moments: list[list[torch.Tensor]] = [[] for _ in keys]
        for p in params:
            state = self.state[p]
            points.append(real_view(local(p)))
            grads.append(real_view(local(p.grad)))
            master = state.get(MASTER)
            masters.append(None if master is None else real_view(local(master)))
            zs.append(real_view(local(state["z"])))
            for column, key in zip(moments, keys):
                column.append(real_view(local(state[key])))
        return [points, grads, zs, *moments, masters]

    def _plan(self, group: dict[str, Any]) -> GroupPlan | None:
        """Build what the group's next steps reuse: the checked, bucketed lists as bound native calls.

        Built after a step that took the full path (validation, lazy state, bucketing); reused by
        :meth:`_cached_step_plans` while the group's parameters are the same objects with the same
        storage, the same of them have gradients, their state dicts hold the same tensors, its flags
        are unchanged, and no group was added or state loaded. A parameter moved to another dtype
        or device gets new storage, so its changed data pointer sends the step through the full
        path, which aligns the state.

        Returns:
            The plan, or None if some parameter with a gradient has no state yet.
        """
        lib = kernels._native()
        params = group["params"]
        has_grad = [p.grad is not None for p in params]
        active = [p for p, has in zip(params, has_grad) if has]
        if any("z" not in self.state[p] for p in active):
            return None
        states = [self.state[p] for p in active]
        keys = ("z", *self.rule.moment_keys(group)) + ((MASTER,) if any(MASTER in st for st in states) else ())
        plan = dict(params_list=params, params=tuple(params), has_grad=has_grad,
                    pointers=[p.data_ptr() for p in active], states=states,
                    state_tensors={key: [st.get(key) for st in states] for key in keys},
                    state_pointers={key: _pointers(st.get(key) for st in states) for key in keys},
                    flags=_flags(group), calls=None)
        op = self.rule.native_op(group)
        if lib is None or not op or any(p.is_complex() or local(p) is not p for p in active):
            return GroupPlan(**plan)
        calls = []
        *lists, masters = self._lists(group, active)
        for path, bucket, kept, rows in kernels.route(lists, fused=group.get("fused"), foreach=group.get("foreach"),
                                                       masters=masters, low_precision_grads=True):
            if path != "native":
                return GroupPlan(**plan)
            name, tensors = op, bucket
            if kept is not None:
                name, tensors = name + "lp_", [bucket[0], bucket[1], kept, *bucket[2:]]
            try:
                calls.append((lib.Prepared(name, tensors, rebind=("grads",)), rows, [bucket[0], None, *bucket[2:]],
                              kept))
            except (TypeError, ValueError):  # a tensor the kernels cannot take: the full path splits it off
                return GroupPlan(**plan)
        return GroupPlan(**{**plan, "calls": calls})

    def _cached_step_plans(self) -> list[list] | None:
        """Every group's bound calls, as (prepared call, lists, masters), or None to take the full path.

        The lists are the plan's, with this step's gradients, which are bound to the prepared calls.

        Nothing is changed when None is returned, and nothing but the calls' gradient pointers
        otherwise; every check of the full path that could fail has passed when the plans were built
        and holds while they match (a gradient of another kind, size or layout does not match).
        """
        plans = getattr(self, "_plans", None)
        if plans is None or len(plans) != len(self.param_groups):
            return None
        ready = []
        for group, plan in zip(self.param_groups, plans):
            params = group["params"]
            if (plan is None or plan.calls is None or params is not plan.params_list
                    or len(params) != len(plan.params) or not all(map(operator.is_, params, plan.params))):
                return None
            grads = [p.grad for p in params]
            if [g is not None for g in grads] != plan.has_grad or _flags(group) != plan.flags:
                return None
            active = [p for p in params if p.grad is not None]
            if [p.data_ptr() for p in active] != plan.pointers:
                return None
            if not all(map(operator.is_, map(self.state.__getitem__, active), plan.states)):
                return None
            for key, tensors in plan.state_tensors.items():
                if not all(map(operator.is_, map(operator.methodcaller("get", key), plan.states), tensors)):
                    return None
                if _pointers(tensors) != plan.state_pointers[key]:  # storage swapped under the same object
                    return None
            grads = [g for g in grads if g is not None]
            calls = []
            for prepared, rows, lists, masters in plan.calls:
                picked = grads if len(rows) == len(grads) else [grads[i] for i in rows]
                if not prepared.bind("grads", picked):
                    return None
                calls.append((prepared, [lists[0], picked, *lists[2:]], masters))
            ready.append(calls)
        return ready

    def _move_points(self, group: dict[str, Any], params: list[torch.Tensor], weight: float) -> None:
        """Interpolate the points of ``params`` toward their z by ``weight`` (through masters where kept)."""
        if not params:
            return
        for p in params:
            self._align_state(group, p)
        masters = [self.state[p].get(MASTER) for p in params]
        kernels.lerp_([real_view(local(p)) for p in params], [real_view(local(self.state[p]["z"])) for p in params],
                      weight, foreach=group.get("foreach"), fused=group.get("fused"),
                      masters=[None if m is None else real_view(local(m)) for m in masters])

    def _step_group(self, group: dict[str, Any], params: list[torch.Tensor], closure_form: bool) -> None:
        """Advance the group's schedule once, then update the parameters that have gradients."""
        scalars = self.rule.advance(group)
        for p in params:
            self._init_state(group, p)
        *lists, masters = self._lists(group, params)
        self.rule.step_(lists, scalars, fused=group.get("fused"), foreach=group.get("foreach"),
                        closure_form=closure_form, masters=masters)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state as ``torch.optim.Optimizer`` does, keeping each state tensor's saved dtype.

        Args:
            state_dict: a dict returned by :meth:`state_dict`.
        """
        check_is_state_dict(self, state_dict)
        state_dict = {**state_dict, "param_groups": [upgrade_saved_group(g) for g in state_dict["param_groups"]]}
        check_each_group(state_dict["param_groups"], lambda saved: self.rule.validate({**self.defaults, **saved}),
                         saved=True)
        self._plans = None
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # a published state dict lacks this package's own keys
            for key, value in self.defaults.items():
                if key != "differentiable":  # torch's own default, never read here
                    group.setdefault(key, value)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for saved_id, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if isinstance(value, torch.Tensor) and value.dtype != self.state[p][key].dtype:
                    self.state[p][key] = value.to(device=p.device, dtype=value.dtype, copy=True)


def check_state_shapes(optimizer: Optimizer) -> None:
    """Raise, naming the parameter, if its stored z has another shape (a state dict of another model).

    Args:
        optimizer: a schedule-free optimizer whose state keeps ``"z"`` per parameter.

    Raises:
        ValueError: naming the first parameter whose z does not fit it.
    """
    for group in optimizer.param_groups:
        for index, p in enumerate(group["params"]):
            z = optimizer.state.get(p, {}).get("z")
            if z is not None and z.shape != p.shape:
                raise ValueError(f"optimizer state of {describe_parameter(group, index, p)} has shape "
                                 f"{tuple(z.shape)}: was the state dict saved from another model?")


def switch_stored_points(optimizer: Optimizer, to_train: bool, mode_key: str = "train_mode") -> None:
    """For forms that store x and y: put each parameter's stored y (``to_train``) or x in it.

    Only groups not yet in that mode move, and then take it; a parameter without stored points
    (no step yet) keeps its value, which is then x and y at once.

    Args:
        optimizer: an optimizer whose state holds ``"x"`` and ``"y"`` per parameter.
        to_train: True for train mode (y), False for eval mode (x).
        mode_key: the group key of the mode.
    """
    key = "y" if to_train else "x"
    for group in optimizer.param_groups:
        if group[mode_key] != to_train:
            for p in group["params"]:
                if key in optimizer.state.get(p, ()):
                    p.copy_(optimizer.state[p][key])
            group[mode_key] = to_train


def stored_points_at_x(optimizer: Optimizer, mode_key: str = "train_mode") -> dict[torch.Tensor, torch.Tensor]:
    """For forms that store x: copies of the stored x of every parameter in a group in train mode.

    Args:
        optimizer: an optimizer whose state holds ``"x"`` per parameter.
        mode_key: the group key of the mode.

    Returns:
        A dict mapping parameter -> its value at x; parameters not listed already hold x.
    """
    return {p: optimizer.state[p]["x"].clone() for group in optimizer.param_groups if group[mode_key]
            for p in group["params"] if "x" in optimizer.state.get(p, ())}


def train_mode_closure(optimizer: Optimizer, closure: Callable[[], Any] | None) -> Any:
    """Refuse a step outside train mode, then evaluate the closure with gradients enabled.

    The eval-mode error is the same for every optimizer of the package.

    Args:
        optimizer: an optimizer with a ``train_mode`` property.
        closure: the step's closure, or None.

    Returns:
        The closure's loss, or None.
    """
    if not optimizer.train_mode:
        raise RuntimeError(f"{type(optimizer).__name__}.step() was called in eval mode (not in train mode): call "
                           "optimizer.train() before training steps (and optimizer.eval() before evaluating or saving).")
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class Modes:
    """The train/eval mode, kept in every group under ``_mode_key`` so that state_dict carries it.

    A subclass (an ``Optimizer``) defines ``_switch(to_train)``, which moves the parameters of the
    groups whose mode differs and records the new mode.
    """

    _mode_key = "train_mode"

    @property
    def train_mode(self) -> bool:
        """True when parameters hold the training point y, False when they hold x."""
        return all(group[self._mode_key] for group in self.param_groups)

    def _switch(self, to_train: bool) -> None:
        raise NotImplementedError

    @kernels.compile_disabled
    @torch.no_grad()
    def train(self) -> None:
        """Put the parameters at the training point y (idempotent; a new optimizer is already there)."""
        self._switch(True)

    @kernels.compile_disabled
    @torch.no_grad()
    def eval(self) -> None:
        """Put the parameters at the averaged point x, for evaluation and checkpointing (idempotent)."""
        self._switch(False)


class ModalForm(Modes, ScheduleFreeCore):
    """Train/eval mode kept in every group (so state_dict carries it); a new optimizer trains.

    Subclasses define ``_switch(to_train)``, which moves the parameters of groups whose mode
    differs and records the new mode.
    """

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; it is validated first and joins the optimizer's current mode.

        Args:
            param_group: dict with ``params`` and optional per-group hyperparameters.
        """
        mode = self.param_groups[0]["train_mode"] if self.param_groups else True
        super().add_param_group({**param_group, "train_mode": mode})

    def _begin_step(self, closure: Callable[[], Any] | None) -> Any:
        """Refuse a step outside train mode, evaluate the closure, share this step's lr ratios."""
        loss = train_mode_closure(self, closure)
        self._check_groups()
        self._check_state()
        self._check_gradients()
        share_lr_ratios(self.param_groups)
        return loss


class PrimalForm(ModalForm):
    """Parameters hold y while training and x in eval mode; ``train()``/``eval()`` interpolate."""

    def _switch(self, to_train: bool) -> None:
        for group in self.param_groups:
            if group["train_mode"] == to_train:
                continue
            beta = self.rule.beta(group)
            weight = 1.0 - beta if to_train else 1.0 - 1.0 / beta
            self._move_points(group, [p for p in group["params"] if "z" in self.state.get(p, ())], weight)
            group["train_mode"] = to_train

    @kernels.compile_disabled
    @torch.no_grad()
    def points_at_x(self) -> dict[torch.Tensor, torch.Tensor]:
        """The values ``eval()`` would give the parameters, computed out of place.

        Nothing is moved: model and optimizer stay exactly as they are. Each value is a new
        tensor in its parameter's dtype, bit-identical to what ``eval()`` would write (the same
        kernel runs on copies). Parameters that are not listed already hold x: groups in eval
        mode, and parameters that never had state.

        Returns:
            A dict mapping parameter -> its value at x.
        """
        points: dict[torch.Tensor, torch.Tensor] = {}
        for group in self.param_groups:
            params = [p for p in group["params"] if "z" in self.state.get(p, ())]
            if not group["train_mode"] or not params:
                continue
            for p in params:
                self._align_state(group, p)
            copies = [self._point(p).detach().clone(memory_format=torch.preserve_format) for p in params]
            kernels.lerp_([real_view(local(c)) for c in copies], [real_view(local(self.state[p]["z"])) for p in params],
                          1.0 - 1.0 / self.rule.beta(group), foreach=group.get("foreach"), fused=group.get("fused"))
            points.update((p, c if c.dtype == p.dtype else c.to(p.dtype)) for p, c in zip(params, copies))
        return points

    @kernels.compile_disabled
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one optimization step at the training point.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss.

        Returns:
            The closure's loss, or None.
        """
        loss = train_mode_closure(self, closure)
        self._check_groups()
        ready = self._cached_step_plans()
        if ready is not None:
            share_lr_ratios(self.param_groups)
            for group, calls in zip(self.param_groups, ready):
                scalars = self.rule.advance(group)
                for prepared, lists, masters in calls:
                    self.rule.step_(lists, scalars, fused=True, foreach=False, closure_form=False, masters=masters,
                                    prepared=prepared)
            return loss
        self._check_state()
        self._check_gradients()
        share_lr_ratios(self.param_groups)
        for group in self.param_groups:
            self._step_group(group, [p for p in group["params"] if p.grad is not None], closure_form=False)
        self._plans = [self._plan(group) for group in self.param_groups]
        return loss


class ClosureForm(ScheduleFreeCore):
    """Parameters always hold x; ``step(closure)`` moves them to y for the closure and back.

    No ``train()``/``eval()`` is needed: between steps the model is always at x.
    """

    def points_at_x(self) -> dict[torch.Tensor, torch.Tensor]:
        """Empty: between steps every parameter already holds x.

        Returns:
            An empty dict (see :meth:`PrimalForm.points_at_x`).
        """
        return {}

    @kernels.compile_disabled
    def step(self, closure: Callable[[], Any]) -> Any:  # type: ignore[override]
        """Evaluate ``closure`` at y and take one step; parameters hold x before and after.

        If the closure raises, or a gradient cannot be used (a sparse one), the
        parameters go back to x (up to float rounding of the round trip), nothing else changes,
        and the error propagates.

        Args:
            closure: callable that zeroes gradients, runs forward and backward, returns the loss.

        Returns:
            The closure's loss.
        """
        if closure is None or not callable(closure):
            raise TypeError(f"{type(self).__name__}.step(closure) requires a callable closure, got {closure!r}")
        self._check_groups()
        self._check_state()
        with torch.no_grad():
            self._move_all(to_y=True)
        try:
            with torch.enable_grad():
                loss = closure()
            self._check_gradients()
        except BaseException:
            with torch.no_grad():
                self._move_all(to_y=False)
            raise
        with torch.no_grad():
            share_lr_ratios(self.param_groups)
            for group in self.param_groups:
                active = [p for p in group["params"] if p.grad is not None]
                idle = [p for p in group["params"] if p.grad is None and "z" in self.state.get(p, ())]
                self._step_group(group, active, closure_form=True)
                self._move_points(group, idle, 1.0 - 1.0 / self.rule.beta(group))
        return loss

    def _move_all(self, to_y: bool) -> None:
        """Move every parameter with state from x to y, or back (the closure failed)."""
        for group in self.param_groups:
            beta = self.rule.beta(group)
            self._move_points(group, [p for p in group["params"] if "z" in self.state.get(p, ())],
                              1.0 - beta if to_y else 1.0 - 1.0 / beta)
