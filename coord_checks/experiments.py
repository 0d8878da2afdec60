"""Ready-made experiments: an example model, its data and loss, and a named optimizer, run in
both standard parametrization (SP) and muP.

Tasks (all deterministic, nothing downloaded):

* ``mlp``: next-character prediction from 8 one-hot characters of standard-library source code
  (``coord_checks.data.stdlib_text``), 2 hidden layers.
* ``transformer``: next-character language modelling on the same text, 16-character sequences,
  2 blocks, 4 heads (``head_dim`` grows with width).
* ``cnn``: 8x8 Gaussian images labelled by a fixed random linear teacher, 10 classes (coordinate
  checks only: there is no real image data without a download).

The default learning rates are ones at which SP visibly breaks width-independence within a few
steps; muP, tuned at the base width (where it equals SP), should not.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from coord_checks import data
from coord_checks.choices import check_choice
from coord_checks.models import MODEL_NAMES, PARAMETRIZATIONS, build_model
from coord_checks.optimizers import DEFAULT_LRS, check_optimizer_name, optimizer_factory
from coord_checks.recording import record_coords
from coord_checks.transfer import lr_grid, sweep_learning_rates

#: Widths of the default coordinate check per model (16x for MLP and CNN, 8x for the Transformer).
DEFAULT_WIDTHS: dict[str, tuple[int, ...]] = {
    "mlp": (64, 128, 256, 512, 1024),
    "cnn": (16, 32, 64, 128, 256),
    "transformer": (32, 64, 128, 256),
}
#: Widths of the default learning-rate sweep per model (models with real data only).
TRANSFER_WIDTHS: dict[str, tuple[int, ...]] = {"mlp": (64, 256, 1024), "transformer": (32, 64, 128)}
DEFAULT_BATCH_SIZES: dict[str, int] = {"mlp": 32, "cnn": 32, "transformer": 16}
#: Recorded steps of the default check; RAdam takes no step during its first few (silent SGD
#: phase while its variance estimate is unreliable), so it needs more.
DEFAULT_STEPS: dict[str, int] = {"adamw": 4, "sgd": 4, "radam": 10, "wrapper": 4, "adamc-plus": 4,
                                 "adamc-plus-naive": 4, "muon": 4, "muon-unscaled": 4}
#: Learning rates that differ from ``DEFAULT_LRS`` for one model.
_LR_OVERRIDES: dict[tuple[str, str], float] = {("transformer", "sgd"): 1.0}
BATCH_MODES: tuple[str, ...] = ("fixed", "streaming")
_CONTEXT = 8
_SEQ_LEN = 16
_IMAGE = {"channels": 3, "size": 8, "n_classes": 10}


def check_model_name(model: str) -> str:
    """Validate an example-model name.

    Args:
        model: one of ``MODEL_NAMES``.

    Returns:
        The name, unchanged.

    Raises:
        ValueError: for any other name.
    """
    return check_choice("model", model, MODEL_NAMES)


def default_lr(model: str, optimizer: str) -> float:
    """The learning rate a check uses when none is given.

    Args:
        model: an example-model name.
        optimizer: an optimizer name.

    Returns:
        The base-width learning rate.
    """
    check_model_name(model)
    check_optimizer_name(optimizer)
    return _LR_OVERRIDES.get((model, optimizer), DEFAULT_LRS[optimizer])


def default_lr_grid(model: str, optimizer: str) -> list[float]:
    """The default grid of a transfer sweep: 9 points, one per octave, centred on
    ``default_lr(model, optimizer)``.

    Args:
        model: an example-model name.
        optimizer: an optimizer name.

    Returns:
        Increasing learning rates.
    """
    return lr_grid(default_lr(model, optimizer), octaves=4)


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy over every position (works for ``(B, C)`` and ``(B, T, C)`` logits).

    Args:
        logits: class scores, classes in the last dimension.
        targets: class indices with the leading shape of ``logits``.

    Returns:
        A scalar loss.
    """
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@lru_cache(maxsize=1)
def _corpus_splits() -> tuple[Tensor, Tensor]:
    return data.split_tokens(data.encode(data.stdlib_text()))


