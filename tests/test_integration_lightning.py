"""Lightning with ScheduleFreeCallback: validation and test at x, checkpoints at x, exact resume.

One module-scoped fixture fits a tiny regression model four times (checkpointing with the
callback, without the callback, resumed from a checkpoint, with validation); each test checks one
claim on the recorded runs. Two one-step fits check the callback's warning and error.
"""
import copy
import importlib
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

BATCHES_PER_EPOCH, EVERY, STEPS = 3, 3, 8


def _import_lightning():
    try:
        return importlib.import_module("lightning.pytorch")
    except ImportError as error:
        pytest.skip(f"lightning not importable ({error}): pip install 'mup_schedulefree[lightning]'")


def _x_reference(module, optimizer):
    """Parameters at x computed independently of the callback: eval() on a deep copy."""
    module_copy, optimizer_copy = copy.deepcopy((module, optimizer))
    optimizer_copy.eval()
    return {k: v.clone() for k, v in module_copy.state_dict().items()}


def _fit(pl, root, *, callback, validate=False, ckpt_path=None):
    from mup_schedulefree import AdamWScheduleFree
    from mup_schedulefree.integrations.lightning import ScheduleFreeCallback

    class Regression(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
            self.losses, self.validated = [], []

        def training_step(self, batch, index):
            loss = nn.functional.mse_loss(self.net(batch[0]), batch[1])
            self.losses.append(loss.item())
            return loss

        def validation_step(self, batch, index):
            self.validated.append({k: v.clone() for k, v in self.state_dict().items()})

        def test_step(self, batch, index):
            self.validated.append({k: v.clone() for k, v in self.state_dict().items()})

        def configure_optimizers(self):
            return AdamWScheduleFree(self.parameters(), lr=1e-2, warmup_steps=2)

    class Recorder(pl.Callback):
        """x before each validation and at the end (listed first: runs before the callback switches), at each save."""

        def __init__(self):
            self.x_at_validation, self.x_at_save, self.train_mode_at_batch = [], {}, []

        def on_validation_start(self, trainer, module):
            self.x_at_validation.append(_x_reference(module, trainer.optimizers[0]))

        def on_train_batch_start(self, trainer, module, batch, index):
            self.train_mode_at_batch.append(trainer.optimizers[0].train_mode)

        def on_train_end(self, trainer, module):
            self.x_at_end = _x_reference(module, trainer.optimizers[0])

        def on_save_checkpoint(self, trainer, module, checkpoint):
            self.x_at_save[trainer.global_step] = _x_reference(module, trainer.optimizers[0])

    generator = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(8 * BATCHES_PER_EPOCH, 4, generator=generator),
                                          torch.randn(8 * BATCHES_PER_EPOCH, 1, generator=generator))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    recorder = Recorder()
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=root, every_n_train_steps=EVERY, save_top_k=-1)
    torch.manual_seed(0)
    module = Regression()
    trainer = pl.Trainer(max_steps=STEPS, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=1 if validate else 0,
                         limit_val_batches=1 if validate else 0,
                         callbacks=[recorder] + ([ScheduleFreeCallback()] if callback else []) + [checkpoints])
    trainer.fit(module, loader, loader if validate else None, ckpt_path=ckpt_path)
    return SimpleNamespace(trainer=trainer, module=module, recorder=recorder, loader=loader)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    pl = _import_lightning()
    root = tmp_path_factory.mktemp("lightning")
    saving = _fit(pl, root / "saving", callback=True)
    plain = _fit(pl, root / "plain", callback=False)
    first = root / "saving" / f"epoch=0-step={EVERY}.ckpt"
    resumed = _fit(pl, root / "resumed", callback=True, ckpt_path=first)
    validating = _fit(pl, root / "validating", callback=True, validate=True)
    return SimpleNamespace(pl=pl, root=root, saving=saving, plain=plain, resumed=resumed, validating=validating)


def _assert_same(state, reference):
    assert state.keys() == reference.keys()
    for key, value in state.items():
        assert torch.equal(value, reference[key]), key


