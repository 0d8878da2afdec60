"""README's walk-through from a model file to a verdict, a diagnosis and a transfer plot runs as
written: the file is README's ``# my_model.py`` block, the commands are its bash block, each run
in-process with the exit status README states and the verdict it shows."""
from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest
import torch

from coord_checks.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"
SECTION = README.read_text().split("### Your own model: from its file", 1)[1].split("\n## ", 1)[0]


def model_file() -> str:
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", SECTION, flags=re.S) if b.startswith("# my_model.py")]
    return block


def commands() -> list[str]:
    (block,) = re.findall(r"```bash\n(.*?)```", SECTION, flags=re.S)
    return [line for line in block.splitlines() if line.startswith("python -m coord_checks ")]


EXPECTED = [  # (exit status, a line the output starts with or contains)
    (0, "Coordinate check verdict: mup PASS"),
    (1, "Coordinate check verdict: mup FAIL"),
    (0, "Over time (14 recorded steps, 1 to 100)"),
    (0, "Diagnosis: the readout lr breaks transfer"),
    (0, "Anytime: the optimum per horizon"),
    (0, "Joint optimum of learning rate and weight decay per width"),
]


def test_the_walkthrough_has_a_model_file_and_the_commands_this_test_knows():
    assert "def make_model(width)" in model_file() and "def batches(n_batches, split)" in model_file()
    assert len(commands()) == len(EXPECTED)


@pytest.mark.usefixtures("one_thread")
def test_readme_walkthrough_commands_run_as_written(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_model.py").write_text(model_file())
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    threads = torch.get_num_threads()
    try:
        for command, (status, text) in zip(commands(), EXPECTED):
            assert main(shlex.split(command)[3:]) == status, command
            out = capsys.readouterr().out
            assert text in out, f"{command}\n{out}"
    finally:
        torch.set_num_threads(threads)
        sys.modules.pop("my_model", None)
    written = sorted(p.name for p in (tmp_path / "coord_check_out").iterdir())
    for name in ("diagnose_my_model_make_buggy_model_adamw.png", "transfer_my_model_make_model_adamw_anytime.png",
                 "coord_check_my_model_make_model_adamw_over_time.png", "transfer_my_model_make_model_adamw_wd.png"):
        assert name in written
