"""The command line: tiny runs write their files and print the verdict; bad arguments give one
``error:`` line and exit status 2, never a traceback."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from coord_checks.cli import main

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "coord_checks", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_check_writes_png_and_csv_and_prints_the_verdict(tmp_path):
    out = tmp_path / "out"
    result = run_cli("--widths", "64", "256", "--steps", "3", "--seeds", "0", "--out", str(out),
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Coordinate check verdict: sp FAIL, mup PASS" in result.stdout
    assert "Worst modules" in result.stdout and str(out.resolve()) in result.stdout
    frame = pd.read_csv(out / "coord_check_mlp_adamw.csv")
    assert set(frame["parametrization"]) == {"sp", "mup"} and set(frame["sequence"]) == {"y", "x"}
    assert set(frame["width"]) == {64, 256}
    assert (out / "coord_check_mlp_adamw_verdict.csv").exists()
    assert (out / "coord_check_mlp_adamw.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_transfer_subcommand_writes_sweep_and_prints_drift(tmp_path):
    result = run_cli("transfer", "--widths", "32", "64", "--lrs", "0.005", "0.01", "0.02",
                     "--steps", "5", "--out", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "drift_octaves" in result.stdout
    sweep = pd.read_csv(tmp_path / "transfer_mlp_adamw.csv")
    assert len(sweep) == 2 * 2 * 3  # parametrizations x widths x lrs
    assert (tmp_path / "transfer_mlp_adamw_optima.csv").exists()
    assert (tmp_path / "transfer_mlp_adamw.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--widths", "64", "-8"], "argument --widths: expected a positive integer, got -8"),
     (["--widths", "64", "0"], "argument --widths: expected a positive integer, got 0"),
     (["--widths", "64"], "need at least two distinct widths"),
     (["--widths", "64", "abc"], "expected a positive integer, got 'abc'"),
     (["--model", "resnet"], "argument --model: invalid choice: 'resnet'"),
     (["--optimizer", "lion"], "argument --optimizer: invalid choice: 'lion'"),
     (["--steps", "0"], "argument --steps: expected a positive integer, got 0"),
     (["--lr", "-1"], "argument --lr: expected a positive finite number, got -1"),
     (["--sequence", "z"], "argument --sequence: invalid choice: 'z'"),
     (["--model", "transformer", "--widths", "32", "34"], "multiples of 4"),
     (["--device", "gpu0"], "argument --device: not a torch device"),
     (["--bogus"], "unrecognized arguments: --bogus"),
     (["transfer", "--model", "cnn"], "argument --model: invalid choice: 'cnn'"),
     (["transfer", "--lrs", "0"], "argument --lrs: expected a positive finite number, got 0")],
)
def test_bad_arguments_give_one_error_line_and_exit_status_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "error:" in lines[0] and message in lines[0]
    assert captured.out == ""


def test_bad_argument_from_the_shell_has_no_traceback(tmp_path):
    result = run_cli("--widths", "0", "128", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "python -m coord_checks: error: argument --widths: expected a positive integer, got 0 (see --help)"
    ]
    assert not list(tmp_path.iterdir())
