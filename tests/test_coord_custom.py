"""Your own model in a coordinate check: from a file, from Python in one call, and from Hugging Face;
every mistake in the factory, the data or the flags is one error naming the argument."""
from __future__ import annotations

import os
from pathlib import Path

import mup
import pandas as pd
import pytest
import torch

from coord_checks import custom
from coord_checks.cli import PROG, main

pytestmark = pytest.mark.usefixtures("one_thread")

MODELS = str(Path(__file__).resolve().parent / "coord_user_models.py")


def spec(name: str) -> str:
    return f"{MODELS}:{name}"


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_own_model_with_own_base_shapes_passes_in_one_call_and_its_readout_is_found():
    result = custom.check_model(spec("make_model"), widths=[32, 64, 128], seeds=(0,), steps=3)
    assert result.spec.readout == "head" and result.spec.attention == ()
    assert result.verdict.passed("mup")
    assert set(result.frame["module"]) == {"embed", "hidden", "head"}
    assert set(result.verdict.at_init()["module"]) == {"head"}  # the readout is exempt at init


def test_base_width_sets_base_shapes_from_the_factory_itself():
    made = custom.prepare_model(spec("make_unshaped"), widths=[32, 128], base_width=32)
    model = made.factory(128)
    assert model.hidden.weight.infshape.width_mult() == 4.0
    assert model.embed.weight.infshape.ninf() == 1 and model.head.weight.infshape.width_mult() == 4.0


def test_readout_is_the_last_mureadout_else_the_last_linear_and_can_be_named():
    assert custom.find_readout(custom.load_object(spec("make_regressor"), "model")(8)) == "out"
    assert custom.find_readout(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(),
                                                   torch.nn.Linear(3, 1))) == "2"
    named = custom.prepare_model(spec("make_model"), [32, 64], readout="hidden")
    assert named.readout == "hidden" and named.init_exempt == ("hidden",)


@pytest.mark.parametrize(("name", "kwargs", "argument", "message"), [
    ("ignores_width", {}, "model", "ignores its width: every parameter has the same shape at widths 64, 128, 32, 256"),
    ("stops_growing", {}, "widths", "widths [64, 128] change no parameter shape"),
    ("make_unshaped", {}, "model", "has no base shapes (parameter 'embed.weight' has no infshape)"),
    ("all_width_mults_one", {}, "model", "mark no dimension as width-dependent"),
    ("plain_linear_readout", {"base_width": 32}, "model", "mup.set_base_shapes refused"),
    ("make_model", {"readout": "lm_head"}, "readout", "'lm_head' is not a submodule"),
    ("make_model", {"base_width": 0}, "base_width", "expected a positive int, got 0"),
    ("no_such_factory", {}, "model", "has no attribute 'no_such_factory'"),
])
def test_factory_mistakes_are_one_line_errors_naming_the_argument(name, kwargs, argument, message):
    with pytest.raises(custom.ArgumentError) as error:
        custom.prepare_model(spec(name), widths=[64, 128], **kwargs)
    assert error.value.argument == argument and message in error.value.message
    assert "\n" not in str(error.value)


def test_data_function_and_loss_by_name_and_from_a_module():
    batches = custom.load_batches(spec("regression_batches"), 2, "eval")
    assert len(batches) == 2 and batches[0][0].shape == (64, 12)
    assert custom.resolve_loss("mse") is custom.mse
    assert custom.resolve_loss(spec("half_mse"))(torch.ones(2), torch.zeros(2)) == pytest.approx(0.5)
    with pytest.raises(custom.ArgumentError, match="^data: .*returned str; expected a non-empty list"):
        custom.load_batches(spec("not_batches"), 2, "train")
    with pytest.raises(custom.ArgumentError, match="^loss: expected one of"):
        custom.resolve_loss("hinge")
    text_inputs, text_targets = custom.load_batches("text", 1, "train")[0]
    assert text_inputs.dtype == torch.long and torch.equal(text_inputs[:, 1:], text_targets[:, :-1])