@dataclass(frozen=True)
class Task:
    """An example model with its data.

    Attributes:
        model: ``"mlp"``, ``"cnn"`` or ``"transformer"``.
        train_batches: training batches (cycled by the loops).
        eval_batches: held-out batches.
        model_kwargs: arguments for ``coord_checks.models.build_model``.
    """

    model: str
    train_batches: list[data.Batch]
    eval_batches: list[data.Batch]
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self, width: int, parametrization: str) -> nn.Module:
        """The example model at ``width`` with base shapes set.

        Args:
            width: model width.
            parametrization: ``"mup"`` or ``"sp"``.

        Returns:
            The model (see ``coord_checks.models.build_model``).
        """
        return build_model(self.model, width, parametrization, **self.model_kwargs)


def make_task(
    model: str,
    n_batches: int,
    batch_size: int | None = None,
    n_eval_batches: int = 1,
    eval_batch_size: int | None = None,
    seed: int = 0,
) -> Task:
    """Build the data for an example model.

    Args:
        model: ``"mlp"``, ``"cnn"`` or ``"transformer"``.
        n_batches: training batches (1 for a fixed batch, one per step for a stream).
        batch_size: examples (or sequences) per batch (default ``DEFAULT_BATCH_SIZES[model]``).
        n_eval_batches: held-out batches (from the last tenth of the text for the text tasks).
        eval_batch_size: examples per held-out batch (default ``batch_size``).
        seed: seed of the batch positions / images.

    Returns:
        A ``Task``.

    Raises:
        ValueError: for an unknown model or non-positive sizes.
    """
    check_model_name(model)
    batch_size = DEFAULT_BATCH_SIZES[model] if batch_size is None else batch_size
    eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
    if model == "cnn":
        images = data.gaussian_image_batches
        return Task(
            "cnn",
            images(batch_size=batch_size, n_batches=n_batches, seed=seed, **_IMAGE),
            images(batch_size=eval_batch_size, n_batches=n_eval_batches, seed=seed + 1, **_IMAGE),
            {"in_channels": _IMAGE["channels"], "n_classes": _IMAGE["n_classes"]},
        )
    train_tokens, held_out_tokens = _corpus_splits()
    if model == "mlp":
        make, length = data.char_context_batches, _CONTEXT
        kwargs = {"d_in": _CONTEXT * data.VOCAB_SIZE, "d_out": data.VOCAB_SIZE}
    else:
        make, length = data.char_sequence_batches, _SEQ_LEN
        kwargs = {"max_seq_len": _SEQ_LEN}
    return Task(
        model,
        make(train_tokens, length, batch_size, n_batches, seed),
        make(held_out_tokens, length, eval_batch_size, n_eval_batches, seed),
        kwargs,
    )


def _check_parametrizations(parametrizations: Sequence[str]) -> list[str]:
    if not parametrizations or any(p not in PARAMETRIZATIONS for p in parametrizations):
        raise ValueError(
            f"parametrizations must be a non-empty subset of {PARAMETRIZATIONS}, "
            f"got {list(parametrizations)}"
        )
    return list(parametrizations)


def run_coord_check(
    model: str = "mlp",
    optimizer: str = "adamw",
    widths: Sequence[int] | None = None,
    steps: int | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    sequences: Sequence[str] = ("y", "x"),
    lr: float | None = None,
    batches: str = "fixed",
    batch_size: int | None = None,
    statistics: Sequence[str] = ("l1",),
    parametrizations: Sequence[str] = ("sp", "mup"),
    device: str | torch.device = "cpu",
    progress: bool = False,
    record_steps: Sequence[int] | None = None,
) -> pd.DataFrame:
    """Coordinate check of a named optimizer on an example model, in SP and in muP.

    Args:
        model: ``"mlp"``, ``"cnn"`` or ``"transformer"``.
        optimizer: a name of ``coord_checks.optimizers.OPTIMIZER_NAMES``.
        widths: model widths (default ``DEFAULT_WIDTHS[model]``).
        steps: recorded steps, step 1 being the initialisation (default ``DEFAULT_STEPS``).
        seeds: initialisation seeds.
        sequences: ``"y"`` and/or ``"x"``.
        lr: base-width learning rate (default ``default_lr(model, optimizer)``).
        batches: ``"fixed"`` (one batch, reused) or ``"streaming"`` (a new batch every step).
        batch_size: examples per batch (default ``DEFAULT_BATCH_SIZES[model]``).
        statistics: statistics to record (see ``coord_checks.recording.STATISTICS``).
        parametrizations: which of ``"sp"`` and ``"mup"`` to run.
        device: where to train.
        progress: show tqdm progress bars.
        record_steps: the steps to record (default every step; see ``record_coords``).

    Returns:
        The recording frame of all runs (``coord_checks.recording.COLUMNS``).

    Raises:
        ValueError: for an unknown model, optimizer, batch mode or parametrization.
    """
    check_model_name(model)
    check_optimizer_name(optimizer)
    if batches not in BATCH_MODES:
        raise ValueError(f"batches must be one of {BATCH_MODES}, got {batches!r}")
    parametrizations = _check_parametrizations(parametrizations)
    widths = DEFAULT_WIDTHS[model] if widths is None else widths
    steps = DEFAULT_STEPS[optimizer] if steps is None else steps
    lr = default_lr(model, optimizer) if lr is None else lr
    task = make_task(model, n_batches=1 if batches == "fixed" else steps, batch_size=batch_size)
    frames = [
        record_coords(
            model_factory=lambda w, p=parametrization: task.build(w, p),
            optimizer_factory=optimizer_factory(optimizer, parametrization, lr),
            widths=list(widths),
            batches=task.train_batches,
            loss_fn=cross_entropy,
            steps=steps,
            seeds=seeds,
            statistics=statistics,
            sequences=sequences,
            device=device,
            parametrization=parametrization,
            progress=progress,
            record_steps=record_steps,
        )
        for parametrization in parametrizations
    ]
    return pd.concat(frames, ignore_index=True)


