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

Across depth (``run_depth_check``, ``run_depth_transfer``; Transformer only, the example model with
residual blocks) the contrast is muP without depth scaling (``"mup"``, depth-unaware: the plain
model with ``n_layers`` blocks and the muP optimizer) against CompleteP (``"completep"``, alpha 1)
or depth-muP (``"depth-mup"``, alpha 1/2): the same model with every residual branch multiplied by
(L_base / L) ** alpha (``mup_schedulefree.depth.scale_residual_branches``) and the optimizer built
with ``depth_mult = L / L_base`` and ``depth_alpha``. L_base is the base depth (default: the
smallest depth), where both are the same model and optimizer. The width stays muP throughout.
A depth check records the modules that every depth has: the embeddings, the residual stream
entering the final LayerNorm (``residual``, a probe added to the model), the final LayerNorm
and the readout.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Iterable, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mup_schedulefree.depth import scale_residual_branches
from mup_schedulefree.scaling import DEPTH_ALPHAS

from coord_checks import data
from coord_checks.choices import check_choice
from coord_checks.models import MODEL_NAMES, PARAMETRIZATIONS, build_model
from coord_checks.optimizers import DEFAULT_LRS, check_optimizer_name, optimizer_factory
from coord_checks.recording import check_axes, record_coords
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
#: Depth parametrizations: depth-unaware muP (the contrast) and the depth-aware ones, by alpha.
DEPTH_PARAMETRIZATIONS: tuple[str, ...] = ("mup", "completep", "depth-mup")
DEPTH_LABELS: dict[float, str] = {1.0: "completep", 0.5: "depth-mup"}
#: Depths (residual blocks) and width of the default depth check and sweep.
DEFAULT_DEPTHS: tuple[int, ...] = (2, 4, 8, 16)
DEFAULT_DEPTH_WIDTHS: tuple[int, ...] = (64,)
#: Name of the probe that records the residual stream entering the final LayerNorm.
RESIDUAL = "residual"
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
        zero_init: build muP's readout and query initialised to zero (``build_model``'s
            ``zero_init=True``, as mup's examples do); SP models are unaffected.
    """

    model: str
    train_batches: list[data.Batch]
    eval_batches: list[data.Batch]
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    zero_init: bool = False

    def _kwargs(self, parametrization: str) -> dict[str, Any]:
        return {**self.model_kwargs, **({"zero_init": True} if self.zero_init and parametrization == "mup" else {})}

    def build(self, width: int, parametrization: str) -> nn.Module:
        """The example model at ``width`` with base shapes set.

        Args:
            width: model width.
            parametrization: ``"mup"`` or ``"sp"``.

        Returns:
            The model (see ``coord_checks.models.build_model``).
        """
        return build_model(self.model, width, parametrization, **self._kwargs(parametrization))

    def build_deep(self, width: int, depth: int, parametrization: str, base_depth: int) -> nn.Module:
        """The example Transformer at ``width`` with ``depth`` blocks, in a depth parametrization.

        The width is muP's in every case. ``"mup"`` is the plain model (depth-unaware);
        ``"completep"`` and ``"depth-mup"`` multiply each residual branch by
        (base_depth / depth) ** alpha. Each has the ``residual`` probe (see the module docstring).

        Args:
            width: ``d_model``.
            depth: number of blocks.
            parametrization: one of ``DEPTH_PARAMETRIZATIONS``.
            base_depth: L_base.

        Returns:
            The model.
        """
        model = build_model(self.model, width, "mup", **{**self._kwargs("mup"), "n_layers": depth})
        add_residual_probe(model)
        alpha = depth_alpha_of(parametrization)
        if alpha is not None:
            scale_residual_branches(model, depth / base_depth, alpha)
        return model


def make_task(
    model: str,
    n_batches: int,
    batch_size: int | None = None,
    n_eval_batches: int = 1,
    eval_batch_size: int | None = None,
    seed: int = 0,
    zero_init: bool = False,
) -> Task:
    """Build the data for an example model.

    Args:
        model: ``"mlp"``, ``"cnn"`` or ``"transformer"``.
        n_batches: training batches (1 for a fixed batch, one per step for a stream).
        batch_size: examples (or sequences) per batch (default ``DEFAULT_BATCH_SIZES[model]``).
        n_eval_batches: held-out batches (from the last tenth of the text for the text tasks).
        eval_batch_size: examples per held-out batch (default ``batch_size``).
        seed: seed of the batch positions / images.
        zero_init: start muP's readout (and the Transformer's query projections) at zero.

    Returns:
        A ``Task``.

    Raises:
        ValueError: for an unknown model or non-positive sizes, or a ``zero_init`` that is not a bool.
    """
    check_model_name(model)
    if not isinstance(zero_init, bool):
        raise ValueError(f"zero_init must be a bool, got {zero_init!r}")
    batch_size = DEFAULT_BATCH_SIZES[model] if batch_size is None else batch_size
    eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
    if model == "cnn":
        images = data.gaussian_image_batches
        return Task(
            "cnn",
            images(batch_size=batch_size, n_batches=n_batches, seed=seed, **_IMAGE),
            images(batch_size=eval_batch_size, n_batches=n_eval_batches, seed=seed + 1, **_IMAGE),
            {"in_channels": _IMAGE["channels"], "n_classes": _IMAGE["n_classes"]},
            zero_init,
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
        zero_init,
    )


def add_residual_probe(model: nn.Module) -> nn.Module:
    """Add an identity submodule ``residual`` that sees the residual stream entering ``model.ln_f``.

    A forward pre-hook on the final LayerNorm passes its input through the probe, so recording the
    probe's output records the residual stream after the last block; the forward, the parameters
    and the state dict are unchanged.

    Args:
        model: a model with a final LayerNorm ``ln_f`` (the example GPT).

    Returns:
        The model, with the probe.

    Raises:
        ValueError: the model has no ``ln_f`` or already has a ``residual`` submodule.
    """
    final = getattr(model, "ln_f", None)
    if not isinstance(final, nn.Module):
        raise ValueError(f"Invalid model: {type(model).__name__} has no final LayerNorm ln_f to probe")
    if hasattr(model, RESIDUAL):
        raise ValueError(f"Invalid model: it already has a {RESIDUAL!r} attribute")
    probe = nn.Identity()
    model.add_module(RESIDUAL, probe)
    final.register_forward_pre_hook(lambda module, inputs: (probe(inputs[0]), *inputs[1:]))
    return model


def depth_alpha_of(parametrization: str) -> float | None:
    """The residual-branch exponent alpha of a depth parametrization.

    Args:
        parametrization: one of ``DEPTH_PARAMETRIZATIONS``.

    Returns:
        1.0 for ``"completep"``, 0.5 for ``"depth-mup"``, None for ``"mup"`` (depth-unaware).

    Raises:
        ValueError: for any other name.
    """
    check_choice("parametrization", parametrization, DEPTH_PARAMETRIZATIONS)
    return {label: alpha for alpha, label in DEPTH_LABELS.items()}.get(parametrization)


def depth_label(depth_alpha: float) -> str:
    """The depth parametrization of a residual-branch exponent.

    Args:
        depth_alpha: 1 (CompleteP) or 0.5 (depth-muP).

    Returns:
        ``"completep"`` or ``"depth-mup"``.

    Raises:
        ValueError: for any other alpha.
    """
    if isinstance(depth_alpha, bool) or depth_alpha not in DEPTH_ALPHAS:
        raise ValueError(f"Invalid depth_alpha: {depth_alpha!r} (must be one of {DEPTH_ALPHAS}: "
                         "1 for CompleteP, 0.5 for depth-muP)")
    return DEPTH_LABELS[float(depth_alpha)]


def depth_optimizer_factory(optimizer: str, parametrization: str, lr: float, base_depth: int,
                            **kwargs: Any) -> Callable[..., torch.optim.Optimizer]:
    """A ``(named_params, depth=L) -> optimizer`` factory for a depth parametrization.

    Args:
        optimizer: a name of ``coord_checks.optimizers.OPTIMIZER_NAMES``.
        parametrization: one of ``DEPTH_PARAMETRIZATIONS``; ``"mup"`` builds the muP optimizer
            without depth arguments, the others pass ``depth_mult = L / base_depth`` and their alpha.
        lr: the base learning rate.
        base_depth: L_base.
        **kwargs: further optimizer arguments.

    Returns:
        The factory (called as ``record_coords`` and ``sweep_learning_rates`` call it with depths).

    Raises:
        ValueError: for an unknown name, parametrization, a non-positive ``lr`` or ``base_depth``.
    """
    alpha = depth_alpha_of(parametrization)
    _check_base_depth(base_depth)
    optimizer_factory(optimizer, "mup", lr)  # validates the name and lr now

    def make(params: Iterable[Any], depth: int) -> torch.optim.Optimizer:
        scaling = {} if alpha is None else {"depth_mult": depth / base_depth, "depth_alpha": alpha}
        return optimizer_factory(optimizer, "mup", lr, **scaling, **kwargs)(params)

    return make


def _depth_setup(model: str, depths: Sequence[int] | None, widths: Sequence[int] | None,
                 base_depth: int | None, depth_alpha: float,
                 parametrizations: Sequence[str] | None) -> tuple[list[int], list[int], int, list[str]]:
    """Checked depths, widths, base depth and parametrizations of a depth check or sweep."""
    if model != "transformer":
        raise ValueError(f"Invalid model: {model!r} (depth needs residual blocks: only 'transformer' has them)")
    widths, depths = check_axes(list(DEFAULT_DEPTH_WIDTHS if widths is None else widths),
                                list(DEFAULT_DEPTHS if depths is None else depths))
    base_depth = _check_base_depth(min(depths) if base_depth is None else base_depth)
    if parametrizations is None:
        parametrizations = ("mup", depth_label(depth_alpha))
    if not parametrizations or any(p not in DEPTH_PARAMETRIZATIONS for p in parametrizations):
        raise ValueError(f"Invalid parametrizations: {list(parametrizations)} (must be a non-empty subset "
                         f"of {DEPTH_PARAMETRIZATIONS})")
    return widths, depths, base_depth, list(parametrizations)


def _check_base_depth(base_depth: Any) -> int:
    """``base_depth``, checked to be a positive int."""
    if isinstance(base_depth, bool) or not isinstance(base_depth, int) or base_depth <= 0:
        raise ValueError(f"Invalid base_depth: {base_depth!r} (must be a positive int)")
    return base_depth


def not_in_blocks(name: str, module: nn.Module) -> bool:
    """Module selector of a depth check: every module outside the residual blocks (every depth has them).

    Args:
        name: the module's name.
        module: the module (unused).

    Returns:
        Whether ``name`` lies outside ``blocks``.
    """
    return not name.startswith("blocks.")


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
    zero_init: bool = False,
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
        zero_init: start muP's readout and query at zero (see ``make_task``).
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
    task = make_task(model, n_batches=1 if batches == "fixed" else steps, batch_size=batch_size, zero_init=zero_init)
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
    zero_init: bool = False,
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
        zero_init: start muP's readout and query at zero (see ``make_task``).
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
        zero_init=zero_init,
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


def run_depth_check(
    model: str = "transformer",
    optimizer: str = "adamw",
    depths: Sequence[int] | None = None,
    widths: Sequence[int] | None = None,
    base_depth: int | None = None,
    depth_alpha: float = 1.0,
    steps: int | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    sequences: Sequence[str] = ("y", "x"),
    lr: float | None = None,
    batches: str = "fixed",
    batch_size: int | None = None,
    statistics: Sequence[str] = ("l1",),
    parametrizations: Sequence[str] | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
    zero_init: bool = False,
    record_steps: Sequence[int] | None = None,
) -> pd.DataFrame:
    """Coordinate check across depth: depth-unaware muP against CompleteP (or depth-muP).

    Records the modules outside the blocks and the ``residual`` probe (see the module docstring);
    judge the frame with ``coord_checks.verdict.judge``, which then fits slopes against log2(depth).

    Args:
        model: ``"transformer"`` (the only example model with residual blocks).
        optimizer: a name of ``coord_checks.optimizers.OPTIMIZER_NAMES``.
        depths: numbers of blocks, at least two distinct (default ``DEFAULT_DEPTHS``).
        widths: ``d_model``, one or more (default ``DEFAULT_DEPTH_WIDTHS``).
        base_depth: L_base (default: the smallest depth).
        depth_alpha: the depth-aware side: 1 (CompleteP) or 0.5 (depth-muP).
        steps: recorded steps, step 1 being the initialisation (default ``DEFAULT_STEPS``).
        seeds: initialisation seeds.
        sequences: ``"y"`` and/or ``"x"``.
        lr: base learning rate (default ``default_lr(model, optimizer)``).
        batches: ``"fixed"`` or ``"streaming"``.
        batch_size: sequences per batch (default ``DEFAULT_BATCH_SIZES[model]``).
        statistics: statistics to record.
        parametrizations: of ``DEPTH_PARAMETRIZATIONS`` (default ``"mup"`` and ``depth_alpha``'s).
        device: where to train.
        progress: show tqdm progress bars.
        zero_init: start muP's readout and query at zero (see ``make_task``).
        record_steps: the steps to record (default every step).

    Returns:
        The recording frame (``coord_checks.recording.DEPTH_COLUMNS``).

    Raises:
        ValueError: for a model other than the Transformer, bad depths, widths, base depth, alpha,
            parametrizations, optimizer or batch mode.
    """
    widths, depths, base_depth, parametrizations = _depth_setup(model, depths, widths, base_depth, depth_alpha,
                                                                parametrizations)
    check_optimizer_name(optimizer)
    if batches not in BATCH_MODES:
        raise ValueError(f"batches must be one of {BATCH_MODES}, got {batches!r}")
    steps = DEFAULT_STEPS[optimizer] if steps is None else steps
    lr = default_lr(model, optimizer) if lr is None else lr
    task = make_task(model, n_batches=1 if batches == "fixed" else steps, batch_size=batch_size, zero_init=zero_init)
    frames = [
        record_coords(
            model_factory=lambda w, d, p=parametrization: task.build_deep(w, d, p, base_depth),
            optimizer_factory=depth_optimizer_factory(optimizer, parametrization, lr, base_depth),
            widths=widths, depths=depths, batches=task.train_batches, loss_fn=cross_entropy, steps=steps,
            seeds=seeds, statistics=statistics, sequences=sequences, modules=not_in_blocks, device=device,
            parametrization=parametrization, progress=progress, record_steps=record_steps,
        )
        for parametrization in parametrizations
    ]
    return pd.concat(frames, ignore_index=True)


def run_depth_transfer(
    model: str = "transformer",
    optimizer: str = "adamw",
    depths: Sequence[int] | None = None,
    widths: Sequence[int] | None = None,
    base_depth: int | None = None,
    depth_alpha: float = 1.0,
    lrs: Sequence[float] | None = None,
    seeds: Sequence[int] = (0,),
    steps: int = 100,
    batch_size: int = 32,
    n_eval_batches: int = 4,
    eval_batch_size: int = 256,
    parametrizations: Sequence[str] | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
    zero_init: bool = False,
    eval_steps: Sequence[int] | None = None,
) -> pd.DataFrame:
    """Learning-rate sweep across depth: depth-unaware muP against CompleteP (or depth-muP).

    The data and evaluation are ``run_transfer``'s; fit with ``coord_checks.transfer.fit_optima``
    (one optimum per width and depth) and ``optimum_drift(..., axis="depth")``.

    Args:
        model: ``"transformer"``.
        optimizer: a name of ``coord_checks.optimizers.OPTIMIZER_NAMES``.
        depths: numbers of blocks, at least two distinct (default ``DEFAULT_DEPTHS``).
        widths: ``d_model``, one or more (default ``DEFAULT_DEPTH_WIDTHS``).
        base_depth: L_base (default: the smallest depth).
        depth_alpha: the depth-aware side: 1 (CompleteP) or 0.5 (depth-muP).
        lrs: learning-rate grid (default ``default_lr_grid(model, optimizer)``).
        seeds: initialisation seeds.
        steps: optimizer steps per run.
        batch_size: sequences per training batch.
        n_eval_batches: held-out batches.
        eval_batch_size: sequences per held-out batch.
        parametrizations: of ``DEPTH_PARAMETRIZATIONS`` (default ``"mup"`` and ``depth_alpha``'s).
        device: where to train.
        progress: show tqdm progress bars.
        zero_init: start muP's readout and query at zero (see ``make_task``).
        eval_steps: also evaluate every run at these step counts.

    Returns:
        The sweep frame (``coord_checks.transfer.SWEEP_COLUMNS`` with ``depth`` after ``width``).

    Raises:
        ValueError: for a model other than the Transformer, bad depths, widths, base depth, alpha,
            parametrizations or optimizer.
    """
    widths, depths, base_depth, parametrizations = _depth_setup(model, depths, widths, base_depth, depth_alpha,
                                                                parametrizations)
    check_optimizer_name(optimizer)
    lrs = default_lr_grid(model, optimizer) if lrs is None else lrs
    task = make_task(model, n_batches=steps, batch_size=batch_size, n_eval_batches=n_eval_batches,
                     eval_batch_size=eval_batch_size, zero_init=zero_init)
    frames = [
        sweep_learning_rates(
            model_factory=lambda w, d, p=parametrization: task.build_deep(w, d, p, base_depth),
            optimizer_factory=lambda params, lr, depth, p=parametrization, **decay: depth_optimizer_factory(
                optimizer, p, lr, base_depth, **decay)(params, depth=depth),
            widths=widths, depths=depths, lrs=list(lrs), train_batches=task.train_batches,
            eval_batches=task.eval_batches, loss_fn=cross_entropy, steps=steps, seeds=seeds, device=device,
            parametrization=parametrization, progress=progress, eval_steps=eval_steps,
        )
        for parametrization in parametrizations
    ]
    return pd.concat(frames, ignore_index=True)
