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
moment v = beta2 v + (1 - beta2) g^2 updated first. Adam with inner momentum uses the bias-corrected
EMA of the gradient, m = inner_momentum m + (1 - inner_momentum) g, in place of g:
(m / bias_correction1) / (sqrt(v / bias_correction2) + eps).

``wrapper_enter_``/``wrapper_exit_`` are the passes ScheduleFreeWrapper runs around its base
optimizer's step (see optimizers/wrapper.py for their math).

Every function here updates its tensors in place and only reads the gradients. Each has an eager
implementation built from torch's ``_foreach`` operations; with ``foreach=False`` it runs the
same operations one tensor at a time, which is faster on CPU. Either way temporaries are bounded:
by one tensor, or by a run of FOREACH_BUCKET_NUMEL elements.
When ``fused`` is requested and the native CPU kernels are available (see ``native.py``),
supported tensors take the single-pass path instead. :func:`route` is the one place that decides
which path each tensor takes.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, NamedTuple, Sequence, TypeVar

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


TRITON_DEVICES: tuple[str, ...] = ("cuda",)
"""Device types whose buckets the Triton kernels take (the test suite adds "cpu" under Triton's interpreter)."""


def _triton():
    """The Triton kernel module for CUDA tensors, or None without triton or a GPU (imported on first use)."""
    try:
        from . import triton_kernels
    except ImportError:
        return None
    return triton_kernels if triton_kernels.available() else None


def _triton_fits(tk, bucket: list[list[torch.Tensor]], kept: list | None, low: list[int]) -> list[bool]:
    """Which rows of a bucket the Triton kernels take: every operand supported, masters with low-precision ones."""
    fits = []
    for i, row in enumerate(zip(*bucket)):
        master = None if kept is None else kept[i]
        ok = all(tk.supports(t) for t in row)
        if master is None:
            ok = ok and all(t.dtype == torch.float32 for t in row)
        else:
            ok = (ok and tk.supports(master) and master.dtype == torch.float32
                  and all(row[j].dtype in (torch.bfloat16, torch.float16) for j in low)
                  and all(t.dtype == torch.float32 for j, t in enumerate(row) if j not in low))
        fits.append(ok)
    return fits


class Route(NamedTuple):
    """Parallel sub-lists that take one path: "native" (the fused C kernels, CPU), "triton" (the fused
    Triton kernels, CUDA), "foreach" or "loop" (eager).

    ``rows`` are their indices in the lists given to :func:`route`.
    """

    path: str
    lists: list[list[torch.Tensor]]
    masters: list[torch.Tensor] | None
    rows: list[int]


def route(lists: Sequence[Tensors], *, fused: bool | None, foreach: bool | None, masters: Tensors | None = None,
          low_precision_grads: bool = False) -> list[Route]:
    """Decide which path each row of parallel tensor lists takes: the one place this is decided.

    Rows are bucketed by the device and dtype of ``lists[0]``. In a bucket, ``fused`` (None: on)
    sends every row the fused kernels can take to them: on the CPU the native kernels, when they are
    built (float32 rows, ``native.supports``, or low-precision parameters with float32 ``masters``,
    ``native.supports_low_precision``); on CUDA the Triton kernels, when triton imports
    (``triton_kernels.supports``: the same dtypes, contiguous). With ``low_precision_grads`` the
    second list, the gradients, has the parameters' dtype. Every other row takes the eager path:
    ``_foreach`` operations when ``foreach`` (None: on for tensors off the CPU), else one tensor at
    a time.

    Args:
        lists: parallel lists of tensors; the first holds the tensors updated in place.
        fused: the group's ``fused`` flag (None, True or False).
        foreach: the group's ``foreach`` flag (None, True or False).
        masters: float32 masters of ``lists[0]`` (entries None where there is none), or None.
        low_precision_grads: with masters, ``lists[1]`` has the parameters' dtype.

    Returns:
        The routes, native ones first in each bucket; empty routes are left out.
    """
    count = len(lists[0])
    master_column = list(masters) if masters is not None else [None] * count
    routes = []
    for *bucket, kept, indices in group_by_device_and_dtype([*lists, master_column, list(range(count))]):
        device_type = bucket[0][0].device.type
        on_cpu = device_type == "cpu"
        eager = "foreach" if (not on_cpu if foreach is None else foreach) else "loop"
        has_masters = kept[0] is not None
        if device_type in TRITON_DEVICES and fused is not False and (tk := _triton()) is not None:
            low = ([0, 1] if low_precision_grads else [0]) if has_masters else []
            fits = _triton_fits(tk, bucket, kept if has_masters else None, low)
            for path, wanted in (("triton", True), (eager, False)):
                rows = [i for i, ok in enumerate(fits) if ok is wanted]
                if rows:
                    routes.append(Route(path, [[column[i] for i in rows] for column in bucket],
                                        [kept[i] for i in rows] if has_masters else None,
                                        [indices[i] for i in rows]))
            continue
        lib = _native() if (on_cpu if fused is None else fused) and on_cpu else None
        if lib is None:
            routes.append(Route(eager, bucket, kept if has_masters else None, indices))
            continue
        if has_masters:
            low = [0, 1] if low_precision_grads else [0]
            fits = [all(lib.supports_low_precision(column[i]) for column in (bucket[j] for j in low))
                    and lib.supports(kept[i])
                    and all(lib.supports(column[i]) for j, column in enumerate(bucket) if j not in low)
                    for i in range(len(kept))]
        else:
            fits = [all(lib.supports(t) for t in row) for row in zip(*bucket)]
        for path, wanted in (("native", True), (eager, False)):
            rows = [i for i, ok in enumerate(fits) if ok is wanted]
            if rows:
                routes.append(Route(path, [[column[i] for i in rows] for column in bucket],
                                    [kept[i] for i in rows] if has_masters else None, [indices[i] for i in rows]))
    return routes


