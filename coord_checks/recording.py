"""Record per-module activation statistics across widths (and depths) while a schedule-free optimizer trains.

A schedule-free optimizer keeps the parameters at the training point y while it trains and moves
them to the evaluation point x on ``optimizer.eval()``. ``record_coords`` measures both: at every
step it records the training forward pass at y, and, when asked, switches to x, runs one extra
forward pass under ``torch.no_grad()``, switches back and restores every parameter, buffer and
random-number state bit for bit, so measuring x never changes the training run.

Step ``t`` (1-based) is the forward pass after ``t - 1`` optimizer updates, as in mup's
``get_coord_data``: step 1 is the initialisation. The x forward runs with the model in train mode
(BatchNorm normalises with the batch's own statistics) and its buffer updates are undone.

The result is one tidy DataFrame, one row per (parametrization, width, seed, step, sequence,
module, statistic), with the statistic computed in float32. Given ``depths`` (numbers of residual
blocks), every (width, depth) pair is a model and the frame has a ``depth`` column after ``width``
(``DEPTH_COLUMNS``); without it the frame is exactly as before (``COLUMNS``).
"""
from __future__ import annotations

import itertools
from typing import Callable, Iterable, Mapping, Sequence, Union

import pandas as pd
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from coord_checks.data import Batch

StatisticFn = Callable[[Tensor], Tensor]
ModuleSelector = Union[None, Sequence[str], Callable[[str, nn.Module], bool]]

#: Built-in statistics of a module's output tensor (all reduce to a 0-d tensor).
STATISTICS: dict[str, StatisticFn] = {
    "l1": lambda t: t.abs().mean(),
    "l2": lambda t: t.square().mean().sqrt(),
    "std": lambda t: t.std(),
    "mean": lambda t: t.mean(),
    "max": lambda t: t.abs().max(),
}
SEQUENCES: tuple[str, ...] = ("y", "x")
COLUMNS: tuple[str, ...] = (
    "parametrization", "width", "seed", "step", "sequence", "module", "statistic", "value"
)
#: Columns of a frame recorded across depths: ``COLUMNS`` with ``depth`` after ``width``.
DEPTH_COLUMNS: tuple[str, ...] = COLUMNS[:2] + ("depth",) + COLUMNS[2:]


def resolve_statistics(statistics: Sequence[str] | Mapping[str, StatisticFn]) -> dict[str, StatisticFn]:
    """Turn statistic names (keys of ``STATISTICS``) or a name-to-function mapping into a dict.

    Args:
        statistics: names such as ``("l1", "l2")`` or a mapping ``{name: fn(tensor) -> 0-d tensor}``.

    Returns:
        An ordered ``{name: fn}`` dict.

    Raises:
        ValueError: for an unknown name or an empty selection.
    """
    if isinstance(statistics, Mapping):
        resolved = dict(statistics)
    else:
        if isinstance(statistics, str):
            statistics = [statistics]
        unknown = [s for s in statistics if s not in STATISTICS]
        if unknown:
            raise ValueError(f"statistics: unknown {unknown}; choose from {sorted(STATISTICS)}")
        resolved = {s: STATISTICS[s] for s in statistics}
    if not resolved:
        raise ValueError("statistics must name at least one statistic")
    return resolved


def select_modules(model: nn.Module, modules: ModuleSelector = None) -> list[tuple[str, nn.Module]]:
    """The named submodules to hook.

    Args:
        model: the network.
        modules: ``None`` for every submodule except the model itself (containers that are never
            called, like ``nn.ModuleList``, simply record nothing, and a wrapper whose output is
            its last submodule's output is recorded once, under the submodule's name); a sequence
            of module names; or a predicate ``(name, module) -> bool``.

    Returns:
        ``(name, module)`` pairs in registration order.

    Raises:
        ValueError: if a requested name is not a submodule of ``model``.
    """
    named = [(name, module) for name, module in model.named_modules() if name]
    if modules is None:
        return named
    if callable(modules):
        return [(name, module) for name, module in named if modules(name, module)]
    lookup = dict(named)
    missing = [name for name in modules if name not in lookup]
    if missing:
        raise ValueError(f"modules: {missing} are not submodules of the model")
    return [(name, lookup[name]) for name in modules]


