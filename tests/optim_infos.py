"""One record per optimizer class, and the helpers every generic test drives them with.

Following torch.optim's OpInfo idea, each :class:`OptimInfo` describes a class once: how to build it,
a list of valid configurations, whether it is closure-driven or has train/eval modes, which flags it
honours, the invalid inputs it must reject, and its counterpart in the published ``schedulefree``
1.4.1 package together with the traps that counterpart is known to exhibit. Generic tests are
parametrized over :data:`INFOS` and never name a class.

Parameter layout used throughout (the tiny MLP's four tensors W1, b1, W2, b2): three groups,
[W1, b1] at the config's lr, [W2] at lr / 3 with weight decay 0.05, [b2] at 2 lr with a 7-step
warmup (where the class has warmup: ``warmup_steps``, or ScheduleFree+'s ``c_warmup``).

Every generic test steps an optimizer through :func:`take_step`, which hands the loss to the classes
that need it (``needs_function_value``: ScheduleFree+'s Polyak step size reads the loss).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import pytest
import schedulefree as published
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import Optimizer

import mup_schedulefree as ours

# Traps of the published package a record can declare (see ``OptimInfo.published_traps``).
WRITES_GRAD = "writes_grad"                  # step() modifies p.grad in place
TOUCHES_GRADLESS = "touches_gradless"        # state / movement for parameters that never had a gradient
DRIFTS_WHEN_FROZEN = "drifts_when_frozen"    # a parameter that lost its gradient keeps moving
STARTS_IN_EVAL = "starts_in_eval"            # a new optimizer refuses to step before train()
MODE_NOT_SAVED = "mode_not_saved"            # state_dict does not carry the train/eval mode
NEW_GROUP_WRONG_MODE = "new_group_wrong_mode"  # add_param_group after train() leaves the group in eval
WRONG_EVAL_ERROR = "wrong_eval_error"        # step() in eval mode raises a bare Exception
ACCEPTS_INVALID = "accepts_invalid"          # negative lr accepted silently

# Arguments upstream added after the 1.4.1 release: a config using one has no 1.4.1 counterpart.
NEWER_THAN_PUBLISHED = frozenset({"inner_momentum"})

KERNEL_FLAGS = frozenset({"foreach", "fused"})  # which kernels compute the step
ALL_FLAGS = KERNEL_FLAGS | {"master_weights"}   # ... and float32 master copies of low-precision parameters


@dataclass(frozen=True)
class ErrorInput:
    """Constructor kwargs that must raise ``error`` (ValueError by default) naming ``name`` and
    showing ``value``: a value out of range is a ValueError, a value of the wrong type a TypeError.

    ``in_group``: the same key is a per-group hyperparameter, so ``add_param_group`` must reject it too.
    """

    kwargs: dict[str, Any]
    name: str
    value: Any
    in_group: bool = True
    error: type = ValueError

    @property
    def id(self) -> str:
        return "-".join(f"{k}={v}" for k, v in self.kwargs.items())


@dataclass(frozen=True)
class OptimInfo:
    """Everything a generic test needs to know about one optimizer class.

    Attributes:
        name: test id.
        factory: ``factory(params, **config)`` builds the optimizer (wrapper: its base too).
        configs: valid configurations; every one has ``lr``.
        closure_form: ``step(closure)`` is required and parameters hold x between steps.
        has_modes: the class has ``train()``/``eval()`` and a ``train_mode`` property.
        beta_key: config key of the y = (1 - beta) z + beta x interpolation coefficient.
        decay_key: per-group key of the weight decay taken at y.
        has_warmup: the class has a per-group warmup, the group key ``warmup_key``.
        warmup_key: the per-group key of the warmup's length in steps.
        flags: which of the keyword flags ``foreach``, ``fused``, ``master_weights`` the class
            honours (changes how it computes); the wrapper's passes take the first two, its base
            owns the precision of what it updates.
        error_inputs: invalid constructor inputs.
        published_factory: ``published_factory(params, **config)`` builds the schedulefree 1.4.1
            counterpart (its primal, reference and wrapper forms start in eval mode).
        published_reads_group_decay: the published class reads ``decay_key`` per group.
        published_traps: names of the traps (module constants) the published counterpart exhibits.
        composed: a :class:`ComposedOptimizer` of parts over disjoint parameters: the suite's
            three groups become one per part and group, a step is atomic per part only, each part
            checks a state dict on load in part order, and the Muon part takes no complex tensors.
        global_step_size: one step size is computed from every group's gradient and the whole
            loss (ScheduleFree+'s Polyak step) and multiplies every group's lr, so a group's
            presence, or the loss of a head without gradient, changes every group's step (see
            :func:`skip_if_global_step_size`).
    """

    name: str
    factory: Callable[..., Optimizer]
    configs: tuple[dict[str, Any], ...]
    closure_form: bool = False
    has_modes: bool = True
    beta_key: str = "betas"
    decay_key: str = "weight_decay"
    has_warmup: bool = True
    warmup_key: str = "warmup_steps"
    flags: frozenset[str] = ALL_FLAGS
    error_inputs: tuple[ErrorInput, ...] = ()
    published_factory: Callable[..., Any] | None = None
    published_reads_group_decay: bool = True
    published_traps: frozenset[str] = field(default_factory=frozenset)
    composed: bool = False
    global_step_size: bool = False

    def make(self, params: Iterable[Any], config: dict[str, Any], **extra: Any) -> Optimizer:
        """Build the optimizer from ``config`` plus ``extra`` kwargs."""
        return self.factory(params, **config, **extra)

    @property
    def published_configs(self) -> tuple[dict[str, Any], ...]:
        """The configs the published 1.4.1 counterpart takes (none of :data:`NEWER_THAN_PUBLISHED`)."""
        return tuple(config for config in self.configs if not NEWER_THAN_PUBLISHED & config.keys())

    def make_published(self, params: Iterable[Any], config: dict[str, Any], *, ready: bool = True) -> Any:
        """Build the published counterpart; ``ready``: call its ``train()`` (it starts in eval mode)."""
        opt = self.published_factory(params, **config)
        if ready and self.has_modes:
            opt.train()
        return opt

    def beta(self, config: dict[str, Any]) -> float:
        """The interpolation coefficient of ``config`` (class default if unset)."""
        if self.beta_key == "betas":
            return config.get("betas", (0.9, 0.999))[0]
        return config.get(self.beta_key, 0.9)

    def __repr__(self) -> str:
        return self.name


# ----------------------------------------------------------------------------- factories
def init_adam_state(adam: torch.optim.Adam) -> None:
    """Create the state torch's Adam would create lazily on its first step (step 0, zero moments).

    The published wrapper keeps its ``z`` in the base optimizer's state, so torch's Adam, which
    initialises only when a parameter's state is empty, then fails with ``KeyError: 'exp_avg'``.
    Creating that state up front gives the same trajectory as lazy initialisation.
    """
    for group in adam.param_groups:
        for p in group["params"]:
            adam.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                             "exp_avg_sq": torch.zeros_like(p)}


def wrapper_factory(wrapper_cls: type, base: str, *, published_form: bool) -> Callable[..., Any]:
    """Build ``wrapper_cls(SGD or Adam(betas=(0, 0.999)), **kw)`` with the base taking the lr.

    ``published_form``: the published wrapper, which needs Adam's state created up front (see
    :func:`init_adam_state`).
    """

    def factory(params: Iterable[Any], lr: float, **kw: Any) -> Any:
        if base == "sgd":
            base_opt = torch.optim.SGD(params, lr=lr)
        else:
            base_opt = torch.optim.Adam(params, lr=lr, betas=(0.0, 0.999))
            if published_form:
                init_adam_state(base_opt)
        return wrapper_cls(base_opt, **kw)

    return factory


def base_width_infshapes(params: Iterable[Any]) -> list[Any]:
    """``params`` (tensors or group dicts) with an ``infshape`` on every tensor that has none: every
    dimension infinite at width multiplier 1, so 2-D tensors are hidden matrices, 1-D ones vector-like."""
    from mup.infshape import InfDim, InfShape

    items = list(params)
    groups = items if items and isinstance(items[0], dict) else [{"params": items}]
    for group in groups:
        for p in group["params"]:
            if not hasattr(p, "infshape"):
                p.infshape = InfShape([InfDim(size, size) for size in p.shape])
    return items


def muon_factory(params: Iterable[Any], **config: Any) -> Optimizer:
    """:func:`MuMuon_ScheduleFree` at the base width: the suite's 2-D tensors take Muon, the others AdamW.

    A group the suite adds later gets the same base-width infshapes before the optimizer splits it
    (its tensors carry none, and a muP optimizer routes and scales by them).
    """
    opt = ours.MuMuon_ScheduleFree(base_width_infshapes(params), **config)
    split = opt._split
    opt._split = lambda group: split({**group, "params": base_width_infshapes(
        [group["params"]] if isinstance(group["params"], torch.Tensor) else group["params"])})
    return opt


# ----------------------------------------------------------------------------- records
_ADAMW_CONFIGS = (
    dict(lr=0.01, betas=(0.9, 0.999), weight_decay=0.01, warmup_steps=5, r=1.0),
    dict(lr=0.03, betas=(0.8, 0.99), eps=1e-6, weight_lr_power=0.0),
)
# AdamW's inner momentum (upstream HEAD, not 1.4.1): only the forms that take it list this config.
_INNER_MOMENTUM_CONFIG = dict(lr=0.01, betas=(0.9, 0.999), weight_decay=0.01, warmup_steps=5, r=1.0,
                              inner_momentum=0.9)
_RADAM_CONFIGS = (
    dict(lr=0.01, betas=(0.9, 0.999), weight_decay=0.01, r=1.0),
    dict(lr=0.03, betas=(0.8, 0.99), silent_sgd_phase=False, weight_lr_power=0.0),
)
_SGD_CONFIGS = (
    dict(lr=0.2, momentum=0.9, weight_decay=0.01, warmup_steps=5, r=1.0),
    dict(lr=0.5, momentum=0.7, weight_lr_power=0.0),
)
_WRAPPER_SGD_CONFIGS = (
    dict(lr=0.2, momentum=0.9, weight_decay_at_y=0.01, r=1.0),
    dict(lr=0.5, momentum=0.7, weight_lr_power=0.0),
)
_WRAPPER_ADAM_CONFIGS = (
    dict(lr=0.01, momentum=0.9, weight_decay_at_y=0.01, r=1.0),
    dict(lr=0.03, momentum=0.8),
)

_MUON_CONFIGS = (
    dict(lr=0.02, adam_lr=0.01, momentum=0.9, weight_decay=0.01, r=1.0),
    dict(lr=0.05, adam_lr=0.03, momentum=0.8, adjust_lr_fn="match_rms_adamw", weight_lr_power=0.0),
)
# ScheduleFree+ (lr multiplies the Polyak step size): AdamC decay (applied as lr_k^2 * weight_decay,
# hence larger values than AdamW's), c_warmup, an EMA of the Polyak denominator; the second config
# anneals sf_beta1 toward sf_beta1_max. The first keeps sf_beta1 fixed: probes that recover x from y
# and z with the config's beta (``OptimInfo.beta``) need the beta that built y.
_PLUS_CONFIGS = (
    dict(lr=1.0, weight_decay=5.0, c_warmup=3, polyak_beta=0.9, r=1.0),
    dict(lr=0.5, betas=(0.8, 0.99), sf_beta1=0.8, sf_beta1_max=0.95, sf_beta1_anneal_steps=20, eps=1e-6,
         polyak_beta=0.5, weight_lr_power=1.0),
)

_COMMON_ERRORS = (
    ErrorInput(dict(lr=-1.0), "lr", -1.0),
    ErrorInput(dict(lr=float("inf")), "lr", float("inf")),
    ErrorInput(dict(lr=None), "lr", None, error=TypeError),
    ErrorInput(dict(lr="1e-2"), "lr", "1e-2", error=TypeError),
    ErrorInput(dict(weight_decay="0.1"), "weight_decay", "0.1", error=TypeError),
    ErrorInput(dict(weight_decay=True), "weight_decay", True, error=TypeError),
    ErrorInput(dict(weight_decay=-0.5), "weight_decay", -0.5),
    ErrorInput(dict(r=-1.0), "r", -1.0),
    ErrorInput(dict(weight_lr_power=-2.0), "weight_lr_power", -2.0),
)
_BETAS_ERRORS = (
    ErrorInput(dict(betas=(1.0, 0.999)), "betas", 1.0),
    ErrorInput(dict(betas=(0.0, 0.999)), "betas", 0.0),
    ErrorInput(dict(betas=(-0.25, 0.999)), "betas", -0.25),
    ErrorInput(dict(betas=(0.9, 1.0)), "betas", 1.0),
    ErrorInput(dict(betas=(0.9, -0.125)), "betas", -0.125),
    ErrorInput(dict(eps=-1e-8), "eps", -1e-8),
)
_WARMUP_ERRORS = (ErrorInput(dict(warmup_steps=-3), "warmup_steps", -3),
                  ErrorInput(dict(warmup_steps=None), "warmup_steps", None, error=TypeError),
                  ErrorInput(dict(warmup_steps=2.5), "warmup_steps", 2.5, error=TypeError))
_MOMENTUM_ERRORS = (
    ErrorInput(dict(momentum=1.0), "momentum", 1.0),
    ErrorInput(dict(momentum=0.0), "momentum", 0.0),
    ErrorInput(dict(momentum=-0.5), "momentum", -0.5),
)
_FLAG_ERRORS = (
    ErrorInput(dict(foreach="yes"), "foreach", "yes", error=TypeError),
    ErrorInput(dict(fused=1), "fused", 1, error=TypeError),
    ErrorInput(dict(master_weights=None), "master_weights", None, error=TypeError),
)
_ADAMW_ERRORS = _COMMON_ERRORS + _BETAS_ERRORS + _WARMUP_ERRORS
_INNER_MOMENTUM_ERRORS = (
    ErrorInput(dict(inner_momentum=1.0), "inner_momentum", 1.0),
    ErrorInput(dict(inner_momentum=-0.1), "inner_momentum", -0.1),
    ErrorInput(dict(inner_momentum="0.9"), "inner_momentum", "0.9", error=TypeError),
    ErrorInput(dict(inner_momentum=None), "inner_momentum", None, error=TypeError),
)
_RADAM_ERRORS = _COMMON_ERRORS + _BETAS_ERRORS + (
    ErrorInput(dict(silent_sgd_phase="no"), "silent_sgd_phase", "no", error=TypeError),)
_SGD_ERRORS = _COMMON_ERRORS + _MOMENTUM_ERRORS + _WARMUP_ERRORS
_WRAPPER_ERRORS = (
    ErrorInput(dict(weight_decay_at_y=-0.1), "weight_decay_at_y", -0.1),
    ErrorInput(dict(weight_decay_at_y=None), "weight_decay_at_y", None, error=TypeError),
    ErrorInput(dict(momentum="0.9"), "momentum", "0.9", in_group=False, error=TypeError),
    ErrorInput(dict(foreach="yes"), "foreach", "yes", in_group=False, error=TypeError),
    ErrorInput(dict(momentum=1.0), "momentum", 1.0, in_group=False),
    ErrorInput(dict(momentum=0.0), "momentum", 0.0, in_group=False),
    ErrorInput(dict(r=-1.0), "r", -1.0, in_group=False),
    ErrorInput(dict(weight_lr_power=-1.0), "weight_lr_power", -1.0, in_group=False),
)

_WRAPPER_REFERENCE_ERRORS = tuple(e for e in _WRAPPER_ERRORS if "foreach" not in e.kwargs)
_MUON_ERRORS = _COMMON_ERRORS[:7] + (
    ErrorInput(dict(r=-1.0), "r", -1.0, in_group=False),
    ErrorInput(dict(weight_lr_power=-2.0), "weight_lr_power", -2.0, in_group=False),
    ErrorInput(dict(adam_lr=-1.0), "adam_lr", -1.0),
    ErrorInput(dict(adam_lr="1e-2"), "adam_lr", "1e-2", error=TypeError),
    ErrorInput(dict(momentum=1.0), "momentum", 1.0, in_group=False),
    ErrorInput(dict(momentum=0.0), "momentum", 0.0, in_group=False),
    ErrorInput(dict(adam_beta2=1.0), "adam_beta2", 1.0, in_group=False),
    ErrorInput(dict(adam_eps=-1e-8), "adam_eps", -1e-8, in_group=False),
    ErrorInput(dict(adjust_lr_fn="spectral"), "adjust_lr_fn", "spectral", in_group=False),
    ErrorInput(dict(ns_steps=0), "ns_steps", 0, in_group=False),
    ErrorInput(dict(ns_steps=2.5), "ns_steps", 2.5, in_group=False, error=TypeError),
)
_PLUS_ERRORS = _COMMON_ERRORS + (
    ErrorInput(dict(betas=(1.0, 0.95)), "betas[0]", 1.0),
    ErrorInput(dict(betas=(-0.25, 0.95)), "betas[0]", -0.25),
    ErrorInput(dict(betas=(0.9, 1.0)), "betas[1]", 1.0),
    ErrorInput(dict(betas=(0.9,)), "betas", (0.9,)),
    ErrorInput(dict(eps=-1e-8), "eps", -1e-8),
    ErrorInput(dict(sf_beta1=1.0), "sf_beta1", 1.0),
    ErrorInput(dict(sf_beta1=0.0), "sf_beta1", 0.0),
    ErrorInput(dict(sf_beta1_max=1.0), "sf_beta1_max", 1.0),
    ErrorInput(dict(polyak_beta=1.0), "polyak_beta", 1.0),
    ErrorInput(dict(polyak_beta=-0.5), "polyak_beta", -0.5),
    ErrorInput(dict(c_warmup=-3), "c_warmup", -3),
    ErrorInput(dict(c_warmup=2.5), "c_warmup", 2.5, error=TypeError),
    ErrorInput(dict(sf_beta1_anneal_steps=-1), "sf_beta1_anneal_steps", -1),
    ErrorInput(dict(sf_beta1_anneal_steps=None), "sf_beta1_anneal_steps", None, error=TypeError),
)

_PRIMAL_TRAPS = frozenset({WRITES_GRAD, STARTS_IN_EVAL, NEW_GROUP_WRONG_MODE, WRONG_EVAL_ERROR})
_CLOSURE_TRAPS = frozenset({WRITES_GRAD, TOUCHES_GRADLESS, DRIFTS_WHEN_FROZEN})
_WRAPPER_TRAPS = frozenset({STARTS_IN_EVAL, MODE_NOT_SAVED, WRONG_EVAL_ERROR})
_WRAPPER_REFERENCE_TRAPS = _WRAPPER_TRAPS | {TOUCHES_GRADLESS, DRIFTS_WHEN_FROZEN}

INFOS: tuple[OptimInfo, ...] = (
    OptimInfo("AdamWScheduleFree", ours.AdamWScheduleFree, _ADAMW_CONFIGS + (_INNER_MOMENTUM_CONFIG,),
              error_inputs=_ADAMW_ERRORS + _INNER_MOMENTUM_ERRORS + _FLAG_ERRORS,
              published_factory=published.AdamWScheduleFree,
              published_traps=_PRIMAL_TRAPS | {ACCEPTS_INVALID}),
    OptimInfo("AdamWScheduleFreePaper", ours.AdamWScheduleFreePaper, _ADAMW_CONFIGS,
              error_inputs=_ADAMW_ERRORS + _FLAG_ERRORS, published_factory=published.AdamWScheduleFreePaper,
              published_traps=_PRIMAL_TRAPS | {ACCEPTS_INVALID}),
    OptimInfo("RAdamScheduleFree", ours.RAdamScheduleFree, _RADAM_CONFIGS, has_warmup=False,
              error_inputs=_RADAM_ERRORS + _FLAG_ERRORS,
              published_factory=published.RAdamScheduleFree,
              published_traps=_PRIMAL_TRAPS | {ACCEPTS_INVALID}),
    OptimInfo("SGDScheduleFree", ours.SGDScheduleFree, _SGD_CONFIGS, beta_key="momentum",
              error_inputs=_SGD_ERRORS + _FLAG_ERRORS,
              published_factory=published.SGDScheduleFree,
              published_traps=_PRIMAL_TRAPS),
    OptimInfo("AdamWScheduleFreeClosure", ours.AdamWScheduleFreeClosure, _ADAMW_CONFIGS + (_INNER_MOMENTUM_CONFIG,),
              closure_form=True, has_modes=False, error_inputs=_ADAMW_ERRORS + _INNER_MOMENTUM_ERRORS + _FLAG_ERRORS,
              published_factory=published.AdamWScheduleFreeClosure,
              published_traps=_CLOSURE_TRAPS | {ACCEPTS_INVALID}),
    OptimInfo("RAdamScheduleFreeClosure", ours.RAdamScheduleFreeClosure, _RADAM_CONFIGS, closure_form=True,
              has_modes=False, has_warmup=False, error_inputs=_RADAM_ERRORS + _FLAG_ERRORS,
              published_factory=published.RAdamScheduleFreeClosure,
              published_traps=_CLOSURE_TRAPS | {ACCEPTS_INVALID}),
    OptimInfo("SGDScheduleFreeClosure", ours.SGDScheduleFreeClosure, _SGD_CONFIGS, closure_form=True,
              has_modes=False, beta_key="momentum", error_inputs=_SGD_ERRORS + _FLAG_ERRORS,
              published_factory=published.SGDScheduleFreeClosure, published_traps=_CLOSURE_TRAPS),
    OptimInfo("AdamWScheduleFreeReference", ours.AdamWScheduleFreeReference,
              _ADAMW_CONFIGS + (dict(lr=0.01, weight_decay=0.05, warmup_steps=3, decay_at_z=True),
                                _INNER_MOMENTUM_CONFIG),
              flags=frozenset(), error_inputs=_ADAMW_ERRORS + _INNER_MOMENTUM_ERRORS,
              published_factory=published.AdamWScheduleFreeReference,
              published_traps=frozenset({STARTS_IN_EVAL, NEW_GROUP_WRONG_MODE, WRONG_EVAL_ERROR,
                                         ACCEPTS_INVALID})),
    OptimInfo("SGDScheduleFreeReference", ours.SGDScheduleFreeReference, _SGD_CONFIGS, beta_key="momentum",
              flags=frozenset(), error_inputs=_SGD_ERRORS,
              published_factory=published.SGDScheduleFreeReference,
              published_traps=frozenset({WRITES_GRAD, WRONG_EVAL_ERROR})),
    OptimInfo("RAdamScheduleFreeReference", ours.RAdamScheduleFreeReference, _RADAM_CONFIGS, has_warmup=False,
              flags=frozenset(), error_inputs=_RADAM_ERRORS),
    OptimInfo("AdamWScheduleFreePaperReference", ours.AdamWScheduleFreePaperReference, _ADAMW_CONFIGS,
              flags=frozenset(), error_inputs=_ADAMW_ERRORS),
    OptimInfo("ScheduleFreeWrapper-SGD", wrapper_factory(ours.ScheduleFreeWrapper, "sgd", published_form=False),
              _WRAPPER_SGD_CONFIGS, beta_key="momentum", decay_key="weight_decay_at_y", has_warmup=False,
              flags=KERNEL_FLAGS, error_inputs=_WRAPPER_ERRORS,
              published_factory=wrapper_factory(published.ScheduleFreeWrapper, "sgd", published_form=True),
              published_reads_group_decay=False, published_traps=_WRAPPER_TRAPS),
    OptimInfo("ScheduleFreeWrapper-Adam", wrapper_factory(ours.ScheduleFreeWrapper, "adam", published_form=False),
              _WRAPPER_ADAM_CONFIGS, beta_key="momentum", decay_key="weight_decay_at_y", has_warmup=False,
              flags=KERNEL_FLAGS, error_inputs=_WRAPPER_ERRORS,
              published_factory=wrapper_factory(published.ScheduleFreeWrapper, "adam", published_form=True),
              published_reads_group_decay=False, published_traps=_WRAPPER_TRAPS),
    OptimInfo("ScheduleFreeWrapperReference-SGD",
              wrapper_factory(ours.ScheduleFreeWrapperReference, "sgd", published_form=False),
              _WRAPPER_SGD_CONFIGS, beta_key="momentum", decay_key="weight_decay_at_y", has_warmup=False,
              flags=frozenset(), error_inputs=_WRAPPER_REFERENCE_ERRORS,
              published_factory=wrapper_factory(published.ScheduleFreeWrapperReference, "sgd", published_form=True),
              published_reads_group_decay=False, published_traps=_WRAPPER_REFERENCE_TRAPS),
    OptimInfo("ScheduleFreeWrapperReference-Adam",
              wrapper_factory(ours.ScheduleFreeWrapperReference, "adam", published_form=False),
              _WRAPPER_ADAM_CONFIGS, beta_key="momentum", decay_key="weight_decay_at_y", has_warmup=False,
              flags=frozenset(), error_inputs=_WRAPPER_REFERENCE_ERRORS,
              published_factory=wrapper_factory(published.ScheduleFreeWrapperReference, "adam", published_form=True),
              published_reads_group_decay=False, published_traps=_WRAPPER_REFERENCE_TRAPS),
    OptimInfo("MuMuon_ScheduleFree", muon_factory, _MUON_CONFIGS, beta_key="momentum", has_warmup=False,
              flags=frozenset(), error_inputs=_MUON_ERRORS, composed=True),
    OptimInfo("AdamCScheduleFreePlusPaper", ours.AdamCScheduleFreePlusPaper, _PLUS_CONFIGS, beta_key="sf_beta1",
              warmup_key="c_warmup", flags=frozenset(), error_inputs=_PLUS_ERRORS, global_step_size=True),
    OptimInfo("AdamCScheduleFreePlus", ours.AdamCScheduleFreePlus, _PLUS_CONFIGS, beta_key="sf_beta1",
              warmup_key="c_warmup", flags=frozenset(), error_inputs=_PLUS_ERRORS, global_step_size=True),
)

MODAL_INFOS = tuple(info for info in INFOS if info.has_modes)
FLAG_INFOS = tuple(info for info in INFOS if info.flags)


def published_with(trap: str) -> tuple[OptimInfo, ...]:
    """Records whose published counterpart exhibits ``trap``."""
    return tuple(info for info in INFOS if trap in info.published_traps)


# ----------------------------------------------------------------------------- driving
def param_groups(info: OptimInfo, params: Sequence[torch.Tensor], config: dict[str, Any], *,
                 group_decay: bool = True) -> list[dict[str, Any]]:
    """The three-group layout of the module docstring over the tensors W1, b1, W2, b2.

    Args:
        group_decay: put the per-group weight decay on [W2] (off for classes that do not read it).
    """
    w1, b1, w2, b2 = params
    lr = config["lr"]
    second: dict[str, Any] = {"params": [w2], "lr": lr / 3}
    third: dict[str, Any] = {"params": [b2], "lr": lr * 2}
    if group_decay:
        second[info.decay_key] = 0.05
    if info.has_warmup:
        third[info.warmup_key] = 7
    return [{"params": [w1, b1]}, second, third]


def loss_of(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean squared error; a model returning several outputs gets the sum of one loss per output."""
    inputs, target = batch
    out = model(inputs)
    if isinstance(out, tuple):
        return sum(F.mse_loss(o, target) for o in out)
    return F.mse_loss(out, target)


