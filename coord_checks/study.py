"""Does muP pay off? muP tuned at the base width only, against standard parametrization tuned at every width.

The protocol follows what a user of muP does, and what a user without it would have to do:

* **muP** is tuned at the smallest (base) width only: its learning rate, and for some variants its
  multipliers or per-role learning rates. Those values are then used unchanged at every width.
* **SP** (standard parametrization) is tuned at every width, which is what muP is meant to save.

Three splits keep the comparison honest. Every choice (the best learning rate, the best
multiplier) is made on the *validation* loss; the losses reported are *test* losses, measured on
text no choice has seen. Both held-out sets come from the last tenth of the corpus (validation its
first half, test its second), the training batches from the rest. Every run is evaluated at the
schedule-free evaluation point x, after ``steps`` steps and at every step of ``eval_steps`` on the
way (schedule-free training has no horizon, so one run answers every budget).

Learning rates live on a lattice ``2 ** (k / points_per_octave)``. A search at one width starts
with a few lattice points around a guess and adds one point past whichever edge holds the seed-mean
minimum, until the minimum is inside (``max_points`` bounds it). The guess for SP at the next width
extrapolates the optima found so far, so SP's optimum, which moves by about an octave per doubling
with Adam, is bracketed after five or six points; muP's grid is centred on the transferred rate.

Each variant of muP is a set of *knobs* (``Knobs``): zero-initialised readout and query, the input,
output and attention multipliers, per-role learning-rate multipliers, the schedule-free momentum
``beta``, Adam's ``eps`` and muP's eps scaling. Knobs of the optimizer (``beta``, ``eps``) change
SP as well, so that an improvement is not credited to muP when SP would enjoy it too.

Every finished run is appended to a CSV at once (``RunStore``), keyed by its knobs, width, learning
rate and seed; a study that is interrupted and started again skips the runs it has and takes the
same decisions, so it ends where an uninterrupted study would.

``run_study`` returns the tidy frame of runs; ``summarize`` turns it into one row per (variant,
horizon, width): the learning rate each side uses, its test loss with the spread over seeds, the
gap (muP minus SP, paired by seed) and whether muP's loss keeps falling with width.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from mup_schedulefree.files import replace_atomically

from coord_checks import data
from coord_checks.diagnose import parameter_roles, role_groups
from coord_checks.experiments import check_model_name, cross_entropy, default_lr
from coord_checks.models import N_HEADS, build_model
from coord_checks.optimizers import check_optimizer_name, optimizer_factory
from coord_checks.recording import check_widths, rng_devices
from coord_checks.transfer import parabola_vertex, train_and_evaluate_sets

logger = logging.getLogger(__name__)

#: Optimizers a study can run (the wrapper's momentum is not the base's ``beta``).
STUDY_OPTIMIZERS: tuple[str, ...] = ("adamw", "radam", "sgd")
#: muP multipliers a variant can tune at the base width.
MULTIPLIERS: tuple[str, ...] = ("input", "output", "attn")
#: Values tried for a multiplier or a role's lr multiplier at the base width.
DEFAULT_MULT_GRID: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
#: Columns of the run frame, one row per (run, evaluation step).
RUN_COLUMNS: tuple[str, ...] = (
    "parametrization", "zero_init", "input_mult", "output_mult", "attn_mult", "role_lrs", "beta", "eps",
    "scale_eps", "width", "lr", "log2_lr", "seed", "step", "train_loss", "valid_loss", "test_loss",
    "diverged", "seconds",
)
_KEY_COLUMNS: tuple[str, ...] = RUN_COLUMNS[: RUN_COLUMNS.index("lr") + 1] + ("seed",)
_CONTEXT = 8


@dataclass(frozen=True)
class Knobs:
    """Everything that defines a run apart from its width, learning rate and seed.

    Attributes:
        parametrization: ``"mup"`` or ``"sp"``.
        zero_init: muP: readout and query projections initialised to zero (True), neither
            (False, the example models' default), or only ``"readout"`` or ``"query"``.
        input_mult: muP: multiplier of the input layer's (embeddings') output.
        output_mult: muP: ``MuReadout``'s output multiplier.
        attn_mult: muP, Transformer: factor on the attention-logit numerator (1 = the default,
            equal to SP's scale at the base width).
        role_lrs: per-role learning-rate multipliers, as ``"role=value;..."`` (empty: none).
        beta: schedule-free momentum (Adam's ``betas[0]``, SGD's ``momentum``).
        eps: Adam's epsilon (unused by SGD).
        scale_eps: muP: scale eps with width (the factories' ``scale_eps=``).
    """

    parametrization: str = "mup"
    zero_init: bool | str = False
    input_mult: float = 1.0
    output_mult: float = 1.0
    attn_mult: float = 1.0
    role_lrs: str = ""
    beta: float = 0.9
    eps: float = 1e-8
    scale_eps: bool = False

    def with_value(self, name: str, value: float) -> "Knobs":
        """These knobs with one multiplier (``input``, ``output``, ``attn``) or role lr (``role:hidden``) set."""
        if name.startswith("role:"):
            roles = dict(_parse_roles(self.role_lrs))
            roles[name[5:]] = value
            return replace(self, role_lrs=_format_roles(roles))
        return replace(self, **{f"{name}_mult": value})


def _parse_roles(text: str) -> list[tuple[str, float]]:
    return [(role, float(value)) for role, value in (item.split("=") for item in text.split(";") if item)]


def _format_roles(roles: dict[str, float]) -> str:
    return ";".join(f"{role}={value!r}" for role, value in sorted(roles.items()) if value != 1.0)


@dataclass(frozen=True)
class Variant:
    """One muP configuration and the SP baseline it is compared with.

    Attributes:
        name: label in the outputs.
        mup: muP's knobs before any tuning.
        sp: SP's knobs (tuned over the learning rate at every width).
        tune: what muP tunes at the base width besides the learning rate, in order: multiplier
            names (``"input"``, ``"output"``, ``"attn"``) and ``"roles"`` (every role's lr
            multiplier, see ``coord_checks.diagnose``).
    """

    name: str
    mup: Knobs = field(default_factory=Knobs)
    sp: Knobs = field(default_factory=lambda: Knobs(parametrization="sp"))
    tune: tuple[str, ...] = ()


def variants(zero_init: bool = False, split_zero_init: bool = False, tune_mults: Sequence[str] = (),
             tune_roles: bool = False, betas: Sequence[float] = (), epsilons: Sequence[float] = (),
             scale_eps: bool = False, on_zero_init: bool = False) -> list[Variant]:
    """The plain muP variant and one more per ablation asked for.

    Args:
        zero_init: add ``zero-init``: readout and query initialised to zero, as in mup's examples.
        split_zero_init: add ``zero-readout-only`` and ``zero-query-only``: one of the two at zero.
        tune_mults: add ``tuned-mults``: these multipliers tuned at the base width.
        tune_roles: add ``tuned-roles``: every role's lr multiplier tuned at the base width.
        betas: add ``beta=B`` per value: SP and muP with that schedule-free momentum.
        epsilons: add ``eps=E`` per value: SP and muP with that Adam epsilon.
        scale_eps: add ``eps=E,scaled`` per epsilon (or for the default one): muP's eps scaled
            with width, against SP at the same eps.
        on_zero_init: build the multiplier, role, beta and eps variants on a zero-initialised readout
            and query (their names then start with ``zero-init,``) instead of on the default init.

    Returns:
        The variants, ``default`` (muP as the example models build it) first.

    Raises:
        ValueError: for an unknown multiplier, a beta outside [0, 1), a non-positive eps, or
            ``on_zero_init`` without an ablation to build on.
    """
    unknown = [m for m in tune_mults if m not in MULTIPLIERS]
    if unknown:
        raise ValueError(f"tune_mults must name some of {MULTIPLIERS}, got {unknown}")
    if any(not 0 <= b < 1 for b in betas):
        raise ValueError(f"betas must lie in [0, 1), got {list(betas)}")
    if any(not 0 < e < math.inf for e in epsilons):
        raise ValueError(f"epsilons must be positive, got {list(epsilons)}")
    if on_zero_init and not (tune_mults or tune_roles or betas or epsilons or scale_eps):
        raise ValueError("on_zero_init builds the multiplier, role, beta and eps ablations on a zero init: "
                         "ask for one of them too")
    base, prefix = (Knobs(zero_init=True), "zero-init,") if on_zero_init else (Knobs(), "")

    def on_base(name: str, sp: Knobs = Knobs("sp"), tune: tuple[str, ...] = (), **mup: Any) -> Variant:
        return Variant(prefix + name, mup=replace(base, **mup), sp=sp, tune=tune)

    found = [Variant("default")]
    if zero_init:
        found.append(Variant("zero-init", mup=Knobs(zero_init=True)))
    if split_zero_init:
        found.append(Variant("zero-readout-only", mup=Knobs(zero_init="readout")))
        found.append(Variant("zero-query-only", mup=Knobs(zero_init="query")))
    if tune_mults:
        found.append(on_base("tuned-mults", tune=tuple(dict.fromkeys(tune_mults))))
    if tune_roles:
        found.append(on_base("tuned-roles", tune=("roles",)))
    for beta in betas:
        found.append(on_base(f"beta={beta:g}", sp=Knobs("sp", beta=beta), beta=beta))
    for eps in epsilons:
        found.append(on_base(f"eps={eps:g}", sp=Knobs("sp", eps=eps), eps=eps))
    if scale_eps:
        for eps in epsilons or (Knobs().eps,):
            found.append(on_base(f"eps={eps:g},scaled", sp=Knobs("sp", eps=eps), eps=eps, scale_eps=True))
    return found


@dataclass(frozen=True)
class StudySettings:
    """What every run of a study shares; a study's folder holds one set of settings.

    Attributes:
        model: ``"transformer"`` or ``"mlp"``.
        optimizer: one of ``STUDY_OPTIMIZERS``.
        widths: increasing widths; the first is muP's base width (muP equals SP there, apart from
            its zero initialisation, when asked for).
        seeds: seeds of initialisation and of the training batches' order.
        steps: training steps per run.
        eval_steps: earlier horizons at which every run is also evaluated.
        batch_size: sequences (or contexts) per training batch.
        seq_len: characters per Transformer sequence.
        n_layers: Transformer blocks.
        warmup_steps: schedule-free warmup.
        weight_decay: weight decay (scaled by muP's rules in muP).
        points_per_octave: learning-rate lattice resolution.
        start_points: lattice points of a search before it extends past an edge (odd).
        max_points: most lattice points one search may try.
        eval_batches: batches in each of the validation and test sets.
        eval_batch_size: sequences per held-out batch.
    """

    model: str = "transformer"
    optimizer: str = "adamw"
    widths: tuple[int, ...] = (64, 128, 256, 512, 1024)
    seeds: tuple[int, ...] = (0, 1)
    steps: int = 200
    eval_steps: tuple[int, ...] = ()
    batch_size: int = 32
    seq_len: int = 32
    n_layers: int = 2
    warmup_steps: int = 20
    weight_decay: float = 0.0
    points_per_octave: int = 2
    start_points: int = 5
    max_points: int = 12
    eval_batches: int = 4
    eval_batch_size: int = 64

    def __post_init__(self) -> None:
        check_model_name(self.model)
        if self.model not in ("transformer", "mlp"):
            raise ValueError(f"model must be 'transformer' or 'mlp' for a study, got {self.model!r}")
        check_optimizer_name(self.optimizer)
        if self.optimizer not in STUDY_OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {STUDY_OPTIMIZERS} for a study, got {self.optimizer!r}")
        widths = check_widths(self.widths)
        if list(widths) != sorted(set(widths)):
            raise ValueError(f"widths must be distinct and increasing, got {list(self.widths)}")
        if self.model == "transformer" and any(w % N_HEADS for w in widths):
            raise ValueError(f"widths must be multiples of {N_HEADS} (the Transformer's heads), got {list(widths)}")
        if not self.seeds:
            raise ValueError("seeds must hold at least one seed")
        for name in ("steps", "batch_size", "seq_len", "n_layers", "points_per_octave", "eval_batches",
                     "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if any(isinstance(s, bool) or not isinstance(s, int) or not 1 <= s < self.steps for s in self.eval_steps):
            raise ValueError(f"eval_steps must be ints in 1..{self.steps - 1}, got {list(self.eval_steps)}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be a non-negative int, got {self.warmup_steps!r}")
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"weight_decay must be non-negative, got {self.weight_decay!r}")
        if self.start_points < 3 or self.start_points % 2 == 0:
            raise ValueError(f"start_points must be an odd int >= 3, got {self.start_points!r}")
        if self.max_points < self.start_points:
            raise ValueError(f"max_points must be at least start_points={self.start_points}, got {self.max_points!r}")

    @property
    def horizons(self) -> list[int]:
        """Every evaluated step count, increasing (``steps`` last)."""
        return sorted({*self.eval_steps, self.steps})

    def lr(self, k: int) -> float:
        """The learning rate at lattice index ``k``."""
        return 2.0 ** (k / self.points_per_octave)

    def lattice_index(self, lr: float) -> int:
        """The lattice index nearest to ``lr``."""
        return round(math.log2(lr) * self.points_per_octave)

    def to_json(self) -> dict[str, Any]:
        """The settings as JSON-ready values (tuples become lists)."""
        return {name: list(value) if isinstance(value, tuple) else value for name, value in asdict(self).items()}


class StudyData:
    """Training batches per seed, and the validation and test batches, of a study's model.

    Args:
        settings: the study's settings.
    """

    def __init__(self, settings: StudySettings) -> None:
        tokens = data.encode(data.stdlib_text())
        train, held_out = data.split_tokens(tokens)
        validation, test = data.split_tokens(held_out, 0.5)
        self.settings = settings
        self._train_tokens = train
        if settings.model == "mlp":
            self.model_kwargs = {"d_in": _CONTEXT * data.VOCAB_SIZE, "d_out": data.VOCAB_SIZE}
        else:
            self.model_kwargs = {"max_seq_len": settings.seq_len, "n_layers": settings.n_layers}
        self.eval_sets = {"valid": self._batches(validation, settings.eval_batch_size, settings.eval_batches, 0),
                          "test": self._batches(test, settings.eval_batch_size, settings.eval_batches, 0)}
        self._train: dict[int, list[data.Batch]] = {}

    def _batches(self, tokens: torch.Tensor, batch_size: int, n_batches: int, seed: int) -> list[data.Batch]:
        if self.settings.model == "mlp":
            return data.char_context_batches(tokens, _CONTEXT, batch_size, n_batches, seed)
        return data.char_sequence_batches(tokens, self.settings.seq_len, batch_size, n_batches, seed)

    def train_batches(self, seed: int) -> list[data.Batch]:
        """One batch per step, in an order set by ``seed``."""
        if seed not in self._train:
            self._train[seed] = self._batches(self._train_tokens, self.settings.batch_size, self.settings.steps,
                                              1000 + seed)
        return self._train[seed]


def build_run(settings: StudySettings, study_data: StudyData, knobs: Knobs, width: int, lr: float
              ) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model and optimizer of one run (seed the global generator first).

    Args:
        settings: the study's settings.
        study_data: its data (for the model's input and output sizes).
        knobs: the run's configuration.
        width: the model's width.
        lr: the base learning rate (muP scales it per group; role multipliers apply on top).

    Returns:
        ``(model, optimizer)``, the optimizer in train mode.
    """
    model_knobs: dict[str, Any] = {}
    if knobs.parametrization == "mup":
        model_knobs = {"zero_init": knobs.zero_init, "input_mult": knobs.input_mult,
                       "output_mult": knobs.output_mult}
        if settings.model == "transformer":
            model_knobs["attn_mult"] = knobs.attn_mult * math.sqrt(settings.widths[0] / N_HEADS)
    model = build_model(settings.model, width, knobs.parametrization, base_width=settings.widths[0],
                        **study_data.model_kwargs, **model_knobs)
    options: dict[str, Any] = {"warmup_steps": settings.warmup_steps, "weight_decay": settings.weight_decay}
    if settings.optimizer == "sgd":
        options["momentum"] = knobs.beta
    else:
        options.update(betas=(knobs.beta, 0.999), eps=knobs.eps)
    if knobs.scale_eps:
        options["scale_eps"] = True
    roles = dict(_parse_roles(knobs.role_lrs))
    params: Iterable[Any] = role_groups(model, lr, roles) if roles else model.parameters()
    return model, optimizer_factory(settings.optimizer, knobs.parametrization, lr, **options)(params)


def _key(values: dict[str, Any]) -> tuple:
    # SP has no zero init; runs written before the models' default changed to False say True there
    values = {**values, "zero_init": values["zero_init"] if values["parametrization"] == "mup" else False}
    return tuple(repr(float(values[c])) if c in ("input_mult", "output_mult", "attn_mult", "beta", "eps", "lr")
                 else str(values[c]) if c == "role_lrs" else values[c] if c == "parametrization"
                 else str(values[c]) if c == "zero_init" else bool(values[c]) if c == "scale_eps" else int(values[c])
                 for c in _KEY_COLUMNS)


class RunStore:
    """Finished runs, appended to a CSV as they finish, so an interrupted study resumes.

    Args:
        path: the CSV (created with a header on the first run; ``None`` keeps runs in memory).
        steps: the evaluation steps every run has; a run missing some (cut short while being
            written) is dropped from the file and run again.
    """

    def __init__(self, path: Path | None, steps: Sequence[int]) -> None:
        self.path = path
        self._runs: dict[tuple, list[dict[str, Any]]] = {}
        if path is None or not path.exists():
            return
        text = path.read_text()
        whole = text[: text.rfind("\n") + 1]  # a line cut while being written is dropped
        if not whole.strip():
            return
        frame = pd.read_csv(io.StringIO(whole), keep_default_na=False,
                            na_values={name: ["nan"] for name in ("train_loss", "valid_loss", "test_loss")})
        if list(frame.columns) != list(RUN_COLUMNS):
            raise ValueError(f"{path}: not a study's run file (columns {list(frame.columns)})")
        by_step: dict[tuple, dict[int, dict[str, Any]]] = {}
        for row in frame.to_dict("records"):
            by_step.setdefault(_key(row), {})[int(row["step"])] = row
        wanted = sorted(steps)
        self._runs = {key: [rows[step] for step in wanted] for key, rows in by_step.items()
                      if sorted(rows) == wanted}
        if whole != text or sum(len(rows) for rows in self._runs.values()) != len(frame):
            replace_atomically(path, lambda temporary: self.frame().to_csv(temporary, index=False))

    def get(self, key: tuple) -> list[dict[str, Any]] | None:
        """The rows of a finished run, or ``None``."""
        return self._runs.get(key)

    def add(self, rows: list[dict[str, Any]]) -> None:
        """Record a finished run (all its rows in one write, flushed to disk)."""
        self._runs[_key(rows[0])] = rows
        if self.path is None:
            return
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=RUN_COLUMNS, lineterminator="\n")
        new = not self.path.exists() or self.path.stat().st_size == 0
        if new:
            writer.writeheader()
        writer.writerows({c: repr(v) if isinstance(v, float) else v for c, v in row.items()} for row in rows)
        with open(self.path, "a") as handle:
            handle.write(buffer.getvalue())
            handle.flush()
            os.fsync(handle.fileno())

    def frame(self) -> pd.DataFrame:
        """Every run held, one row per evaluation step (``RUN_COLUMNS``)."""
        rows = [row for run in self._runs.values() for row in run]
        return pd.DataFrame(rows, columns=list(RUN_COLUMNS))


class Study:
    """Runs a study's searches, each run once (see the module docstring).

    Args:
        settings: what the runs share.
        store: finished runs (resumed from, and appended to).
        report: called with one line per run (e.g. ``print``), or ``None``.
        device: where to train.
    """

    def __init__(self, settings: StudySettings, store: RunStore, report: Callable[[str], Any] | None = None,
                 device: str | torch.device = "cpu") -> None:
        self.settings = settings
        self.store = store
        self.report = report
        self.device = torch.device(device)
        self._data: StudyData | None = None

    @property
    def data(self) -> StudyData:
        """The study's batches (built on first use)."""
        if self._data is None:
            self._data = StudyData(self.settings)
        return self._data

    def run(self, knobs: Knobs, width: int, k: int, seed: int) -> list[dict[str, Any]]:
        """One run (or its stored rows): ``knobs`` at ``width``, lattice lr ``k``, ``seed``."""
        lr = self.settings.lr(k)
        head = {**asdict(knobs), "width": width, "lr": lr}
        key = _key({**head, "seed": seed})
        stored = self.store.get(key)
        if stored is not None:
            return stored
        started = time.perf_counter()
        with torch.random.fork_rng(devices=rng_devices(self.device)):
            torch.manual_seed(seed)
            model, optimizer = build_run(self.settings, self.data, knobs, width, lr)
            model.to(self.device)
            to = self.device
            train = [(x.to(to), y.to(to)) for x, y in self.data.train_batches(seed)]
            held_out = {name: [(x.to(to), y.to(to)) for x, y in batches]
                        for name, batches in self.data.eval_sets.items()}
            results = train_and_evaluate_sets(model, optimizer, train, held_out, cross_entropy,
                                              self.settings.horizons)
        seconds = time.perf_counter() - started
        rows = [{**head, "log2_lr": math.log2(lr), "seed": seed, "step": step, "train_loss": train_loss,
                 "valid_loss": losses["valid"], "test_loss": losses["test"],
                 "diverged": not math.isfinite(losses["valid"]), "seconds": seconds}
                for step, train_loss, losses in results]
        self.store.add(rows)
        if self.report is not None:
            final = rows[-1]["valid_loss"]
            self.report(f"{knobs.parametrization:>3} width {width:>5} lr 2^{math.log2(lr):+.2f} seed {seed}"
                        f"{_describe(knobs)}: valid {final:.4f} ({seconds:.1f} s)")
        return rows

    def mean_loss(self, knobs: Knobs, width: int, k: int, step: int | None = None) -> float:
        """Seed-mean validation loss at lattice lr ``k`` (``inf`` if any seed diverged)."""
        step = self.settings.steps if step is None else step
        losses = [next(r["valid_loss"] for r in self.run(knobs, width, k, seed) if r["step"] == step)
                  for seed in self.settings.seeds]
        return float(np.mean(losses)) if all(math.isfinite(v) for v in losses) else math.inf

    def search(self, knobs: Knobs, width: int, center: int, must: Iterable[int] = ()) -> int:
        """Lattice index of the best seed-mean validation loss at the final step, bracketed.

        Tries ``start_points`` lattice points around ``center`` (and every index of ``must``),
        then one more past whichever edge holds the minimum, until it lies inside or
        ``max_points`` are tried.
        """
        half = self.settings.start_points // 2
        ks = set(range(center - half, center + half + 1)) | set(must)
        while True:
            losses = {k: self.mean_loss(knobs, width, k) for k in sorted(ks)}
            best = min(losses, key=lambda k: (losses[k], k))
            if len(ks) >= self.settings.max_points:
                return best
            if best == min(ks):
                ks.add(best - 1)
            elif best == max(ks):
                ks.add(best + 1)
            else:
                return best

    def tune_at_base(self, variant: Variant) -> tuple[Knobs, int]:
        """muP's knobs and lattice lr after tuning at the base width (validation loss, final step)."""
        base = self.settings.widths[0]
        knobs = variant.mup
        k = self.search(knobs, base, self.settings.lattice_index(default_lr(self.settings.model,
                                                                               self.settings.optimizer)))
        names = [n for item in variant.tune for n in (self._roles() if item == "roles" else [item])]
        if not names:
            return knobs, k
        for name in names:
            candidates = [knobs.with_value(name, value) for value in DEFAULT_MULT_GRID]
            knobs = min(candidates, key=lambda c: self.mean_loss(c, base, k))
        return knobs, self.search(knobs, base, k)

    def _roles(self) -> list[str]:
        torch.manual_seed(0)
        model, _ = build_run(self.settings, self.data, Knobs(), self.settings.widths[0], 1e-3)
        present = set(parameter_roles(model).values())
        return [f"role:{role}" for role in ("input", "hidden", "attention", "readout", "vector") if role in present]

    def run_variant(self, variant: Variant) -> Knobs:
        """Every run of one variant: muP tuned at the base width and carried to every width,
        SP searched at every width. Returns muP's tuned knobs."""
        knobs, k_base = self.tune_at_base(variant)
        base = self.settings.widths[0]
        transferred = {self._best_at(knobs, base, step) for step in self.settings.horizons}
        for width in self.settings.widths[1:]:
            self.search(knobs, width, k_base, must=transferred)
        optima: list[tuple[int, int]] = []
        center = self.settings.lattice_index(default_lr(self.settings.model, self.settings.optimizer))
        for width in self.settings.widths:
            if len(optima) >= 2:
                (w0, k0), (w1, k1) = optima[-2], optima[-1]
                center = round(k1 + (k1 - k0) * math.log2(width / w1) / math.log2(w1 / w0))
            elif optima:
                center = optima[-1][1]
            optima.append((width, self.search(variant.sp, width, center)))
        return knobs

    def _best_at(self, knobs: Knobs, width: int, step: int) -> int:
        tried = self._tried(knobs, width)
        return min(tried, key=lambda k: (self.mean_loss(knobs, width, k, step), k))

    def _tried(self, knobs: Knobs, width: int) -> list[int]:
        frame = self.store.frame()
        head = _key({**asdict(knobs), "width": width, "lr": 1.0, "seed": 0})[:-2]
        lrs = {float(row["lr"]) for row in frame.to_dict("records") if _key(row)[:-2] == head}
        return sorted(self.settings.lattice_index(lr) for lr in lrs)


def _describe(knobs: Knobs) -> str:
    default = Knobs(knobs.parametrization)
    changed = [f"{name}={value}" for name, value in asdict(knobs).items()
               if name != "parametrization" and value != getattr(default, name)]
    return f" [{', '.join(changed)}]" if changed else ""


def run_study(settings: StudySettings, study_variants: Sequence[Variant], out: Path | None = None,
              report: Callable[[str], Any] | None = None, device: str | torch.device = "cpu"
              ) -> tuple[pd.DataFrame, dict[str, Knobs]]:
    """Run (or resume) a study: every variant's muP tuning and transfer, and SP tuned at every width.

    Args:
        settings: what the runs share.
        study_variants: the variants (see ``variants``); names must be distinct.
        out: a folder for ``study.json`` (the settings) and ``study_runs.csv`` (finished runs,
            appended as they finish); ``None`` keeps everything in memory.
        report: called with one line per new run, or ``None``.
        device: where to train.

    Returns:
        ``(runs, tuned)``: the frame of this study's runs (``RUN_COLUMNS``; runs of other widths or
        seeds that ``out`` holds are left out) and each variant's muP knobs after tuning at the
        base width.

    Raises:
        ValueError: if ``out`` holds a study with other settings, a variant name repeats, or a
            variant needs what the settings lack (eps knobs with SGD, the attention multiplier
            without a Transformer).
    """
    names = [v.name for v in study_variants]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"study_variants must have distinct names, got {names}")
    for variant in study_variants:
        if settings.optimizer == "sgd" and (variant.mup.scale_eps or variant.mup.eps != Knobs().eps):
            raise ValueError(f"variant {variant.name!r}: eps knobs need an Adam optimizer, not sgd")
        if settings.model != "transformer" and ("attn" in variant.tune or variant.mup.zero_init == "query"):
            raise ValueError(f"variant {variant.name!r}: the attention multiplier needs model='transformer'")
    store_path = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        check_settings_file(out / "study.json", settings)
        store_path = out / "study_runs.csv"
    study = Study(settings, RunStore(store_path, settings.horizons), report, device)
    tuned = {variant.name: study.run_variant(variant) for variant in study_variants}
    runs = study.store.frame()  # the folder may hold runs of other widths or seeds: keep this study's
    return runs[runs["width"].isin(settings.widths) & runs["seed"].isin(settings.seeds)].reset_index(drop=True), tuned