def _dispatch(native_name: str, eager: Callable[..., None], lists: Sequence[Tensors], scalars: dict[str, float],
              foreach: bool | None, fused: bool | None, native_scalars: dict[str, float] | None = None,
              masters: Tensors | None = None, prepared: Callable[..., None] | None = None) -> None:
    """Run each :func:`route` of the lists: ``native.<native_name>`` (``<...>lp_`` with masters) or ``eager``.

    ``native_scalars`` (default: ``scalars``) are the keyword arguments of the native function. With
    ``masters``, ``lists[0]`` holds low-precision parameters whose float32 masters the math updates:
    natively in one pass; eagerly, written parameters are adopted (:func:`adopt_written_`), ``eager``
    runs on the masters with the gradients widened to float32, and each parameter gets its master
    rounded to its dtype. Both give the same bits. ``prepared`` is a native call already bound to
    these lists (see ``native.Prepared``): it runs with the native scalars, and nothing is routed.
    """
    if prepared is not None:
        prepared(**(scalars if native_scalars is None else native_scalars))
        return
    is_step = native_name != "lerp_"
    for path, sub, kept, _ in route(lists, fused=fused, foreach=foreach, masters=masters,
                                    low_precision_grads=is_step):
        if path == "triton":
            name = "adam_sf_step_" if native_name.startswith("adam_sf_") else (
                "sgd_sf_step_" if native_name.startswith("sgd_sf_") else native_name)
            getattr(_triton(), name)(*sub, **scalars, **({} if kept is None else {"masters": kept}))
        elif path == "native":
            lib = _native()
            kwargs = dict(scalars if native_scalars is None else native_scalars)
            if kept is None:
                getattr(lib, native_name)(*sub, **kwargs)
            elif not is_step:
                lib.lerp_lp_(sub[0], kept, *sub[1:], **kwargs)
            else:
                closure = native_name.endswith("closure_step_")
                getattr(lib, native_name.replace("closure_step_", "step_") + "lp_")(
                    sub[0], sub[1], kept, *sub[2:], **kwargs, closure_form=closure)
        elif kept is None:
            _batched(eager, sub, path == "foreach", **scalars)
        else:
            params, rest = sub[0], [list(column) for column in sub[1:]]
            adopt_written_(params, kept)
            if is_step:
                rest[0] = [g if g.dtype == m.dtype else g.to(m.dtype) for g, m in zip(rest[0], kept)]
            _batched(eager, [kept, *rest], path == "foreach", **scalars)
            for p, master in zip(params, kept):
                p.copy_(master)


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


def _second_moment_root(grads: Tensors, exp_avg_sqs: Tensors, beta2: float, eps: float, bias_correction2: float,
                        adaptive: bool) -> Tensors | None:
    """Update the second moments v; return new tensors sqrt(v / bc2) + eps (None if not adaptive)."""
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    if not adaptive:
        return None
    denom = torch._foreach_div(exp_avg_sqs, bias_correction2)
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, eps)
    return denom


def _direction_adam(
    grads: Tensors, exp_avg_sqs: Tensors, beta2: float, eps: float, bias_correction2: float, adaptive: bool
) -> Tensors:
    """Update the second moments and return g / (sqrt(v / bc2) + eps) (or g itself if not adaptive)."""
    denom = _second_moment_root(grads, exp_avg_sqs, beta2, eps, bias_correction2, adaptive)
    if denom is None:
        return grads
    if len(denom) == 1:  # one tensor at a time: reuse the buffer instead of allocating another
        return [torch.div(grads[0], denom[0], out=denom[0])]
    return torch._foreach_div(grads, denom)


