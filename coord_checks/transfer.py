"""Learning-rate transfer: does the best learning rate at the small width stay best at the large one?

``sweep_learning_rates`` trains one model per (width, learning rate, seed) for a fixed number of
steps with a schedule-free optimizer (no learning-rate schedule) and evaluates the loss at the
evaluation point x (``optimizer.eval()``) on held-out batches. Schedule-free training has no
horizon, so the same runs can be evaluated at several step counts (``eval_steps``: an *anytime*
sweep, one row per step), which tells how the optimum moves with the training length. ``fit_optima`` locates the optimum
per width as the vertex of a parabola fitted to the seed-mean loss against log2(lr) around the
grid minimum; ``optimum_drift`` reports how far that optimum moves across widths, in octaves
(factors of two of the learning rate). Under muP the drift should be small; under standard
parametrization with Adam-like optimizers the optimum moves to smaller rates as width grows.

Across depth (``depths=``: numbers of residual blocks) every (width, depth) pair is a model, the
sweep frame has a ``depth`` column after ``width``, ``fit_optima`` fits one optimum per (width,
depth) and ``optimum_drift(..., axis="depth")`` reports the drift across depths.
"""
from __future__ import annotations

import itertools
import logging
import math
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from coord_checks.data import Batch
from coord_checks.recording import check_axes, rng_devices, take_step

logger = logging.getLogger(__name__)

SWEEP_COLUMNS: tuple[str, ...] = (
    "parametrization", "width", "lr", "log2_lr", "seed", "step", "train_loss", "eval_loss", "diverged"
)
#: Columns a drift is measured along (the abscissa of its trend).
DRIFT_AXES: tuple[str, ...] = ("width", "depth")


def lr_grid(center: float, octaves: int, points_per_octave: int = 1) -> list[float]:
    """A log2-spaced learning-rate grid centred on ``center``.

    Args:
        center: the middle learning rate.
        octaves: the grid spans ``center * 2**-octaves`` to ``center * 2**octaves``.
        points_per_octave: grid points per factor of two.

    Returns:
        ``2 * octaves * points_per_octave + 1`` increasing learning rates.

    Raises:
        ValueError: for a non-positive ``center``, negative ``octaves`` or non-positive
            ``points_per_octave``.
    """
    if not center > 0:
        raise ValueError(f"center must be positive, got {center}")
    if octaves < 0:
        raise ValueError(f"octaves must be non-negative, got {octaves}")
    if points_per_octave < 1:
        raise ValueError(f"points_per_octave must be at least 1, got {points_per_octave}")
    n = octaves * points_per_octave
    return [center * 2.0 ** (i / points_per_octave) for i in range(-n, n + 1)]


def train_and_evaluate(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_batches: Sequence[Batch],
    eval_batches: Sequence[Batch],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    steps: int,
) -> tuple[float, float]:
    """Train for ``steps`` steps, then evaluate at the schedule-free x point.

    The evaluation runs with ``model.eval()``: a model with BatchNorm needs its running
    statistics recalibrated at x first (``mup_schedulefree.recalibrate_batchnorm``); the example
    text models have none.

    Args:
        model: the network, on the batches' device.
        optimizer: a schedule-free optimizer (train mode; ``eval()`` is called at the end).
        train_batches: step ``t`` uses ``train_batches[t % len(train_batches)]``.
        eval_batches: held-out batches, averaged at the end.
        loss_fn: ``(model_output, targets) -> scalar loss``.
        steps: optimizer steps.

    Returns:
        ``(train_loss, eval_loss)``: the mean training loss over the last quarter of the steps
        and the held-out loss at x; both ``nan`` if training diverged (a non-finite loss).
    """
    (_, train_loss, eval_loss), = train_and_evaluate_at(
        model, optimizer, train_batches, eval_batches, loss_fn, [steps])
    return train_loss, eval_loss


