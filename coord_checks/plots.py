"""Pictures of coordinate-check and transfer frames (matplotlib only, no global style changes).

Every function builds its own ``matplotlib.figure.Figure`` (no pyplot state, no ``rcParams``
writes), so it is safe to call from libraries, tests and headless machines alike; style tweaks are
scoped with ``matplotlib.rc_context``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import matplotlib
import matplotlib.lines
import matplotlib.ticker
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from coord_checks.verdict import check_axis

_STYLE = {"font.size": 8, "axes.titlesize": 8, "legend.fontsize": 7, "axes.grid": True,
          "grid.alpha": 0.3}
_PARAM_TITLES = {"sp": "standard parametrization (SP)", "mup": "muP"}
#: Panel titles of a depth check or sweep, whose contrast is depth-unaware muP.
_DEPTH_TITLES = {"mup": "muP, depth-unaware", "completep": "CompleteP (alpha = 1)",
                 "depth-mup": "depth-muP (alpha = 1/2)"}
_SEQUENCE_TITLES = {"y": "y (training point)", "x": "x (evaluation point)"}


def pick_steps(steps: Sequence[int], max_panels: int) -> list[int]:
    """Up to ``max_panels`` steps, evenly spread and always including the first and last.

    Args:
        steps: available steps.
        max_panels: most steps to return (at least 1).

    Returns:
        Sorted distinct steps.

    Raises:
        ValueError: if ``max_panels < 1`` or ``steps`` is empty.
    """
    if max_panels < 1:
        raise ValueError(f"max_panels must be at least 1, got {max_panels}")
    ordered = sorted(set(int(s) for s in steps))
    if not ordered:
        raise ValueError("steps must not be empty")
    if len(ordered) <= max_panels:
        return ordered
    picks = np.linspace(0, len(ordered) - 1, max_panels).round().astype(int)
    return [ordered[i] for i in sorted(set(picks.tolist()))]


def _ordered(values: pd.Series, preferred: Sequence[str]) -> list[str]:
    present = list(dict.fromkeys(values))
    return [v for v in preferred if v in present] + [v for v in present if v not in preferred]


def at_largest_other(frame: pd.DataFrame, axis: str) -> tuple[pd.DataFrame, str]:
    """The rows of ``frame`` at the largest value of the axis that is not drawn, and a note naming it.

    Args:
        frame: a recording or sweep frame.
        axis: the drawn axis, ``"width"`` or ``"depth"``.

    Returns:
        ``(rows, note)``: all rows and ``""`` when the other axis is absent or single-valued, else
        the rows at its largest value and e.g. ``"width 64"``.
    """
    other = "depth" if axis == "width" else "width"
    if other not in frame.columns or frame[other].nunique() < 2:
        return frame, ""
    largest = frame[other].max()
    return frame[frame[other] == largest], f"{other} {largest}"


def _titles(axis: str) -> dict[str, str]:
    return _DEPTH_TITLES if axis == "depth" else _PARAM_TITLES


def plot_coords(
    frame: pd.DataFrame,
    statistic: str = "l1",
    max_steps: int = 4,
    title: str | None = None,
    axis: str | None = None,
) -> Figure:
    """Coordinate-check figure: statistic against width (or depth), one line per module.

    Layout: one block per parametrization side by side (SP left, muP right; across depth,
    depth-unaware muP left); inside each block a row per sequence (y, then x) and a panel per step.
    Both axes are logarithmic (base 2 for width or depth); lines are the mean over seeds. Flat lines
    mean width-independent (depth-independent) activations.

    Args:
        frame: a recording frame (``coord_checks.recording.COLUMNS`` or ``DEPTH_COLUMNS``).
        statistic: which statistic to draw.
        max_steps: most step panels per row (steps are spread evenly, first and last kept).
        title: figure title.
        axis: the abscissa, ``"width"`` or ``"depth"`` (default: depth when the frame holds two
            depths or more). A frame that varies along both is drawn at the other axis's largest value.

    Returns:
        The figure.

    Raises:
        ValueError: if the frame has no rows for ``statistic``, or for a bad ``axis``.
    """
    axis = check_axis(frame, axis)
    rows = frame[frame["statistic"] == statistic]
    if rows.empty:
        raise ValueError(f"statistic {statistic!r} not in frame")
    rows, fixed = at_largest_other(rows, axis)
    titles = _titles(axis)
    params = _ordered(rows["parametrization"], ("sp", "mup"))
    sequences = _ordered(rows["sequence"], ("y", "x"))
    steps = pick_steps(rows["step"].unique(), max_steps)
    modules = list(dict.fromkeys(rows["module"]))
    palette = matplotlib.colormaps["tab10" if len(modules) <= 10 else "tab20"]
    n_colours = 10 if len(modules) <= 10 else 20
    styles = {
        m: {"color": palette(i % n_colours), "ls": ("-", "--", ":")[(i // n_colours) % 3]}
        for i, m in enumerate(modules)
    }
    keys = ["parametrization", "sequence", "step", "module"]
    means = rows.groupby([*keys, axis], sort=False)["value"].mean()
    curves = {
        key: curve.droplevel(keys)
        for key, curve in means.groupby(level=list(range(len(keys))), sort=False)
    }

    with matplotlib.rc_context(_STYLE):
        legend_columns = 1 if len(modules) <= 24 else 2
        legend_height = 0.16 * math.ceil(len(modules) / legend_columns) + 0.6
        fig = Figure(
            figsize=(2.1 * len(steps) * len(params) + 1.2 + 1.6 * legend_columns,
                     max(2.0 * len(sequences) + 1.0, legend_height)),
            layout="constrained",
        )
        subfigs = np.atleast_1d(fig.subfigures(1, len(params), wspace=0.03))
        for subfig, param in zip(subfigs, params):
            subfig.suptitle(titles.get(param, param) + (f", {fixed}" if fixed else ""), fontweight="bold")
            axes = subfig.subplots(len(sequences), len(steps), sharex=True, sharey="row", squeeze=False)
            for r, seq in enumerate(sequences):
                for c, step in enumerate(steps):
                    ax = axes[r, c]
                    for module in modules:
                        curve = curves.get((param, seq, step, module))
                        if curve is None:
                            continue
                        ax.plot(curve.index, curve.to_numpy(), marker=".", lw=1.0, ms=3,
                                label=module, **styles[module])
                    ax.set_xscale("log", base=2)
                    ax.set_yscale("log", nonpositive="mask")
                    ax.set_title(f"{seq}, step {step}")
                    if r == len(sequences) - 1:
                        ax.set_xlabel("depth (residual blocks)" if axis == "depth" else "width")
                    if c == 0:
                        ax.set_ylabel(f"{_SEQUENCE_TITLES.get(seq, seq)}\nmean {statistic}")
        handles = {m: matplotlib.lines.Line2D([], [], marker=".", lw=1.0, **styles[m])
                   for m in modules}
        fig.legend(handles.values(), handles.keys(), loc="outside right center",
                   ncols=legend_columns, title="module")
        if title:
            fig.suptitle(title)
    return fig


def plot_over_time(
    table: pd.DataFrame,
    fail_slope: float = 0.25,
    title: str | None = None,
    axis: str = "width",
) -> Figure:
    """Width (or depth) slope of every module against the step, for a long run recorded at log-spaced steps.

    One panel per parametrization (columns, SP left) and sequence (rows). A line above the dashed
    fail threshold at the end of the run keeps growing with width; one that comes down and stays
    below it settles.

    Args:
        table: a judged table (``Verdict.table``); ``init`` rows are left out.
        fail_slope: the threshold drawn (``Thresholds.fail_slope``).
        title: figure title.
        axis: the judged axis (``Verdict.axis``), for the labels; a table judged along depth at
            several widths is drawn at the largest width.

    Returns:
        The figure.
    """
    rows, fixed = at_largest_other(table[table["status"] != "init"], axis)
    titles = _titles(axis)
    params = _ordered(rows["parametrization"], ("sp", "mup"))
    sequences = _ordered(rows["sequence"], ("y", "x"))
    modules = list(dict.fromkeys(rows["module"]))
    palette = matplotlib.colormaps["tab10" if len(modules) <= 10 else "tab20"]
    n_colours = 10 if len(modules) <= 10 else 20
    styles = {m: {"color": palette(i % n_colours), "ls": ("-", "--", ":")[(i // n_colours) % 3]}
              for i, m in enumerate(modules)}
    with matplotlib.rc_context(_STYLE):
        fig = Figure(figsize=(max(3.6 * len(params) + 1.8, 8.0), 2.2 * len(sequences) + 0.8),
                     layout="constrained")
        axes = fig.subplots(len(sequences), len(params), sharex=True, sharey=True, squeeze=False)
        for c, param in enumerate(params):
            for r, seq in enumerate(sequences):
                ax = axes[r, c]
                selected = rows[(rows["parametrization"] == param) & (rows["sequence"] == seq)]
                for module, curve in selected.groupby("module", sort=False):
                    curve = curve.sort_values("step")
                    ax.plot(curve["step"], curve["slope"], marker=".", ms=3, lw=1.0, **styles[module])
                ax.axhline(fail_slope, color="firebrick", ls="--", lw=0.9)
                ax.axhline(0.0, color="black", lw=0.6)
                ax.set_xscale("log", base=2)
                ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
                ax.set_title(f"{titles.get(param, param)}, {seq}" + (f", {fixed}" if fixed else ""))
                if r == len(sequences) - 1:
                    ax.set_xlabel("step")
                if c == 0:
                    ax.set_ylabel(f"{axis} slope of log2(statistic)")
        handles = [matplotlib.lines.Line2D([], [], marker=".", lw=1.0, **styles[m]) for m in modules]
        handles.append(matplotlib.lines.Line2D([], [], color="firebrick", ls="--", lw=0.9))
        fig.legend(handles, [*modules, f"fail above {fail_slope:g}"], loc="outside right center",
                   ncols=1 if len(modules) <= 24 else 2, title="module")
        if title:
            fig.suptitle(title)
    return fig


def plot_transfer(
    sweep: pd.DataFrame,
    optima: pd.DataFrame | None = None,
    loss: str = "eval_loss",
    title: str | None = None,
    panel: str = "parametrization",
    axis: str = "width",
) -> Figure:
    """Learning-rate transfer figure: loss against learning rate, one line per width (or depth).

    One panel per parametrization (SP left, muP right), or per value of ``panel``, sharing the y axis. Lines are the mean
    over seeds; diverged runs are left out. With ``optima`` (from ``fit_optima``) each width's
    fitted optimum is marked with a star and a dotted vertical line.

    Args:
        sweep: a frame from ``coord_checks.transfer.sweep_learning_rates``.
        optima: optional frame from ``coord_checks.transfer.fit_optima``.
        loss: which loss column to draw.
        title: figure title.
        panel: the column whose values get a panel each (``"role"`` for a
            ``coord_checks.diagnose`` sweep, whose learning rate is that of one role).
        axis: the column with a line per value, ``"width"`` or ``"depth"`` (a sweep across depth,
            with a ``depth`` column; one that varies along both is drawn at the largest width).

    Returns:
        The figure.

    Raises:
        ValueError: for a bad ``axis``.
    """
    axis = check_axis(sweep, axis)
    sweep, fixed = at_largest_other(sweep, axis)
    if optima is not None:
        optima, _ = at_largest_other(optima, axis)
    titles = _titles(axis)
    params = _ordered(sweep[panel], ("sp", "mup"))
    points = sorted(sweep[axis].unique())
    cmap = matplotlib.colormaps["viridis"]
    colours = {v: cmap(0.85 * i / max(len(points) - 1, 1)) for i, v in enumerate(points)}
    curves = sweep.groupby([panel, axis, "lr"])[loss].mean()
    finite = curves[np.isfinite(curves.to_numpy())]
    low = float(finite.min()) if len(finite) else 0.0
    high = float(finite.quantile(0.9)) if len(finite) else 1.0
    span = max(high - low, 1e-3)

    with matplotlib.rc_context(_STYLE):
        fig = Figure(figsize=(max(min(4.2, 14.0 / len(params)) * len(params) + 1.0, 7.5), 3.4),
                     layout="constrained")
        axes = np.atleast_1d(fig.subplots(1, len(params), sharey=True))
        for ax, param in zip(axes, params):
            for point in points:
                if (param, point) not in curves.index:
                    continue
                curve = curves.loc[(param, point)]
                ax.plot(curve.index, curve.to_numpy(), marker="o", ms=3, lw=1.2,
                        color=colours[point], label=f"{axis} {point}")
                if optima is not None:
                    match = optima[(optima[panel] == param) & (optima[axis] == point)]
                    for _, row in match.iterrows():
                        ax.axvline(row["lr_opt"], color=colours[point], ls=":", lw=1.0)
                        ax.plot([row["lr_opt"]], [row["best_loss"]], marker="*", ms=9,
                                color=colours[point], mec="black", mew=0.5)
            ax.set_xscale("log", base=2)
            if panel == "parametrization":
                base = "base depth" if axis == "depth" and param != "mup" else "base width"
                ax.set_xlabel(f"learning rate ({base})" if param != "sp" else "learning rate")
                ax.set_title(titles.get(param, param) + (f", {fixed}" if fixed else ""), fontweight="bold")
            else:
                ax.set_xlabel(f"learning rate of the {param} parameters")
                ax.set_title(f"{panel} {param}", fontweight="bold")
            ax.legend(loc="upper left")
        axes[0].set_ylabel(f"{loss.replace('_', ' ')} at x")
        axes[0].set_ylim(low - 0.05 * span, high + 0.25 * span)
        if title:
            fig.suptitle(title)
    return fig


def plot_anytime(optima: pd.DataFrame, title: str | None = None, axis: str = "width") -> Figure:
    """Anytime transfer figure: the optimal learning rate against the training length, one line per width (or depth).

    One panel per parametrization (SP left), sharing the y axis. Lines that lie on top of each other
    mean the optimum transfers across widths at every horizon; a line's slope shows how the optimum
    moves as training gets longer. Hollow markers are optima at the edge of the lr grid.

    Args:
        optima: ``coord_checks.transfer.fit_optima(sweep, by=("parametrization", "step"))``.
        title: figure title.
        axis: the column with a line per value, ``"width"`` or ``"depth"`` (optima of a sweep across
            depth; one that varies along both is drawn at the largest width).

    Returns:
        The figure.

    Raises:
        ValueError: for a bad ``axis``.
    """
    axis = check_axis(optima, axis)
    optima, fixed = at_largest_other(optima, axis)
    titles = _titles(axis)
    params = _ordered(optima["parametrization"], ("sp", "mup"))
    widths = sorted(optima[axis].unique())
    cmap = matplotlib.colormaps["viridis"]
    colours = {w: cmap(0.85 * i / max(len(widths) - 1, 1)) for i, w in enumerate(widths)}
    with matplotlib.rc_context(_STYLE):
        fig = Figure(figsize=(max(3.8 * len(params) + 1.0, 7.5), 3.2), layout="constrained")
        axes = np.atleast_1d(fig.subplots(1, len(params), sharey=True))
        for ax, param in zip(axes, params):
            for width in widths:
                rows = optima[(optima["parametrization"] == param) & (optima[axis] == width)]
                rows = rows.sort_values("step")
                if rows.empty:
                    continue
                ax.plot(rows["step"], rows["lr_opt"], lw=1.2, color=colours[width], label=f"{axis} {width}")
                edge = rows["at_edge"].to_numpy(dtype=bool)
                ax.plot(rows["step"][~edge], rows["lr_opt"][~edge], "o", ms=4, color=colours[width])
                ax.plot(rows["step"][edge], rows["lr_opt"][edge], "o", ms=5, mfc="none", color=colours[width])
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
            ax.set_xlabel("training steps (evaluated at x)")
            ax.set_title(titles.get(param, param) + (f", {fixed}" if fixed else ""), fontweight="bold")
            ax.legend(loc="best")
        axes[0].set_ylabel("optimal learning rate")
        if title:
            fig.suptitle(title)
    return fig


def plot_lr_wd(sweep: pd.DataFrame, joint: pd.DataFrame | None = None, loss: str = "eval_loss",
               title: str | None = None) -> Figure:
    """Learning rate x weight decay figure: a loss heat map per parametrization (rows) and width (columns).

    Darker is lower loss, on one colour scale for the whole figure (clipped at the 90th percentile
    so that diverged corners do not wash it out; diverged cells are left white). With ``joint``
    (from ``coord_checks.transfer.fit_joint_optima``) the grid cell of each joint optimum is
    starred: stars in the same cell across a row mean the pair transfers.

    Args:
        sweep: a frame from ``sweep_learning_rates(..., weight_decays=...)``.
        joint: optional joint optima.
        loss: which loss column to draw.
        title: figure title.

    Returns:
        The figure.
    """
    params = _ordered(sweep["parametrization"], ("sp", "mup"))
    widths = sorted(sweep["width"].unique())
    lrs = sorted(sweep["lr"].unique())
    decays = sorted(sweep["weight_decay"].unique())
    surfaces = sweep.groupby(["parametrization", "width", "weight_decay", "lr"])[loss].mean()
    finite = surfaces[np.isfinite(surfaces.to_numpy())]
    low = float(finite.min()) if len(finite) else 0.0
    high = float(finite.quantile(0.9)) if len(finite) else 1.0
    with matplotlib.rc_context(_STYLE):
        fig = Figure(figsize=(2.6 * len(widths) + 1.6, 2.2 * len(params) + 0.8), layout="constrained")
        axes = fig.subplots(len(params), len(widths), sharex=True, sharey=True, squeeze=False)
        image = None
        for r, param in enumerate(params):
            for c, width in enumerate(widths):
                ax = axes[r, c]
                grid = np.full((len(decays), len(lrs)), np.nan)
                for (wd, lr), value in surfaces.get((param, width), pd.Series(dtype=float)).items():
                    grid[decays.index(wd), lrs.index(lr)] = value
                image = ax.imshow(np.ma.masked_invalid(grid), origin="lower", aspect="auto",
                                  cmap="viridis", vmin=low, vmax=max(high, low + 1e-6))
                if joint is not None:
                    match = joint[(joint["parametrization"] == param) & (joint["width"] == width)]
                    for _, row in match.iterrows():
                        column = int(np.argmin(np.abs(np.log2(lrs) - math.log2(row["grid_lr"]))))
                        ax.plot([column], [decays.index(row["weight_decay_opt"])],
                                marker="*", ms=11, color="white", mec="black", mew=0.6)
                ax.set_title(f"{_PARAM_TITLES.get(param, param)}, width {width}")
                ax.grid(False)
                if r == len(params) - 1:
                    ax.set_xticks(range(len(lrs)), [f"{lr:.2g}" for lr in lrs], rotation=60)
                    ax.set_xlabel("learning rate")
                if c == 0:
                    ax.set_yticks(range(len(decays)), [f"{wd:g}" for wd in decays])
                    ax.set_ylabel("weight decay")
        if image is not None:
            fig.colorbar(image, ax=axes, shrink=0.8, label=f"{loss.replace('_', ' ')} at x")
        if title:
            fig.suptitle(title)
    return fig


def plot_study(summary: pd.DataFrame, step: int | None = None, title: str | None = None) -> Figure:
    """"Does muP pay off?" figure from ``coord_checks.study.summarize``: two panels over width.

    Left: test loss at x against width, with the seed spread as error bars: SP tuned at every
    width (black) and each muP variant at the learning rate tuned at the base width. Right: the
    learning rate each side uses (SP's optimum moves, muP's is fixed) and, dotted, muP's own optimum
    at each width.

    Args:
        summary: a frame from ``coord_checks.study.summarize``.
        step: the horizon to draw (default: the largest).
        title: figure title.

    Returns:
        The figure.

    Raises:
        ValueError: if the summary is empty or has no row at ``step``.
    """
    if summary.empty:
        raise ValueError("summary is empty: nothing to plot")
    step = int(summary["step"].max()) if step is None else step
    rows = summary[summary["step"] == step]
    if rows.empty:
        raise ValueError(f"step: the summary has no rows at step {step}")
    variants = list(dict.fromkeys(rows["variant"]))
    cmap = matplotlib.colormaps["tab10"]
    with matplotlib.rc_context(_STYLE):
        fig = Figure(figsize=(8.0, 3.4), layout="constrained")
        loss_ax, lr_ax = fig.subplots(1, 2)
        sp_drawn = set()
        for i, variant in enumerate(variants):
            part = rows[rows["variant"] == variant].sort_values("width")
            colour = cmap(i % 10)
            sp_key = tuple(part["sp_test"].round(12))
            if sp_key not in sp_drawn:
                sp_drawn.add(sp_key)
                label = "SP, tuned at every width" + ("" if len(sp_drawn) == 1 else f" ({variant})")
                loss_ax.errorbar(part["width"], part["sp_test"], yerr=part["sp_test_std"], color="black",
                                 marker="s", ms=4, lw=1.2, capsize=2, ls="-" if len(sp_drawn) == 1 else "--",
                                 label=label)
                lr_ax.plot(part["width"], part["sp_log2_lr"], color="black", marker="s", ms=4, lw=1.2,
                           ls="-" if len(sp_drawn) == 1 else "--", label=label)
            loss_ax.errorbar(part["width"], part["mup_test"], yerr=part["mup_test_std"], color=colour,
                             marker="o", ms=4, lw=1.2, capsize=2, label=f"muP {variant}, tuned at base width")
            lr_ax.plot(part["width"], part["mup_log2_lr"], color=colour, marker="o", ms=4, lw=1.2,
                       label=f"muP {variant}: lr used")
            lr_ax.plot(part["width"], part["mup_log2_lr_opt"], color=colour, ls=":", lw=1.0)
        for ax in (loss_ax, lr_ax):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("width")
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        loss_ax.set_ylabel(f"test loss at x after {step} steps")
        loss_ax.set_title("loss: seed mean +/- std", fontweight="bold")
        lr_ax.set_ylabel("log2 learning rate (base lr for muP)")
        lr_ax.set_title("learning rate used (dotted: muP's optimum)", fontweight="bold")
        loss_ax.legend(loc="best")
        if title:
            fig.suptitle(title)
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Write a figure as PNG, creating the folder if needed.

    Args:
        fig: the figure.
        path: file path (``.png``).
        dpi: resolution.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path