def check_settings_file(path: Path, settings: StudySettings) -> None:
    """Write the settings to ``path``, or check they equal the ones a resumed study left there.

    Raises:
        ValueError: naming the first setting that differs.
    """
    wanted = settings.to_json()
    if path.exists():
        saved = json.loads(path.read_text())
        for name, value in wanted.items():
            if name in ("widths", "seeds"):
                continue
            if saved.get(name) != value:
                raise ValueError(f"{path.parent} holds a study with {name}={saved.get(name)!r}, not {value!r}: "
                                 "choose another output folder or delete it")
    path.write_text(json.dumps(wanted, indent=1) + "\n")


def _knob_rows(frame: pd.DataFrame, knobs: Knobs) -> pd.DataFrame:
    head = _key({**asdict(knobs), "width": 0, "lr": 1.0, "seed": 0})[:-3]
    keep = [_key(row)[:-3] == head for row in frame.to_dict("records")]
    return frame[np.asarray(keep, dtype=bool)] if len(frame) else frame


def _curve(rows: pd.DataFrame) -> pd.Series:
    """Seed-mean validation loss per lr (``inf`` where any seed diverged)."""
    return rows.groupby("lr")["valid_loss"].apply(lambda v: v.mean() if np.isfinite(v).all() else math.inf)