def _direction_adam_inner(grads: Tensors, exp_avg_sqs: Tensors, exp_avgs: Tensors, beta2: float, eps: float,
                          bias_correction2: float, adaptive: bool, inner_momentum: float,
                          bias_correction1: float) -> Tensors:
    """Update both moments and return (m / bc1) / (sqrt(v / bc2) + eps) (or m / bc1 if not adaptive).

    m = inner_momentum m + (1 - inner_momentum) g is the EMA of the gradients; the result is a new
    list, never the gradients or the moments.
    """
    denom = _second_moment_root(grads, exp_avg_sqs, beta2, eps, bias_correction2, adaptive)
    torch._foreach_mul_(exp_avgs, inner_momentum)
    torch._foreach_add_(exp_avgs, grads, alpha=1.0 - inner_momentum)
    direction = torch._foreach_div(exp_avgs, bias_correction1)
    if denom is not None:
        torch._foreach_div_(direction, denom)
    return direction


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


def _eager_adam(ys, grads, zs, exp_avg_sqs, exp_avgs=None, *, lr, beta1, beta2, eps, weight_decay, ckp1,
                bias_correction2, adaptive, closure_form, inner_momentum=0.0, bias_correction1=1.0) -> None:
    if exp_avgs is None:
        us = _direction_adam(grads, exp_avg_sqs, beta2, eps, bias_correction2, bool(adaptive))
    else:
        us = _direction_adam_inner(grads, exp_avg_sqs, exp_avgs, beta2, eps, bias_correction2, bool(adaptive),
                                   inner_momentum, bias_correction1)
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
    exp_avgs: Tensors | None = None,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    ckp1: float,
    bias_correction2: float,
    adaptive: bool = True,
    inner_momentum: float = 0.0,
    bias_correction1: float = 1.0,
    closure_form: bool = False,
    foreach: bool | None = False,
    fused: bool | None = False,
    masters: Tensors | None = None,
    prepared: Callable[..., None] | None = None,
) -> None:
    """One schedule-free Adam step (AdamW-SF, and RAdam-SF with ``adaptive`` from its rectification).

    Args:
        ys: points where the gradients were taken, updated in place (closure form: x on exit).
        grads: gradients at ``ys``; read only.
        zs: base iterates, updated in place.
        exp_avg_sqs: second moments, updated in place.
        exp_avgs: first moments (the EMA of the gradients), updated in place, for AdamW with inner
            momentum; None (the default) for none.
        lr: scheduled learning rate of this step.
        beta1: interpolation between z and x that defines y.
        beta2: second-moment decay.
        eps: added to the root of the bias-corrected second moment.
        weight_decay: decay coefficient, applied at y and scaled by ``lr``.
        ckp1: averaging weight of the new z into x.
        bias_correction2: 1 - beta2^(k+1).
        adaptive: divide by the second-moment root (False during RAdam's early steps).
        inner_momentum: decay of the EMA in ``exp_avgs`` (which must be given when it is not 0).
        bias_correction1: 1 - inner_momentum^(k+1), used with ``exp_avgs``.
        closure_form: tensors in ``ys`` hold y on entry and must hold x on exit.
        foreach: use list-wide ``_foreach`` operations instead of a per-tensor loop on the eager
            path (None: for tensors off the CPU; see :func:`route`).
        fused: use the native single-pass kernel for the tensors it takes (None: on the CPU).
        masters: float32 master copies of ``ys``, which are then bfloat16/float16 parameters (with
            gradients of their dtype): the math runs on the masters, and ``ys`` get them rounded.
        prepared: the native call a step plan bound to these very lists, gradients included
            (``native.Prepared``); it runs instead of routing the lists anew.
    """
    scalars = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, ckp1=ckp1,
                   bias_correction2=bias_correction2, adaptive=adaptive, closure_form=closure_form)
    lists = [ys, grads, zs, exp_avg_sqs]
    inner = ""
    if exp_avgs is not None:
        lists.append(exp_avgs)
        scalars.update(inner_momentum=inner_momentum, bias_correction1=bias_correction1)
        inner = "inner_"
    elif inner_momentum != 0.0:
        raise ValueError(f"Invalid inner_momentum: {inner_momentum!r} (needs exp_avgs to keep its moving average)")
    native_name = f"adam_sf_{inner}closure_step_" if closure_form else f"adam_sf_{inner}step_"
    _dispatch(native_name, _eager_adam, lists, scalars, foreach, fused,
              native_scalars={k: v for k, v in scalars.items() if k != "closure_form"}, masters=masters,
              prepared=prepared)


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
    foreach: bool | None = False,
    fused: bool | None = False,
    masters: Tensors | None = None,
    prepared: Callable[..., None] | None = None,
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
        foreach: use list-wide ``_foreach`` operations instead of a per-tensor loop on the eager
            path (None: for tensors off the CPU; see :func:`route`).
        fused: use the native single-pass kernel for the tensors it takes (None: on the CPU).
        masters: float32 master copies of ``ys``, which are then bfloat16/float16 parameters (see
            :func:`adam_step_`).
        prepared: the native call a step plan bound to these very lists (see :func:`adam_step_`).
    """
    scalars = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, ckp1=ckp1, closure_form=closure_form)
    native_name = "sgd_sf_closure_step_" if closure_form else "sgd_sf_step_"
    _dispatch(native_name, _eager_sgd, [ys, grads, zs], scalars, foreach, fused,
              native_scalars={k: v for k, v in scalars.items() if k != "closure_form"}, masters=masters,
              prepared=prepared)


def _eager_lerp(starts, ends, *, weight) -> None:
    torch._foreach_lerp_(starts, ends, weight)


def lerp_(starts: Tensors, ends: Tensors, weight: float, *, foreach: bool | None = False, fused: bool | None = False,
          masters: Tensors | None = None) -> None:
    """starts <- starts + weight * (ends - starts), in place (the train()/eval() switches).

    Args:
        starts: tensors moved in place.
        ends: targets; read only.
        weight: interpolation weight (may lie outside [0, 1]).
        foreach: use one ``_foreach_lerp_`` over the lists (None: off the CPU).
        fused: use the native kernel for the tensors it takes (None: on the CPU).
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


