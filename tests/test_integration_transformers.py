"""Hugging Face Trainer with ScheduleFreeCallback: checkpoints and export at x, exact resume, muP groups.

One module-scoped fixture trains a tiny muP GPT-2 five times (checkpointing with the callback,
without checkpoints or callback, resumed from a checkpoint, and checkpointing right after
Trainer's own evaluation, then resumed); each test checks one claim on the recorded runs. Everything runs on CPU, offline, in seconds.
"""
import copy
import importlib
import os
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

STEPS, SAVE_STEPS = 6, 2


def _import_hf():
    try:
        return importlib.import_module("transformers"), importlib.import_module("safetensors.torch")
    except ImportError as error:
        pytest.skip(f"transformers not importable ({error}): pip install 'mup_schedulefree[hf]'")


def _gpt2(width, hf):
    from mup_schedulefree.integrations.transformers import tie_mu_readout
    torch.manual_seed(0)
    config = hf.GPT2Config(n_embd=width, n_layer=2, n_head=2, vocab_size=64, n_positions=32,
                           bos_token_id=0, eos_token_id=0)
    return tie_mu_readout(hf.GPT2LMHeadModel(config))


def _mup_gpt2(hf):
    import mup
    model = _gpt2(32, hf)
    mup.set_base_shapes(model, _gpt2(16, hf), delta=_gpt2(24, hf))
    return model