def run_transfer(
    model: str = "mlp",
    optimizer: str = "adamw",
    widths: Sequence[int] | None = None,
    lrs: Sequence[float] | None = None,
    seeds: Sequence[int] = (0,),
    steps: int = 100,
    batch_size: int = 32,
    n_eval_batches: int = 4,
    eval_batch_size: int = 256,
    parametrizations: Sequence[str] = ("sp", "mup"),
    device: str | torch.device = "cpu",
    progress: bool = False,
    eval_steps: Sequence[int] | None = None,
    weight_decays: Sequence[float] | None = None,
) -> pd.DataFrame:
    """Learning-rate sweep of a named optimizer on a text task, in SP and in muP.

    Every step sees a fresh batch of standard-library text (``steps`` batches, the same for every
    run); the loss is evaluated at x on held-out batches from the last tenth of the text.

    Args:
        model: ``"mlp"`` or ``"transformer"``.
        optimizer: a name of ``coord_checks.optimizers.OPTIMIZER_NAMES``.
        widths: model widths (default ``TRANSFER_WIDTHS[model]``).
        lrs: learning-rate grid (default ``default_lr_grid(model, optimizer)``).
        seeds: initialisation seeds.
        steps: optimizer steps per run.
        batch_size: examples per training batch.
        n_eval_batches: held-out batches.
        eval_batch_size: examples per held-out batch.
        parametrizations: which of ``"sp"`` and ``"mup"`` to sweep.
        device: where to train.
        progress: show tqdm progress bars.
        eval_steps: also evaluate every run at these step counts (an anytime sweep).
        weight_decays: also sweep these weight decays (a 2-D grid; see
            ``coord_checks.transfer.fit_joint_optima``).

    Returns:
        The sweep frame (``coord_checks.transfer.SWEEP_COLUMNS``).

    Raises:
        ValueError: for a model without real data (``"cnn"``) or an unknown name.
    """
    if model not in TRANSFER_WIDTHS:
        raise ValueError(
            f"model must be one of {tuple(TRANSFER_WIDTHS)} for a transfer sweep, got {model!r}"
        )
    check_optimizer_name(optimizer)
    parametrizations = _check_parametrizations(parametrizations)
    widths = TRANSFER_WIDTHS[model] if widths is None else widths
    lrs = default_lr_grid(model, optimizer) if lrs is None else lrs
    task = make_task(
        model,
        n_batches=steps,
        batch_size=batch_size,
        n_eval_batches=n_eval_batches,
        eval_batch_size=eval_batch_size,
    )
    frames = [
        sweep_learning_rates(
            model_factory=lambda w, p=parametrization: task.build(w, p),
            optimizer_factory=lambda params, lr, p=parametrization, **decay: optimizer_factory(
                optimizer, p, lr, **decay
            )(params),
            widths=list(widths),
            lrs=list(lrs),
            train_batches=task.train_batches,
            eval_batches=task.eval_batches,
            loss_fn=cross_entropy,
            steps=steps,
            seeds=seeds,
            device=device,
            parametrization=parametrization,
            progress=progress,
            eval_steps=eval_steps,
            weight_decays=weight_decays,
        )
        for parametrization in parametrizations
    ]
    return pd.concat(frames, ignore_index=True)