def wrapper_enter_(params: Tensors, zs: Tensors, *, decay: float, momentum: float, foreach: bool | None = False,
                   fused: bool | None = False, prepared: Callable[..., None] | None = None) -> None:
    """ScheduleFreeWrapper, before the base step: put z in the parameters and keep x in the z slots.

    With d = decay:  z <- z - d y;  y <- (1 - d (1 - momentum)) y   (decay taken at y, if d != 0)
    then  x <- lerp(y, z, 1 - 1/momentum);  p <- z;  zslot <- x.

    Args:
        params: parameters holding y; hold z on return, for the base optimizer to update.
        zs: the wrapper's z slots; hold x on return.
        decay: lr times the decay coefficient taken at y.
        momentum: interpolation y = (1 - momentum) z + momentum x.
        foreach: use list-wide ``_foreach`` operations instead of a per-tensor loop (None: off the CPU).
        fused: use the native single-pass kernel for supported tensors, no temporaries (None: on the CPU).
        prepared: the native call a wrapper plan bound to these very lists (``native.Prepared``); it
            runs instead of routing the lists anew.
    """
    scalars = dict(decay=decay, y_scale=1.0 - decay * (1.0 - momentum), to_x=1.0 - 1.0 / momentum)
    _dispatch("wrapper_enter_", _eager_wrapper_enter, [params, zs], scalars, foreach, fused, prepared=prepared)


def wrapper_exit_(params: Tensors, zs: Tensors, *, ckp1: float, momentum: float, foreach: bool | None = False,
                  fused: bool | None = False, prepared: Callable[..., None] | None = None) -> None:
    """ScheduleFreeWrapper, after the base step: average z into x, form y, and put z back.

    x <- lerp(x, z, ckp1);  y <- lerp(x, z, 1 - momentum);  p <- y;  zslot <- z.

    Args:
        params: parameters holding the base optimizer's new z; hold y on return.
        zs: the wrapper's z slots holding x; hold z on return.
        ckp1: averaging weight of the new z into x.
        momentum: interpolation y = (1 - momentum) z + momentum x.
        foreach: use list-wide ``_foreach`` operations instead of a per-tensor loop (None: off the CPU).
        fused: use the native single-pass kernel for supported tensors, no temporaries (None: on the CPU).
        prepared: the native call a wrapper plan bound to these very lists (see :func:`wrapper_enter_`).
    """
    _dispatch("wrapper_exit_", _eager_wrapper_exit, [params, zs], dict(ckp1=ckp1, to_y=1.0 - momentum),
              foreach, fused, prepared=prepared)


def group_by_device_and_dtype(lists: Sequence[Tensors]) -> list[list[list[torch.Tensor]]]:
    """Split parallel tensor lists into sub-lists sharing the device and dtype of the first list.

    Args:
        lists: parallel lists of tensors (same length).

    Returns:
        One entry per (device, dtype) of ``lists[0]``, each a list of parallel sub-lists.
    """
    if not lists[0]:
        return []
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
