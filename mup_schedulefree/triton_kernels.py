"""Fused schedule-free steps for CUDA tensors, in Triton: one pass over memory, one launch per list.

The math is the one ``kernels.py`` states (and ``csrc/sf_kernels.c`` implements for the CPU),
operation for operation: the same lerp formulas, the same fused multiply-adds, the same scalars
rounded once to float32. Each function here takes the same lists and keyword scalars as the native
op of the same name (see ``native.OPS``), so the dispatcher in ``kernels.py`` can send a CUDA
bucket here exactly where it sends a CPU bucket to the C kernels.

One launch covers a whole list of tensors. A *block table* cuts every tensor into blocks of
``BLOCK`` elements; program ``b`` looks up its tensor and offset in the table and reads that
tensor's data pointers from a pointer table (one row per tensor, one column per operand). Every
scalar is a runtime argument, so a new learning rate, averaging weight or bias correction never
recompiles; only the flags (Adam or SGD, closure form, weight decay on or off, which lerp formula,
the parameter dtype) are compile-time constants, a handful of variants per model.

Low-precision parameters (bfloat16, float16) come with float32 masters: the step reads the
parameter's gradient in its own dtype, updates the master and the float32 state, and writes the
master rounded back to the parameter, in the same pass. Before it, one more pass over the
parameters (2 bytes an element) flags every tensor some code wrote since the last step (its value
is no longer its master rounded); the step then adopts that tensor's value as its master first, as
the CPU paths do (``kernels.adopt_written_``).

Triton is only imported when this module is; ``available()`` says whether it can run. On a machine
without a GPU, ``TRITON_INTERPRET=1`` (set before the first import of this module) runs the same
kernels on CPU tensors through Triton's interpreter, which is how the test suite checks them.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no triton: ``available()`` is False and nothing below is defined for use
    triton = None
    tl = None

Tensors = Sequence[torch.Tensor]

#: Elements per program. Large enough to keep a GPU's memory pipes full, small enough that a list
#: of many small tensors wastes little on masked lanes.
BLOCK = 1024
#: Parameter dtypes the kernels take (low-precision ones with float32 masters).
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_OP_ADAM, _OP_SGD = 0, 1


def interpreted() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available() -> bool:
    """Whether the kernels can run here: Triton imports, and a CUDA device or the interpreter is there."""
    return triton is not None and (interpreted() or torch.cuda.is_available())


def supports(t: torch.Tensor) -> bool:
    """Whether a tensor can be an operand: contiguous, of a supported dtype, on CUDA (or the CPU when interpreted)."""
    on = t.device.type == "cuda" or (interpreted() and t.device.type == "cpu")
    return on and t.dtype in DTYPES and t.is_contiguous() and not t.is_complex()


class _Table:
    """The block table and pointer table of parallel tensor lists (see the module docstring).

    Everything the kernels look up is packed into one int64 tensor and copied to the device at once.
    """

    def __init__(self, columns: Sequence[Tensors]) -> None:
        device = columns[0][0].device
        count = len(columns[0])
        numels = torch.tensor([t.numel() for t in columns[0]], dtype=torch.int64)
        pointers = torch.tensor([[t.data_ptr() for t in row] for row in zip(*columns)], dtype=torch.int64)
        blocks = (numels + BLOCK - 1) // BLOCK
        self.n_blocks = int(blocks.sum())
        tensor_of_block = torch.repeat_interleave(torch.arange(count), blocks)
        first = torch.cumsum(blocks, 0) - blocks
        starts = (torch.arange(self.n_blocks) - first[tensor_of_block]) * BLOCK
        packed = torch.cat([pointers.flatten(), numels, tensor_of_block, starts]).to(device)
        cut = [pointers.numel(), count, self.n_blocks, self.n_blocks]
        self.pointers, self.numels, self.block_tensor, self.block_start = torch.split(packed, cut)
        self.width = len(columns)


_TABLES: dict[tuple, _Table] = {}
_TABLES_KEPT = 64


def _table(columns: Sequence[Tensors]) -> _Table:
    """The table of these very tensors, reused while their addresses and sizes stay (a step's usual case)."""
    key = (columns[0][0].device, tuple(t.numel() for t in columns[0]),
           tuple(t.data_ptr() for column in columns for t in column))
    table = _TABLES.get(key)
    if table is None:
        if len(_TABLES) >= _TABLES_KEPT:
            _TABLES.clear()
        table = _TABLES[key] = _Table(columns)
    return table


def _lerp_weight(weight: float) -> tuple[bool, float, float]:
    """torch's lerp picks its formula by |w| < 0.5 (see ``csrc/sf_kernels.c``)."""
    w = float(torch.tensor(weight, dtype=torch.float32))
    return abs(w) < 0.5, w, float(torch.tensor(1.0, dtype=torch.float32) - torch.tensor(w, dtype=torch.float32))


def _to_float(value: float) -> float:
    """A Python scalar rounded to float32 once, as torch rounds it for float32 tensors."""
    return float(torch.tensor(value, dtype=torch.float32))


if triton is not None:

    @triton.jit
    def _lerp(a, b, SMALL: tl.constexpr, w, omw):
        if SMALL:
            return tl.fma(w, b - a, a)
        return tl.fma(-(b - a), omw, b)

    @triton.jit
    def _rounded(x, PARAM: tl.constexpr):
        # float32 -> PARAM, rounding to nearest even. For bfloat16 this is done on the bits (add
        # 0x7FFF plus the lowest kept bit, keep the high half), which is what the hardware's
        # conversion does and what Triton's CPU interpreter, which truncates, does not.
        if PARAM == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = bits + (((bits >> 16) & 1) + 0x7FFF)
            rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
            return tl.where(x != x, x.to(tl.bfloat16), rounded)
        return x.to(PARAM)

    @triton.jit
    def _block(numels, block_tensor, block_start, BLOCK_: tl.constexpr):
        # this program's tensor, its element offsets in that tensor, and which of them exist
        b = tl.program_id(0)
        t = tl.load(block_tensor + b)
        offsets = tl.load(block_start + b) + tl.arange(0, BLOCK_)
        return t, offsets, offsets < tl.load(numels + t)

    @triton.jit
    def _operand(pointers, row, column, WIDTH: tl.constexpr, DTYPE: tl.constexpr):
        return tl.load(pointers + row * WIDTH + column).to(tl.pointer_type(DTYPE))

    @triton.jit
    def _written_kernel(pointers, numels, block_tensor, block_start, flags, WIDTH: tl.constexpr,
                        PARAM: tl.constexpr, MASTER_COL: tl.constexpr, BLOCK_: tl.constexpr):
        t, offsets, mask = _block(numels, block_tensor, block_start, BLOCK_)
        p = tl.load(_operand(pointers, t, 0, WIDTH, PARAM) + offsets, mask=mask)
        m = tl.load(_operand(pointers, t, MASTER_COL, WIDTH, tl.float32) + offsets, mask=mask)
        # only lanes that differ touch the flag: none at all in the common step with no write
        differ = mask & (p != _rounded(m, PARAM))
        tl.atomic_max(flags + t + offsets * 0, tl.full((BLOCK_,), 1, tl.int32), mask=differ)

    @triton.jit
    def _step_kernel(pointers, numels, block_tensor, block_start, flags,
                     beta2, one_minus_beta2, bias_correction2, eps, weight_decay, neg_lr, y_coef,
                     to_z_w, to_z_omw, to_x_w, to_x_omw, inner, one_minus_inner, bias_correction1,
                     WIDTH: tl.constexpr, OP: tl.constexpr, ADAPTIVE: tl.constexpr, DECAY: tl.constexpr,
                     CLOSURE: tl.constexpr, INNER: tl.constexpr, TO_Z_SMALL: tl.constexpr,
                     TO_X_SMALL: tl.constexpr, PARAM: tl.constexpr, MASTER: tl.constexpr, BLOCK_: tl.constexpr):
        # columns: 0 parameter (y, or x in the closure form), 1 gradient, 2 z, then Adam's v and m,
        # then the float32 master of a low-precision parameter
        t, offsets, mask = _block(numels, block_tensor, block_start, BLOCK_)
        p_ptr = _operand(pointers, t, 0, WIDTH, PARAM) + offsets
        g = tl.load(_operand(pointers, t, 1, WIDTH, PARAM) + offsets, mask=mask).to(tl.float32)
        z_ptr = _operand(pointers, t, 2, WIDTH, tl.float32) + offsets
        if MASTER:
            m_ptr = _operand(pointers, t, WIDTH - 1, WIDTH, tl.float32) + offsets
            y = tl.load(m_ptr, mask=mask)
            if tl.load(flags + t) != 0:
                y = tl.load(p_ptr, mask=mask).to(tl.float32)
        else:
            y = tl.load(p_ptr, mask=mask)
        z = tl.load(z_ptr, mask=mask)
        if OP == 0:
            v_ptr = _operand(pointers, t, 3, WIDTH, tl.float32) + offsets
            v = tl.fma(one_minus_beta2 * g, g, beta2 * tl.load(v_ptr, mask=mask))
            tl.store(v_ptr, v, mask=mask)
            if INNER:
                a_ptr = _operand(pointers, t, 4, WIDTH, tl.float32) + offsets
                a = tl.fma(g, one_minus_inner, inner * tl.load(a_ptr, mask=mask))
                tl.store(a_ptr, a, mask=mask)
                u = tl.div_rn(a, bias_correction1)
            else:
                u = g
            if ADAPTIVE:
                u = tl.div_rn(u, tl.sqrt_rn(tl.div_rn(v, bias_correction2)) + eps)
        else:
            u = g
        if DECAY:
            u = tl.fma(y, weight_decay, u)
        z_new = tl.fma(u, neg_lr, z)
        if CLOSURE:
            y_new = _lerp(_lerp(y, z, TO_X_SMALL, to_x_w, to_x_omw), z_new, TO_Z_SMALL, to_z_w, to_z_omw)
        else:
            y_new = tl.fma(u, y_coef, _lerp(y, z, TO_Z_SMALL, to_z_w, to_z_omw))
        tl.store(z_ptr, z_new, mask=mask)
        if MASTER:
            tl.store(m_ptr, y_new, mask=mask)
            tl.store(p_ptr, _rounded(y_new, PARAM), mask=mask)
        else:
            tl.store(p_ptr, y_new, mask=mask)

    @triton.jit
    def _lerp_kernel(pointers, numels, block_tensor, block_start, flags, w, omw, WIDTH: tl.constexpr,
                     SMALL: tl.constexpr, PARAM: tl.constexpr, MASTER: tl.constexpr, BLOCK_: tl.constexpr):
        # columns: 0 start (moved), 1 end (read), then the float32 master of a low-precision start
        t, offsets, mask = _block(numels, block_tensor, block_start, BLOCK_)
        p_ptr = _operand(pointers, t, 0, WIDTH, PARAM) + offsets
        end = tl.load(_operand(pointers, t, 1, WIDTH, tl.float32) + offsets, mask=mask)
        if MASTER:
            m_ptr = _operand(pointers, t, 2, WIDTH, tl.float32) + offsets
            start = tl.load(m_ptr, mask=mask)
            if tl.load(flags + t) != 0:
                start = tl.load(p_ptr, mask=mask).to(tl.float32)
            moved = _lerp(start, end, SMALL, w, omw)
            tl.store(m_ptr, moved, mask=mask)
            tl.store(p_ptr, _rounded(moved, PARAM), mask=mask)
        else:
            tl.store(p_ptr, _lerp(tl.load(p_ptr, mask=mask), end, SMALL, w, omw), mask=mask)

    @triton.jit
    def _wrapper_kernel(pointers, numels, block_tensor, block_start, decay, y_scale, a_w, a_omw, b_w, b_omw,
                        ENTER: tl.constexpr, DECAY: tl.constexpr, A_SMALL: tl.constexpr, B_SMALL: tl.constexpr,
                        BLOCK_: tl.constexpr):
        # columns: 0 parameter, 1 the wrapper's z slot (float32 both)
        t, offsets, mask = _block(numels, block_tensor, block_start, BLOCK_)
        p_ptr = _operand(pointers, t, 0, 2, tl.float32) + offsets
        s_ptr = _operand(pointers, t, 1, 2, tl.float32) + offsets
        p = tl.load(p_ptr, mask=mask)
        s = tl.load(s_ptr, mask=mask)
        if ENTER:  # p holds y, s holds z: decay at y, then p <- z, s <- x = lerp(y, z, 1 - 1/momentum)
            if DECAY:
                s = tl.fma(p, -decay, s)
                p = p * y_scale
            tl.store(s_ptr, _lerp(p, s, A_SMALL, a_w, a_omw), mask=mask)
            tl.store(p_ptr, s, mask=mask)
        else:  # p holds the new z, s holds x: x <- lerp(x, z, ckp1), p <- lerp(x, z, 1 - momentum), s <- z
            x = _lerp(s, p, A_SMALL, a_w, a_omw)
            tl.store(p_ptr, _lerp(x, p, B_SMALL, b_w, b_omw), mask=mask)
            tl.store(s_ptr, p, mask=mask)


def _check(lists: Sequence[Tensors], masters: Tensors | None) -> None:
    if triton is None:
        raise RuntimeError("triton is not installed: the CUDA kernels need it (it ships with CUDA builds of torch)")
    params = lists[0]
    dtype = params[0].dtype
    for column in lists:
        for t in column:
            if not supports(t):
                raise ValueError(f"tensor of dtype {t.dtype} on {t.device} (contiguous: {t.is_contiguous()}) "
                                 "is not supported by the Triton kernels")
    if any(t.dtype is not dtype for t in params):
        raise ValueError("parameters of one call must share a dtype")
    if (masters is None) != (dtype is torch.float32):
        raise ValueError("float32 parameters take no masters; bfloat16/float16 parameters need float32 masters")


def _written_flags(table: _Table, params: Tensors, masters: Tensors | None) -> torch.Tensor:
    flags = torch.zeros(len(params), dtype=torch.int32, device=params[0].device)
    if masters is not None:
        _written_kernel[(table.n_blocks,)](table.pointers, table.numels, table.block_tensor, table.block_start,
                                           flags, WIDTH=table.width, PARAM=_triton_dtype(params[0].dtype),
                                           MASTER_COL=table.width - 1, BLOCK_=BLOCK)
    return flags


def _triton_dtype(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def _step(op: int, columns: list, scalars: dict, masters: Tensors | None, closure_form: bool) -> None:
    params = columns[0]
    if not params:
        return
    _check([c for c in columns if c is not None], masters)
    all_columns = [*columns, *([masters] if masters is not None else [])]
    table = _table(all_columns)
    if table.n_blocks == 0:
        return
    flags = _written_flags(table, params, masters)
    to_z_small, to_z_w, to_z_omw = _lerp_weight(scalars["ckp1"])
    to_x_small, to_x_w, to_x_omw = _lerp_weight(1.0 - 1.0 / scalars["beta"])
    lr, beta, ckp1 = scalars["lr"], scalars["beta"], scalars["ckp1"]
    inner = scalars.get("inner_momentum", 0.0)
    _step_kernel[(table.n_blocks,)](
        table.pointers, table.numels, table.block_tensor, table.block_start, flags,
        _to_float(scalars.get("beta2", 0.0)), _to_float(1.0 - scalars.get("beta2", 0.0)),
        _to_float(scalars.get("bias_correction2", 1.0)), _to_float(scalars.get("eps", 0.0)),
        _to_float(scalars["weight_decay"]), -_to_float(lr), _to_float(lr * (beta * (1.0 - ckp1) - 1.0)),
        to_z_w, to_z_omw, to_x_w, to_x_omw, _to_float(inner), _to_float(1.0 - inner),
        _to_float(scalars.get("bias_correction1", 1.0)),
        WIDTH=table.width, OP=op, ADAPTIVE=bool(scalars.get("adaptive", False)),
        DECAY=scalars["weight_decay"] != 0.0, CLOSURE=closure_form, INNER=len(columns) == 5,
        TO_Z_SMALL=to_z_small, TO_X_SMALL=to_x_small, PARAM=_triton_dtype(params[0].dtype),
        MASTER=masters is not None, BLOCK_=BLOCK)


def adam_sf_step_(ys: Tensors, grads: Tensors, zs: Tensors, exp_avg_sqs: Tensors, exp_avgs: Tensors | None = None,
                  *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, ckp1: float,
                  bias_correction2: float, adaptive: bool = True, inner_momentum: float = 0.0,
                  bias_correction1: float = 1.0, closure_form: bool = False, masters: Tensors | None = None) -> None:
    """One schedule-free Adam step over lists of tensors, in one launch (see ``kernels.adam_step_``).

    Args:
        ys: parameters holding y (closure form: y on entry, x on exit); float32, or bfloat16/float16
            with ``masters``.
        grads: their gradients, in the parameters' dtype; read only.
        zs: float32 base iterates.
        exp_avg_sqs: float32 second moments.
        exp_avgs: float32 first moments for AdamW with inner momentum, or None.
        lr: scheduled learning rate.
        beta1: interpolation between z and x that defines y.
        beta2: second-moment decay.
        eps: added to the root of the bias-corrected second moment.
        weight_decay: decay coefficient, taken at y.
        ckp1: averaging weight of the new z into x.
        bias_correction2: 1 - beta2^(k+1).
        adaptive: divide by the second-moment root (False during RAdam's early steps).
        inner_momentum: decay of ``exp_avgs``.
        bias_correction1: 1 - inner_momentum^(k+1), with ``exp_avgs``.
        closure_form: ``ys`` hold y on entry and x on exit.
        masters: float32 masters of low-precision ``ys``, or None.

    Raises:
        ValueError: for a tensor the kernels do not take, or masters that do not match the dtype.
    """
    columns = [ys, grads, zs, exp_avg_sqs, *([exp_avgs] if exp_avgs is not None else [])]
    _step(_OP_ADAM, columns, dict(lr=lr, beta=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, ckp1=ckp1,
                                  bias_correction2=bias_correction2, adaptive=adaptive, inner_momentum=inner_momentum,
                                  bias_correction1=bias_correction1), masters, closure_form)


def sgd_sf_step_(ys: Tensors, grads: Tensors, zs: Tensors, *, lr: float, momentum: float, weight_decay: float,
                 ckp1: float, closure_form: bool = False, masters: Tensors | None = None) -> None:
    """One schedule-free SGD step over lists of tensors, in one launch (see ``kernels.sgd_step_``).

    Args:
        ys: parameters holding y (closure form: y on entry, x on exit).
        grads: their gradients, in the parameters' dtype; read only.
        zs: float32 base iterates.
        lr: scheduled learning rate.
        momentum: interpolation between z and x that defines y.
        weight_decay: decay coefficient, taken at y.
        ckp1: averaging weight of the new z into x.
        closure_form: ``ys`` hold y on entry and x on exit.
        masters: float32 masters of low-precision ``ys``, or None.

    Raises:
        ValueError: for a tensor the kernels do not take, or masters that do not match the dtype.
    """
    _step(_OP_SGD, [ys, grads, zs], dict(lr=lr, beta=momentum, weight_decay=weight_decay, ckp1=ckp1),
          masters, closure_form)


def lerp_(starts: Tensors, ends: Tensors, *, weight: float, masters: Tensors | None = None) -> None:
    """starts <- lerp(starts, ends, weight) over lists of tensors, in one launch (the train()/eval() switches).

    Args:
        starts: tensors moved in place; float32, or bfloat16/float16 with ``masters``.
        ends: float32 targets; read only.
        weight: interpolation weight.
        masters: float32 masters of low-precision ``starts``: they move, and ``starts`` get them rounded.

    Raises:
        ValueError: for a tensor the kernels do not take, or masters that do not match the dtype.
    """
    if not starts:
        return
    _check([starts, ends], masters)
    table = _table([starts, ends, *([masters] if masters is not None else [])])
    if table.n_blocks == 0:
        return
    flags = _written_flags(table, starts, masters)
    small, w, omw = _lerp_weight(weight)
    _lerp_kernel[(table.n_blocks,)](table.pointers, table.numels, table.block_tensor, table.block_start, flags,
                                    w, omw, WIDTH=table.width, SMALL=small, PARAM=_triton_dtype(starts[0].dtype),
                                    MASTER=masters is not None, BLOCK_=BLOCK)


def _wrapper(params: Tensors, zs: Tensors, enter: bool, decay: float, y_scale: float, a: float, b: float) -> None:
    if not params:
        return
    _check([params, zs], None)
    table = _table([params, zs])
    if table.n_blocks == 0:
        return
    a_small, a_w, a_omw = _lerp_weight(a)
    b_small, b_w, b_omw = _lerp_weight(b)
    _wrapper_kernel[(table.n_blocks,)](table.pointers, table.numels, table.block_tensor, table.block_start,
                                       _to_float(decay), _to_float(y_scale), a_w, a_omw, b_w, b_omw, ENTER=enter,
                                       DECAY=decay != 0.0, A_SMALL=a_small, B_SMALL=b_small, BLOCK_=BLOCK)


def wrapper_enter_(params: Tensors, zs: Tensors, *, decay: float, y_scale: float, to_x: float) -> None:
    """ScheduleFreeWrapper's pass before the base step, in one launch (see ``kernels.wrapper_enter_``).

    Args:
        params: float32 parameters holding y; hold z on return.
        zs: the wrapper's float32 z slots; hold x on return.
        decay: lr times the decay coefficient taken at y.
        y_scale: 1 - decay (1 - momentum).
        to_x: 1 - 1/momentum.
    """
    _wrapper(params, zs, True, decay, y_scale, to_x, 0.0)


def wrapper_exit_(params: Tensors, zs: Tensors, *, ckp1: float, to_y: float) -> None:
    """ScheduleFreeWrapper's pass after the base step, in one launch (see ``kernels.wrapper_exit_``).

    Args:
        params: float32 parameters holding the base optimizer's new z; hold y on return.
        zs: the wrapper's float32 z slots holding x; hold z on return.
        ckp1: averaging weight of the new z into x.
        to_y: 1 - momentum.
    """
    _wrapper(params, zs, False, 0.0, 1.0, ckp1, to_y)