def _evaluate_at_x(model: nn.Module, optimizer: torch.optim.Optimizer,
                   eval_sets: Mapping[str, Sequence[Batch]],
                   loss_fn: Callable[[Tensor, Tensor], Tensor]) -> dict[str, float]:
    if hasattr(optimizer, "eval"):
        optimizer.eval()
    model.eval()
    losses = {}
    with torch.no_grad():
        for name, batches in eval_sets.items():
            value = float(torch.stack([loss_fn(model(x), y) for x, y in batches]).mean())
            losses[name] = value if math.isfinite(value) else math.nan
    return losses


def train_and_evaluate_at(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_batches: Sequence[Batch],
    eval_batches: Sequence[Batch],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    eval_steps: Sequence[int],
) -> list[tuple[int, float, float]]:
    """Train to ``max(eval_steps)`` and evaluate at x after each of ``eval_steps`` steps, in one run.

    An evaluation before the last switches to x (``optimizer.eval()``, ``model.eval()``), measures,
    switches back, and restores every parameter and buffer bit for bit, so the run goes on exactly
    as if it had not been evaluated.

    Args:
        model: the network, on the batches' device.
        optimizer: a schedule-free optimizer in train mode (left in eval mode at the end).
        train_batches: step ``t`` uses ``train_batches[t % len(train_batches)]``.
        eval_batches: held-out batches, averaged.
        loss_fn: ``(model_output, targets) -> scalar loss``.
        eval_steps: positive step counts.

    Returns:
        ``(step, train_loss, eval_loss)`` per evaluation step, increasing: the mean training loss
        over the last quarter of the steps so far and the held-out loss at x; ``nan`` from the
        step where training diverged (a non-finite loss) on.

    Raises:
        ValueError: for an empty ``eval_steps`` or a non-positive step.
    """
    return [(step, train_loss, losses["eval"]) for step, train_loss, losses in train_and_evaluate_sets(
        model, optimizer, train_batches, {"eval": eval_batches}, loss_fn, eval_steps)]


