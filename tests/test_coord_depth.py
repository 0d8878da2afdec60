"""Coordinate checks and lr sweeps across depth: the depth column, slopes against log2(depth), the
CLI's depth flags, and a tiny depth check that needs the depth scaling to pass.

The contrast test's bounds come from a measurement (the example Transformer, width 32, depths 2
and 8, base depth 2, one batch of 8 sequences, seed 0, AdamW-SF at lr 1e-2, steps 1-4): the
slope of the residual stream's mean |x| against log2(depth) was, at y,

    depth-unaware muP   0.089  0.396  0.411  0.292   (init, then after 1, 2, 3 updates)
    CompleteP          -0.018  0.001  0.021  0.054
    depth-muP           0.004  0.026  0.031  0.028

(x: within 0.02 of these). With the readout and query initialised to zero (``zero_init=True``)
the first update cannot reach the blocks, and depth-unaware muP reads 0.086 0.086 0.588 0.507,
CompleteP and depth-muP stay within 0.04 of 0. The test asks the verdict's own thresholds of it:
CompleteP and depth-muP pass (|slope| < 0.1 at every step), depth-unaware muP fails (slope > 0.25
after two updates, steps 3 and 4, under either initialisation).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

import mup_schedulefree as msf
from coord_checks import experiments, plots, transfer, verdict
from coord_checks.cli import PROG, main
from coord_checks.recording import COLUMNS, DEPTH_COLUMNS, record_coords

#: The tiny contrast check (see the module docstring).
TINY_CHECK = {"depths": (2, 8), "widths": (32,), "steps": 4, "seeds": (0,), "batch_size": 8}


@pytest.fixture
def restore_threads():
    """``main`` sets torch's intra-op threads; give the test process its own count back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def synthetic_frame(exponent: float, depths=(2, 4, 8, 16), widths=(64,)) -> pd.DataFrame:
    """A depth frame whose one statistic is depth ** exponent * width ** (exponent / 2), two seeds."""
    rows = [("mup", width, depth, seed, 2, "y", "residual", "l1", depth ** exponent * width ** (exponent / 2))
            for width in widths for depth in depths for seed in (0, 1)]
    return pd.DataFrame(rows, columns=list(DEPTH_COLUMNS))


def test_depth_frame_has_a_depth_column_after_width_and_one_model_per_width_and_depth():
    built, named = [], []

    def model_factory(width: int, depth: int) -> torch.nn.Module:
        built.append((width, depth))
        return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(depth)])

    def optimizer_factory(named_params, depth: int) -> torch.optim.Optimizer:
        pairs = list(named_params)
        named.append((depth, [name for name, _ in pairs]))
        return msf.SGDScheduleFree([p for _, p in pairs], lr=0.1)

    batch = (torch.randn(4, 8), torch.randn(4, 8))
    frame = record_coords(model_factory, optimizer_factory, widths=[8], depths=[1, 3], batches=[batch],
                          loss_fn=torch.nn.functional.mse_loss, steps=2)
    assert list(frame.columns) == list(DEPTH_COLUMNS)
    assert built == [(8, 1), (8, 3)]
    assert named == [(1, ["0.weight", "0.bias"]), (3, [f"{i}.{k}" for i in range(3) for k in ("weight", "bias")])]
    assert sorted(frame["depth"].unique()) == [1, 3] and set(frame["width"]) == {8}
    assert set(frame.loc[frame["depth"] == 1, "module"]) == {"0"}
    assert list(COLUMNS) == [c for c in DEPTH_COLUMNS if c != "depth"]


@pytest.mark.parametrize(("widths", "depths", "message"), [
    ([8], [2, 2], "depths must hold at least 2 distinct values"),
    ([8], [2, 0], "depths must be positive ints"),
    ([], [2, 4], "widths must hold at least 1 distinct value"),
    ([8], None, "widths must hold at least two distinct widths"),
])
def test_bad_depths_or_widths_are_errors_naming_them(widths, depths, message):
    with pytest.raises(ValueError, match=message):
        record_coords(lambda *a: torch.nn.Linear(8, 8), lambda *a, **k: None, widths=widths, depths=depths,
                      batches=[(torch.zeros(1, 8), torch.zeros(1, 8))], loss_fn=torch.nn.functional.mse_loss,
                      steps=2)