def test_every_n_train_steps_checkpoints_hold_x(runs):
    saved = runs.saving.recorder.x_at_save
    assert sorted(saved) == [EVERY, 2 * EVERY]
    for step, reference in saved.items():
        checkpoint = torch.load(runs.root / "saving" / f"epoch={step // BATCHES_PER_EPOCH - 1}-step={step}.ckpt",
                                weights_only=False)
        _assert_same(checkpoint["state_dict"], reference)


def test_checkpoints_do_not_change_the_run(runs):
    assert len(runs.saving.module.losses) == STEPS
    assert runs.saving.module.losses == runs.plain.module.losses


def test_resume_continues_training_bit_identically(runs):
    assert runs.resumed.module.losses == runs.saving.module.losses[EVERY:]
    optimizer = runs.resumed.trainer.optimizers[0]
    assert not any(len(state) > 3 for state in optimizer.state.values()), "stored training points left in state"


def test_validation_batches_see_x_and_training_returns_to_y(runs):
    recorder, validated = runs.validating.recorder, runs.validating.module.validated
    assert len(recorder.x_at_validation) == len(validated) >= 3
    for reference, seen in zip(recorder.x_at_validation, validated):
        _assert_same(seen, reference)
    assert len(recorder.train_mode_at_batch) == STEPS and all(recorder.train_mode_at_batch)


def test_model_after_fit_holds_x_and_test_runs_there(runs):
    run = runs.saving
    optimizer = run.trainer.optimizers[0]
    assert not optimizer.train_mode
    final_x = run.recorder.x_at_end
    _assert_same(run.module.state_dict(), final_x)
    run.module.validated.clear()
    run.trainer.test(run.module, run.loader, verbose=False)
    assert run.module.validated and all(torch.equal(s[k], final_x[k]) for s in run.module.validated for k in s)
    assert not optimizer.train_mode


def test_import_without_lightning_names_the_extra(monkeypatch):
    for name in ("lightning", "lightning.pytorch", "pytorch_lightning"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "mup_schedulefree.integrations.lightning", raising=False)
    with pytest.raises(ImportError) as raised:
        importlib.import_module("mup_schedulefree.integrations.lightning")
    message = str(raised.value)
    assert 'pip install "mup_schedulefree[lightning]"' in message and "\n" not in message


def _tiny_fit(pl, root, optimizer_class, checkpoint):
    from mup_schedulefree.integrations.lightning import ScheduleFreeCallback

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(2, 1)

        def training_step(self, batch, index):
            return self.net(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return optimizer_class(self.parameters(), lr=1e-2)

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(4, 2)), batch_size=2)
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=root,
                         callbacks=[ScheduleFreeCallback(), checkpoint])
    module = Tiny()
    trainer.fit(module, loader)
    return module, trainer


def test_weights_only_checkpoints_warn_that_they_hold_y(tmp_path):
    pl = _import_lightning()
    from mup_schedulefree import AdamWScheduleFree
    with pytest.warns(UserWarning, match="save_weights_only=True.*hold the training point y"):
        _tiny_fit(pl, tmp_path, AdamWScheduleFree, pl.callbacks.ModelCheckpoint(tmp_path, save_weights_only=True))


def test_callback_refuses_an_optimizer_without_points_at_x(tmp_path):
    pl = _import_lightning()
    with pytest.raises(TypeError, match=r"trainer.optimizers=\['SGD'\]"):
        _tiny_fit(pl, tmp_path, torch.optim.SGD, pl.callbacks.ModelCheckpoint(tmp_path))


def test_closure_forms_train_with_the_callback_and_save_their_x(tmp_path):
    """Lightning passes a closure to every step, so the closure forms fit it; they have no modes
    (their parameters hold x between steps), and the callback leaves them so."""
    pl = _import_lightning()
    from mup_schedulefree import AdamWScheduleFreeClosure
    module, trainer = _tiny_fit(pl, tmp_path, AdamWScheduleFreeClosure, pl.callbacks.ModelCheckpoint(tmp_path))
    saved = torch.load(trainer.checkpoint_callback.best_model_path or next(tmp_path.glob("*.ckpt")),
                       weights_only=False)["state_dict"]
    for key, value in module.state_dict().items():
        assert torch.equal(saved[key], value), key