class _Recorder:
    """Forward hooks that stash statistics of module outputs while ``active`` is set.

    A module whose output is the very tensor already stashed in this pass (a wrapper returning
    its last submodule's output, such as a Transformer MLP returning its output projection) is
    recorded once, under the submodule's name: submodule hooks fire first.
    """

    def __init__(self, named_modules: list[tuple[str, nn.Module]], statistics: dict[str, StatisticFn]):
        self.statistics = statistics
        self.active = False
        self.keys: list[tuple[str, str]] = []
        self.values: list[Tensor] = []
        self.seen: list[Tensor] = []
        self.handles = [
            module.register_forward_hook(self._hook(name)) for name, module in named_modules
        ]

    def _hook(self, name: str) -> Callable[[nn.Module, object, object], None]:
        def hook(module: nn.Module, inputs: object, output: object) -> None:
            if not self.active:
                return
            if isinstance(output, Tensor):
                self._stash(name, output)
            elif isinstance(output, (tuple, list)):
                for i, item in enumerate(output):
                    if isinstance(item, Tensor):
                        self._stash(f"{name}[{i}]", item)

        return hook

    def _stash(self, name: str, output: Tensor) -> None:
        if any(output is earlier for earlier in self.seen):
            return
        self.seen.append(output)
        with torch.no_grad():
            tensor = output.detach().float()
            for stat_name, fn in self.statistics.items():
                self.keys.append((name, stat_name))
                self.values.append(fn(tensor).reshape(()))

    def drain(self) -> list[tuple[str, str, float]]:
        """Return and forget what was stashed (one device-to-host copy for all values)."""
        self.seen = []
        if not self.values:
            return []
        values = torch.stack(self.values).cpu().tolist()
        rows = [(module, stat, value) for (module, stat), value in zip(self.keys, values)]
        self.keys, self.values = [], []
        return rows

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _to_device(batch: Batch, device: torch.device) -> Batch:
    inputs, targets = batch
    return inputs.to(device), targets.to(device)


def rng_devices(device: torch.device) -> list[int]:
    """The CUDA devices whose generators ``torch.random.fork_rng`` must save for ``device``.

    Args:
        device: where the work runs.

    Returns:
        ``[index]`` for a CUDA device, ``[]`` otherwise (the CPU generator is always saved).
    """
    if device.type == "cuda":
        return [device.index if device.index is not None else torch.cuda.current_device()]
    return []


def take_step(optimizer: torch.optim.Optimizer, loss: Tensor) -> None:
    """``optimizer.step()``, or ``optimizer.step(function_value=loss)`` for an optimizer whose step needs the loss.

    An optimizer says it needs the loss with a true class attribute ``needs_function_value``
    (ScheduleFree+, whose Polyak step size is computed from it).

    Args:
        optimizer: the optimizer, its gradients computed.
        loss: the loss those gradients come from (at the current parameters).
    """
    if getattr(optimizer, "needs_function_value", False):
        optimizer.step(function_value=loss.detach())
    else:
        optimizer.step()


def forward_at_x(model: nn.Module, optimizer: torch.optim.Optimizer, inputs: Tensor) -> Tensor:
    """One forward pass at the schedule-free evaluation point x, leaving training untouched.

    Switches the optimizer to eval mode, runs ``model(inputs)`` under ``torch.no_grad()``, switches
    back to train mode, then restores all parameters, buffers and random-number generators to
    their exact previous values (so round-off from the y -> x -> y interpolation cannot leak into
    training, and BatchNorm running statistics are not updated by the x pass).

    Args:
        model: the network, in train mode.
        optimizer: a schedule-free optimizer with ``eval()`` and ``train()``, in train mode.
        inputs: the batch inputs, on the model's device.

    Returns:
        The model output at x (detached).
    """
    tensors = [*model.parameters(), *model.buffers()]
    saved = [t.detach().clone() for t in tensors]
    with torch.random.fork_rng(devices=rng_devices(inputs.device)), torch.no_grad():
        optimizer.eval()
        try:
            output = model(inputs)
        finally:
            optimizer.train()
            for t, s in zip(tensors, saved):
                t.copy_(s)
    return output


