"""Lightning with a schedule-free optimizer: evaluate and checkpoint at x, resume exactly.

Lightning calls neither ``optimizer.train()`` nor ``optimizer.eval()``: without help, validation
runs at the training point y and checkpoints hold y. :class:`ScheduleFreeCallback` fixes both.
It imports ``lightning.pytorch`` (``pip install "mup_schedulefree[lightning]"``), or
``pytorch_lightning`` where only that is installed.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Any

from torch import nn

from ..training import state_dict_at_x, unwrap_optimizer
from . import require, restore_train_points, with_train_points


def _import_lightning() -> Any:
    try:
        return importlib.import_module("lightning.pytorch")
    except ImportError:
        pass
    try:
        return importlib.import_module("pytorch_lightning")
    except ImportError:
        return require("lightning.pytorch", "lightning", "mup_schedulefree.integrations.lightning")


pl = _import_lightning()


class ScheduleFreeCallback(pl.Callback):
    """Validation, test and predict at x; checkpoints at x that resume training at y exactly.

    Add it to the Trainer whose LightningModule's ``configure_optimizers`` returns optimizers of
    this package::

        trainer = lightning.pytorch.Trainer(callbacks=[ScheduleFreeCallback()], ...)

    * ``optimizer.train()`` before training; ``optimizer.eval()`` around the validation, test and
      predict loops, then back to the mode before. After ``fit`` the model holds x.
    * Checkpoints: ``checkpoint["state_dict"]`` holds x, computed out of place (the model is not
      moved, so saving does not change the run), and the optimizer states keep y, so
      ``fit(ckpt_path=...)`` continues training bit-identically. ``ModelCheckpoint(save_weights_only=True)``
      files are written without callbacks and hold y: a warning says so.
    """

    def __init__(self) -> None:
        self._modes: list[bool] = []

    @staticmethod
    def _optimizers(trainer: Any) -> list[Any]:
        found = [unwrap_optimizer(optimizer) for optimizer in trainer.optimizers]
        return [optimizer for optimizer in found if optimizer is not None]

    def _restore(self, trainer: Any) -> list[Any]:
        """Restore stored training points; return the optimizers with train/eval modes.

        Closure forms have no modes: their parameters hold x between steps already.
        """
        optimizers = [optimizer for optimizer in self._optimizers(trainer) if hasattr(optimizer, "train_mode")]
        for optimizer in optimizers:
            restore_train_points(optimizer)
        return optimizers

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Check that an optimizer of this package is there; warn about weights-only checkpoints.

        Args:
            trainer: the Lightning Trainer.
            pl_module: the LightningModule.
        """
        if not self._optimizers(trainer):
            names = [type(optimizer).__name__ for optimizer in trainer.optimizers]
            raise TypeError(f"ScheduleFreeCallback needs a schedule-free optimizer of mup_schedulefree (one with "
                            f"points_at_x), got trainer.optimizers={names}")
        for callback in trainer.checkpoint_callbacks:
            if getattr(callback, "save_weights_only", False):
                warnings.warn(f"{type(callback).__name__}(save_weights_only=True) writes checkpoints without calling "
                              "callbacks: they hold the training point y, not x", UserWarning, stacklevel=2)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Put the parameters at y (restoring the exact y of a checkpoint being resumed).

        Args:
            trainer: the Lightning Trainer.
            pl_module: the LightningModule.
        """
        for optimizer in self._restore(trainer):
            optimizer.train()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Leave the model at x after training.

        Args:
            trainer: the Lightning Trainer.
            pl_module: the LightningModule.
        """
        for optimizer in self._restore(trainer):
            optimizer.eval()

    def _enter_eval(self, trainer: Any) -> None:
        optimizers = self._restore(trainer)
        self._modes = [optimizer.train_mode for optimizer in optimizers]
        for optimizer in optimizers:
            optimizer.eval()

    def _leave_eval(self, trainer: Any) -> None:
        for optimizer, mode in zip(self._restore(trainer), self._modes):
            if mode:
                optimizer.train()
        self._modes = []

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        """Switch to x for validation (the sanity check included).

        Args:
            trainer: the Lightning Trainer.
            pl_module: the LightningModule.
        """
        self._enter_eval(trainer)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        """Return to the mode before validation.

        Args:
            trainer: the Lightning Trainer.
            pl_module: the LightningModule.
        """
        self._leave_eval(trainer)

    def on_test_start(self, trainer: Any, pl_module: Any) -> None:
        """Switch to x for testing.

        Args:
            trainer: the Lightning Trainer.
            pl_module: the LightningModule.
        """
        self._enter_eval(trainer)

    def on_test_end(self, trainer: Any, pl_module: Any) -> None:
        """Return to the mode before testing.

        Args:
            trainer: the Lightning Trainer.
            pl_module: the LightningModule.
        """
        self._leave_eval(trainer)

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        """Switch to x for prediction.

        Args:
            trainer: the Lightning Trainer.
            pl_module: the LightningModule.
        """
        self._enter_eval(trainer)

    def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
        """Return to the mode before prediction.

        Args:
            trainer: the Lightning Trainer.
            pl_module: the LightningModule.
        """
        self._leave_eval(trainer)

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """Write the weights at x and keep each optimizer's training point y beside its state.

        Args:
            trainer: the Lightning Trainer.
            pl_module: the LightningModule.
            checkpoint: the checkpoint dict being written; changed in place.
        """
        optimizers = self._optimizers(trainer)
        checkpoint["state_dict"] = _state_dict_at_x(pl_module, optimizers, checkpoint["state_dict"])
        states = checkpoint.get("optimizer_states", [])
        for index, optimizer in enumerate(trainer.optimizers):
            inner = unwrap_optimizer(optimizer)
            if inner is not None and index < len(states):
                states[index] = with_train_points(inner, states[index])


def _state_dict_at_x(module: nn.Module, optimizers: list[Any], state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` with every parameter of each optimizer at x; one optimizer's x per parameter."""
    result = dict(state_dict)
    for optimizer in optimizers:
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        at_x = state_dict_at_x(module, optimizer)
        for name, p in module.named_parameters(remove_duplicate=False):
            if id(p) in owned and name in result:
                result[name] = at_x[name]
    return result
