"""Judge a coordinate-check frame: do module statistics stay width-independent (or depth-independent)?

For every (parametrization, sequence, module, step) the statistic is first averaged over seeds at
each width; then

    slope  = least-squares slope of log2(statistic) against log2(width)
    spread = max over widths / min over widths

A slope of 0 means the statistic does not change with width; a slope of 1 means it doubles every
time the width doubles (the blow-up standard parametrization shows after one Adam step).

Default judgement (``Thresholds``): *pass* when |slope| < 0.1 and spread < 1.5; *fail* when
slope > 0.25 (or a value is not finite, or zero at some widths but not others); *warn* otherwise.
The overall verdict fails when any judged row fails; warnings are reported but do not fail it.
Growth is what muP exists to prevent, so only growth fails; a statistic that shrinks with width
is a warning (under muP, for instance, the attention logits of a zero-initialised query stay close
to zero for the first few steps and their early values shrink with width).
At the initialisation step (step 1) the readout and the attention logits are not judged: under
muP they legitimately shrink with width at init (or are exactly zero when zero-initialised). They
get status ``init`` and are reported apart.

Over a long run (steps recorded log-spaced up to, say, 200; ``judge(..., over_time=True)``) each
module is classified by how its width slope behaves across steps:

    flat                no judged step fails;
    grows-then-settles  some steps fail, and none from ``settle_step`` on, which lies in the first
                        ``settle_fraction`` (default half) of the run: a finite-width transient;
    keeps-growing       still failing in the last part of the run.

Only keeps-growing fails the check over time.

Across depth (a frame recorded with ``depths``, which has a ``depth`` column) the same judgement
runs against log2(depth) instead, at each width: ``judge(frame, axis="depth")``, the default when
the frame holds two depths or more. A slope of 1 then means the statistic doubles whenever the
number of residual blocks doubles. Only modules recorded at every depth are judged (a deeper model
has blocks a shallower one lacks). ``axis="width"`` judges a depth frame across widths, at each depth.

Everything here is a pure function of the frame produced by ``coord_checks.recording``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

#: Substrings of module names that are not judged at the initialisation step.
INIT_EXEMPT: tuple[str, ...] = ("readout", "attn_logits")
GROUP_KEYS: tuple[str, ...] = ("parametrization", "sequence", "module", "step")
_STATUS_RANK = {"fail": 3, "warn": 2, "pass": 1, "init": 0}
#: Behaviours over time, in increasing order of concern.
BEHAVIOURS: tuple[str, ...] = ("flat", "grows-then-settles", "keeps-growing")
MODULE_KEYS: tuple[str, ...] = ("parametrization", "sequence", "module")
#: The axes a frame can be judged along (the column whose log2 is the abscissa of the slope).
AXES: tuple[str, ...] = ("width", "depth")


@dataclass(frozen=True)
class Thresholds:
    """Pass/fail limits on the width scaling of one statistic.

    Attributes:
        pass_slope: pass needs |slope| below this.
        pass_spread: pass needs max/min across widths below this.
        fail_slope: a slope above this fails.
    """

    pass_slope: float = 0.1
    pass_spread: float = 1.5
    fail_slope: float = 0.25

    def __post_init__(self) -> None:
        if not self.pass_slope > 0:
            raise ValueError(f"pass_slope must be positive, got {self.pass_slope}")
        if not self.pass_spread > 1:
            raise ValueError(f"pass_spread must exceed 1, got {self.pass_spread}")
        if not self.fail_slope >= self.pass_slope:
            raise ValueError(
                f"fail_slope must be at least pass_slope={self.pass_slope}, got {self.fail_slope}"
            )


def fit_width_scaling(values_by_width: pd.Series) -> tuple[float, float]:
    """Slope of log2(value) against log2(width), and max/min spread, of one curve.

    Args:
        values_by_width: values indexed by width (at least two distinct widths).

    Returns:
        ``(slope, spread)``. A curve that is zero at every width gives ``(0.0, 1.0)``; a curve
        with a non-finite or negative value, or zero at only some widths, gives ``(nan, inf)``.

    Raises:
        ValueError: with fewer than two distinct widths.
    """
    widths = np.asarray(values_by_width.index, dtype=float)
    values = np.asarray(values_by_width.to_numpy(), dtype=float)
    if len(np.unique(widths)) < 2:
        raise ValueError(f"values_by_width needs at least two distinct widths, got {widths.tolist()}")
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        return math.nan, math.inf
    if np.all(values == 0):
        return 0.0, 1.0
    if np.any(values == 0):
        return math.nan, math.inf
    slope = float(np.polyfit(np.log2(widths), np.log2(values), 1)[0])
    return slope, float(values.max() / values.min())


def default_axis(frame: pd.DataFrame) -> str:
    """The axis a frame is judged along by default: ``"depth"`` if it holds two depths or more, else ``"width"``.

    Args:
        frame: a recording frame.

    Returns:
        ``"depth"`` or ``"width"``.
    """
    return "depth" if "depth" in frame.columns and frame["depth"].nunique() > 1 else "width"


def check_axis(frame: pd.DataFrame, axis: str | None) -> str:
    """Validate the axis to judge or plot ``frame`` along.

    Args:
        frame: a recording frame (or a judged table).
        axis: ``"width"``, ``"depth"`` or None (``default_axis``).

    Returns:
        The axis.

    Raises:
        ValueError: an axis not in ``AXES``, or ``"depth"`` for a frame without a ``depth`` column.
    """
    if axis is None:
        return default_axis(frame)
    if axis not in AXES:
        raise ValueError(f"Invalid axis: {axis!r} (must be one of {AXES})")
    if axis == "depth" and "depth" not in frame.columns:
        raise ValueError("Invalid axis: 'depth' (the frame has no depth column: record it with depths=[...])")
    return axis


def other_axis(frame: pd.DataFrame, axis: str) -> list[str]:
    """The other axis's column, as a group key, where the frame has it.

    Args:
        frame: a recording frame (or a judged table).
        axis: the judged axis.

    Returns:
        ``["depth"]`` or ``["width"]``, or ``[]`` (a width frame judged along width).
    """
    other = "depth" if axis == "width" else "width"
    return [other] if other in frame.columns else []


def width_scaling(frame: pd.DataFrame, statistic: str = "l1", axis: str = "width") -> pd.DataFrame:
    """Slope and spread across widths (or depths) for every (parametrization, sequence, module, step).

    Args:
        frame: a recording frame (columns of ``coord_checks.recording.COLUMNS``, or
            ``DEPTH_COLUMNS``).
        statistic: which statistic to judge.
        axis: ``"width"`` (slope against log2 width) or ``"depth"`` (against log2 depth, at each
            width; only modules recorded at every depth).

    Returns:
        One row per group with columns parametrization, sequence, module, step, slope, spread,
        n_widths, in the frame's module order; a frame with a depth column has the other axis's
        column after step (``depth`` when judged along width, ``width`` along depth), and along
        depth the count is ``n_depths``.

    Raises:
        ValueError: if the frame lacks columns or rows for ``statistic``, or for a bad ``axis``.
    """
    axis = check_axis(frame, axis)
    missing = {*GROUP_KEYS, "width", "statistic", "value"} - set(frame.columns)
    if missing:
        raise ValueError(f"frame lacks columns {sorted(missing)}")
    rows = frame[frame["statistic"] == statistic]
    if rows.empty:
        available = sorted(frame["statistic"].unique())
        raise ValueError(f"statistic {statistic!r} not in frame; it holds {available}")
    keys = [*GROUP_KEYS, *other_axis(frame, axis)]
    if axis == "depth":
        depths = rows["depth"].nunique()
        everywhere = rows.groupby("module", sort=False)["depth"].nunique() == depths
        rows = rows[rows["module"].map(everywhere)]
    means = rows.groupby([*keys, axis], sort=False)["value"].mean()
    records = []
    for key, curve in means.groupby(level=list(range(len(keys))), sort=False):
        slope, spread = fit_width_scaling(curve.droplevel(list(range(len(keys)))))
        records.append((*key, slope, spread, curve.size))
    return pd.DataFrame(records, columns=[*keys, "slope", "spread", f"n_{axis}s"])


def classify(
    slope: float,
    spread: float,
    thresholds: Thresholds = Thresholds(),
) -> str:
    """Status of one curve: ``"pass"``, ``"warn"`` or ``"fail"``.

    Args:
        slope: log2-log2 slope against width.
        spread: max/min across widths.
        thresholds: the limits.

    Returns:
        ``"fail"`` if the slope is not finite or exceeds ``fail_slope``; ``"pass"`` if |slope| <
        ``pass_slope`` and spread < ``pass_spread``; ``"warn"`` otherwise.
    """
    if not (math.isfinite(slope) and math.isfinite(spread)) or slope > thresholds.fail_slope:
        return "fail"
    if abs(slope) < thresholds.pass_slope and spread < thresholds.pass_spread:
        return "pass"
    return "warn"


def behaviour_over_time(table: pd.DataFrame, settle_fraction: float = 0.5) -> pd.DataFrame:
    """Classify each module's width scaling across the recorded steps.

    Args:
        table: a judged table (``Verdict.table``: one row per parametrization, sequence, module and
            step, with slope and status); ``init`` rows are ignored. A table judged along one axis
            of a frame that has both is classified per value of the other axis.
        settle_fraction: a module settles if no step fails from ``settle_step`` on and
            ``settle_step <= settle_fraction * last step``.

    Returns:
        One row per (parametrization, sequence, module, and the other axis where the table has
        it): ``behaviour`` (``flat``,
        ``grows-then-settles`` or ``keeps-growing``), ``settle_step`` (the first recorded step after
        the last failing one; empty for flat and keeps-growing), ``peak_step`` and ``peak_slope``
        (the largest width slope), ``final_slope``, ``final_status`` (the last step's status) and
        ``status`` (``fail`` for keeps-growing, else ``final_status``).

    Raises:
        ValueError: if ``settle_fraction`` is not in (0, 1].
    """
    if not 0 < settle_fraction <= 1:
        raise ValueError(f"settle_fraction must be in (0, 1], got {settle_fraction}")
    judged = table[table["status"] != "init"]
    keys = [*MODULE_KEYS, *[column for column in ("width", "depth") if column in table.columns]]
    records = []
    for key, rows in judged.groupby(keys, sort=False):
        rows = rows.sort_values("step")
        steps = rows["step"].to_numpy()
        failing = (rows["status"] == "fail").to_numpy()
        slopes = rows["slope"].to_numpy(dtype=float)
        peak = int(np.argmax(np.where(np.isfinite(slopes), slopes, np.inf)))
        settle_step = None
        if not failing.any():
            behaviour = "flat"
        else:
            after = steps[steps > steps[failing].max()]
            settled = len(after) > 0 and after[0] <= settle_fraction * steps[-1]
            behaviour = "grows-then-settles" if settled else "keeps-growing"
            settle_step = int(after[0]) if settled else None
        final_status = rows["status"].iloc[-1]
        records.append((*key, behaviour, settle_step, int(steps[peak]), float(slopes[peak]),
                        float(slopes[-1]), final_status,
                        "fail" if behaviour == "keeps-growing" else final_status))
    columns = [*keys, "behaviour", "settle_step", "peak_step", "peak_slope", "final_slope",
               "final_status", "status"]
    result = pd.DataFrame(records, columns=columns)
    result["settle_step"] = result["settle_step"].astype("Int64")
    return result


@dataclass(frozen=True)
class Verdict:
    """The judged table of a coordinate check.

    Attributes:
        table: one row per (parametrization, sequence, module, step) with slope, spread,
            n_widths and status (``pass``/``warn``/``fail``, or ``init`` for exempt rows).
        statistic: the statistic judged.
        thresholds: the limits used.
        over_time: judge each module by its behaviour over the steps (``behaviour_over_time``):
            only keeps-growing fails; warnings are those of the last step.
        settle_fraction: see ``behaviour_over_time``.
        axis: ``"width"`` or ``"depth"``: the slopes are against log2 of this column.
    """

    table: pd.DataFrame
    statistic: str
    thresholds: Thresholds
    over_time: bool = False
    settle_fraction: float = 0.5
    axis: str = "width"

    def behaviour(self) -> pd.DataFrame:
        """Each module's behaviour across steps.

        Returns:
            ``behaviour_over_time(self.table, self.settle_fraction)``.
        """
        return behaviour_over_time(self.table, self.settle_fraction)

    def _statuses(self, rows: pd.DataFrame) -> pd.Series:
        """The statuses that decide the selected rows: per step, or per module over time."""
        if self.over_time:
            return behaviour_over_time(rows, self.settle_fraction)["status"]
        return rows["status"]

    def _rows(self, parametrization: str | None, sequence: str | None) -> pd.DataFrame:
        rows = self.table
        if parametrization is not None:
            rows = rows[rows["parametrization"] == parametrization]
        if sequence is not None:
            rows = rows[rows["sequence"] == sequence]
        if rows.empty:
            raise ValueError(
                f"no rows for parametrization={parametrization!r}, sequence={sequence!r}"
            )
        return rows

    def status(self, parametrization: str | None = None, sequence: str | None = None) -> str:
        """Worst judged status of the selected rows.

        Args:
            parametrization: restrict to one parametrization label (default: all).
            sequence: restrict to ``"y"`` or ``"x"`` (default: both).

        Returns:
            ``"fail"`` if any judged row fails, else ``"warn"`` if any warns, else ``"pass"``.
        """
        ranks = [_STATUS_RANK[s] for s in self._statuses(self._rows(parametrization, sequence))]
        worst = max(ranks, default=_STATUS_RANK["pass"])
        return {3: "fail", 2: "warn"}.get(worst, "pass")

    def passed(self, parametrization: str | None = None, sequence: str | None = None) -> bool:
        """The overall pass/fail: True unless a judged row of the selection fails.

        Warnings (a statistic that shrinks with width, or grows by less than ``fail_slope``) do not
        fail the check; they are listed by ``format`` and counted by ``summary``.

        Args:
            parametrization: restrict to one parametrization label (default: all).
            sequence: restrict to ``"y"`` or ``"x"`` (default: both).

        Returns:
            Whether no judged row fails.
        """
        return self.status(parametrization, sequence) != "fail"

    def headline(self, parametrization: str | None = None, sequence: str | None = None) -> str:
        """One-word verdict of the selected rows, with the warning count.

        Args:
            parametrization: restrict to one parametrization label (default: all).
            sequence: restrict to ``"y"`` or ``"x"`` (default: both).

        Returns:
            ``"PASS"``, ``"PASS (n warnings)"`` or ``"FAIL"``.
        """
        rows = self._rows(parametrization, sequence)
        if not self.passed(parametrization, sequence):
            return "FAIL"
        warnings = int((self._statuses(rows) == "warn").sum())
        return f"PASS ({warnings} warning{'s' * (warnings != 1)})" if warnings else "PASS"

    def summary(self) -> pd.DataFrame:
        """Per (parametrization, sequence): verdict and counts of pass/warn/fail rows (over time:
        of flat, grows-then-settles and keeps-growing modules)."""
        records = []
        if self.over_time:
            behaviour = self.behaviour()
            for (param, seq), rows in behaviour.groupby(["parametrization", "sequence"], sort=False):
                counts = rows["behaviour"].value_counts()
                records.append({"parametrization": param, "sequence": seq,
                                "verdict": self.headline(param, seq),
                                **{b: int(counts.get(b, 0)) for b in BEHAVIOURS},
                                "max final |slope|": _max_abs(rows["final_slope"])})
            return pd.DataFrame(records)
        for (param, seq), rows in self.table.groupby(["parametrization", "sequence"], sort=False):
            counts = rows["status"].value_counts()
            records.append(
                {
                    "parametrization": param,
                    "sequence": seq,
                    "verdict": self.headline(param, seq),
                    **{s: int(counts.get(s, 0)) for s in ("pass", "warn", "fail")},
                    "max |slope|": _max_abs(rows.loc[rows["status"] != "init", "slope"]),
                }
            )
        return pd.DataFrame(records)

    def worst(self, n: int = 3) -> pd.DataFrame:
        """The ``n`` worst modules per (parametrization, sequence), each at its worst step.

        Args:
            n: modules to list per group.

        Returns:
            Rows of ``table`` ordered by status (fail, warn, pass) and then by |slope|.
        """
        judged = self.table[self.table["status"] != "init"].copy()
        judged["_rank"] = judged["status"].map(_STATUS_RANK)
        judged["_size"] = judged["slope"].abs().fillna(math.inf)
        judged = judged.sort_values(["_rank", "_size"], ascending=False, kind="stable")
        per_module = judged.drop_duplicates(["parametrization", "sequence", "module"])
        top = per_module.groupby(["parametrization", "sequence"], sort=False).head(n)
        return top.drop(columns=["_rank", "_size"]).reset_index(drop=True)

    def at_init(self) -> pd.DataFrame:
        """The exempt rows (readout and attention logits at the initialisation step)."""
        return self.table[self.table["status"] == "init"].reset_index(drop=True)

    def format(self, n_worst: int = 3) -> str:
        """A readable report: overall verdict, per-group summary, worst modules, init rows.

        Args:
            n_worst: modules listed per (parametrization, sequence).

        Returns:
            Multi-line text.
        """
        t, axis = self.thresholds, self.axis
        lines = [
            ("Coordinate check verdict: " if axis == "width" else "Depth coordinate check verdict: ")
            + ", ".join(f"{p} {self.headline(p)}" for p in self.table["parametrization"].unique()),
            f"  statistic {self.statistic!r}; slope of log2(statistic) vs log2({axis}), spread = "
            f"max/min over {axis}s; pass: |slope| < {t.pass_slope:g} and spread < "
            f"{t.pass_spread:g}; fail: slope > {t.fail_slope:g}; warn: anything between",
            "",
            _to_text(self.summary()),
            "",
        ]
        if self.over_time:
            behaviour = self.behaviour()
            steps = sorted(self.table["step"].unique())
            shown = behaviour[behaviour["behaviour"] != "flat"].copy()
            shown["_rank"] = shown["behaviour"].map(BEHAVIOURS.index)
            shown = shown.sort_values(["_rank", "peak_slope"], ascending=False, kind="stable")
            shown = shown.groupby(["parametrization", "sequence"], sort=False).head(n_worst)
            lines += [
                f"Over time ({len(steps)} recorded steps, {steps[0]} to {steps[-1]}): modules that grow "
                f"with {axis} at some step (up to {n_worst} per parametrization and sequence; "
                f"{int((behaviour['behaviour'] == 'flat').sum())} flat not shown); only keeps-growing fails:",
                _to_text(shown.drop(columns=["_rank", "status"])),
            ]
        else:
            lines += [
                f"Worst modules (up to {n_worst} per parametrization and sequence, at their worst step):",
                _to_text(self.worst(n_worst)),
            ]
        init = self.at_init()
        if not init.empty:
            lines += ["", "At initialisation (not judged; muP readout/attention logits shrink or are zero):",
                      _to_text(init)]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def judge(
    frame: pd.DataFrame,
    statistic: str = "l1",
    thresholds: Thresholds = Thresholds(),
    init_exempt: Sequence[str] = INIT_EXEMPT,
    init_step: int = 1,
    over_time: bool = False,
    settle_fraction: float = 0.5,
    axis: str | None = None,
) -> Verdict:
    """Judge a recording frame.

    Args:
        frame: a recording frame (columns of ``coord_checks.recording.COLUMNS``) with at least two
            widths, or one recorded across depths (``DEPTH_COLUMNS``) with at least two depths.
        statistic: the statistic to judge (``"l1"``, mean absolute value, by default).
        thresholds: pass/fail limits.
        init_exempt: substrings of module names not judged at ``init_step``.
        init_step: the step recorded at initialisation (1 in ``record_coords`` frames).
        over_time: judge modules by their behaviour across steps, for a long run recorded at
            log-spaced steps (see ``behaviour_over_time``): only a module that keeps growing with
            width fails.
        settle_fraction: see ``behaviour_over_time``.
        axis: judge slopes against log2 ``"width"`` or log2 ``"depth"`` (at each width); default
            ``default_axis(frame)``: depth when the frame holds two depths or more.

    Returns:
        A ``Verdict``.

    Raises:
        ValueError: for a frame without the columns or the statistic, or a bad ``axis``.
    """
    axis = check_axis(frame, axis)
    table = width_scaling(frame, statistic, axis)
    status = [classify(s, r, thresholds) for s, r in zip(table["slope"], table["spread"])]
    exempt = (table["step"] == init_step) & table["module"].map(
        lambda name: any(pattern in name for pattern in init_exempt)
    )
    table["status"] = np.where(exempt, "init", status)
    verdict = Verdict(table=table, statistic=statistic, thresholds=thresholds, over_time=over_time,
                      settle_fraction=settle_fraction, axis=axis)
    verdict.behaviour()  # validates settle_fraction now, not at the first report
    return verdict


def _max_abs(values: pd.Series) -> float:
    values = values.abs()
    return math.inf if values.isna().any() else float(values.max()) if len(values) else math.nan


def _to_text(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "  (none)"
    return frame.to_string(index=False, float_format=lambda v: f"{v:.3f}")
