"""Plots are functions of the frames: layout, log axes, PNG output, no global style changes."""
from __future__ import annotations

import matplotlib
import pandas as pd
import pytest
from matplotlib.figure import Figure

from coord_checks.plots import pick_steps, plot_coords, plot_transfer, save_figure
from coord_checks.recording import COLUMNS
from coord_checks.transfer import SWEEP_COLUMNS, fit_optima


def coords_frame(steps=(1, 2, 3, 4, 5, 6)) -> pd.DataFrame:
    rows = [(param, w, 0, step, seq, module, "l1", 1.0 + (param == "sp") * w * step / 64)
            for param in ("mup", "sp") for w in (64, 128, 256) for step in steps
            for seq in ("y", "x") for module in ("input", "hidden", "readout")]
    return pd.DataFrame(rows, columns=list(COLUMNS))


def test_pick_steps_keeps_first_and_last():
    assert pick_steps(range(1, 11), 4) == [1, 4, 7, 10]
    assert pick_steps([3, 1, 2], 5) == [1, 2, 3]
    with pytest.raises(ValueError, match="max_panels"):
        pick_steps([1], 0)


def test_coord_figure_has_sp_and_mup_side_by_side_with_a_panel_per_step_and_sequence(tmp_path):
    before = dict(matplotlib.rcParams)
    fig = plot_coords(coords_frame(), max_steps=3, title="t")
    assert dict(matplotlib.rcParams) == before
    assert isinstance(fig, Figure)
    titles = [sub.get_suptitle() for sub in fig.subfigs]
    assert titles == ["standard parametrization (SP)", "muP"]
    axes = [ax for sub in fig.subfigs for ax in sub.axes]
    assert len(axes) == 2 * 2 * 3  # parametrizations x sequences x steps
    assert all(ax.get_xscale() == "log" and ax.get_yscale() == "log" for ax in axes)
    assert {ax.get_title() for ax in axes} == {f"{s}, step {t}" for s in "yx" for t in (1, 3, 6)}
    assert all(len(ax.get_lines()) == 3 for ax in axes)  # one line per module
    path = save_figure(fig, tmp_path / "sub" / "coords.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_transfer_figure_has_a_line_per_width_and_marks_optima():
    rows = [(p, w, 2.0**k, float(k), 0, 100, 0.0, 2 + 0.1 * (k + 6) ** 2, False)
            for p in ("sp", "mup") for w in (64, 256) for k in range(-9, -2)]
    sweep = pd.DataFrame(rows, columns=list(SWEEP_COLUMNS))
    before = dict(matplotlib.rcParams)
    fig = plot_transfer(sweep, fit_optima(sweep))
    assert dict(matplotlib.rcParams) == before
    assert [ax.get_title() for ax in fig.axes] == ["standard parametrization (SP)", "muP"]
    for ax in fig.axes:
        labels = [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]
        assert labels == ["width 64", "width 256"]
        assert ax.get_xscale() == "log"


def test_plot_coords_names_a_missing_statistic():
    with pytest.raises(ValueError, match="'std' not in frame"):
        plot_coords(coords_frame(), statistic="std")
