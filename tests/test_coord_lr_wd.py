"""Learning rate x weight decay: the joint optimum per width and its drift, from a 2-D sweep."""
from __future__ import annotations

import math
import os

import pandas as pd
import pytest
import torch

from coord_checks.cli import PROG, main
from coord_checks.plots import plot_lr_wd
from coord_checks.transfer import SWEEP_COLUMNS, fit_joint_optima, fit_optima, joint_drift

DECAYS = (0.0, 0.01, 0.1, 1.0)


def bowl(optima: dict[int, tuple[float, float]]) -> pd.DataFrame:
    """A 2-D sweep whose loss is ``2 + 0.1 (log2 lr - a)^2 + 0.2 [wd != b]`` at width w: (a, b) = optima[w]."""
    columns = list(SWEEP_COLUMNS)
    columns.insert(columns.index("log2_lr") + 1, "weight_decay")
    rows = []
    for width, (log2_opt, wd_opt) in optima.items():
        for k in range(-10, -1):
            for wd in DECAYS:
                loss = 2.0 + 0.1 * (k - log2_opt) ** 2 + 0.2 * (wd != wd_opt)
                rows.append(("mup", width, 2.0**k, float(k), wd, 0, 100, loss, loss, False))
    return pd.DataFrame(rows, columns=columns)


def test_joint_optimum_per_width_and_its_drift():
    sweep = bowl({64: (-6.3, 0.01), 256: (-6.1, 0.1), 1024: (-5.3, 0.1)})
    joint = fit_joint_optima(sweep).set_index("width")
    assert joint.loc[64, "weight_decay_opt"] == 0.01 and joint.loc[1024, "weight_decay_opt"] == 0.1
    assert joint.loc[256, "log2_lr_opt"] == pytest.approx(-6.1, abs=1e-9)
    assert not joint["at_edge"].any() and not joint["wd_at_edge"].any()
    drift = joint_drift(fit_joint_optima(sweep)).iloc[0]
    assert drift["drift_octaves"] == pytest.approx(1.0, abs=1e-9)
    assert drift["wd_drift_octaves"] == pytest.approx(math.log2(10)) and drift["wd_opt_range"] == "0.01 .. 0.1"
    with pytest.raises(ValueError, match="several weight_decay values"):
        fit_optima(sweep)  # mixing decays along the lr axis would be wrong
    fig = plot_lr_wd(sweep, fit_joint_optima(sweep))
    assert [ax.get_title() for ax in fig.axes[:3]] == [f"muP, width {w}" for w in (64, 256, 1024)]


def test_transfer_wds_prints_the_joint_optimum_and_writes_the_heat_maps(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        status = main(["transfer", "--widths", "16", "32", "--lrs", "0.005", "0.01", "0.02", "--wds", "0", "0.1",
                       "--steps", "4", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert status == 0 and "Joint optimum of learning rate and weight decay per width" in out
    assert "wd_drift_octaves" in out
    assert sorted(os.listdir(tmp_path)) == ["transfer_mlp_adamw_wd.csv", "transfer_mlp_adamw_wd.png",
                                            "transfer_mlp_adamw_wd_optima.csv"]
    sweep = pd.read_csv(tmp_path / "transfer_mlp_adamw_wd.csv")
    assert len(sweep) == 2 * 2 * 3 * 2 and set(sweep["weight_decay"]) == {0.0, 0.1}


@pytest.mark.parametrize(("argv", "message"), [
    (["--wds", "-1"], "argument --wds: expected a non-negative number, got -1"),
    (["--wds", "0", "0.1", "--eval-steps", "5"], "argument --wds: not with --eval-steps"),
])
def test_wds_mistakes_are_one_error_line_naming_the_flag(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["transfer", *argv, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{PROG} transfer: error: ") and message in lines[0], lines