def take_step(info: OptimInfo, opt: Any, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
    """One optimizer step the way ``info``'s class is driven; returns the loss.

    Args:
        closure: zeroes the gradients, computes the loss, calls backward and returns the loss.
            Closure forms get it (``step(closure)``); the others run it first, then ``step()``,
            or ``step(function_value=loss)`` when the class sets ``needs_function_value``.
    """
    if info.closure_form:
        return opt.step(closure)
    loss = closure()
    if getattr(opt, "needs_function_value", False):
        opt.step(function_value=loss)
    else:
        opt.step()
    return loss


def train_step(info: OptimInfo, opt: Any, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor],
               after_backward: Callable[[], None] | None = None) -> torch.Tensor:
    """One step (:func:`take_step`): zero grads, forward, backward, ``after_backward()``, step."""

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = loss_of(model, batch)
        loss.backward()
        if after_backward is not None:
            after_backward()
        return loss

    return take_step(info, opt, closure)


def to_eval(info: OptimInfo, opt: Any) -> None:
    """Put parameters at x (no-op for closure forms, whose parameters always hold x between steps)."""
    if info.has_modes:
        opt.eval()


def to_train(info: OptimInfo, opt: Any) -> None:
    """Put parameters at y (no-op for closure forms)."""
    if info.has_modes:
        opt.train()