def test_judge_fits_the_slope_against_log2_depth_at_each_width():
    """Oracle: value = depth ** 0.5 * width ** 0.25, so the depth slope is 0.5 at each width (1e-12)."""
    judged = verdict.judge(synthetic_frame(0.5, widths=(32, 64)))
    assert judged.axis == "depth"
    table = judged.table
    assert list(table.columns) == [*verdict.GROUP_KEYS, "width", "slope", "spread", "n_depths", "status"]
    assert sorted(table["width"]) == [32, 64]
    assert np.allclose(table["slope"], 0.5, rtol=0, atol=1e-12)
    assert np.allclose(table["spread"], 8 ** 0.5, rtol=1e-12)  # (16 / 2) ** 0.5
    assert (table["n_depths"] == 4).all() and (table["status"] == "fail").all()
    assert "vs log2(depth)" in judged.format() and "Depth coordinate check verdict" in judged.format()


def test_judge_along_width_of_a_depth_frame_fits_width_at_each_depth():
    """Same oracle: the width slope is 0.25 at each depth."""
    table = verdict.judge(synthetic_frame(0.5, widths=(32, 64)), axis="width").table
    assert sorted(table["depth"]) == [2, 4, 8, 16]
    assert np.allclose(table["slope"], 0.25, rtol=0, atol=1e-12) and "n_widths" in table.columns


def test_frame_without_depth_judges_along_width_as_before_and_refuses_depth():
    frame = synthetic_frame(1.0, depths=(2,), widths=(32, 64, 128)).drop(columns="depth")
    judged = verdict.judge(frame)
    assert judged.axis == "width"
    assert list(judged.table.columns) == [*verdict.GROUP_KEYS, "slope", "spread", "n_widths", "status"]
    assert np.allclose(judged.table["slope"], 0.5, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="Invalid axis: 'depth'"):
        verdict.judge(frame, axis="depth")
    with pytest.raises(ValueError, match="Invalid axis: 'height'"):
        verdict.judge(frame, axis="height")


def test_judge_along_depth_leaves_out_modules_that_some_depths_lack():
    frame = synthetic_frame(0.0)
    deep_only = frame[frame["depth"] == 16].assign(module="blocks.15")
    table = verdict.judge(pd.concat([frame, deep_only], ignore_index=True)).table
    assert set(table["module"]) == {"residual"}


def test_plot_coords_puts_depth_on_the_x_axis_and_old_frames_keep_width():
    figure = plots.plot_coords(synthetic_frame(0.5))
    labels = {ax.get_xlabel() for ax in figure.axes}
    assert "depth (residual blocks)" in labels
    old = synthetic_frame(0.5, depths=(2,), widths=(32, 64)).drop(columns="depth")
    assert "width" in {ax.get_xlabel() for ax in plots.plot_coords(old).axes}


def test_depth_sweep_fits_one_optimum_per_depth_and_reports_drift_across_depths():
    """Oracle: loss = (log2 lr - c(depth)) ** 2 on a one-octave grid, c = -6 - 0.5 log2(depth): the
    parabola vertex is c exactly (1e-9), the drift 0.5 * log2(16 / 2) = 1.5 octaves, the trend -0.5."""
    rows = []
    for depth in (2, 4, 8, 16):
        centre = -6 - 0.5 * math.log2(depth)
        for log2_lr in range(-12, -1):
            rows.append(("completep", 64, depth, 2.0 ** log2_lr, log2_lr, 0, 10, 0.0,
                         (log2_lr - centre) ** 2, False))
    columns = list(transfer.SWEEP_COLUMNS)
    columns.insert(2, "depth")
    optima = transfer.fit_optima(pd.DataFrame(rows, columns=columns))
    assert sorted(optima["depth"]) == [2, 4, 8, 16]
    assert np.allclose(optima.sort_values("depth")["log2_lr_opt"], [-6.5, -7.0, -7.5, -8.0], atol=1e-9)
    drift = transfer.optimum_drift(optima, axis="depth")
    assert drift["drift_octaves"].item() == pytest.approx(1.5, abs=1e-9)
    assert drift["trend"].item() == pytest.approx(-0.5, abs=1e-9)
    assert drift["depth_ratio"].item() == 8.0 and drift["width"].item() == 64
    with pytest.raises(ValueError, match="Invalid axis: 'height'"):
        transfer.optimum_drift(optima, axis="height")