def _train(hf, output_dir, *, callback, save_steps=SAVE_STEPS, resume=None, evaluate=False):
    """One Trainer run; returns the trainer, per-step losses, the x reference of each save, warnings."""
    from mup_schedulefree import MuAdamW_ScheduleFree
    from mup_schedulefree.integrations.transformers import ScheduleFreeCallback, mup_trainer_optimizer

    class Recorder(hf.TrainerCallback):
        """Losses per step, and at each save an x computed independently: eval() on a deep copy."""

        def __init__(self):
            self.losses, self.saved_x, self.saved_y = [], {}, {}

        def on_log(self, args, state, control, logs=None, **kwargs):
            if "loss" in logs:
                self.losses.append(logs["loss"])

        def on_save(self, args, state, control, model=None, optimizer=None, **kwargs):
            model_copy, optimizer_copy = copy.deepcopy((model, optimizer.optimizer))
            optimizer_copy.eval()
            self.saved_x[state.global_step] = {k: v.clone() for k, v in model_copy.state_dict().items()}
            self.saved_y[state.global_step] = {k: v.clone() for k, v in model.state_dict().items()}

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (32, 16), generator=generator)
    args = hf.TrainingArguments(output_dir, max_steps=STEPS, per_device_train_batch_size=4, logging_steps=1,
                                save_steps=save_steps, save_strategy="steps" if save_steps else "no",
                                eval_strategy="steps" if evaluate else "no", eval_steps=SAVE_STEPS,
                                weight_decay=0.1, use_cpu=True, report_to=[], seed=0, disable_tqdm=True)
    recorder = Recorder()
    rows = [{"input_ids": r, "labels": r} for r in ids]
    trainer = hf.Trainer(_mup_gpt2(hf), args, train_dataset=rows, eval_dataset=rows[:8] if evaluate else None,
                         callbacks=([ScheduleFreeCallback()] if callback else []) + [recorder],
                         optimizer_cls_and_kwargs=mup_trainer_optimizer(MuAdamW_ScheduleFree, lr=1e-2,
                                                                        warmup_steps=2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train(resume_from_checkpoint=resume)
    return SimpleNamespace(trainer=trainer, losses=recorder.losses, saved_x=recorder.saved_x,
                           saved_y=recorder.saved_y, warnings=[str(w.message) for w in caught])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    hf, safetensors_torch = _import_hf()
    hf.logging.set_verbosity_error()
    root = tmp_path_factory.mktemp("trainer")
    saving = _train(hf, str(root / "saving"), callback=True)
    export = root / "export"
    saving.trainer.save_model(str(export))
    plain = _train(hf, str(root / "plain"), callback=False, save_steps=0)
    resumed = _train(hf, str(root / "resumed"), callback=True,
                     resume=str(root / "saving" / f"checkpoint-{SAVE_STEPS}"))
    evaluating = _train(hf, str(root / "evaluating"), callback=True, evaluate=True)
    evaluated_resume = _train(hf, str(root / "evaluated_resume"), callback=True, evaluate=True,
                              resume=str(root / "evaluating" / f"checkpoint-{SAVE_STEPS}"))
    return SimpleNamespace(hf=hf, load=safetensors_torch.load_file, root=root, export=export, saving=saving,
                           plain=plain, resumed=resumed, evaluating=evaluating, evaluated_resume=evaluated_resume)


def _assert_same(state, reference):
    assert state.keys() <= reference.keys()
    for key, value in state.items():
        assert torch.equal(value, reference[key]), key


def test_every_checkpoint_holds_x(runs):
    saved = runs.saving.saved_x
    assert sorted(saved) == list(range(SAVE_STEPS, STEPS + 1, SAVE_STEPS))
    for step, reference in saved.items():
        weights = runs.load(str(runs.root / "saving" / f"checkpoint-{step}" / "model.safetensors"))
        _assert_same(weights, reference)
        y = runs.saving.saved_y[step]
        assert any(not torch.equal(weights[k], y[k]) for k in weights), "x equals y: the check is vacuous"


def test_saved_model_after_train_holds_x_and_loads_with_from_pretrained(runs):
    final_x = runs.saving.saved_x[STEPS]
    _assert_same(runs.load(str(runs.export / "model.safetensors")), final_x)
    reloaded = runs.hf.GPT2LMHeadModel.from_pretrained(str(runs.export))
    _assert_same(reloaded.state_dict(), final_x)
    assert not runs.saving.trainer.optimizer.optimizer.train_mode


def test_checkpoints_do_not_change_the_run(runs):
    assert len(runs.saving.losses) == STEPS
    assert runs.saving.losses == runs.plain.losses


def test_resume_from_checkpoint_continues_bit_identically(runs):
    assert runs.resumed.losses == runs.saving.losses[SAVE_STEPS:]


def test_checkpoint_after_evaluation_holds_x_and_resumes_bit_identically(runs):
    """Trainer's evaluate() leaves the optimizer in eval mode; the save that follows writes that state."""
    for step, reference in runs.evaluating.saved_x.items():
        weights = runs.load(str(runs.root / "evaluating" / f"checkpoint-{step}" / "model.safetensors"))
        _assert_same(weights, reference)
    assert len(runs.evaluating.losses) == STEPS
    assert runs.evaluated_resume.losses == runs.evaluating.losses[SAVE_STEPS:]


def test_linear_schedule_warns_once_naming_constant(runs):
    messages = [m for m in runs.saving.warnings if "lr_scheduler_type" in m]
    assert len(messages) == 1
    assert 'lr_scheduler_type="constant"' in messages[0] and '"linear"' in messages[0]


def test_constant_schedule_does_not_warn():
    _import_hf()
    from mup_schedulefree import AdamWScheduleFree
    from mup_schedulefree.integrations.transformers import ScheduleFreeCallback
    optimizer = AdamWScheduleFree([torch.nn.Parameter(torch.ones(2))])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ScheduleFreeCallback().on_train_begin(SimpleNamespace(lr_scheduler_type="constant"), None, None,
                                              optimizer=optimizer)


def test_callback_refuses_an_optimizer_without_points_at_x():
    _import_hf()
    from mup_schedulefree.integrations.transformers import ScheduleFreeCallback
    with pytest.raises(TypeError, match="optimizer=SGD"):
        ScheduleFreeCallback().on_train_begin(SimpleNamespace(lr_scheduler_type="constant"), None, None,
                                              optimizer=torch.optim.SGD([torch.nn.Parameter(torch.ones(2))]))


def test_trainer_groups_keep_no_decay_for_biases_and_norms_with_mup_scaling(runs):
    model = runs.saving.trainer.model
    names = {id(p): n for n, p in model.named_parameters()}
    decays = {}
    for group in runs.saving.trainer.optimizer.param_groups:
        for p in group["params"]:
            decays[names[id(p)]] = (group["weight_decay"], group["mup_wd_mult"])
    for name, (weight_decay, multiplier) in decays.items():
        no_decay = name.endswith("bias") or ".ln_" in name
        assert (weight_decay == 0.0) == no_decay, name
        if not no_decay:
            assert weight_decay == pytest.approx(0.1 * multiplier), name
    assert {m for _, m in decays.values()} != {1.0}, "no group was scaled by muP"


FACTORY_CASES = [("MuAdamW_ScheduleFree", (), {"lr": 1e-2}), ("MuRAdam_ScheduleFree", (), {"lr": 1e-2}),
                 ("MuSGD_ScheduleFree", (), {"lr": 0.5}), ("MuAdamW_ScheduleFreeReference", (), {"lr": 1e-2}),
                 ("MuSGD_ScheduleFreeReference", (), {"lr": 0.5}),
                 ("MuScheduleFreeWrapper", (torch.optim.Adam,), {"lr": 1e-2, "betas": (0.0, 0.999)})]


@pytest.mark.parametrize("name, args, kwargs", FACTORY_CASES, ids=[case[0] for case in FACTORY_CASES])
def test_mup_trainer_optimizer_builds_every_factory_from_trainer_groups(name, args, kwargs):
    """Trainer's two groups, as ``create_optimizer`` builds them, go through each factory with their decay."""
    _import_hf()
    import mup
    import mup_schedulefree
    from mup_schedulefree.integrations.transformers import mup_trainer_optimizer

    def mlp(width):
        return torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                                   torch.nn.ReLU(), mup.MuReadout(width, 1))
    model = mlp(64)
    mup.set_base_shapes(model, mlp(16), delta=mlp(32))
    optimizer_class, optimizer_kwargs = mup_trainer_optimizer(getattr(mup_schedulefree, name), *args, **kwargs)
    assert isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    optimizer = optimizer_class([{"params": weights, "weight_decay": 0.1}, {"params": biases, "weight_decay": 0.0}],
                                **optimizer_kwargs)
    assert callable(getattr(optimizer, "points_at_x", None))
    decay = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    assert all(decay[id(p)] == 0.0 for p in biases)
    assert all(decay[id(p)] > 0.0 for p in weights)
    assert {group["mup_lr_mult"] for group in optimizer.param_groups} != {1.0}


def test_mup_trainer_optimizer_refuses_weight_decay():
    _import_hf()
    from mup_schedulefree import MuAdamW_ScheduleFree
    from mup_schedulefree.integrations.transformers import mup_trainer_optimizer
    with pytest.raises(ValueError, match="weight_decay=0.1.*TrainingArguments"):
        mup_trainer_optimizer(MuAdamW_ScheduleFree, lr=1e-3, weight_decay=0.1)


def test_tie_mu_readout_makes_gpt2_acceptable_to_set_base_shapes():
    hf, _ = _import_hf()
    import mup
    from mup_schedulefree.integrations.transformers import tie_mu_readout

    def plain(width):
        return hf.GPT2LMHeadModel(hf.GPT2Config(n_embd=width, n_layer=1, n_head=2, vocab_size=64, n_positions=8,
                                                bos_token_id=0, eos_token_id=0))
    with pytest.raises(AssertionError, match="lm_head"):
        mup.set_base_shapes(plain(32), plain(16), delta=plain(24))
    model = tie_mu_readout(plain(32))
    mup.set_base_shapes(model, tie_mu_readout(plain(16)), delta=tie_mu_readout(plain(24)))
    assert isinstance(model.lm_head, mup.MuSharedReadout)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.width_mult() == 2.0


def test_import_without_transformers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "mup_schedulefree.integrations.transformers", raising=False)
    with pytest.raises(ImportError) as raised:
        importlib.import_module("mup_schedulefree.integrations.transformers")
    message = str(raised.value)
    assert 'pip install "mup_schedulefree[hf]"' in message and "\n" not in message


def test_package_imports_without_the_frameworks():
    code = ("import sys\n"
            "for name in ('transformers', 'accelerate', 'lightning', 'pytorch_lightning'):\n"
            "    sys.modules[name] = None\n"
            "import mup_schedulefree, mup_schedulefree.integrations\n"
            "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
