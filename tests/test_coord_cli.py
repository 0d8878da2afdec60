"""The command line: tiny runs write their files and print the verdict; bad arguments give one
``error:`` line and exit status 2, never a traceback."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from coord_checks import experiments, plots
from coord_checks.cli import PROG, main

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


def test_zero_init_starts_the_mup_readout_at_zero_and_leaves_sp_alone(tmp_path, restore_threads):
    """The readout's output at step 1 (initialisation): exactly zero in muP with --zero-init, as the
    zero-initialised MuReadout gives; SP's nn.Linear keeps PyTorch's init with or without the flag."""
    def readout_at_init(*flags: str) -> pd.Series:
        out = tmp_path / "-".join(flags or ("default",))
        assert main(["--widths", "64", "128", "--steps", "2", "--seeds", "0", "--sequence", "y",
                     *flags, "--out", str(out)]) == 0
        frame = pd.read_csv(out / "coord_check_mlp_adamw.csv")
        rows = frame[(frame["module"] == "readout") & (frame["step"] == 1)]
        return rows.set_index(["parametrization", "width"])["value"].sort_index()

    zeroed, default = readout_at_init("--zero-init"), readout_at_init()
    assert (zeroed["mup"] == 0).all() and (default["mup"] > 0).all()
    pd.testing.assert_series_equal(zeroed["sp"], default["sp"])


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
     (["--steps", "1"], "argument --steps: at least 2, got 1 (step 1 is the initialisation"),
     (["--out", ""], "argument --out: empty folder name"),
     (["--lr", "-1"], "argument --lr: expected a positive number up to 1e+06, got -1"),
     (["--sequence", "z"], "argument --sequence: invalid choice: 'z'"),
     (["--model", "transformer", "--widths", "32", "34"], "multiples of 4"),
     (["--device", "gpu0"], "argument --device: not a torch device"),
     (["--bogus"], "unrecognized arguments: --bogus"),
     (["transfer", "--model", "cnn"], "argument --model: invalid choice: 'cnn'"),
     (["transfer", "--lrs", "0"], "argument --lrs: expected a positive number up to 1e+06, got 0"),
     (["--model", "coord_user_models:make_model", "--widths", "32", "64", "--zero-init"],
      "argument --zero-init: only with the example models")],
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


@pytest.fixture
def restore_threads():
    """``main`` sets torch's intra-op threads; give the test process its own count back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def error_line(argv: list[str], capsys) -> str:
    """Run ``main(argv)`` in-process, assert exit status 2 and exactly one stderr line; return it."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{PROG}: error:") or lines[0].startswith(f"{PROG} transfer: error:")
    return lines[0]


def no_compute(*args, **kwargs):
    raise AssertionError("the check started computing before its arguments were checked")


TINY = ["--widths", "8", "16", "--steps", "2", "--seeds", "0", "--sequence", "y"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--lr", "1e300"], "argument --lr: expected a positive number up to 1e+06, got 1e300"),
     (["transfer", "--lrs", "0.01", "1e7"], "argument --lrs: expected a positive number up to 1e+06"),
     (["--seeds", str(2**64)], f"argument --seeds: expected an integer in [0, 2**64), got {2**64}"),
     (["--threads", "100000"], "argument --threads: expected a positive integer up to"),
     (["--device", "meta"], "argument --device: cannot compute on 'meta'"),
     (["--device", "cuda:99"], "argument --device: cannot compute on 'cuda:99'"),
     (["transfer", "--device", "meta"], "argument --device: cannot compute on 'meta'")],
)
def test_values_that_parse_but_cannot_run_give_one_error_line_before_any_compute(
        argv, message, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(experiments, "run_coord_check", no_compute)
    monkeypatch.setattr(experiments, "run_transfer", no_compute)
    line = error_line([*argv, "--out", str(tmp_path / "out")], capsys)
    assert message in line
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_an_error_naming_device(capsys):
    assert "argument --device: cannot compute on 'cuda'" in error_line(["--device", "cuda"], capsys)


def test_out_that_is_an_existing_file_is_an_error_naming_out(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(experiments, "run_coord_check", no_compute)
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    line = error_line(["--out", str(afile)], capsys)
    assert "argument --out:" in line and str(afile) in line and "not a folder" in line
    assert afile.read_text() == "keep me"


@pytest.mark.parametrize("where", ["below a file", "under /proc"])
def test_out_that_cannot_be_created_is_an_error_naming_out(where, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(experiments, "run_coord_check", no_compute)
    if where == "below a file":
        (tmp_path / "afile").write_text("")
        out = tmp_path / "afile" / "sub"
    else:
        if not Path("/proc/self").is_dir():
            pytest.skip("no /proc here")
        out = Path("/proc/coord_check_out")
    line = error_line(["--out", str(out)], capsys)
    assert "argument --out: cannot write to" in line and str(out) in line


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="permission bits do not stop root")
def test_out_in_a_read_only_folder_is_an_error_naming_out(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(experiments, "run_coord_check", no_compute)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        line = error_line(["--out", str(locked / "out")], capsys)
    finally:
        locked.chmod(0o700)
    assert "argument --out: cannot write to" in line


def test_output_file_that_cannot_be_replaced_is_an_error_naming_out_and_leaves_no_temp(
        tmp_path, capsys, restore_threads):
    out = tmp_path / "out"
    (out / "coord_check_mlp_adamw_verdict.csv").mkdir(parents=True)
    line = error_line([*TINY, "--out", str(out)], capsys)
    assert "argument --out: cannot write" in line and "coord_check_mlp_adamw_verdict.csv" in line
    assert sorted(os.listdir(out)) == ["coord_check_mlp_adamw.csv", "coord_check_mlp_adamw_verdict.csv"]


def test_out_of_memory_is_an_error_naming_widths(tmp_path, capsys, restore_threads):
    line = error_line(["--widths", "8", str(10**15), "--steps", "2", "--seeds", "0",
                       "--out", str(tmp_path)], capsys)
    assert "argument --widths: out of memory" in line
    assert not os.listdir(tmp_path)


def test_out_of_memory_across_depth_is_an_error_naming_depths_and_widths(tmp_path, capsys, restore_threads):
    line = error_line(["--depths", "2", "4", "--widths", str(10**15), "--steps", "2", "--seeds", "0",
                       "--out", str(tmp_path)], capsys)
    assert "argument --depths: out of memory" in line and f"width up to {10**15} and depth up to 4" in line
    assert not os.listdir(tmp_path)


def test_transfer_where_every_lr_diverges_is_an_error_naming_lrs_and_nothing_else(tmp_path):
    out = tmp_path / "out"
    result = run_cli("transfer", "--optimizer", "sgd", "--widths", "8", "16", "--steps", "3",
                     "--lrs", "1e5", "1e6", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.splitlines()  # from the shell: no grid-edge warning before the error
    assert len(lines) == 1 and lines[0].startswith(f"{PROG} transfer: error: argument --lrs:"), lines
    assert "every learning rate diverged" in lines[0]
    assert not os.listdir(out)


def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def status_after_interrupt(argv: list[str]) -> int:
    """``main(argv)``'s return value; a KeyboardInterrupt escaping it fails the test, not the session."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped main()")