def run(info: OptimInfo, opt: Any, model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
        switch_every: int = 0) -> None:
    """Train over ``batches``; every ``switch_every`` steps (0: never) call eval() then train()."""
    for i, batch in enumerate(batches, start=1):
        train_step(info, opt, model, batch)
        if switch_every and i % switch_every == 0:
            to_eval(info, opt)
            to_train(info, opt)


def skip_if_global_step_size(info: OptimInfo, oracle: str) -> None:
    """Skip a test whose oracle cannot hold when one step size serves all groups.

    Args:
        oracle: what the test compares against, and why the shared step size breaks it.
    """
    if info.global_step_size:
        pytest.skip(f"{info.name} multiplies every group's lr by one Polyak step size computed from all "
                    f"groups' gradients and the whole loss: {oracle}")


def snapshot(values: Iterable[Any]) -> list[Any]:
    """Detached clones of tensors, deep copies of anything else (state may hold Python numbers)."""
    return [v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) for v in values]


def same_value(actual: Any, expected: Any) -> bool:
    """Tensors equal (``torch.equal``, same dtype); anything else ``==``."""
    if isinstance(expected, torch.Tensor):
        return isinstance(actual, torch.Tensor) and actual.dtype == expected.dtype and torch.equal(actual, expected)
    return not isinstance(actual, torch.Tensor) and actual == expected