def _train_and_record(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    recorder: _Recorder,
    batches: Sequence[Batch],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    steps: int,
    sequences: Sequence[str],
    record_steps: frozenset[int],
) -> list[tuple[int, str, str, str, float]]:
    """Rows ``(step, sequence, module, statistic, value)`` of one training run, recorded at
    ``record_steps``."""
    model.train()
    if hasattr(optimizer, "train"):
        optimizer.train()
    rows = []
    for step in range(1, steps + 1):
        inputs, targets = batches[(step - 1) % len(batches)]
        recording = step in record_steps
        if recording and "x" in sequences:
            recorder.active = True
            forward_at_x(model, optimizer, inputs)
            recorder.active = False
            rows += [(step, "x", *record) for record in recorder.drain()]
        recorder.active = recording and "y" in sequences
        output = model(inputs)
        recorder.active = False
        rows += [(step, "y", *record) for record in recorder.drain()]
        if step == steps:
            break
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(output, targets)
        loss.backward()
        take_step(optimizer, loss)
    return rows


def record_coords(
    model_factory: Callable[[int], nn.Module],
    optimizer_factory: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
    widths: Sequence[int],
    batches: Sequence[Batch],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    steps: int,
    seeds: Sequence[int] = (0,),
    statistics: Sequence[str] | Mapping[str, StatisticFn] = ("l1",),
    sequences: Sequence[str] = SEQUENCES,
    modules: ModuleSelector = None,
    device: str | torch.device = "cpu",
    parametrization: str = "mup",
    progress: bool = False,
    record_steps: Sequence[int] | None = None,
    depths: Sequence[int] | None = None,
) -> pd.DataFrame:
    """Train one model per (width, seed), or per (width, depth, seed), and record module output statistics.

    Before each model is built the global generator is seeded with ``torch.manual_seed(seed)``
    (the caller's generator state is restored on return); the batches are the same for every
    width and seed.

    Args:
        model_factory: ``width -> model`` with base shapes already set (see
            ``coord_checks.models.build_model``), on the CPU or on ``device``; with ``depths``,
            ``(width, depth) -> model``.
        optimizer_factory: ``params -> optimizer``, e.g. ``lambda p: MuAdamW_ScheduleFree(p,
            lr=1e-2)``; it must have ``train()``/``eval()`` to record the x sequence. An
            optimizer whose step needs the loss gets it (see ``take_step``). With ``depths`` it
            is called as ``optimizer_factory(model.named_parameters(), depth=depth)`` (a depth
            rule needs the names, to find the parameters inside residual blocks).
        widths: at least two distinct positive widths; with ``depths``, at least one.
        batches: ``(inputs, targets)`` pairs; step ``t`` uses ``batches[(t - 1) % len(batches)]``,
            so one batch gives a fixed batch and ``steps`` batches a stream.
        loss_fn: ``(model_output, targets) -> scalar loss``.
        steps: forward passes recorded per model, with ``steps - 1`` optimizer updates in
            between.
        seeds: initialisation seeds.
        statistics: names from ``STATISTICS`` (``"l1"`` is the mean absolute value) or a mapping of
            names to functions of a float32 tensor.
        sequences: any of ``"y"`` (training point) and ``"x"`` (evaluation point).
        modules: which submodules to hook (see ``select_modules``).
        device: where to train.
        parametrization: label stored in the ``parametrization`` column (e.g. ``"mup"``, ``"sp"``).
        progress: show a tqdm progress bar over (seed, width) runs (on a terminal).
        record_steps: the steps to record (default: every step); the model still trains for
            ``steps`` steps, so ``coord_checks.custom.log_spaced_steps(200)`` watches a long run
            at 16 steps' cost of recording.
        depths: numbers of residual blocks, at least two distinct (default None: width only).

    Returns:
        A DataFrame with columns ``COLUMNS``: parametrization, width, seed, step, sequence, module,
        statistic, value; with ``depths``, ``DEPTH_COLUMNS`` (a ``depth`` column after ``width``).

    Raises:
        ValueError: for empty or non-positive widths, fewer than two distinct widths (or depths,
            when given), ``steps < 1``, no batches, an unknown sequence or statistic, or
            ``record_steps`` outside 1 .. ``steps``.
        TypeError: if the x sequence is requested and the optimizer has no ``eval``/``train``.
    """
    widths, depths = check_axes(widths, depths)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if len(batches) == 0:
        raise ValueError("batches must hold at least one (inputs, targets) pair")
    if not seeds:
        raise ValueError("seeds must hold at least one seed")
    unknown = [s for s in sequences if s not in SEQUENCES]
    if unknown or not sequences:
        raise ValueError(f"sequences must be a non-empty subset of {SEQUENCES}, got {list(sequences)}")
    stat_fns = resolve_statistics(statistics)
    record_at = frozenset(range(1, steps + 1) if record_steps is None else record_steps)
    if not record_at or any(isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= steps
                            for s in record_at):
        raise ValueError(f"record_steps must be a non-empty set of steps in 1..{steps}, "
                         f"got {sorted(record_at, key=str)}")
    device = torch.device(device)
    device_batches = [_to_device(b, device) for b in batches]

    rows: list[tuple] = []
    runs = list(itertools.product(seeds, widths, [None] if depths is None else depths))
    bar = tqdm(runs, desc=f"coord check [{parametrization}]", leave=False,
               disable=None if progress else True)
    with torch.random.fork_rng(devices=rng_devices(device)):
        for seed, width, depth in bar:
            torch.manual_seed(seed)
            if depth is None:
                model = model_factory(width).to(device)
                optimizer = optimizer_factory(model.parameters())
            else:
                model = model_factory(width, depth).to(device)
                optimizer = optimizer_factory(model.named_parameters(), depth=depth)
            if "x" in sequences and not (hasattr(optimizer, "eval") and hasattr(optimizer, "train")):
                raise TypeError(
                    f"optimizer_factory returned {type(optimizer).__name__}, which has no "
                    "eval()/train(); the x sequence needs a schedule-free optimizer"
                )
            recorder = _Recorder(select_modules(model, modules), stat_fns)
            try:
                for step, sequence, module, stat, value in _train_and_record(
                    model, optimizer, recorder, device_batches, loss_fn, steps, sequences, record_at
                ):
                    at = (width,) if depth is None else (width, depth)
                    rows.append((parametrization, *at, seed, step, sequence, module, stat, value))
            finally:
                recorder.remove()
    return pd.DataFrame(rows, columns=list(COLUMNS if depths is None else DEPTH_COLUMNS))


