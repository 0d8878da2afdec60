"""Coordinate checks and width-transfer validation for schedule-free optimizers.

Data first, pictures second: ``record_coords`` trains models of several widths and returns a tidy
DataFrame of per-module statistics at the schedule-free training point y and evaluation point x;
``judge`` turns it into a pass/fail verdict; ``plot_coords`` draws it. ``sweep_learning_rates``,
``fit_optima`` and ``optimum_drift`` check that the best learning rate transfers across widths.
``run_coord_check`` and ``run_transfer`` do all of it for the example models, and
``python -m coord_checks`` from the command line.
"""
from coord_checks.experiments import run_coord_check, run_transfer
from coord_checks.models import build_model
from coord_checks.plots import plot_coords, plot_transfer, save_figure
from coord_checks.recording import record_coords
from coord_checks.transfer import fit_optima, lr_grid, optimum_drift, sweep_learning_rates
from coord_checks.verdict import Thresholds, Verdict, judge

__all__ = [
    "record_coords",
    "judge",
    "Thresholds",
    "Verdict",
    "plot_coords",
    "plot_transfer",
    "save_figure",
    "sweep_learning_rates",
    "fit_optima",
    "optimum_drift",
    "lr_grid",
    "build_model",
    "run_coord_check",
    "run_transfer",
]
