"""Learning-rate transfer: the optimum fit, and muP's optimum drifting less than SP's."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from coord_checks.experiments import run_transfer
from coord_checks.transfer import (
    SWEEP_COLUMNS,
    fit_optima,
    lr_grid,
    optimum_drift,
    parabola_vertex,
)


def quadratic_sweep(optima_log2: dict[tuple[str, int], float], grid=tuple(range(-10, -1)),
                    seeds=(0, 1)) -> pd.DataFrame:
    """A sweep frame whose loss is exactly ``2 + 0.1 * (log2 lr - optimum)**2``."""
    rows = []
    for (param, width), opt in optima_log2.items():
        for log2_lr in grid:
            for seed in seeds:
                loss = 2.0 + 0.1 * (log2_lr - opt) ** 2
                rows.append((param, width, 2.0**log2_lr, float(log2_lr), seed, 100, loss, loss, False))
    return pd.DataFrame(rows, columns=list(SWEEP_COLUMNS))


def test_lr_grid_is_log2_spaced_around_center():
    grid = lr_grid(0.01, octaves=2, points_per_octave=2)
    assert len(grid) == 9
    assert grid[4] == pytest.approx(0.01)
    assert np.diff(np.log2(grid)) == pytest.approx([0.5] * 8)
    with pytest.raises(ValueError, match="center"):
        lr_grid(0.0, 2)


def test_parabola_vertex_recovers_exact_minimum_and_clips_to_window():
    assert parabola_vertex([-7, -6, -5], [(x + 6.3) ** 2 for x in (-7, -6, -5)]) == pytest.approx(-6.3)
    assert parabola_vertex([-7, -6, -5], [(x + 9.0) ** 2 for x in (-7, -6, -5)]) == -7.0
    assert parabola_vertex([-7, -6, -5], [1.0, 2.0, 1.5]) == -7.0  # opens downwards: grid argmin
    with pytest.raises(ValueError, match="three points"):
        parabola_vertex([1, 2], [1, 2])


def test_fit_optima_finds_off_grid_optimum_and_drift():
    sweep = quadratic_sweep({("sp", 64): -5.3, ("sp", 1024): -8.6, ("mup", 64): -5.3, ("mup", 1024): -5.1})
    optima = fit_optima(sweep).set_index(["parametrization", "width"])
    assert optima.loc[("sp", 1024), "log2_lr_opt"] == pytest.approx(-8.6, abs=1e-9)
    assert optima.loc[("mup", 64), "lr_opt"] == pytest.approx(2.0**-5.3, rel=1e-9)
    assert not optima["at_edge"].any()
    drift = optimum_drift(fit_optima(sweep)).set_index("parametrization")
    assert drift.loc["sp", "drift_octaves"] == pytest.approx(3.3, abs=1e-9)
    assert drift.loc["mup", "drift_octaves"] == pytest.approx(0.2, abs=1e-9)
    assert drift.loc["sp", "trend"] == pytest.approx(-3.3 / 4, abs=1e-9)


def test_fit_optima_skips_diverged_runs_and_flags_grid_edge():
    sweep = quadratic_sweep({("sp", 64): -1.0, ("sp", 128): -6.0})
    diverged = (sweep["width"] == 128) & (sweep["log2_lr"] >= -5)
    sweep.loc[diverged, ["train_loss", "eval_loss"]] = math.nan
    sweep.loc[diverged, "diverged"] = True
    optima = fit_optima(sweep).set_index("width")
    assert optima.loc[64, "at_edge"]
    assert optima.loc[128, "grid_lr"] == pytest.approx(2.0**-6)
    assert -7.0 <= optima.loc[128, "log2_lr_opt"] <= -6.0


@pytest.mark.usefixtures("one_thread")
def test_mup_optimum_drifts_less_than_standard_parametrization():
    """AdamW-SF on the character MLP, widths 32..512 (16x), 100 steps, loss at x.

    Measured here: SP's optimum falls by about 2 octaves over the 16x (trend near -0.5 octave per
    doubling) while muP's moves by under 1. Tolerances: muP drifts at least 0.75 octave less, and
    SP's optimum shrinks by at least 0.3 octave per width doubling.
    """
    sweep = run_transfer("mlp", "adamw", widths=(32, 128, 512), lrs=lr_grid(0.01, octaves=3),
                         steps=100, seeds=(0,))
    assert not sweep["diverged"].all()
    optima = fit_optima(sweep)
    drift = optimum_drift(optima).set_index("parametrization")
    message = f"\n{optima}\n{drift}"
    assert drift.loc["mup", "drift_octaves"] < drift.loc["sp", "drift_octaves"] - 0.75, message
    assert drift.loc["sp", "trend"] < -0.3, message
    assert not drift["any_at_edge"].any(), message