def train_and_evaluate_sets(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_batches: Sequence[Batch],
    eval_sets: Mapping[str, Sequence[Batch]],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    eval_steps: Sequence[int],
) -> list[tuple[int, float, dict[str, float]]]:
    """``train_and_evaluate_at`` with several named held-out sets (e.g. validation and test).

    Args:
        model: the network, on the batches' device.
        optimizer: a schedule-free optimizer in train mode (left in eval mode at the end); one
            whose step needs the loss gets it (see ``coord_checks.recording.take_step``).
        train_batches: step ``t`` uses ``train_batches[t % len(train_batches)]``.
        eval_sets: ``{name: held-out batches}``, each averaged on its own.
        loss_fn: ``(model_output, targets) -> scalar loss``.
        eval_steps: positive step counts.

    Returns:
        ``(step, train_loss, {name: loss at x})`` per evaluation step, increasing; ``nan`` losses
        from the step where training diverged (a non-finite loss) on.

    Raises:
        ValueError: for an empty ``eval_steps`` or a non-positive step, or no held-out set.
    """
    targets = sorted(set(eval_steps))
    if not targets or any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in targets):
        raise ValueError(f"eval_steps must be positive ints, got {list(eval_steps)}")
    if not eval_sets:
        raise ValueError("eval_sets must name at least one held-out set")
    model.train()
    if hasattr(optimizer, "train"):
        optimizer.train()
    losses: list[Tensor] = []
    results = []
    for step in range(targets[-1]):
        inputs, labels = train_batches[step % len(train_batches)]
        loss = loss_fn(model(inputs), labels)
        if not torch.isfinite(loss):
            done = {t for t, _, _ in results}
            failed = {name: math.nan for name in eval_sets}
            return results + [(t, math.nan, dict(failed)) for t in targets if t not in done]
        losses.append(loss.detach())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        take_step(optimizer, loss)
        if step + 1 not in targets:
            continue
        tail = max(1, (step + 1) // 4)
        train_loss = float(torch.stack(losses[-tail:]).mean())
        if step + 1 == targets[-1]:
            results.append((step + 1, train_loss, _evaluate_at_x(model, optimizer, eval_sets, loss_fn)))
            break
        tensors = [*model.parameters(), *model.buffers()]
        saved = [t.detach().clone() for t in tensors]
        results.append((step + 1, train_loss, _evaluate_at_x(model, optimizer, eval_sets, loss_fn)))
        model.train()
        if hasattr(optimizer, "train"):
            optimizer.train()
        with torch.no_grad():
            for t, value in zip(tensors, saved):
                t.copy_(value)
    return results


def sweep_learning_rates(
    model_factory: Callable[[int], nn.Module],
    optimizer_factory: Callable[[Iterable[nn.Parameter], float], torch.optim.Optimizer],
    widths: Sequence[int],
    lrs: Sequence[float],
    train_batches: Sequence[Batch],
    eval_batches: Sequence[Batch],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    steps: int,
    seeds: Sequence[int] = (0,),
    device: str | torch.device = "cpu",
    parametrization: str = "mup",
    progress: bool = False,
    eval_steps: Sequence[int] | None = None,
    weight_decays: Sequence[float] | None = None,
    depths: Sequence[int] | None = None,
) -> pd.DataFrame:
    """Train every (width, lr, seed), or (width, depth, lr, seed), for a fixed budget and record the held-out loss at x.

    Args:
        model_factory: ``width -> model`` with base shapes set; the global generator is seeded
            with ``torch.manual_seed(seed)`` before each call (and restored on return). With
            ``depths``: ``(width, depth) -> model``.
        optimizer_factory: ``(params, lr) -> optimizer``; with ``depths`` it is called as
            ``(model.named_parameters(), lr, depth=depth)`` (a depth rule needs the names).
        widths: at least two distinct positive widths; with ``depths``, at least one.
        lrs: learning rates, ideally log2-spaced (see ``lr_grid``).
        train_batches: training batches, cycled.
        eval_batches: held-out batches.
        loss_fn: ``(model_output, targets) -> scalar loss``.
        steps: optimizer steps per run.
        seeds: initialisation seeds.
        device: where to train.
        parametrization: label stored in the ``parametrization`` column.
        progress: show a tqdm progress bar over runs (on a terminal).
        eval_steps: step counts at which every run is also evaluated at x (an anytime sweep);
            ``steps`` is always one of them.
        weight_decays: if given, a second grid axis: ``optimizer_factory`` is called as
            ``(params, lr, weight_decay=wd)`` for every ``wd`` (see ``fit_joint_optima``).
        depths: numbers of residual blocks, at least two distinct (default None: width only).

    Returns:
        A DataFrame with columns ``SWEEP_COLUMNS`` (with ``depth`` after ``width`` when depths are
        swept, and ``weight_decay`` after ``log2_lr`` when weight decays are), one row per
        evaluation (``diverged`` marks runs whose loss became non-finite by then; their losses are
        ``nan``).

    Raises:
        ValueError: for bad widths or depths, an empty or non-positive lr grid, ``steps < 1``, missing
            batches, ``eval_steps`` outside 1 .. ``steps``, or a negative or empty weight-decay grid.
    """
    widths, depths = check_axes(widths, depths)
    if not lrs or any(not lr > 0 for lr in lrs):
        raise ValueError(f"lrs must be a non-empty list of positive rates, got {list(lrs)}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not train_batches or not eval_batches:
        raise ValueError("train_batches and eval_batches must each hold at least one batch")
    if not seeds:
        raise ValueError("seeds must hold at least one seed")
    eval_at = sorted({*(eval_steps or ()), steps})
    if any(isinstance(t, bool) or not isinstance(t, int) or not 1 <= t <= steps for t in eval_at):
        raise ValueError(f"eval_steps must be ints in 1..{steps}, got {list(eval_steps or ())}")
    if weight_decays is not None and (not weight_decays or any(not wd >= 0 for wd in weight_decays)):
        raise ValueError(f"weight_decays must be a non-empty list of non-negative numbers, got {weight_decays}")
    device = torch.device(device)
    train_batches = [(x.to(device), y.to(device)) for x, y in train_batches]
    eval_batches = [(x.to(device), y.to(device)) for x, y in eval_batches]

    records = []
    runs = list(itertools.product(widths, [None] if depths is None else depths, lrs,
                                  [None] if weight_decays is None else weight_decays, seeds))
    bar = tqdm(runs, desc=f"lr sweep [{parametrization}]", leave=False,
               disable=None if progress else True)
    with torch.random.fork_rng(devices=rng_devices(device)):
        for width, depth, lr, wd, seed in bar:
            torch.manual_seed(seed)
            decay = {} if wd is None else {"weight_decay": wd}
            if depth is None:
                model = model_factory(width).to(device)
                optimizer = optimizer_factory(model.parameters(), lr, **decay)
            else:
                model = model_factory(width, depth).to(device)
                optimizer = optimizer_factory(model.named_parameters(), lr, depth=depth, **decay)
            at = (width,) if depth is None else (width, depth)
            for step, train_loss, eval_loss in train_and_evaluate_at(
                model, optimizer, train_batches, eval_batches, loss_fn, eval_at
            ):
                records.append((parametrization, *at, lr, math.log2(lr), *decay.values(), seed, step,
                                train_loss, eval_loss, math.isnan(eval_loss)))
    columns = list(SWEEP_COLUMNS)
    if depths is not None:
        columns.insert(columns.index("width") + 1, "depth")
    if weight_decays is not None:
        columns.insert(columns.index("log2_lr") + 1, "weight_decay")
    return pd.DataFrame(records, columns=columns)


def parabola_vertex(log2_lrs: Sequence[float], losses: Sequence[float]) -> float:
    """Vertex of the least-squares parabola through (log2 lr, loss) points.

    Args:
        log2_lrs: at least three abscissae.
        losses: the matching losses.

    Returns:
        The abscissa of the minimum, clipped to the range of ``log2_lrs``; the abscissa of the
        smallest loss if the fitted parabola does not open upwards.

    Raises:
        ValueError: with fewer than three points.
    """
    xs = np.asarray(log2_lrs, dtype=float)
    ys = np.asarray(losses, dtype=float)
    if len(xs) < 3:
        raise ValueError(f"need at least three points for a parabola, got {len(xs)}")
    a, b, _ = np.polyfit(xs, ys, 2)
    if not a > 0:
        return float(xs[np.argmin(ys)])
    return float(np.clip(-b / (2 * a), xs.min(), xs.max()))


def fit_optima(sweep: pd.DataFrame, half_window: int = 1, loss: str = "eval_loss",
               by: Sequence[str] = ("parametrization",), warn_at_edge: bool = True) -> pd.DataFrame:
    """Optimal learning rate per (parametrization, width) from a sweep frame.

    The loss is averaged over seeds at each learning rate; diverged runs count as infinitely bad.
    The parabola is fitted to the grid minimum and its ``half_window`` neighbours on each side
    (fewer at the grid's edge or next to diverged points; with fewer than three finite points
    the grid minimum itself is reported).

    Args:
        sweep: a frame from ``sweep_learning_rates``.
        half_window: neighbours on each side of the grid minimum used in the fit.
        loss: which loss column to use.
        by: the columns that, with ``width`` (and ``depth``, in a sweep across depth), make one
            curve (``("role",)`` for a diagnosis, ``("parametrization", "step")`` for an anytime sweep).
        warn_at_edge: log a warning for each optimum at the edge of the grid.

    Returns:
        One row per (``*by``, width), or (``*by``, width, depth): ``grid_lr`` (the grid minimum), ``log2_lr_opt`` and
        ``lr_opt`` (the parabola vertex), ``best_loss`` and ``at_edge`` (True when the grid
        minimum lies on the grid's first or last point, so the optimum may lie outside the grid).

    Raises:
        ValueError: if ``half_window < 1``, a width has no finite loss, or the sweep holds several
            steps or weight decays and ``by`` does not include that column.
    """
    if half_window < 1:
        raise ValueError(f"half_window must be at least 1, got {half_window}")
    by = list(by)
    for column in ("step", "weight_decay"):
        if column in sweep.columns and column not in by and sweep[column].nunique() > 1:
            raise ValueError(f"sweep holds several {column} values {sorted(sweep[column].unique())}: pass "
                             f"by=(..., {column!r}), select one, or use fit_joint_optima")
    points = ["width", *(["depth"] if "depth" in sweep.columns and "depth" not in by else [])]
    records = []
    for key, rows in sweep.groupby([*by, *points], sort=False):
        labels, at = key[:len(by)], dict(zip(points, key[len(by):]))
        where = ", ".join(f"{column}={label!r}" for column, label in zip(by, labels))
        width = ", ".join(f"{value}" if column == "width" else f"{column} {value}" for column, value in at.items())
        curve = rows.groupby("log2_lr")[loss].mean().sort_index()
        finite = curve[np.isfinite(curve.to_numpy())]
        if finite.empty:
            raise ValueError(f"no finite {loss} for {where}, width={width}")
        i = int(np.argmin(curve.fillna(np.inf).to_numpy()))
        window = curve.iloc[max(0, i - half_window) : i + half_window + 1]
        window = window[np.isfinite(window.to_numpy())]
        log2_grid = float(curve.index[i])
        vertex = parabola_vertex(window.index, window.to_numpy()) if len(window) >= 3 else log2_grid
        at_edge = i in (0, len(curve) - 1)
        if at_edge and warn_at_edge:
            logger.warning("optimum for %s, width %s is at the edge of the lr grid", where, width)
        records.append(
            {
                **dict(zip(by, labels)),
                **at,
                "grid_lr": 2.0**log2_grid,
                "log2_lr_opt": vertex,
                "lr_opt": 2.0**vertex,
                "best_loss": float(curve.iloc[i]),
                "at_edge": at_edge,
            }
        )
    return pd.DataFrame(records)


def optimum_drift(optima: pd.DataFrame, by: Sequence[str] = ("parametrization",),
                  axis: str = "width") -> pd.DataFrame:
    """How far the optimal learning rate moves across widths (or depths), per parametrization.

    Args:
        optima: a frame from ``fit_optima``.
        by: the columns of one curve, as given to ``fit_optima``.
        axis: ``"width"`` or ``"depth"``: the drift across this column's values (optima from a
            sweep across depth have both columns; the other axis is then a group key too).

    Returns:
        One row per parametrization (per value of ``by``, and of the other axis where the optima
        have both): ``drift_octaves`` (max minus min of log2 lr_opt across widths), ``trend``
        (least-squares slope of log2 lr_opt against log2 width; about -1 means the optimum halves
        whenever the width doubles), ``width_ratio`` (largest over smallest width) and
        ``any_at_edge``; along depth, the same against depth, with ``depth_ratio``.

    Raises:
        ValueError: an ``axis`` not in ``DRIFT_AXES`` or not a column of ``optima``.
    """
    if axis not in DRIFT_AXES or axis not in optima.columns:
        raise ValueError(f"Invalid axis: {axis!r} (must be one of {DRIFT_AXES} and a column of the optima)")
    other = "depth" if axis == "width" else "width"
    by = [*by, *([other] if other in optima.columns and other not in by else [])]
    records = []
    for key, rows in optima.groupby(by, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        log2_w = np.log2(rows[axis].to_numpy(dtype=float))
        log2_lr = rows["log2_lr_opt"].to_numpy(dtype=float)
        trend = float(np.polyfit(log2_w, log2_lr, 1)[0]) if len(rows) >= 2 else math.nan
        records.append(
            {
                **dict(zip(by, key)),
                "drift_octaves": float(log2_lr.max() - log2_lr.min()),
                "trend": trend,
                f"{axis}_ratio": float(rows[axis].max() / rows[axis].min()),
                "any_at_edge": bool(rows["at_edge"].any()),
            }
        )
    return pd.DataFrame(records)


def fit_joint_optima(sweep: pd.DataFrame, by: Sequence[str] = ("parametrization",),
                     loss: str = "eval_loss") -> pd.DataFrame:
    """Joint optimum of learning rate and weight decay per width, from a 2-D sweep.

    The seed-mean loss is minimised over the (lr, weight decay) grid; the learning rate is then
    refined by ``fit_optima``'s parabola along the lr axis at the best weight decay. The weight
    decay is reported as its grid value.

    Args:
        sweep: a frame from ``sweep_learning_rates(..., weight_decays=...)``.
        by: the columns that, with ``width``, make one grid.
        loss: which loss column to use.

    Returns:
        One row per (``*by``, width): ``weight_decay_opt``, ``grid_lr``, ``log2_lr_opt``, ``lr_opt``,
        ``best_loss``, ``at_edge`` (the lr optimum at the lr grid's edge) and ``wd_at_edge`` (the
        best weight decay is the grid's smallest or largest and the grid has more than one).

    Raises:
        ValueError: if the sweep has no ``weight_decay`` column or a grid has no finite loss.
    """
    if "weight_decay" not in sweep.columns:
        raise ValueError("sweep has no weight_decay column: sweep with weight_decays=[...]")
    by = list(by)
    records = []
    for key, rows in sweep.groupby([*by, "width"], sort=False):
        surface = rows.groupby(["weight_decay", "lr"])[loss].mean()
        finite = surface[np.isfinite(surface.to_numpy())]
        if finite.empty:
            raise ValueError(f"no finite {loss} for {dict(zip([*by, 'width'], key))}")
        best_wd = float(finite.idxmin()[0])
        line = rows[rows["weight_decay"] == best_wd].drop(columns="weight_decay")
        optimum = fit_optima(line, by=by, loss=loss).iloc[0].to_dict()
        decays = sorted(rows["weight_decay"].unique())
        records.append({**optimum, "weight_decay_opt": best_wd,
                        "wd_at_edge": len(decays) > 1 and best_wd in (decays[0], decays[-1])})
    columns = [*by, "width", "weight_decay_opt", "grid_lr", "log2_lr_opt", "lr_opt", "best_loss",
               "at_edge", "wd_at_edge"]
    return pd.DataFrame(records)[columns]


def joint_drift(joint: pd.DataFrame, by: Sequence[str] = ("parametrization",)) -> pd.DataFrame:
    """How far the joint (lr, weight decay) optimum moves across widths.

    Args:
        joint: a frame from ``fit_joint_optima``.
        by: its grouping columns.

    Returns:
        ``optimum_drift``'s columns for the learning rate, plus ``wd_drift_octaves`` (log2 of the
        largest over the smallest optimal weight decay; ``inf`` if it is 0 at some widths only,
        0 if it is 0 at all) and ``wd_opt_range`` (smallest and largest, as text).
    """
    drift = optimum_drift(joint, by=by)
    extra = []
    for _, rows in joint.groupby(list(by), sort=False):
        decays = rows["weight_decay_opt"].to_numpy(dtype=float)
        low, high = float(decays.min()), float(decays.max())
        octaves = 0.0 if high == low else (math.inf if low == 0 else math.log2(high / low))
        extra.append((octaves, f"{low:g} .. {high:g}"))
    drift["wd_drift_octaves"] = [octaves for octaves, _ in extra]
    drift["wd_opt_range"] = [text for _, text in extra]
    return drift
