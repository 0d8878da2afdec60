"""Diagnosis: every parameter gets a role, each role's lr is swept across widths, and a readout that
forgets muP's width multiplier is named as the role that breaks transfer."""
from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd
import pytest
import torch

from coord_checks import custom
from coord_checks.cli import PROG, main
from coord_checks.diagnose import diagnose, parameter_roles, role_groups, transfer_cost
from coord_checks.models import build_model
from mup_schedulefree import MuAdamW_ScheduleFree

pytestmark = pytest.mark.usefixtures("one_thread")

MODELS = Path(__file__).resolve().parent / "coord_user_models.py"
USER = custom.load_object(f"{MODELS}:regression_batches", "data").__globals__
# Small and deterministic: 2 widths (4x), 40 streaming steps of teacher regression, 9 multipliers.
SMALL = ["--widths", "32", "128", "--steps", "40", "--lr", "0.05",
         "--data", f"{MODELS}:regression_batches", "--loss", "mse"]


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_roles_follow_infshape_and_names_on_the_example_transformer():
    roles = parameter_roles(build_model("transformer", 64, "mup", max_seq_len=8))
    assert roles["tok_emb.weight"] == roles["pos_emb.weight"] == "input"
    assert {roles[f"blocks.0.attn.{p}.weight"] for p in ("query", "key", "value", "out")} == {"attention"}
    assert roles["blocks.1.mlp.fc.weight"] == roles["blocks.1.mlp.proj.weight"] == "hidden"
    assert roles["blocks.0.ln1.weight"] == roles["ln_f.bias"] == "vector"
    assert roles["readout.weight"] == "readout"
    groups = role_groups(build_model("mlp", 64, "mup", d_in=8, d_out=4), 0.01, {"readout": 4.0})
    assert [(g["role"], g["lr"]) for g in groups] == [("input", 0.01), ("hidden", 0.01), ("readout", 0.04)]


def test_diagnose_names_the_readout_that_forgets_the_width_multiplier(tmp_path, capsys, restore_threads):
    status = main(["diagnose", "--model", f"{MODELS}:broken_readout_regressor", *SMALL, "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert status == 0
    assert out.startswith("Diagnosis: the readout lr breaks transfer"), out
    stem = "diagnose_coord_user_models_broken_readout_regressor_adamw"
    assert sorted(os.listdir(tmp_path)) == [f"{stem}.csv", f"{stem}.png", f"{stem}_optima.csv"]
    optima = pd.read_csv(tmp_path / f"{stem}_optima.csv").set_index(["role", "width"])
    # 4x the width gives a readout update 4x larger: its optimal lr falls by about 2 octaves
    drop = optima.loc[("readout", 32), "log2_lr_opt"] - optima.loc[("readout", 128), "log2_lr_opt"]
    assert drop > 1.5, optima
    broken = transfer_cost(pd.read_csv(tmp_path / f"{stem}.csv")).set_index("role")["relative_cost"]
    assert broken["readout"] > 3 * max(broken["input"], broken["hidden"]), broken

    # the same model with mup.MuReadout: the readout's transfer costs a small fraction of that
    make_model = custom.load_object(f"{MODELS}:shaped_regressor", "model")
    batches = USER["regression_batches"]
    correct = diagnose(make_model, lambda groups, lr: MuAdamW_ScheduleFree(groups, lr=lr), [32, 128], 0.05,
                       batches(40, "train"), batches(4, "eval"), custom.mse, steps=40)
    costs = correct.drift.set_index("role")["relative_cost"]
    assert set(costs.index) == {"input", "hidden", "readout"}
    assert costs["readout"] < broken["readout"] / 5, correct.format()


@pytest.mark.parametrize(("argv", "message"), [
    (["--roles", "attention"], "argument --roles: the model has roles ['input', 'hidden', 'readout'], got ['attention']"),
    (["--optimizer", "sgd", "--lr", "1e6", "--multipliers", "1e4", "1e5", "1e6", "--steps", "10"],
     "argument --multipliers: every multiplier of the input lr diverged at width 8"),
    (["--rounds", "-1"], "argument --rounds: expected a non-negative integer, got -1"),
])
def test_diagnose_mistakes_are_one_error_line_naming_the_flag(argv, message, tmp_path, capsys, restore_threads):
    with pytest.raises(SystemExit) as exit_info:
        main(["diagnose", "--model", f"{MODELS}:shaped_regressor", "--widths", "8", "16", "--steps", "3",
              "--data", f"{MODELS}:regression_batches", "--loss", "mse", *argv, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{PROG} diagnose: error: "), lines
    assert message in lines[0]


def test_a_drift_along_a_flat_curve_is_not_named_and_a_costly_one_is():
    from coord_checks.diagnose import DIAGNOSIS_COLUMNS, Diagnosis, transfer_cost
    from coord_checks.transfer import fit_optima, optimum_drift

    def loss(role, width, k):  # readout: sharp bowl moving 1 octave; hidden: nearly flat, moving 4
        if role == "readout":
            return 1.0 + 0.05 * (k - (0 if width == 32 else -1)) ** 2
        return 1.0 + 1e-5 * (k - (-3 if width == 32 else 3)) ** 2

    rows = [(role, width, 2.0**k, 0.01 * 2.0**k, math.log2(0.01) + k, 0, loss(role, width, k), loss(role, width, k),
             False) for role in ("hidden", "readout") for width in (32, 128) for k in range(-4, 5)]
    sweep = pd.DataFrame(rows, columns=list(DIAGNOSIS_COLUMNS))
    optima = fit_optima(sweep, by=("role",))
    drift = optimum_drift(optima, by=("role",)).merge(transfer_cost(sweep), on="role")
    drift = drift.sort_values("drift_octaves", ascending=False).reset_index(drop=True)
    diagnosis = Diagnosis(sweep, optima, drift, rounds=0, held={})
    assert drift.set_index("role")["drift_octaves"].idxmax() == "hidden"  # hidden drifts further ...
    assert diagnosis.worst_role == "readout"  # ... but only the readout's drift costs loss
    assert drift.set_index("role").loc["readout", "transfer_cost"] == pytest.approx(0.05)
    flat = Diagnosis(sweep, optima, drift[drift["role"] == "hidden"], rounds=0, held={})
    assert flat.worst_role is None and "the learning rates transfer" in flat.format()