def test_own_model_from_the_command_line_writes_its_files_and_prints_the_verdict(
        tmp_path, capsys, restore_threads):
    status = main(["--model", spec("make_regressor"), "--base-width", "32", "--widths", "32", "64", "128",
                   "--data", spec("regression_batches"), "--loss", spec("half_mse"), "--steps", "3",
                   "--seeds", "0", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert status == 0 and "Coordinate check verdict: mup PASS" in out
    stem = "coord_check_coord_user_models_make_regressor_adamw"
    assert sorted(os.listdir(tmp_path)) == [f"{stem}.csv", f"{stem}.png", f"{stem}_verdict.csv"]
    frame = pd.read_csv(tmp_path / f"{stem}.csv")
    assert set(frame["module"]) == {"first", "second", "out"} and set(frame["width"]) == {32, 64, 128}


def error_line(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{PROG}"), lines
    return lines[0]


@pytest.mark.parametrize(("argv", "message"), [
    (["--model", spec("ignores_width")], "argument --model: " + spec("ignores_width") + " ignores its width"),
    (["--model", spec("make_unshaped")], "argument --model: " + spec("make_unshaped") + "(16) has no base shapes"),
    (["--model", spec("stops_growing"), "--widths", "64", "128"], "argument --widths: widths [64, 128] change no"),
    (["--model", spec("make_model"), "--data", spec("not_batches")], "argument --data: "),
    (["--model", spec("make_model"), "--loss", "hinge"], "argument --loss: expected one of"),
    (["--model", spec("make_regressor"), "--base-width", "16"],  # text tokens into a float model
     "argument --model: " + spec("make_regressor") + " failed while training on --data text"),
    (["--model", "no_such_module:make_model"], "argument --model: cannot import 'no_such_module'"),
    (["--model", "resnet"], "argument --model: invalid choice: 'resnet'"),
    (["--model", spec("make_model"), "--widths"], "argument --widths: expected at least one argument"),
    (["--model", spec("make_model"), "--steps", "3", "--horizon", "9"], "not allowed with argument"),
    (["--data", spec("regression_batches")], "argument --data: only with your own model"),
    (["--base-width", "8"], "argument --base-width: only with your own model"),
])
def test_own_model_mistakes_on_the_command_line_are_one_error_line_naming_the_flag(
        argv, message, capsys, tmp_path, restore_threads):
    if "--widths" not in argv:
        argv = [*argv, "--widths", "16", "32"]
    line = error_line([*argv, "--seeds", "0", "--steps", "2", "--out", str(tmp_path)]
                      if "--steps" not in argv and "--horizon" not in argv else [*argv, "--out", str(tmp_path)],
                      capsys)
    assert message in line, line


def test_widths_are_required_for_your_own_model(capsys, tmp_path):
    assert "argument --widths: required with --model module:function" in error_line(
        ["--model", spec("make_model"), "--out", str(tmp_path)], capsys)


def test_gpt2_through_the_hugging_face_adapter_passes_under_mup(monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from coord_checks.data import VOCAB_SIZE
    from coord_checks.huggingface import causal_lm_factory

    config = transformers.GPT2Config(vocab_size=VOCAB_SIZE, n_positions=16, n_layer=2, n_head=4, n_embd=32,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=None, eos_token_id=None)
    make_model = causal_lm_factory(config, width_field="n_embd", base_width=32)
    wide = make_model(128)
    assert isinstance(wide.lm_head, mup.MuSharedReadout) and wide.lm_head.weight is wide.transformer.wte.weight
    assert wide.transformer.h[0].attn.scaling == pytest.approx(32**0.5 / 4 ** 0.5 / 32)  # sqrt(8) / 32
    assert config.n_embd == 32  # the config is copied, not changed
    result = custom.check_model(make_model, widths=[32, 64, 128], seeds=(0,), steps=3)
    assert result.spec.readout == "lm_head"
    assert result.verdict.passed("mup"), result.verdict.format()
    plain = custom.check_model(causal_lm_factory(config), widths=[32, 64, 128], base_width=32,
                               seeds=(0,), steps=3)  # shapes only: GPT-2's fixed-std init grows with width
    assert not plain.verdict.passed("mup")
