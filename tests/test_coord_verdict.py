"""The verdict is a pure function of the frame: synthetic frames with known width scaling."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from coord_checks.recording import COLUMNS
from coord_checks.verdict import Thresholds, classify, fit_width_scaling, judge, width_scaling

WIDTHS = (64, 128, 256, 512, 1024)


def synthetic_frame(slopes: dict[tuple[str, int], float], widths=WIDTHS, seeds=(0, 1),
                    parametrization: str = "mup", sequence: str = "y") -> pd.DataFrame:
    """A recording frame whose statistic is exactly ``c * width**slope`` for each (module, step)."""
    rows = []
    for (module, step), slope in slopes.items():
        for width in widths:
            for seed in seeds:
                rows.append((parametrization, width, seed, step, sequence, module, "l1",
                             0.7 * (width / widths[0]) ** slope))
    return pd.DataFrame(rows, columns=list(COLUMNS))


@pytest.mark.parametrize("slope", [-1.0, -0.3, 0.0, 0.05, 0.5, 1.0, 2.0])
def test_fit_recovers_power_law_slope_and_spread(slope):
    curve = pd.Series([3.0 * w**slope for w in WIDTHS], index=list(WIDTHS))
    fitted, spread = fit_width_scaling(curve)
    assert fitted == pytest.approx(slope, abs=1e-9)
    assert spread == pytest.approx(16.0 ** abs(slope), rel=1e-9)


def test_fit_treats_all_zero_as_flat_and_partial_zero_or_nan_as_broken():
    assert fit_width_scaling(pd.Series([0.0, 0.0, 0.0], index=[1, 2, 4])) == (0.0, 1.0)
    slope, spread = fit_width_scaling(pd.Series([0.0, 1.0, 2.0], index=[1, 2, 4]))
    assert math.isnan(slope) and spread == math.inf
    slope, spread = fit_width_scaling(pd.Series([1.0, float("nan"), 2.0], index=[1, 2, 4]))
    assert math.isnan(slope) and spread == math.inf


def test_fit_rejects_a_single_width():
    with pytest.raises(ValueError, match="two distinct widths"):
        fit_width_scaling(pd.Series([1.0, 1.0], index=[8, 8]))


@pytest.mark.parametrize(
    ("slope", "spread", "expected"),
    [(0.0, 1.0, "pass"), (0.09, 1.2, "pass"), (-0.09, 1.49, "pass"), (0.05, 1.6, "warn"),
     (0.2, 1.3, "warn"), (-0.8, 8.0, "warn"), (0.26, 1.2, "fail"), (1.0, 16.0, "fail"),
     (math.nan, math.inf, "fail")],
)
def test_classify_applies_default_thresholds(slope, spread, expected):
    assert classify(slope, spread) == expected


def test_judge_passes_flat_frame_and_fails_growing_module():
    flat = synthetic_frame({("hidden", 2): 0.0, ("readout", 2): 0.02})
    assert judge(flat).passed() and judge(flat).status() == "pass"
    growing = synthetic_frame({("hidden", 2): 0.0, ("readout", 2): 1.0})
    verdict = judge(growing)
    assert not verdict.passed()
    worst = verdict.worst(1)
    assert worst.loc[0, "module"] == "readout" and worst.loc[0, "slope"] == pytest.approx(1.0)


def test_shrinking_module_warns_without_failing():
    verdict = judge(synthetic_frame({("hidden", 2): -0.5}))
    assert verdict.status() == "warn"
    assert verdict.passed()
    assert verdict.headline() == "PASS (1 warning)"


def test_readout_and_attention_logits_at_init_are_reported_apart():
    frame = synthetic_frame({
        ("readout", 1): -0.5,
        ("blocks.0.attn.attn_logits", 1): -0.5,
        ("hidden", 1): 0.0,
        ("readout", 2): 0.0,
    })
    verdict = judge(frame)
    assert verdict.status() == "pass"
    assert set(verdict.at_init()["module"]) == {"readout", "blocks.0.attn.attn_logits"}
    assert "At initialisation" in verdict.format()
    # the same shrinkage one step later is judged
    later = synthetic_frame({("readout", 2): -0.5})
    assert judge(later).status() == "warn"
    # and growth of any other module at init is judged too
    assert not judge(synthetic_frame({("hidden", 1): 0.5})).passed()


def test_seeds_are_averaged_before_the_fit():
    frame = synthetic_frame({("hidden", 2): 0.0}, seeds=(0, 1))
    noise = np.where(frame["seed"] == 0, 0.5, 1.5)  # seed means stay exactly 0.7
    frame["value"] = frame["value"] * noise
    table = width_scaling(frame)
    assert table.loc[0, "slope"] == pytest.approx(0.0, abs=1e-12)
    assert table.loc[0, "spread"] == pytest.approx(1.0)


def test_verdict_is_split_by_parametrization_and_sequence():
    frame = pd.concat([
        synthetic_frame({("hidden", 2): 1.0}, parametrization="sp", sequence="x"),
        synthetic_frame({("hidden", 2): 0.0}, parametrization="mup", sequence="x"),
    ])
    verdict = judge(frame)
    assert verdict.passed("mup", "x") and not verdict.passed("sp", "x")
    assert not verdict.passed()
    summary = verdict.summary().set_index("parametrization")
    assert summary.loc["sp", "verdict"] == "FAIL" and summary.loc["mup", "verdict"] == "PASS"
    with pytest.raises(ValueError, match="no rows"):
        verdict.passed("mup", "y")


def test_custom_thresholds_change_the_judgement():
    frame = synthetic_frame({("hidden", 2): 0.2})
    assert judge(frame).status() == "warn"
    assert judge(frame, thresholds=Thresholds(pass_slope=0.3, pass_spread=2.0, fail_slope=0.5)).status() == "pass"
    assert judge(frame, thresholds=Thresholds(fail_slope=0.15)).status() == "fail"


@pytest.mark.parametrize("kwargs", [{"pass_slope": 0.0}, {"pass_spread": 1.0},
                                    {"pass_slope": 0.3, "fail_slope": 0.2}])
def test_thresholds_reject_inconsistent_limits(kwargs):
    with pytest.raises(ValueError):
        Thresholds(**kwargs)


def test_judge_names_a_missing_statistic():
    with pytest.raises(ValueError, match="'l2' not in frame"):
        judge(synthetic_frame({("hidden", 2): 0.0}), statistic="l2")