def _vertex(curve: pd.Series) -> float:
    ordered = curve.sort_index()
    i = int(np.argmin(ordered.to_numpy()))
    window = ordered.iloc[max(0, i - 1): i + 2]
    window = window[np.isfinite(window.to_numpy())]
    if len(window) < 3:
        return math.log2(float(ordered.index[i]))
    return parabola_vertex(np.log2(window.index.to_numpy(dtype=float)), window.to_numpy())


def summarize(runs: pd.DataFrame, settings: StudySettings, tuned: dict[str, Knobs],
              study_variants: Sequence[Variant]) -> pd.DataFrame:
    """One row per (variant, horizon, width): the answer to "does muP pay off?".

    The SP learning rate at a width is its best by seed-mean validation loss there; muP's is the
    best at the base width, whatever is best at this width. Test losses are per-seed values at
    those rates; the gap is muP minus SP, paired by seed (the same seed sets the data order).

    Args:
        runs: the frame of runs from ``run_study``.
        settings: the study's settings.
        tuned: each variant's tuned muP knobs, from ``run_study``.
        study_variants: the variants, as passed to ``run_study``.

    Returns:
        Columns ``variant, step, width, sp_log2_lr, sp_log2_lr_opt, sp_test, sp_test_std,
        mup_log2_lr, mup_log2_lr_opt, mup_test, mup_test_std, gap, gap_std, wider_is_better,
        sp_at_edge, mup_knobs``: log2 learning rates (the one used, and the parabola vertex of
        the validation curve), test losses (seed mean and standard deviation), and whether muP's
        test loss fell from the previous width by more than the two seed spreads together.
    """
    records = []
    base = settings.widths[0]
    for variant in study_variants:
        mup_rows, sp_rows = _knob_rows(runs, tuned[variant.name]), _knob_rows(runs, variant.sp)
        for step in settings.horizons:
            mup_at, sp_at = mup_rows[mup_rows["step"] == step], sp_rows[sp_rows["step"] == step]
            base_curve = _curve(mup_at[mup_at["width"] == base])
            if base_curve.empty:
                continue
            lr_transferred = float(base_curve.idxmin())
            previous: tuple[float, float] | None = None
            for width in settings.widths:
                sp_w, mup_w = sp_at[sp_at["width"] == width], mup_at[mup_at["width"] == width]
                if sp_w.empty or mup_w.empty:
                    continue
                sp_curve, mup_curve = _curve(sp_w), _curve(mup_w)
                sp_lr = float(sp_curve.idxmin())
                sp_test = sp_w[sp_w["lr"] == sp_lr].set_index("seed")["test_loss"]
                mup_test = mup_w[mup_w["lr"] == lr_transferred].set_index("seed")["test_loss"]
                gap = (mup_test - sp_test).dropna()
                mup_mean, mup_std = float(mup_test.mean()), float(mup_test.std(ddof=1)) if len(mup_test) > 1 else 0.0
                better = (math.nan if previous is None
                          else bool(mup_mean < previous[0] - (mup_std + previous[1])))
                records.append({
                    "variant": variant.name, "step": step, "width": width,
                    "sp_log2_lr": math.log2(sp_lr), "sp_log2_lr_opt": _vertex(sp_curve),
                    "sp_test": float(sp_test.mean()),
                    "sp_test_std": float(sp_test.std(ddof=1)) if len(sp_test) > 1 else 0.0,
                    "mup_log2_lr": math.log2(lr_transferred), "mup_log2_lr_opt": _vertex(mup_curve),
                    "mup_test": mup_mean, "mup_test_std": mup_std,
                    "gap": float(gap.mean()) if len(gap) else math.nan,
                    "gap_std": float(gap.std(ddof=1)) if len(gap) > 1 else 0.0,
                    "wider_is_better": better,
                    "sp_at_edge": sp_lr in (float(sp_curve.index.min()), float(sp_curve.index.max())),
                    "mup_knobs": _describe(tuned[variant.name]).strip(" []"),
                })
                previous = (mup_mean, mup_std)
    return pd.DataFrame(records)


def drift(summary: pd.DataFrame) -> pd.DataFrame:
    """How far each side's optimal learning rate moves across widths, per variant and horizon.

    Args:
        summary: a frame from ``summarize``.

    Returns:
        ``variant, step, sp_drift_octaves, mup_drift_octaves, sp_trend, mup_trend``: max minus
        min of the parabola-vertex log2 lr across widths, and its least-squares slope against
        log2 width (about -1: the optimum halves per doubling).
    """
    records = []
    for (variant, step), rows in summary.groupby(["variant", "step"], sort=False):
        log2_w = np.log2(rows["width"].to_numpy(dtype=float))
        record = {"variant": variant, "step": step}
        for side in ("sp", "mup"):
            lrs = rows[f"{side}_log2_lr_opt"].to_numpy(dtype=float)
            record[f"{side}_drift_octaves"] = float(lrs.max() - lrs.min())
            record[f"{side}_trend"] = float(np.polyfit(log2_w, lrs, 1)[0]) if len(rows) > 1 else math.nan
        records.append(record)
    return pd.DataFrame(records)
