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

Every function here updates its tensors in place and only reads the gradients. Each has an eager
implementation built from torch's ``_foreach`` operations; with ``foreach=False`` it runs the
same operations one tensor at a time, which is faster on CPU (no list-sized temporaries).
When ``fused`` is requested and the native CPU kernels are available (see ``native.py``),
supported tensors take the single-pass path instead.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, Sequence

import torch

Tensors = Sequence[torch.Tensor]


def _batched(fn: Callable[..., None], lists: Sequence[Tensors], foreach: bool, **scalars: float) -> None:
    """Run ``fn`` on whole lists (foreach) or on one tensor at a time."""
    if foreach:
        fn(*lists, **scalars)
        return
    for items in zip(*lists):
        fn(*([t] for t in items), **scalars)


def _native():
    """The native kernel module, or None when fused kernels cannot be built here."""
    from . import native

    return native if native.available() else None


def _fused_split(native, lists: Sequence[Tensors]) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    """Split parallel lists into (native-supported, rest) by whether every tensor of an index is supported."""
    fast: list[list[torch.Tensor]] = [[] for _ in lists]
    rest: list[list[torch.Tensor]] = [[] for _ in lists]
    for items in zip(*lists):
        target = fast if all(native.supports(t) for t in items) else rest
        for column, t in zip(target, items):
            column.append(t)
    return fast, rest


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
    """
    scalars = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, ckp1=ckp1,
                   bias_correction2=bias_correction2, adaptive=adaptive, closure_form=closure_form)
    lists = [ys, grads, zs, exp_avg_sqs]
    lib = _native() if fused else None
    if lib is not None:
        fast, lists = _fused_split(lib, lists)
        if fast[0]:
            kernel = lib.adam_sf_closure_step_ if closure_form else lib.adam_sf_step_
            kernel(*fast, **{k: v for k, v in scalars.items() if k != "closure_form"})
    if lists[0]:
        _batched(_eager_adam, lists, foreach, **scalars)


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
    """
    scalars = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, ckp1=ckp1, closure_form=closure_form)
    lists = [ys, grads, zs]
    lib = _native() if fused else None
    if lib is not None:
        fast, lists = _fused_split(lib, lists)
        if fast[0]:
            kernel = lib.sgd_sf_closure_step_ if closure_form else lib.sgd_sf_step_
            kernel(*fast, **{k: v for k, v in scalars.items() if k != "closure_form"})
    if lists[0]:
        _batched(_eager_sgd, lists, foreach, **scalars)


def lerp_(starts: Tensors, ends: Tensors, weight: float, *, foreach: bool = False, fused: bool = False) -> None:
    """starts <- starts + weight * (ends - starts), in place (the train()/eval() switches).

    Args:
        starts: tensors moved in place.
        ends: targets; read only.
        weight: interpolation weight (may lie outside [0, 1]).
        foreach: use one ``_foreach_lerp_`` over the lists.
        fused: use the native kernel for supported tensors.
    """
    lists = [starts, ends]
    lib = _native() if fused else None
    if lib is not None:
        fast, lists = _fused_split(lib, lists)
        if fast[0]:
            lib.lerp_(*fast, weight=weight)
    if lists[0]:
        _batched(lambda a, b, weight: torch._foreach_lerp_(a, b, weight), lists, foreach, weight=weight)


def group_by_device_and_dtype(lists: Sequence[Tensors]) -> list[list[list[torch.Tensor]]]:
    """Split parallel tensor lists into sub-lists sharing the device and dtype of the first list.

    Args:
        lists: parallel lists of tensors (same length).

    Returns:
        One entry per (device, dtype) of ``lists[0]``, each a list of parallel sub-lists.
    """
    buckets: dict[tuple[torch.device, torch.dtype], list[list[torch.Tensor]]] = defaultdict(
        lambda: [[] for _ in lists]
    )
    for items in zip(*lists):
        bucket = buckets[(items[0].device, items[0].dtype)]
        for column, t in zip(bucket, items):
            column.append(t)
    return list(buckets.values())


def swap_(a: Tensors, b: Tensors) -> None:
    """Exchange the contents of two parallel tensor lists in place (storage stays where it is).

    Args:
        a: first list; ends up holding what ``b`` held.
        b: second list; ends up holding what ``a`` held.
    """
    for s, t in zip(a, b):
        held = s.clone()
        s.copy_(t)
        t.copy_(held)
