"""Coordinate checks and width-transfer validation for schedule-free optimizers.

Data first, pictures second: ``record_coords`` trains models of several widths and returns a tidy
DataFrame of per-module statistics at the schedule-free training point y and evaluation point x;
``judge`` turns it into a pass/fail verdict; ``plot_coords`` draws it. ``sweep_learning_rates``,
``fit_optima`` and ``optimum_drift`` check that the best learning rate transfers across widths.
``run_coord_check`` and ``run_transfer`` do all of it for the example models, ``check_model`` for
your own (``coord_checks.custom``), and ``python -m coord_checks`` from the command line;
``run_depth_check`` and ``run_depth_transfer`` do it across depth (the example Transformer,
depth-unaware muP against CompleteP or depth-muP).
``coord_checks.diagnose.diagnose`` finds the parameter group whose learning rate fails to transfer.
``run_study`` (``coord_checks.study``) measures whether muP tuned at the base width matches standard
parametrization tuned at every width.
"""
from __future__ import annotations

import importlib
from typing import Any

# Public name -> submodule. Imported on first use, so ``python -m coord_checks`` can answer Ctrl-C
# with one line even while torch and matplotlib are still loading.
_HOMES = {
    "run_coord_check": "experiments", "run_transfer": "experiments",
    "run_depth_check": "experiments", "run_depth_transfer": "experiments",
    "build_model": "models",
    "check_model": "custom", "prepare_model": "custom", "log_spaced_steps": "custom",
    "causal_lm_factory": "huggingface",
    "parameter_roles": "diagnose",
    "plot_coords": "plots", "plot_over_time": "plots", "plot_transfer": "plots",
    "plot_anytime": "plots", "plot_lr_wd": "plots", "save_figure": "plots",
    "record_coords": "recording",
    "run_study": "study", "plot_study": "plots",
    "fit_optima": "transfer", "fit_joint_optima": "transfer", "joint_drift": "transfer", "lr_grid": "transfer", "optimum_drift": "transfer", "sweep_learning_rates": "transfer",
    "Thresholds": "verdict", "Verdict": "verdict", "judge": "verdict",
}


def __getattr__(name: str) -> Any:
    """Import a public name's submodule the first time the name is used."""
    if name not in _HOMES:
        raise AttributeError(f"module 'coord_checks' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"coord_checks.{_HOMES[name]}"), name)
    globals()[name] = value
    return value


__all__ = [
    "record_coords",
    "judge",
    "Thresholds",
    "Verdict",
    "plot_coords",
    "plot_over_time",
    "plot_anytime",
    "plot_lr_wd",
    "plot_transfer",
    "save_figure",
    "sweep_learning_rates",
    "fit_optima",
    "optimum_drift",
    "fit_joint_optima",
    "joint_drift",
    "parameter_roles",
    "lr_grid",
    "build_model",
    "check_model",
    "prepare_model",
    "log_spaced_steps",
    "causal_lm_factory",
    "run_coord_check",
    "run_transfer",
    "run_depth_check",
    "run_depth_transfer",
    "run_study",
    "plot_study",
]