# ----------------------------------------------------------------------------- comparisons
def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (in float64; 0 when both are zero)."""
    a, e = actual.detach().double(), expected.detach().double()
    scale = e.abs().max().item()
    err = (a - e).abs().max().item()
    return err / scale if scale > 0 else err


def assert_rel_close(actual: Sequence[torch.Tensor], expected: Sequence[torch.Tensor], rtol: float,
                     what: str) -> None:
    """Every pair agrees to ``max_rel_err <= rtol`` (error relative to the tensor's largest entry)."""
    assert len(actual) == len(expected), f"{what}: {len(actual)} tensors vs {len(expected)}"
    for i, (a, e) in enumerate(zip(actual, expected)):
        err = max_rel_err(a, e)
        assert err <= rtol, f"{what}[{i}]: max relative error {err:.3g} > {rtol:g}"


def assert_bitwise_equal(actual: Any, expected: Any, where: str = "state_dict") -> None:
    """Nested dicts/lists/tuples equal, tensors with ``torch.equal`` and the same dtype."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{where}: {type(actual).__name__} is not a tensor"
        assert actual.dtype == expected.dtype, f"{where}: dtype {actual.dtype} != {expected.dtype}"
        assert torch.equal(actual, expected), f"{where}: tensors differ (max abs diff " \
            f"{(actual.double() - expected.double()).abs().max().item():.3g})"
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and set(actual) == set(expected), \
            f"{where}: keys {sorted(map(str, actual))} != {sorted(map(str, expected))}"
        for key in expected:
            assert_bitwise_equal(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)) and len(actual) == len(expected), f"{where}: length differs"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_bitwise_equal(a, e, f"{where}[{i}]")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def assert_same_run(model_a: nn.Module, opt_a: Optimizer, model_b: nn.Module, opt_b: Optimizer) -> None:
    """Parameters and the whole optimizer state_dict are bitwise identical."""
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(a, b), f"parameter {name} differs (max abs diff {(a - b).abs().max().item():.3g})"
    assert_bitwise_equal(opt_b.state_dict(), opt_a.state_dict())
