"""Long-horizon checks: record at log-spaced steps, and judge modules by how they behave over time."""
from __future__ import annotations

import pandas as pd
import pytest

from coord_checks.custom import log_spaced_steps
from coord_checks.recording import COLUMNS
from coord_checks.verdict import behaviour_over_time, judge

WIDTHS = (64, 128, 256, 512)
STEPS = log_spaced_steps(200)


def frame_over_time(slope_at: dict[str, callable]) -> pd.DataFrame:
    """A frame whose statistic is ``width**slope(step)`` exactly, per module."""
    rows = [("mup", width, 0, step, "y", module, "l1", (width / WIDTHS[0]) ** slope(step))
            for module, slope in slope_at.items() for step in STEPS for width in WIDTHS]
    return pd.DataFrame(rows, columns=list(COLUMNS))


SETTLES_AT_32 = {  # the readout of mup issue 71: grows with width for ~30 steps, then flat
    "hidden": lambda step: 0.0,
    "readout": lambda step: 1.0 if step < 32 else 0.02,
}


def test_log_spaced_steps_cover_the_run_at_a_fraction_of_the_cost():
    assert STEPS == [1, 2, 3, 4, 6, 8, 11, 16, 23, 32, 45, 64, 91, 128, 181, 200]
    assert log_spaced_steps(1) == [1] and log_spaced_steps(5, per_octave=1) == [1, 2, 4, 5]
    with pytest.raises(ValueError, match="last"):
        log_spaced_steps(0)


def test_grows_then_settles_passes_with_its_settle_step_where_every_step_judged_alone_fails():
    frame = frame_over_time(SETTLES_AT_32)
    assert not judge(frame).passed()  # the short-horizon rule: any growing step fails
    verdict = judge(frame, over_time=True)
    behaviour = verdict.behaviour().set_index("module")
    assert behaviour.loc["hidden", "behaviour"] == "flat"
    assert behaviour.loc["readout", "behaviour"] == "grows-then-settles"
    assert behaviour.loc["readout", "settle_step"] == 32
    assert behaviour.loc["readout", "peak_slope"] == pytest.approx(1.0, abs=1e-9)
    assert verdict.passed() and verdict.headline() == "PASS"
    text = verdict.format()
    assert "grows-then-settles" in text and "Over time (16 recorded steps, 1 to 200)" in text


@pytest.mark.parametrize("slope", [
    lambda step: 0.5,                                # grows with width at every step
    lambda step: 1.0 if step < 32 or step > 150 else 0.0,  # comes back late
    lambda step: 1.0 if step < 128 else 0.0,         # settles too late: only the last 2 steps
])
def test_keeps_growing_fails(slope):
    verdict = judge(frame_over_time({"hidden": lambda step: 0.0, "readout": slope}), over_time=True)
    behaviour = verdict.behaviour().set_index("module")
    assert behaviour.loc["readout", "behaviour"] == "keeps-growing"
    assert pd.isna(behaviour.loc["readout", "settle_step"])
    assert not verdict.passed() and verdict.headline() == "FAIL"


def test_settle_fraction_is_checked_and_sets_how_early_a_module_must_settle():
    table = judge(frame_over_time(SETTLES_AT_32)).table
    assert behaviour_over_time(table, settle_fraction=0.1).set_index("module").loc[
        "readout", "behaviour"] == "keeps-growing"  # 32 > 0.1 * 200
    with pytest.raises(ValueError, match="settle_fraction"):
        judge(frame_over_time(SETTLES_AT_32), over_time=True, settle_fraction=0.0)


def test_horizon_flag_records_log_spaced_steps_and_writes_the_over_time_table_and_figure(tmp_path, capsys):
    import torch

    from coord_checks.cli import main

    threads = torch.get_num_threads()
    try:
        status = main(["--horizon", "16", "--widths", "32", "64", "--seeds", "0", "--sequence", "y",
                       "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert status == 0
    assert "Over time (8 recorded steps, 1 to 16)" in capsys.readouterr().out
    frame = pd.read_csv(tmp_path / "coord_check_mlp_adamw.csv")
    assert sorted(frame["step"].unique()) == log_spaced_steps(16)
    behaviour = pd.read_csv(tmp_path / "coord_check_mlp_adamw_over_time.csv")
    assert set(behaviour["behaviour"]) <= {"flat", "grows-then-settles", "keeps-growing"}
    assert (tmp_path / "coord_check_mlp_adamw_over_time.png").stat().st_size > 0
