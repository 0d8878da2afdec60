"""Hugging Face ``Trainer`` with a schedule-free optimizer: checkpoints and the final model at x.

Trainer already calls ``optimizer.train()`` before each training step and ``optimizer.eval()``
before evaluating, so evaluation runs at x. Three seams remain, and this module closes them:

* :class:`ScheduleFreeCallback`: every checkpoint's model weights hold x without moving the model
  (training continues at y, bit-identically to a run without checkpoints); each checkpoint also
  keeps y, so ``resume_from_checkpoint`` continues bit-identically; after ``trainer.train()`` the
  model holds x, so ``trainer.save_model()`` and ``push_to_hub`` export x; a decaying lr scheduler
  (Trainer's default ``lr_scheduler_type="linear"``) triggers a warning.
* :func:`mup_trainer_optimizer`: any factory (``MuAdamW_ScheduleFree`` & co) as
  ``Trainer(optimizer_cls_and_kwargs=...)``, keeping Trainer's no-decay groups for biases and norms.
* :func:`tie_mu_readout`: the ``mup.MuSharedReadout`` a tied language-model head needs before
  ``mup.set_base_shapes`` accepts the model.

Requires ``pip install "mup_schedulefree[hf]"``.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import mup
import torch
from torch import nn

from ..training import state_dict_at_x, unwrap_optimizer
from . import require, restore_train_points, with_train_points

transformers = require("transformers", "hf", "mup_schedulefree.integrations.transformers")

CONSTANT_SCHEDULES = ("constant", "constant_with_warmup")


class ScheduleFreeCallback(transformers.TrainerCallback):
    """Checkpoints and the trained model at x, exact resume, and a warning for decaying schedules.

    Add it to any Trainer whose optimizer comes from this package::

        trainer = Trainer(model, args, train_dataset=data, callbacks=[ScheduleFreeCallback()],
                          optimizer_cls_and_kwargs=mup_trainer_optimizer(MuAdamW_ScheduleFree, lr=1e-3))

    What it does, step by step:

    * From the moment Trainer decides to save until the save is done, ``model.state_dict()``
      returns the parameters at x (computed out of place by ``state_dict_at_x``) and the optimizer's
      state dict carries each parameter's training point y. The model is never moved, so the run
      is bit-identical to one without checkpoints.
    * At the start of training (also when resuming), parameters loaded at x from a checkpoint are
      put back at the stored y, so a resumed run continues bit-identically.
    * At the end of training the optimizer is switched to eval: the model holds x, ready for
      ``trainer.save_model()``, ``push_to_hub`` or ``evaluate()``. A later ``trainer.train()``
      switches back (Trainer calls ``optimizer.train()`` before each step). With
      ``load_best_model_at_end`` the loaded best checkpoint already holds x and nothing moves.
    * A learning-rate schedule other than ``"constant"``/``"constant_with_warmup"`` triggers one
      warning at the start of training: schedule-free replaces the schedule, and a decay to 0
      freezes the average.
    """

    def __init__(self) -> None:
        self._handles: list[Any] = []
        self._computing = False

    def on_train_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        """Check the optimizer, warn about a decaying schedule, restore y after a resume.

        Args:
            args: the ``TrainingArguments``.
            state: the ``TrainerState``.
            control: the ``TrainerControl``.
            optimizer: the Trainer's optimizer (possibly wrapped by accelerate).
            **kwargs: the other objects Trainer passes to callbacks.
        """
        inner = self._optimizer(optimizer)
        if args.lr_scheduler_type not in CONSTANT_SCHEDULES:
            name = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
            warnings.warn(f'lr_scheduler_type="{name}" changes the learning rate during training; schedule-free '
                          'optimizers need no schedule and a decay to 0 stops the averaging: pass '
                          'lr_scheduler_type="constant" (warm up with the optimizer\'s warmup_steps or '
                          '"constant_with_warmup")', UserWarning, stacklevel=2)
        restore_train_points(inner)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Close a save window Trainer opened without saving (``save_strategy="best"``).

        Args:
            args: the ``TrainingArguments``.
            state: the ``TrainerState``.
            control: the ``TrainerControl``.
            **kwargs: the objects Trainer passes to callbacks.
        """
        self._close()

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                    **kwargs: Any) -> None:
        """Open the save window when Trainer is about to write a checkpoint after this step.

        Args:
            args: the ``TrainingArguments``.
            state: the ``TrainerState``.
            control: the ``TrainerControl``; ``should_save`` says whether a save follows.
            model: the model being trained.
            optimizer: the Trainer's optimizer.
            **kwargs: the other objects Trainer passes to callbacks.
        """
        if control.should_save:
            self._open(model, optimizer)

    def on_epoch_end(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                     **kwargs: Any) -> None:
        """Open the save window before an end-of-epoch checkpoint (``save_strategy="epoch"``).

        Args:
            args: the ``TrainingArguments``.
            state: the ``TrainerState``.
            control: the ``TrainerControl``.
            model: the model being trained.
            optimizer: the Trainer's optimizer.
            **kwargs: the other objects Trainer passes to callbacks.
        """
        if control.should_save:
            self._open(model, optimizer)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Close the save window: ``state_dict()`` of model and optimizer are plain again.

        Args:
            args: the ``TrainingArguments``.
            state: the ``TrainerState``.
            control: the ``TrainerControl``.
            **kwargs: the objects Trainer passes to callbacks.
        """
        self._close()

    def on_train_end(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        """Leave the model at x: ``optimizer.eval()`` (unless the best checkpoint, at x, was loaded).

        Args:
            args: the ``TrainingArguments``.
            state: the ``TrainerState``.
            control: the ``TrainerControl``.
            optimizer: the Trainer's optimizer.
            **kwargs: the other objects Trainer passes to callbacks.
        """
        self._close()
        if args.load_best_model_at_end and state.best_model_checkpoint is not None:
            return
        self._optimizer(optimizer).eval()

    @staticmethod
    def _optimizer(optimizer: Any) -> Any:
        inner = unwrap_optimizer(optimizer)
        if inner is None:
            raise TypeError(f"ScheduleFreeCallback needs a schedule-free optimizer of mup_schedulefree (one with "
                            f"points_at_x), got optimizer={type(optimizer).__name__}")
        return inner

    def _open(self, model: nn.Module, optimizer: Any) -> None:
        if self._handles:
            return
        inner = self._optimizer(optimizer)

        def weights_at_x(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
            if self._computing:
                return
            self._computing = True
            try:
                at_x = state_dict_at_x(module, inner)
            finally:
                self._computing = False
            for key, value in at_x.items():
                state_dict[prefix + key] = value

        self._handles = [model.register_state_dict_post_hook(weights_at_x),
                         inner.register_state_dict_post_hook(with_train_points)]

    def _close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def mup_trainer_optimizer(factory: Callable[..., torch.optim.Optimizer], *args: Any,
                          **kwargs: Any) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """A factory of this package as ``Trainer(optimizer_cls_and_kwargs=...)``.

    Trainer treats anything that is not a ``torch.optim.Optimizer`` subclass as a zero-argument
    factory of factories and calls ``optimizer_cls()(model, **kwargs)``; a plain factory then fails
    with ``missing 1 required positional argument: 'params'``. The returned class is an Optimizer
    subclass whose construction calls ``factory(groups, *args, **kwargs)``, so Trainer passes its
    usual groups: weight decay ``TrainingArguments.weight_decay`` on weights, 0 on biases and norm
    weights. The factory keeps those keys and scales them by muP's rules. The closure forms
    (``*_ScheduleFreeClosure``) do not fit Trainer, which calls ``step()`` without a closure.

    Example::

        trainer = Trainer(model, TrainingArguments(..., weight_decay=0.1, lr_scheduler_type="constant"),
                          optimizer_cls_and_kwargs=mup_trainer_optimizer(MuAdamW_ScheduleFree, lr=1e-3),
                          callbacks=[ScheduleFreeCallback()])

    Args:
        factory: ``MuAdamW_ScheduleFree`` or any other factory (or optimizer class) taking params first.
        *args: further positional arguments of the factory (the base class of ``MuScheduleFreeWrapper``).
        **kwargs: the factory's keyword arguments (lr, betas, warmup_steps, ...). Weight decay is
            Trainer's: set ``TrainingArguments(weight_decay=...)``.

    Returns:
        ``(optimizer_class, {})`` for ``optimizer_cls_and_kwargs``.
    """
    if not callable(factory):
        raise TypeError(f"factory must be callable, got factory={factory!r}")
    if "weight_decay" in kwargs:
        raise ValueError(f"weight_decay={kwargs['weight_decay']!r}: Trainer's groups set weight decay; pass it as "
                         "TrainingArguments(weight_decay=...), which Trainer applies to all but biases and norms")

    def __new__(cls: type, params: Any) -> torch.optim.Optimizer:
        return factory(params, *args, **kwargs)

    name = getattr(factory, "__name__", type(factory).__name__)
    return type(f"Trainer{name}", (torch.optim.Optimizer,), {"__new__": __new__, "__doc__": factory.__doc__}), {}


def tie_mu_readout(model: Any, **readout_kwargs: Any) -> Any:
    """Replace a model's tied output layer by a ``mup.MuSharedReadout`` sharing the input embedding.

    ``mup.set_base_shapes`` refuses a model whose readout (infinite fan-in, finite fan-out, such as
    GPT-2's ``lm_head`` tied to ``wte``) is a plain ``nn.Linear``. Call this on the model and on its
    base and delta models before ``set_base_shapes``; the weight stays the embedding's weight, the
    readout's bias (if any) is kept, and the output is divided by the width multiplier as muP needs.

    Args:
        model: a transformers ``PreTrainedModel`` with input and output embeddings.
        **readout_kwargs: passed to ``mup.MuSharedReadout`` (``output_mult``, ``readout_zero_init``).

    Returns:
        The model, changed in place.
    """
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or not isinstance(head, nn.Linear):
        raise ValueError(f"model={type(model).__name__} has no nn.Linear output embedding to tie, got {head!r}")
    if isinstance(head, mup.MuReadout):
        return model
    if head.weight is not embedding.weight:
        raise ValueError(f"model={type(model).__name__}: the output layer's weight is not tied to the input embedding; "
                         "replace it by mup.MuReadout instead")
    readout = mup.MuSharedReadout(embedding.weight, bias=False, **readout_kwargs)
    if head.bias is not None:
        readout.bias = head.bias
    model.set_output_embeddings(readout)
    return model
