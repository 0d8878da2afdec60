"""Anytime transfer: one schedule-free run evaluated at x after several step counts gives the optimum
per horizon, and evaluating mid-run changes nothing about the run."""
from __future__ import annotations

import os

import pandas as pd
import pytest
import torch

from coord_checks.cli import PROG, main
from coord_checks.experiments import cross_entropy, make_task, run_transfer
from coord_checks.optimizers import optimizer_factory
from coord_checks.plots import plot_anytime
from coord_checks.transfer import fit_optima, optimum_drift, train_and_evaluate_at

pytestmark = pytest.mark.usefixtures("one_thread")


def run(eval_steps, task, optimizer="adamw"):
    torch.manual_seed(0)
    model = task.build(32, "mup")
    opt = optimizer_factory(optimizer, "mup", 0.02)(model.parameters())
    return train_and_evaluate_at(model, opt, task.train_batches, task.eval_batches, cross_entropy, eval_steps)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_evaluating_mid_run_leaves_the_run_bit_for_bit_unchanged(optimizer):
    task = make_task("mlp", n_batches=12, n_eval_batches=2)
    anytime = run([3, 6, 12], task, optimizer)
    assert [step for step, _, _ in anytime] == [3, 6, 12]
    assert anytime[-1] == run([12], task, optimizer)[0]  # exact: no tolerance
    assert anytime[0] == run([3], task, optimizer)[0] and anytime[1] == run([6], task, optimizer)[0]


def test_anytime_sweep_gives_an_optimum_and_a_drift_per_horizon(tmp_path):
    sweep = run_transfer("mlp", "adamw", widths=(16, 32), lrs=[0.005, 0.01, 0.02, 0.04], steps=8,
                         batch_size=8, n_eval_batches=1, eval_batch_size=32, eval_steps=[2, 4])
    assert len(sweep) == 2 * 2 * 4 * 3  # parametrizations x widths x lrs x horizons
    assert sorted(sweep["step"].unique()) == [2, 4, 8]
    with pytest.raises(ValueError, match="pass by=.*'step'"):
        fit_optima(sweep)
    optima = fit_optima(sweep, by=("parametrization", "step"))
    assert len(optima) == 2 * 3 * 2 and set(optima.columns) >= {"parametrization", "step", "width", "lr_opt"}
    drift = optimum_drift(optima, by=("parametrization", "step"))
    assert len(drift) == 2 * 3 and (drift["drift_octaves"] >= 0).all()
    final = fit_optima(sweep[sweep["step"] == 8])  # the final horizon alone is the plain sweep
    pd.testing.assert_frame_equal(final, optima[optima["step"] == 8].drop(columns="step").reset_index(drop=True))
    fig = plot_anytime(optima)
    assert [ax.get_title() for ax in fig.axes] == ["standard parametrization (SP)", "muP"]
    assert [line.get_label() for line in fig.axes[1].get_lines() if not line.get_label().startswith("_")] == [
        "width 16", "width 32"]


def test_transfer_eval_steps_prints_the_optimum_per_horizon_and_draws_it(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        status = main(["transfer", "--widths", "16", "32", "--lrs", "0.005", "0.01", "0.02", "--steps", "6",
                       "--eval-steps", "2", "4", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert status == 0 and "Anytime: the optimum per horizon" in out
    assert sorted(os.listdir(tmp_path)) == ["transfer_mlp_adamw.csv", "transfer_mlp_adamw.png",
                                            "transfer_mlp_adamw_anytime.png", "transfer_mlp_adamw_optima.csv"]
    assert sorted(pd.read_csv(tmp_path / "transfer_mlp_adamw_optima.csv")["step"].unique()) == [2, 4, 6]


def test_eval_steps_beyond_steps_is_one_error_line_naming_the_flag(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["transfer", "--steps", "10", "--eval-steps", "5", "20", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"{PROG} transfer: error: argument --eval-steps: steps must not exceed --steps 10, got [20] (see --help)"]
