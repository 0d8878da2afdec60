"""Schedule-free update math as pure functions over lists of tensors.

Notation (Defazio et al., "The Road Less Scheduled"): z is the base iterate, x the running
average that is evaluated, y = (1 - beta) z + beta x the point where the gradient is taken.
During training the parameter tensor holds y (closure forms: x). With u the update direction,

    u      = direction(g) + weight_decay * y           (decay is taken at y)
    z_new  = z - lr * u
    x_new  = (1 - ckp1) x + ckp1 z_new
    y_new  = beta x_new + (1 - beta) z_new

which, written on y and z only (x never stored), is

    y_new  = lerp(y, z, ckp1) + lr * (beta * (1 - ckp1) - 1) * u
    z_new  = z - lr * u.

direction(g) is g for SGD, and g / (sqrt(v / bias_correction2) + eps) for Adam, with the second
moment v = beta2 v + (1 - beta2) g^2 updated first.

``wrapper_enter_``/``wrapper_exit_`` are the passes ScheduleFreeWrapper runs around its base
optimizer's step (see optimizers/wrapper.py for their math).

Every function here updates its tensors in place and only reads the gradients. Each has an eager
implementation built from torch's ``_foreach`` operations; with ``foreach=False`` it runs the
same operations one tensor at a time, which is faster on CPU. Either way temporaries are bounded:
by one tensor, or by a run of FOREACH_BUCKET_NUMEL elements.
When ``fused`` is requested and the native CPU kernels are available (see ``native.py``),
supported tensors take the single-pass path instead.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, Sequence, TypeVar

import torch

Tensors = Sequence[torch.Tensor]
F = TypeVar("F", bound=Callable)


FOREACH_BUCKET_NUMEL = 1 << 24
"""The ``_foreach`` path works through its lists in runs of consecutive tensors holding at most this
many elements (a larger tensor forms a run alone), so its temporaries are bounded by a run rather
than by the whole model: 64 MiB per temporary list in float32."""


def compile_disabled(fn: F) -> F:
    """Exclude ``fn``, and everything it calls, from ``torch.compile`` tracing.

    The optimizers' ``step``/``train``/``eval`` read per-parameter Python state (lazy state,
    schedules, bookkeeping in the groups) and call the native kernels through ctypes, none of which
    dynamo can trace: traced, a compiled training step breaks its graph many times, guards on that
    state and recompiles every step until it hits its recompile limit. Excluded, the compiled
    function breaks its graph once at the call and the optimizer runs eagerly, as it would uncompiled.

    ``torch._disable_dynamo`` is torch's own form of ``torch.compiler.disable(fn, recursive=True)``
    for library code (``Optimizer.zero_grad`` uses it): it imports ``torch._dynamo`` on the first
    call rather than at import, which would add ~0.8 s to importing this package.

    Args:
        fn: the function or method to exclude.

    Returns:
        A function that runs ``fn`` with tracing disabled (``functools.wraps`` keeps its name and docstring).
    """
    return torch._disable_dynamo(fn, recursive=True)


def _runs(lists: Sequence[Tensors], limit: int) -> list[list[Tensors]]:
    """Cut parallel lists into runs of consecutive indices whose first-list elements sum to <= limit."""
    runs, start, total = [], 0, 0
    for i, t in enumerate(lists[0]):
        if total and total + t.numel() > limit:
            runs.append([column[start:i] for column in lists])
            start, total = i, 0
        total += t.numel()
    runs.append([column[start:] for column in lists])
    return runs


def _batched(fn: Callable[..., None], lists: Sequence[Tensors], foreach: bool, **scalars: float) -> None:
    """Run ``fn`` on runs of the lists (foreach, see FOREACH_BUCKET_NUMEL) or on one tensor at a time."""
    if foreach:
        for run in _runs(lists, FOREACH_BUCKET_NUMEL):
            fn(*run, **scalars)
        return
    for items in zip(*lists):
        fn(*([t] for t in items), **scalars)


def _native():
    """The native kernel module, or None when fused kernels cannot be built here."""
    from . import native

    return native if native.available() else None


def _dispatch(native_name: str, eager: Callable[..., None], lists: Sequence[Tensors], scalars: dict[str, float],
              foreach: bool, fused: bool, native_scalars: dict[str, float] | None = None,
              masters: Tensors | None = None) -> None:
    """Run ``native.<native_name>`` on the supported tensors when ``fused``, and ``eager`` on the rest.

    ``native_scalars`` (default: ``scalars``) are the keyword arguments of the native function. With
    ``masters``, ``lists[0]`` holds low-precision parameters whose float32 masters the math updates
    (see :func:`with_masters`); the native function is then ``<native_name>lp_``.
    """
    if masters is not None:
        with_masters(native_name, eager, lists, masters, scalars, foreach, fused, native_scalars)
        return
    lib = _native() if fused else None
    if lib is not None:
        fast, lists = lib.split_supported(lists)
        if fast[0]:
            getattr(lib, native_name)(*fast, **(scalars if native_scalars is None else native_scalars))
    if lists[0]:
        _batched(eager, lists, foreach, **scalars)


def adopt_written_(params: Tensors, masters: Tensors) -> None:
    """Each master takes its parameter's value if the parameter no longer holds the master rounded to its dtype.

    The comparison is by value (``torch.equal``), so every way of writing a parameter is seen:
    ``load_state_dict``, clamping, weight tying, ``p.data`` writes.

    Args:
        params: low-precision parameters.
        masters: their float32 masters; updated where their parameter was written.
    """
    for p, master in zip(params, masters):
        if not torch.equal(p, master.to(p.dtype)):
            master.copy_(p)


def with_masters(native_name: str, eager: Callable[..., None], lists: Sequence[Tensors], masters: Tensors,
                 scalars: dict[str, float], foreach: bool, fused: bool,
                 native_scalars: dict[str, float] | None = None) -> None:
    """Run a step or move on low-precision parameters (``lists[0]``) through their float32 masters.

    Fused (native ``<native_name>lp_``, one pass, no temporaries) where the parameters, their
    gradients and the float32 tensors are supported; elsewhere eagerly: written parameters are
    adopted (:func:`adopt_written_`), ``eager`` runs on the masters with the gradients widened to
    float32, and each parameter gets its master rounded to its dtype. Both give the same bits.

    Args:
        native_name: the float32 native function's name (``adam_sf_step_``, ``lerp_``...).
        eager: the eager implementation, on float32 lists.
        lists: [parameters, then the op's other lists]; for steps the second is the gradients.
        masters: the parameters' float32 masters.
        scalars: keyword arguments of ``eager``.
        foreach: eager path with ``_foreach`` operations.
        fused: take the native path where supported.
        native_scalars: keyword arguments of the native function (default: ``scalars``).
    """
    lib = _native() if fused else None
    params, rest = list(lists[0]), [list(column) for column in lists[1:]]
    masters = list(masters)
    if lib is not None:
        # A step's lists are [params, grads, zs, *moments]; a move's are [params, ends].
        grads_low = native_name != "lerp_"
        keep = [i for i in range(len(params)) if lib.supports_low_precision(params[i]) and lib.supports(masters[i])
                and (not grads_low or lib.supports_low_precision(rest[0][i]))
                and all(lib.supports(column[i]) for column in rest[1 if grads_low else 0:])]
        if keep:
            pick = lambda column: [column[i] for i in keep]  # noqa: E731
            fast = [pick(params), *(pick(c) for c in rest)]
            fast.insert(2 if grads_low else 1, pick(masters))
            kwargs = dict(scalars if native_scalars is None else native_scalars)
            if native_name == "lerp_":
                lib.lerp_lp_(*fast, **kwargs)
            else:
                closure = native_name.endswith("closure_step_")
                getattr(lib, native_name.replace("closure_step_", "step_") + "lp_")(*fast, **kwargs,
                                                                                    closure_form=closure)
            chosen = set(keep)
            params = [t for i, t in enumerate(params) if i not in chosen]
            masters = [t for i, t in enumerate(masters) if i not in chosen]
            rest = [[t for i, t in enumerate(column) if i not in chosen] for column in rest]
    if not params:
        return
    adopt_written_(params, masters)
    if native_name != "lerp_":
        rest[0] = [g if g.dtype == m.dtype else g.to(m.dtype) for g, m in zip(rest[0], masters)]
    _batched(eager, [masters, *rest], foreach, **scalars)
    for p, master in zip(params, masters):
        p.copy_(master)


def _direction_adam(
    grads: Tensors, exp_avg_sqs: Tensors, beta2: float, eps: float, bias_correction2: float, adaptive: bool
) -> Tensors:
    """Update the second moments and return g / (sqrt(v / bc2) + eps) (or g itself if not adaptive)."""
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    if not adaptive:
        return grads
    denom = torch._foreach_div(exp_avg_sqs, bias_correction2)
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, eps)
    if len(denom) == 1:  # one tensor at a time: reuse the buffer instead of allocating another
        return [torch.div(grads[0], denom[0], out=denom[0])]
    return torch._foreach_div(grads, denom)


def _with_decay(direction: Tensors, grads: Tensors, ys: Tensors, weight_decay: float) -> Tensors:
    """Add weight_decay * y to the direction, copying it first if it aliases the gradients."""
    if weight_decay == 0.0:
        return direction
    if direction is grads:
        return torch._foreach_add(grads, ys, alpha=weight_decay)
    torch._foreach_add_(direction, ys, alpha=weight_decay)
    return direction


def _primal_update(ys: Tensors, zs: Tensors, us: Tensors, lr: float, beta: float, ckp1: float) -> None:
    """y <- lerp(y, z, ckp1) + lr (beta (1 - ckp1) - 1) u;  z <- z - lr u."""
    torch._foreach_lerp_(ys, zs, ckp1)
    torch._foreach_add_(ys, us, alpha=lr * (beta * (1.0 - ckp1) - 1.0))
    torch._foreach_sub_(zs, us, alpha=lr)


def _closure_update(xs: Tensors, zs: Tensors, us: Tensors, lr: float, beta: float, ckp1: float) -> None:
    """Closure form: xs hold y on entry and x on exit.  x = lerp(y, z, 1 - 1/beta); z -= lr u; x = lerp(x, z, ckp1)."""
    torch._foreach_lerp_(xs, zs, 1.0 - 1.0 / beta)
    torch._foreach_sub_(zs, us, alpha=lr)
    torch._foreach_lerp_(xs, zs, ckp1)


def _eager_adam(ys, grads, zs, exp_avg_sqs, *, lr, beta1, beta2, eps, weight_decay, ckp1, bias_correction2,
                adaptive, closure_form) -> None:
    us = _direction_adam(grads, exp_avg_sqs, beta2, eps, bias_correction2, bool(adaptive))
    us = _with_decay(us, grads, ys, weight_decay)
    update = _closure_update if closure_form else _primal_update
    update(ys, zs, us, lr, beta1, ckp1)


def _eager_sgd(ys, grads, zs, *, lr, momentum, weight_decay, ckp1, closure_form) -> None:
    us = _with_decay(grads, grads, ys, weight_decay)
    update = _closure_update if closure_form else _primal_update
    update(ys, zs, us, lr, momentum, ckp1)


def adam_step_(
    ys: Tensors,
    grads: Tensors,
    zs: Tensors,
    exp_avg_sqs: Tensors,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    ckp1: float,
    bias_correction2: float,
    adaptive: bool = True,
    closure_form: bool = False,
    foreach: bool = False,
    fused: bool = False,
    masters: Tensors | None = None,
) -> None:
    """One schedule-free Adam step (AdamW-SF, and RAdam-SF with ``adaptive`` from its rectification).

    Args:
        ys: points where the gradients were taken, updated in place (closure form: x on exit).
        grads: gradients at ``ys``; read only.
        zs: base iterates, updated in place.
        exp_avg_sqs: second moments, updated in place.
        lr: scheduled learning rate of this step.
        beta1: interpolation between z and x that defines y.
        beta2: second-moment decay.
        eps: added to the root of the bias-corrected second moment.
        weight_decay: decay coefficient, applied at y and scaled by ``lr``.
        ckp1: averaging weight of the new z into x.
        bias_correction2: 1 - beta2^(k+1).
        adaptive: divide by the second-moment root (False during RAdam's early steps).
        closure_form: tensors in ``ys`` hold y on entry and must hold x on exit.
        foreach: use list-wide ``_foreach`` operations instead of a per-tensor loop.
        fused: use the native single-pass kernel for supported (CPU float32 contiguous) tensors.
        masters: float32 master copies of ``ys``, which are then bfloat16/float16 parameters (with
            gradients of their dtype): the math runs on the masters, and ``ys`` get them rounded.
    """
    scalars = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, ckp1=ckp1,
                   bias_correction2=bias_correction2, adaptive=adaptive, closure_form=closure_form)
    native_name = "adam_sf_closure_step_" if closure_form else "adam_sf_step_"
    _dispatch(native_name, _eager_adam, [ys, grads, zs, exp_avg_sqs], scalars, foreach, fused,
              native_scalars={k: v for k, v in scalars.items() if k != "closure_form"}, masters=masters)


def sgd_step_(
    ys: Tensors,
    grads: Tensors,
    zs: Tensors,
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    ckp1: float,
    closure_form: bool = False,
    foreach: bool = False,
    fused: bool = False,
    masters: Tensors | None = None,
) -> None:
    """One schedule-free SGD step.

    Args:
        ys: points where the gradients were taken, updated in place (closure form: x on exit).
        grads: gradients at ``ys``; read only.
        zs: base iterates, updated in place.
        lr: scheduled learning rate of this step.
        momentum: interpolation between z and x that defines y (the beta of the notation above).
        weight_decay: decay coefficient, applied at y and scaled by ``lr``.
        ckp1: averaging weight of the new z into x.
        closure_form: tensors in ``ys`` hold y on entry and must hold x on exit.
        foreach: use list-wide ``_foreach`` operations instead of a per-tensor loop.
        fused: use the native single-pass kernel for supported (CPU float32 contiguous) tensors.
        masters: float32 master copies of ``ys``, which are then bfloat16/float16 parameters (see
            :func:`adam_step_`).
    """
    scalars = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, ckp1=ckp1, closure_form=closure_form)
    native_name = "sgd_sf_closure_step_" if closure_form else "sgd_sf_step_"
    _dispatch(native_name, _eager_sgd, [ys, grads, zs], scalars, foreach, fused,
              native_scalars={k: v for k, v in scalars.items() if k != "closure_form"}, masters=masters)


def _eager_lerp(starts, ends, *, weight) -> None:
    torch._foreach_lerp_(starts, ends, weight)


def lerp_(starts: Tensors, ends: Tensors, weight: float, *, foreach: bool = False, fused: bool = False,
          masters: Tensors | None = None) -> None:
    """starts <- starts + weight * (ends - starts), in place (the train()/eval() switches).

    Args:
        starts: tensors moved in place.
        ends: targets; read only.
        weight: interpolation weight (may lie outside [0, 1]).
        foreach: use one ``_foreach_lerp_`` over the lists.
        fused: use the native kernel for supported tensors.
        masters: float32 master copies of ``starts``, which are then bfloat16/float16 parameters:
            the masters move, and ``starts`` get them rounded (see :func:`adam_step_`).
    """
    _dispatch("lerp_", _eager_lerp, [starts, ends], dict(weight=weight), foreach, fused, masters=masters)


def _eager_wrapper_enter(params, zs, *, decay, y_scale, to_x) -> None:
    if decay != 0.0:
        torch._foreach_sub_(zs, params, alpha=decay)
        torch._foreach_mul_(params, y_scale)
    xs = torch._foreach_lerp(params, zs, to_x)
    torch._foreach_copy_(params, zs)
    torch._foreach_copy_(zs, xs)


def _eager_wrapper_exit(params, zs, *, ckp1, to_y) -> None:
    torch._foreach_lerp_(zs, params, ckp1)
    ys = torch._foreach_lerp(zs, params, to_y)
    torch._foreach_copy_(zs, params)
    torch._foreach_copy_(params, ys)


def wrapper_enter_(params: Tensors, zs: Tensors, *, decay: float, momentum: float, foreach: bool = False,
                   fused: bool = False) -> None:
    """ScheduleFreeWrapper, before the base step: put z in the parameters and keep x in the z slots.

    With d = decay:  z <- z - d y;  y <- (1 - d (1 - momentum)) y   (decay taken at y, if d != 0)
    then  x <- lerp(y, z, 1 - 1/momentum);  p <- z;  zslot <- x.

    Args:
        params: parameters holding y; hold z on return, for the base optimizer to update.
        zs: the wrapper's z slots; hold x on return.
        decay: lr times the decay coefficient taken at y.
        momentum: interpolation y = (1 - momentum) z + momentum x.
        foreach: use list-wide ``_foreach`` operations instead of a per-tensor loop.
        fused: use the native single-pass kernel for supported tensors (no temporaries).
    """
    scalars = dict(decay=decay, y_scale=1.0 - decay * (1.0 - momentum), to_x=1.0 - 1.0 / momentum)
    _dispatch("wrapper_enter_", _eager_wrapper_enter, [params, zs], scalars, foreach, fused)


def wrapper_exit_(params: Tensors, zs: Tensors, *, ckp1: float, momentum: float, foreach: bool = False,
                  fused: bool = False) -> None:
    """ScheduleFreeWrapper, after the base step: average z into x, form y, and put z back.

    x <- lerp(x, z, ckp1);  y <- lerp(x, z, 1 - momentum);  p <- y;  zslot <- z.

    Args:
        params: parameters holding the base optimizer's new z; hold y on return.
        zs: the wrapper's z slots holding x; hold z on return.
        ckp1: averaging weight of the new z into x.
        momentum: interpolation y = (1 - momentum) z + momentum x.
        foreach: use list-wide ``_foreach`` operations instead of a per-tensor loop.
        fused: use the native single-pass kernel for supported tensors (no temporaries).
    """
    _dispatch("wrapper_exit_", _eager_wrapper_exit, [params, zs], dict(ckp1=ckp1, to_y=1.0 - momentum),
              foreach, fused)


def group_by_device_and_dtype(lists: Sequence[Tensors]) -> list[list[list[torch.Tensor]]]:
    """Split parallel tensor lists into sub-lists sharing the device and dtype of the first list.

    Args:
        lists: parallel lists of tensors (same length).

    Returns:
        One entry per (device, dtype) of ``lists[0]``, each a list of parallel sub-lists.
    """
    if lists[0]:
        device, dtype = lists[0][0].device, lists[0][0].dtype
        if all(t.device == device and t.dtype is dtype for t in lists[0]):  # the common case, one bucket
            return [[list(column) for column in lists]]
    buckets: dict[tuple[torch.device, torch.dtype], list[list[torch.Tensor]]] = defaultdict(
        lambda: [[] for _ in lists]
    )
    for items in zip(*lists):
        bucket = buckets[(items[0].device, items[0].dtype)]
        for column, t in zip(bucket, items):
            column.append(t)
    return list(buckets.values())