def test_ctrl_c_during_the_run_exits_130_with_one_line_and_writes_nothing(
        tmp_path, capsys, monkeypatch, restore_threads):
    monkeypatch.setattr(experiments, "run_coord_check", interrupt)
    assert status_after_interrupt(["--out", str(tmp_path)]) == 130
    assert capsys.readouterr().err.splitlines() == [f"{PROG}: interrupted"]
    assert not os.listdir(tmp_path)


def test_ctrl_c_while_writing_leaves_only_complete_files(tmp_path, capsys, monkeypatch, restore_threads):
    def half_a_png(fig, path, dpi=120):
        Path(path).write_bytes(b"\x89PNG\r\n")
        raise KeyboardInterrupt

    monkeypatch.setattr(plots, "save_figure", half_a_png)
    assert status_after_interrupt([*TINY, "--out", str(tmp_path)]) == 130
    assert capsys.readouterr().err.splitlines() == [f"{PROG}: interrupted"]
    assert sorted(os.listdir(tmp_path)) == ["coord_check_mlp_adamw.csv", "coord_check_mlp_adamw_verdict.csv"]
    assert len(pd.read_csv(tmp_path / "coord_check_mlp_adamw.csv")) > 0


def test_sigint_from_the_shell_exits_130_with_one_line_and_no_files(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(
        [sys.executable, "-m", "coord_checks", "--widths", "64", "1024", "--steps", "100000",
         "--seeds", "0", "--out", str(out)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a background shell ignores it
    )
    try:
        deadline = time.monotonic() + 120
        while not out.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # the folder appears once main() runs: from then on Ctrl-C is handled
        if not out.exists():
            process.kill()
            pytest.fail(f"the output folder never appeared: {process.communicate()}")
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert stderr.splitlines() == [f"{PROG}: interrupted"]
    assert not os.listdir(out)