def test_depth_aware_model_at_the_base_depth_is_plain_mup_bit_for_bit():
    frame = experiments.run_depth_check(**{**TINY_CHECK, "depths": (2, 3), "steps": 3}, sequences=("y",))
    at_base = frame[frame["depth"] == 2]
    mup = at_base[at_base["parametrization"] == "mup"]["value"].to_numpy()
    completep = at_base[at_base["parametrization"] == "completep"]["value"].to_numpy()
    assert len(mup) > 0 and np.array_equal(mup, completep)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_depth_check_passes_with_depth_scaling_and_fails_without(alpha):
    """The residual stream entering the final LayerNorm: flat across depth under CompleteP and
    depth-muP, growing under depth-unaware muP (bounds from the measurement in the module docstring)."""
    frame = experiments.run_depth_check(**TINY_CHECK, depth_alpha=alpha)
    judged = verdict.judge(frame)
    residual = judged.table[judged.table["module"] == experiments.RESIDUAL]
    aware = residual[residual["parametrization"] == experiments.depth_label(alpha)]
    plain = residual[(residual["parametrization"] == "mup") & (residual["step"] >= 3)]
    assert len(aware) == 8 and len(plain) == 4  # y and x, at steps 1-4 / 3-4
    assert (aware["slope"].abs() < judged.thresholds.pass_slope).all(), aware
    assert (plain["slope"] > judged.thresholds.fail_slope).all(), plain
    assert judged.passed(experiments.depth_label(alpha)) and not judged.passed("mup")


@pytest.mark.parametrize(("argv", "message"), [
    (["--depths", "4"], "argument --depths: need at least two distinct depths, got [4]"),
    (["--depths", "2", "0"], "argument --depths: expected a positive integer, got 0"),
    (["--depths", "2", "4", "--model", "mlp"], "argument --depths: needs --model transformer"),
    (["--depths", "2", "4", "--depth-alpha", "0.7"], "argument --depth-alpha: expected 1 (CompleteP) or 0.5"),
    (["--depth-alpha", "1"], "argument --depth-alpha: only with --depths"),
    (["--base-depth", "2"], "argument --base-depth: only with --depths"),
    (["--depths", "2", "4", "--base-depth", "0"], "argument --base-depth: expected a positive integer, got 0"),
    (["--depths", "2", "4", "--widths", "30"], "argument --widths: transformer widths must be multiples of 4"),
    (["transfer", "--depths", "2", "4", "--wds", "0.1"], "argument --wds: not with --depths"),
    (["transfer", "--depths", "2"], "argument --depths: need at least two distinct depths"),
])
def test_bad_depth_flags_give_one_error_line_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(PROG) and message in lines[0], lines


def test_cli_depth_check_writes_a_depth_frame_and_exits_with_the_depth_aware_verdict(
        tmp_path, capsys, restore_threads):
    status = main(["--depths", "2", "8", "--widths", "32", "--steps", "4", "--seeds", "0", "--out",
                   str(tmp_path)])
    printed = capsys.readouterr().out
    assert status == 0
    assert "Depth coordinate check verdict: mup FAIL, completep PASS" in printed
    frame = pd.read_csv(tmp_path / "depth_coord_check_transformer_adamw.csv")
    assert list(frame.columns) == list(DEPTH_COLUMNS) and set(frame["depth"]) == {2, 8}
    table = pd.read_csv(tmp_path / "depth_coord_check_transformer_adamw_verdict.csv")
    assert "n_depths" in table.columns
    assert (tmp_path / "depth_coord_check_transformer_adamw.png").stat().st_size > 0


def test_cli_depth_transfer_writes_optima_per_depth_and_the_drift_across_depths(
        tmp_path, capsys, restore_threads):
    status = main(["transfer", "--depths", "1", "2", "--widths", "16", "--depth-alpha", "0.5", "--steps", "3",
                   "--lrs", "0.003", "0.01", "0.03", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert status == 0 and "Drift of the optimum across depths" in printed
    sweep = pd.read_csv(tmp_path / "depth_transfer_transformer_adamw.csv")
    assert set(sweep["parametrization"]) == {"mup", "depth-mup"} and set(sweep["depth"]) == {1, 2}
    assert len(sweep) == 2 * 2 * 3  # parametrizations x depths x lrs
    optima = pd.read_csv(tmp_path / "depth_transfer_transformer_adamw_optima.csv")
    assert sorted(optima["depth"]) == [1, 1, 2, 2]
    assert (tmp_path / "depth_transfer_transformer_adamw.png").stat().st_size > 0