def check_widths(widths: Sequence[int]) -> list[int]:
    """Validate a list of widths.

    Args:
        widths: model widths.

    Returns:
        The widths as a list of ints, in the given order.

    Raises:
        ValueError: if a width is not a positive int or fewer than two distinct widths are given.
        TypeError: if ``widths`` is not a sequence.
    """
    if isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence):
        raise TypeError(f"widths must be a sequence of ints, got {type(widths).__name__}")
    for w in widths:
        if isinstance(w, bool) or not isinstance(w, int) or w <= 0:
            raise ValueError(f"widths must be positive ints, got {w!r}")
    if len(set(widths)) < 2:
        raise ValueError(f"widths must hold at least two distinct widths, got {list(widths)}")
    return list(widths)


def check_axes(widths: Sequence[int], depths: Sequence[int] | None) -> tuple[list[int], list[int] | None]:
    """Validate the widths and depths of a check or sweep.

    Without depths, the widths are the varying axis (``check_widths``). With depths, at least
    two distinct depths vary and one width or more is enough (several widths: both axes vary).

    Args:
        widths: model widths.
        depths: numbers of residual blocks, or None.

    Returns:
        ``(widths, depths)`` as lists of ints (depths None when not given).

    Raises:
        ValueError: a width or depth that is not a positive int, no width, fewer than two distinct
            widths without depths, or fewer than two distinct depths.
        TypeError: if ``widths`` or ``depths`` is not a sequence.
    """
    if depths is None:
        return check_widths(widths), None
    return _positive_ints("widths", widths, 1), _positive_ints("depths", depths, 2)


def _positive_ints(name: str, values: Sequence[int], distinct: int) -> list[int]:
    """``values`` as a list, checked to hold positive ints, at least ``distinct`` of them distinct."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a sequence of ints, got {type(values).__name__}")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be positive ints, got {value!r}")
    if len(set(values)) < distinct:
        raise ValueError(f"{name} must hold at least {distinct} distinct value{'s' * (distinct > 1)}, "
                         f"got {list(values)}")
    return list(values)
