"""Command line: ``python -m coord_checks`` (coordinate check), ``transfer``, ``diagnose`` and ``study``.

The check trains each example model in standard parametrization and in muP with the same
schedule-free optimizer and base-width learning rate, writes the recording frame (CSV), the
verdict table (CSV) and a figure (PNG) to the output folder, prints the verdict, and exits with 0
when the muP run passes, 1 when it fails (the SP run is expected to fail: it is the contrast).

The transfer sweep writes the sweep frame, the fitted optima (CSV) and a figure (PNG), and prints
the optimum per width and its drift across widths. The study (``coord_checks.study``) runs muP tuned
at the smallest width against SP tuned at every width, appending every finished run to
``study_runs.csv`` so that it resumes, and writes the summary, the drift and a figure per horizon.

With ``--depths L [L ...]`` (Transformer only) the check and the sweep run across depth instead:
depth-unaware muP (the contrast) against CompleteP (``--depth-alpha 1``, the default) or depth-muP
(``--depth-alpha 0.5``), based at ``--base-depth`` (default: the smallest depth), at one width or
several (``--widths``; default 64). The verdict fits slopes against log2(depth) and the exit status
is that of the depth-aware run; the sweep reports the optimum's drift across depths.

Every failure the user can cause ends with one ``prog: error: ...`` line on stderr naming the
flag, and exit status 2: bad arguments, a device that cannot compute, an output folder that cannot
be written, running out of memory, a transfer sweep whose every learning rate diverges. The
device and the output folder are checked before any compute. Ctrl-C ends with one
``prog: interrupted`` line and exit status 130. Each output file is written under a temporary name
in the output folder and renamed into place, so an interrupted run leaves complete files or none.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn, Sequence

import numpy as np
import torch

from mup_schedulefree.files import replace_atomically

from coord_checks import custom, diagnose, experiments, plots, study, transfer, verdict
from coord_checks.models import MODEL_NAMES, N_HEADS
from coord_checks.optimizers import DEFAULT_LRS, OPTIMIZER_NAMES, optimizer_factory
from coord_checks.recording import STATISTICS

PROG = "python -m coord_checks"
DEFAULT_OUT = "coord_check_out"
_SEQUENCES = {"y": ("y",), "x": ("x",), "both": ("y", "x")}
#: Largest accepted learning rate: far beyond divergence, and small enough that the optimizers'
#: scalar arithmetic (lr squared, lr times muP multipliers, as float32) cannot overflow.
_MAX_LR = 1e6
_CPUS = os.cpu_count() or 1
_OUT_OF_MEMORY = re.compile(r"out of memory|can't allocate memory", re.IGNORECASE)
#: How a depth check or sweep names its parametrizations in titles.
_DEPTH_NAMES = {"mup": "muP (depth-unaware)", "completep": "CompleteP", "depth-mup": "depth-muP"}


class UsageError(Exception):
    """A failure the user caused while the command ran (not a bug): ``main`` prints its message
    as one ``error:`` line and exits with status 2. The message starts with the flag to change."""


class _OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (``prog: error: message``), exit status 2."""

    def error(self, message: str) -> NoReturn:
        """Print ``prog: error: message`` on one line and exit with status 2."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _number(convert: Callable[[str], Any], what: str, accept: Callable[[Any], bool]) -> Callable[[str], Any]:
    """An argparse ``type`` that converts with ``convert`` and rejects values failing ``accept``,
    saying what was expected and echoing what was typed."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value

    return parse


_positive_int = _number(int, "a positive integer", lambda value: value > 0)
_depth_alpha = _number(float, "1 (CompleteP) or 0.5 (depth-muP)", lambda value: value in experiments.DEPTH_LABELS)
_learning_rate = _number(float, f"a positive number up to {_MAX_LR:g}", lambda value: 0 < value <= _MAX_LR)
_seed = _number(int, "an integer in [0, 2**64)", lambda value: 0 <= value < 2**64)
_thread_count = _number(int, f"a positive integer up to {_CPUS} (the CPU count)",
                        lambda value: 0 < value <= _CPUS)


def _model_choice(models: Sequence[str]) -> Callable[[str], str]:
    """An argparse ``type`` accepting an example model's name or ``module:function``."""

    def parse(text: str) -> str:
        if text in models or ":" in text:
            return text
        choices = ", ".join(repr(m) for m in models)
        raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {choices}, "
                                         "or module:function for your own model)")

    return parse


#: Flags that only a user model (``--model module:function``) takes, with their defaults.
_USER_FLAGS = {"base_width": None, "data": "text", "loss": "cross_entropy", "readout": None,
               "attention": None}


def _add_common(parser: argparse.ArgumentParser, models: Sequence[str], seeds: Sequence[int]) -> None:
    parser.add_argument("--model", type=_model_choice(models), metavar="MODEL",
                        help=f"example model ({', '.join(models)}; default: mlp, transformer with --depths), "
                             "or your own: module:function or path/file.py:function, a function width -> nn.Module")
    parser.add_argument("--optimizer", choices=OPTIMIZER_NAMES, default="adamw",
                        help="schedule-free optimizer; muP uses its Mu* factory (default: adamw)")
    parser.add_argument("--widths", type=_positive_int, nargs="+", metavar="W",
                        help="model widths, at least two distinct (default: per model)")
    parser.add_argument("--seeds", type=_seed, nargs="+", metavar="S", default=list(seeds),
                        help=f"initialisation seeds (default: {' '.join(map(str, seeds))})")
    parser.add_argument("--zero-init", action="store_true",
                        help="example models: start muP's readout and query at zero, as mup's examples do, so "
                             "that every output is updates alone (default: PyTorch's init)")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help=f"output folder (default: ./{DEFAULT_OUT})")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--threads", type=_thread_count, default=1,
                        help="torch intra-op threads (default: 1; more help a little on an idle "
                             "machine, but make these many tiny operations crawl when other "
                             "processes compete for the cores)")
    own = parser.add_argument_group("your own model (--model module:function)")
    own.add_argument("--base-width", type=_positive_int, metavar="B",
                     help="set base shapes from the factory at widths B and 2B (default: the factory "
                          "sets them itself)")
    own.add_argument("--data", default="text", metavar="SOURCE",
                     help="batches: 'text' (built-in next-character token sequences, vocabulary "
                          "of 96) or module:function, a function (n_batches, split) -> [(inputs, "
                          "targets), ...] with split 'train' or 'eval' (default: text)")
    own.add_argument("--loss", default="cross_entropy", metavar="LOSS",
                     help="cross_entropy, mse, or module:function (output, targets) -> loss "
                          "(default: cross_entropy)")
    own.add_argument("--readout", metavar="NAME",
                     help="the readout module (default: the last MuReadout, else the last Linear)")
    own.add_argument("--attention", nargs="+", metavar="NAME",
                     help="modules whose output is attention logits (default: those named attn_logits)")


def _add_depth(parser: argparse.ArgumentParser) -> None:
    deep = parser.add_argument_group("across depth (--depths; transformer only)")
    deep.add_argument("--depths", type=_positive_int, nargs="+", metavar="L",
                      help="numbers of residual blocks, at least two distinct: run across depth, "
                           "depth-unaware muP against --depth-alpha's rule (widths: --widths, default 64)")
    deep.add_argument("--depth-alpha", type=_depth_alpha, metavar="ALPHA",
                      help="residual branches times (L_base / L) ** ALPHA and the optimizer's depth rule: "
                           "1 (CompleteP, default) or 0.5 (depth-muP)")
    deep.add_argument("--base-depth", type=_positive_int, metavar="B",
                      help="L_base, where both runs are the same model (default: the smallest depth)")


def build_parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser, argparse.ArgumentParser]:
    """The parsers of the check (default command) and of the ``transfer`` and ``diagnose`` subcommands.

    Returns:
        ``(check_parser, transfer_parser, diagnose_parser)``.
    """
    check = _OneLineParser(
        prog=PROG,
        description="Coordinate check of a schedule-free optimizer in standard parametrization vs "
                    "muP. Run 'python -m coord_checks transfer --help' for the learning-rate sweep, "
                    "'python -m coord_checks diagnose --help' to find the parameter group that breaks it, "
                    "'python -m coord_checks study --help' to compare muP tuned small with SP tuned at every width.",
    )
    _add_common(check, MODEL_NAMES, seeds=(0, 1, 2))
    length = check.add_mutually_exclusive_group()
    length.add_argument("--steps", type=_positive_int, help="recorded steps, step 1 = init "
                        "(default: 4; 10 for radam)")
    length.add_argument("--horizon", type=_positive_int, metavar="N",
                        help="train N steps, record at log-spaced steps, and judge each module as "
                             "flat, grows-then-settles or keeps-growing (only the last fails)")
    check.add_argument("--sequence", choices=tuple(_SEQUENCES), default="both",
                       help="measure at the training point y, the evaluation point x, or both (default)")
    check.add_argument("--lr", type=_learning_rate, help="base-width learning rate (default: per optimizer)")
    check.add_argument("--batches", choices=experiments.BATCH_MODES, default="fixed",
                       help="one fixed batch or a new batch per step (default: fixed)")
    check.add_argument("--statistic", choices=tuple(STATISTICS), default="l1",
                       help="statistic to judge and plot (default: l1 = mean |x|)")
    _add_depth(check)

    sweep = _OneLineParser(
        prog=f"{PROG} transfer",
        description="Learning-rate transfer sweep on standard-library text: loss at x after a "
                    "fixed budget, per width and learning rate, in SP and in muP.",
    )
    _add_common(sweep, tuple(experiments.TRANSFER_WIDTHS), seeds=(0,))
    sweep.add_argument("--steps", type=_positive_int, default=100, help="training steps per run (default: 100)")
    sweep.add_argument("--lrs", type=_learning_rate, nargs="+", metavar="LR",
                       help="learning-rate grid (default: 9 points, one per octave, around the "
                            "optimizer's default)")
    sweep.add_argument("--eval-steps", type=_positive_int, nargs="+", metavar="S",
                       help="also evaluate every run at x after these many steps (anytime transfer: "
                            "optimum and drift per horizon, and a plot of optimum lr vs steps)")
    sweep.add_argument("--wds", type=_number(float, "a non-negative number", lambda v: 0 <= v < math.inf),
                       nargs="+", metavar="WD",
                       help="also sweep these weight decays: a learning rate x weight decay grid, with "
                            "the joint optimum per width and its drift")
    _add_depth(sweep)

    doctor = _OneLineParser(
        prog=f"{PROG} diagnose",
        description="Which parameter group breaks learning-rate transfer? Sweeps the lr multiplier of "
                    "one role at a time (input, hidden, readout, attention, vector-like) at every "
                    "width, the other roles at their optimum, and reports how far each role's "
                    "optimum drifts across widths and what that costs, in muP.",
    )
    _add_common(doctor, tuple(experiments.TRANSFER_WIDTHS), seeds=(0,))
    doctor.add_argument("--steps", type=_positive_int, default=100, help="training steps per run (default: 100)")
    doctor.add_argument("--lr", type=_learning_rate, help="base learning rate, ideally tuned at the smallest "
                        "width (default: per optimizer)")
    doctor.add_argument("--multipliers", type=_learning_rate, nargs="+", metavar="M",
                        help="multipliers of one role's lr (default: 9 points, 1/16 .. 16)")
    doctor.add_argument("--roles", nargs="+", choices=diagnose.ROLES, metavar="ROLE",
                        help=f"roles to sweep, of {', '.join(diagnose.ROLES)} (default: every role the model has)")
    doctor.add_argument("--rounds", type=_number(int, "a non-negative integer", lambda v: v >= 0), default=1,
                        help="extra coordinate-descent passes at the smallest width (default: 1)")
    return check, sweep, doctor


def build_study_parser() -> argparse.ArgumentParser:
    """The parser of the ``study`` subcommand: muP tuned at the base width against SP tuned at every width."""
    parser = _OneLineParser(
        prog=f"{PROG} study",
        description="Does muP pay off? muP tuned at the smallest width only, against standard "
                    "parametrization tuned at every width, on standard-library text: test loss at x per "
                    "width with the seed spread, the gap, the lr drift, and ablations. Resumes from the "
                    "runs already in --out.",
    )
    parser.add_argument("--model", choices=("transformer", "mlp"), default="transformer",
                        help="example model (default: transformer)")
    parser.add_argument("--optimizer", choices=study.STUDY_OPTIMIZERS, default="adamw",
                        help="schedule-free optimizer (default: adamw)")
    defaults = study.StudySettings()
    parser.add_argument("--widths", type=_positive_int, nargs="+", metavar="W", default=list(defaults.widths),
                        help="increasing widths; muP is tuned at the first "
                             f"(default: {' '.join(map(str, defaults.widths))})")
    parser.add_argument("--seeds", type=_seed, nargs="+", metavar="S", default=list(defaults.seeds),
                        help="seeds of initialisation and data order (default: 0 1)")
    parser.add_argument("--steps", type=_positive_int, default=defaults.steps,
                        help=f"training steps per run (default: {defaults.steps})")
    parser.add_argument("--eval-steps", type=_positive_int, nargs="+", metavar="S", default=[],
                        help="also evaluate every run at these earlier steps (the horizon ablation)")
    parser.add_argument("--batch-size", type=_positive_int, default=defaults.batch_size,
                        help=f"sequences per training batch (default: {defaults.batch_size})")
    parser.add_argument("--seq-len", type=_positive_int, default=defaults.seq_len,
                        help=f"characters per sequence, transformer (default: {defaults.seq_len})")
    parser.add_argument("--warmup-steps", type=_number(int, "a non-negative integer", lambda v: v >= 0),
                        default=defaults.warmup_steps, help=f"warmup steps (default: {defaults.warmup_steps})")
    parser.add_argument("--weight-decay", type=_number(float, "a non-negative number", lambda v: 0 <= v < math.inf),
                        default=defaults.weight_decay, help="weight decay (default: 0)")
    parser.add_argument("--points-per-octave", type=_positive_int, default=defaults.points_per_octave,
                        help=f"learning-rate lattice points per factor of 2 (default: {defaults.points_per_octave})")
    ablations = parser.add_argument_group("ablations (each adds a muP variant)")
    ablations.add_argument("--zero-init", action="store_true",
                           help="muP with readout and query initialised to zero (as in mup's examples)")
    ablations.add_argument("--split-zero-init", action="store_true",
                           help="muP with only the readout, and with only the query, initialised to zero")
    ablations.add_argument("--tune-mults", nargs="+", choices=study.MULTIPLIERS, metavar="MULT",
                           help="muP with these multipliers (input, output, attn) tuned at the base width "
                                f"over {' '.join(f'{m:g}' for m in study.DEFAULT_MULT_GRID)}")
    ablations.add_argument("--tune-roles", action="store_true",
                           help="muP with every role's lr multiplier tuned at the base width")
    ablations.add_argument("--betas", type=_number(float, "a number in [0, 1)", lambda v: 0 <= v < 1),
                           nargs="+", metavar="B", default=[],
                           help="SP and muP with this schedule-free momentum (one variant each)")
    ablations.add_argument("--eps", type=_learning_rate, nargs="+", metavar="E", default=[],
                           help="SP and muP with this Adam epsilon (one variant each)")
    ablations.add_argument("--scale-eps", action="store_true",
                           help="muP with eps scaled with width (per --eps value), against SP at that eps")
    ablations.add_argument("--on-zero-init", action="store_true",
                           help="build the --tune-mults, --tune-roles, --betas and --eps variants on a zero "
                                "readout and query instead of the default init")
    parser.add_argument("--out", default="study_out", metavar="DIR",
                        help="output folder; runs already there are reused (default: ./study_out)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--threads", type=_thread_count, default=1,
                        help="torch intra-op threads (default: 1)")
    parser.add_argument("--quiet", action="store_true", help="no line per run")
    return parser


def is_user_model(args: argparse.Namespace) -> bool:
    """Whether ``--model`` names the user's factory (``module:function``) rather than an example.

    Args:
        args: parsed arguments.

    Returns:
        True for ``module:function``.
    """
    return ":" in args.model


def _check_widths(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if is_user_model(args):
        if args.widths is None:
            parser.error("argument --widths: required with --model module:function")
        if args.zero_init:
            parser.error("argument --zero-init: only with the example models (initialise your own model as "
                         "you train it)")
    else:
        given = [flag for flag, default in _USER_FLAGS.items() if getattr(args, flag) != default]
        if given:
            parser.error(f"argument --{given[0].replace('_', '-')}: only with your own model "
                         "(--model module:function)")
    if args.widths is not None and len(set(args.widths)) < 2 and not getattr(args, "depths", None):
        parser.error(f"argument --widths: need at least two distinct widths, got {args.widths}")
    if args.model == "transformer" and args.widths is not None:
        bad = [w for w in args.widths if w % N_HEADS]  # user models are checked by building them
        if bad:
            parser.error(f"argument --widths: transformer widths must be multiples of {N_HEADS} "
                         f"(the head count), got {bad}")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"argument --seeds: seeds must be distinct, got {args.seeds}")
    if not args.out.strip():
        parser.error("argument --out: empty folder name (use --out . for the current folder)")
    if getattr(args, "horizon", None) is None and getattr(args, "sequence", None) is not None \
            and args.steps is not None and args.steps < 2:
        parser.error(f"argument --steps: at least 2, got {args.steps} (step 1 is the initialisation, "
                     "before any update: there would be nothing to judge)")
    if getattr(args, "wds", None) and args.eval_steps:
        parser.error("argument --wds: not with --eval-steps (sweep the grid at one horizon)")
    too_late = [s for s in getattr(args, "eval_steps", None) or () if s > args.steps]
    if too_late:
        parser.error(f"argument --eval-steps: steps must not exceed --steps {args.steps}, got {too_late}")


def _check_depths(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill in the default model (the Transformer with ``--depths``, else the MLP) and check the depth flags."""
    depths = getattr(args, "depths", None)
    if args.model is None:
        args.model = "mlp" if depths is None else "transformer"
    if depths is None:
        given = [flag for flag in ("depth_alpha", "base_depth") if getattr(args, flag, None) is not None]
        if given:
            parser.error(f"argument --{given[0].replace('_', '-')}: only with --depths")
        return
    if args.model != "transformer":
        parser.error(f"argument --depths: needs --model transformer (the only example model with residual "
                     f"blocks), got --model {args.model}")
    if len(set(depths)) < 2:
        parser.error(f"argument --depths: need at least two distinct depths, got {depths}")
    if getattr(args, "wds", None):
        parser.error("argument --wds: not with --depths (sweep the learning rate alone across depth)")


def _first_sentence(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return re.split(r"(?<=\.)\s|\n", text, maxsplit=1)[0]


def _check_device(parser: argparse.ArgumentParser, device: str) -> None:
    """Reject a device torch does not know, or one that cannot compute here (``meta``, ``cuda``
    without CUDA, a backend torch was built without): a tiny op must run there and come back."""
    with warnings.catch_warnings():  # torch warns about deprecated device names
        warnings.simplefilter("ignore")
        try:
            torch.device(device)
        except RuntimeError:
            parser.error(f"argument --device: not a torch device: {device!r}")
        try:
            (torch.zeros(1, device=device) + 1).cpu()
        except (RuntimeError, AssertionError, ImportError) as error:  # what torch raises for each
            parser.error(f"argument --device: cannot compute on {device!r}: {_first_sentence(error)}")


def _check_out(parser: argparse.ArgumentParser, out: str) -> None:
    """Create the output folder and prove it writable by creating a temporary file in it."""
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        parser.error(f"argument --out: not a folder: {out!r} is an existing file")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):  # removed on closing, Ctrl-C included
            pass
    except OSError as error:
        parser.error(f"argument --out: cannot write to {out!r}: {error.strerror or error}")


def _write_whole(path: Path, write: Callable[[str], object]) -> None:
    """Write ``path`` as ``write(temporary)`` through ``replace_atomically``, so that ``path`` is
    always absent or complete; a failure to write is a ``UsageError`` naming ``--out``."""
    try:
        replace_atomically(path, write)
    except OSError as error:
        raise UsageError(f"argument --out: cannot write {str(path)!r}: {error.strerror or error}") from None


@contextmanager
def _out_of_memory_as_usage_error(args: argparse.Namespace, default_widths: Sequence[int]) -> Iterator[None]:
    """Turn running out of memory (host or device) into a ``UsageError`` naming ``--widths`` (and
    ``--depths`` in a run across depth)."""
    try:
        yield
    except (MemoryError, RuntimeError) as error:
        if isinstance(error, RuntimeError) and not _OUT_OF_MEMORY.search(str(error)):
            raise
        widest = max(args.widths or default_widths)
        depths = getattr(args, "depths", None)
        if depths:
            raise UsageError(f"argument --depths: out of memory on {args.device!r} at width up to {widest} and "
                             f"depth up to {max(depths)}; try fewer blocks or smaller --widths") from None
        raise UsageError(f"argument --widths: out of memory on {args.device!r} at width up to "
                         f"{widest}; try smaller widths") from None


def _as_usage_error(error: custom.ArgumentError) -> UsageError:
    return UsageError(f"argument --{error.argument.replace('_', '-')}: {error.message}")


def prepare_user_model(args: argparse.Namespace) -> custom.ModelSpec:
    """The user's model factory from ``--model``, checked, with base shapes from ``--base-width``.

    Args:
        args: parsed arguments with ``--model module:function``.

    Returns:
        The ``ModelSpec``.

    Raises:
        UsageError: naming the flag at fault (see ``coord_checks.custom.prepare_model``).
    """
    try:
        return custom.prepare_model(args.model, args.widths, args.base_width, args.readout, args.attention)
    except custom.ArgumentError as error:
        raise _as_usage_error(error) from None


def load_user_batches(args: argparse.Namespace, n_batches: int, split: str) -> list:
    """``--data``'s batches (see ``coord_checks.custom.load_batches``).

    Args:
        args: parsed arguments.
        n_batches: batches wanted.
        split: ``"train"`` or ``"eval"``.

    Returns:
        The batches.

    Raises:
        UsageError: naming ``--data``.
    """
    try:
        return custom.load_batches(args.data, n_batches, split)
    except custom.ArgumentError as error:
        raise _as_usage_error(error) from None


def user_loss(args: argparse.Namespace) -> custom.LossFn:
    """``--loss``'s function (see ``coord_checks.custom.resolve_loss``).

    Args:
        args: parsed arguments.

    Returns:
        The loss function.

    Raises:
        UsageError: naming ``--loss``.
    """
    try:
        return custom.resolve_loss(args.loss)
    except custom.ArgumentError as error:
        raise _as_usage_error(error) from None


@contextmanager
def _user_code_failure_as_usage_error(args: argparse.Namespace, label: str) -> Iterator[None]:
    """Turn an exception raised while the user's model trains into a ``UsageError`` naming ``--model``
    (out of memory is left to ``_out_of_memory_as_usage_error``)."""
    try:
        yield
    except custom.ArgumentError as error:
        raise _as_usage_error(error) from None
    except (RuntimeError, TypeError, ValueError, IndexError, AttributeError, KeyError) as error:
        if isinstance(error, RuntimeError) and _OUT_OF_MEMORY.search(str(error)):
            raise
        raise UsageError(f"argument --model: {label} failed while training on --data {args.data} "
                         f"with --loss {args.loss}: {custom.first_line(error)}") from None


def _record_user_model(args: argparse.Namespace) -> custom.CheckResult:
    """The user's model's check (muP only), with every failure it can cause as a ``UsageError``."""
    with _out_of_memory_as_usage_error(args, args.widths), \
            _user_code_failure_as_usage_error(args, args.model):
        return custom.check_model(
            args.model, args.widths, data=args.data, loss=args.loss, optimizer=args.optimizer,
            lr=args.lr, steps=args.steps, horizon=args.horizon, base_width=args.base_width,
            seeds=args.seeds, batches=args.batches, readout=args.readout, attention=args.attention,
            statistic=args.statistic, sequences=_SEQUENCES[args.sequence], device=args.device,
            progress=True,
        )


def run_check(args: argparse.Namespace) -> int:
    """Run the coordinate check described by parsed arguments.

    An example model runs in SP and in muP; the user's model (``--model module:function``) in
    muP. With ``--horizon N`` the run trains N steps, records log-spaced steps and judges each
    module over time. With ``--depths`` the Transformer runs across depth, depth-unaware muP
    against the ``--depth-alpha`` rule, judged against log2(depth).

    Args:
        args: namespace from the check parser.

    Returns:
        Exit status: 0 if the muP run (across depth: the depth-aware run) passes, 1 if it fails.

    Raises:
        UsageError: if the run runs out of memory, the user's model cannot be used, or an output
            file cannot be written.
    """
    start = time.perf_counter()
    steps = args.horizon or args.steps or experiments.DEFAULT_STEPS[args.optimizer]
    record_steps = custom.log_spaced_steps(args.horizon) if args.horizon else None
    axis, judged_label, names, prefix = "width", "mup", {"sp": "SP", "mup": "muP"}, "coord_check"
    if is_user_model(args):
        frame, judged, spec = _record_user_model(args)
        label, name = spec.label, custom.file_label(args.model)
        lr = DEFAULT_LRS[args.optimizer] if args.lr is None else args.lr
    elif args.depths:
        alpha = 1.0 if args.depth_alpha is None else args.depth_alpha
        axis, judged_label, names, prefix = "depth", experiments.depth_label(alpha), _DEPTH_NAMES, "depth_coord_check"
        with _out_of_memory_as_usage_error(args, experiments.DEFAULT_DEPTH_WIDTHS):
            frame = experiments.run_depth_check(
                model=args.model, optimizer=args.optimizer, depths=args.depths, widths=args.widths,
                base_depth=args.base_depth, depth_alpha=alpha, steps=steps, seeds=args.seeds,
                sequences=_SEQUENCES[args.sequence], lr=args.lr, batches=args.batches,
                statistics=(args.statistic,), device=args.device, progress=True, record_steps=record_steps,
                zero_init=args.zero_init,
            )
        judged = verdict.judge(frame, statistic=args.statistic, over_time=bool(args.horizon), axis="depth")
        base_depth = min(args.depths) if args.base_depth is None else args.base_depth
        label = f"{args.model}, width {' '.join(map(str, sorted(frame['width'].unique())))}, base depth {base_depth}"
        name = args.model
        lr = args.lr if args.lr is not None else experiments.default_lr(args.model, args.optimizer)
    else:
        with _out_of_memory_as_usage_error(args, experiments.DEFAULT_WIDTHS[args.model]):
            frame = experiments.run_coord_check(
                model=args.model,
                optimizer=args.optimizer,
                widths=args.widths,
                steps=steps,
                seeds=args.seeds,
                sequences=_SEQUENCES[args.sequence],
                lr=args.lr,
                batches=args.batches,
                statistics=(args.statistic,),
                device=args.device,
                progress=True,
                record_steps=record_steps,
                zero_init=args.zero_init,
            )
        judged = verdict.judge(frame, statistic=args.statistic, over_time=bool(args.horizon))
        label, name = args.model, args.model
        lr = args.lr if args.lr is not None else experiments.default_lr(args.model, args.optimizer)
    out = Path(args.out)
    stem = f"{prefix}_{name}_{args.optimizer}"
    written = [f"{stem}.csv", f"{stem}_verdict.csv", f"{stem}.png"]
    _write_whole(out / f"{stem}.csv", lambda path: frame.to_csv(path, index=False))
    _write_whole(out / f"{stem}_verdict.csv", lambda path: judged.table.to_csv(path, index=False))
    verdicts = ", ".join(f"{names.get(p, p)} {judged.headline(p)}" for p in judged.table["parametrization"].unique())
    title = (f"{label}, {args.optimizer} schedule-free, base-width lr {lr:g}: "
             f"mean {args.statistic} of module outputs vs {axis} ({verdicts})")
    figure = plots.plot_coords(frame, statistic=args.statistic, title=title, axis=axis)
    _write_whole(out / f"{stem}.png", lambda path: plots.save_figure(figure, path))
    if args.horizon:
        written += [f"{stem}_over_time.csv", f"{stem}_over_time.png"]
        behaviour = judged.behaviour()
        _write_whole(out / written[-2], lambda path: behaviour.to_csv(path, index=False))
        over_time = plots.plot_over_time(
            judged.table, judged.thresholds.fail_slope, axis=axis,
            title=f"{label}, {args.optimizer} schedule-free, {args.horizon} steps: {axis} slope of "
                  f"each module over time ({verdicts})")
        _write_whole(out / written[-1], lambda path: plots.save_figure(over_time, path))
    print(judged.format())
    print(f"\nwrote {', '.join(written[:-1])} and {written[-1]} to {out.resolve()}/ "
          f"in {time.perf_counter() - start:.1f} s")
    return 0 if judged.passed(judged_label) else 1


def _user_sweep(args: argparse.Namespace):
    """The learning-rate sweep of the user's model (muP only)."""
    spec = prepare_user_model(args)
    lrs = args.lrs or transfer.lr_grid(DEFAULT_LRS[args.optimizer], octaves=4)
    train, held_out = load_user_batches(args, args.steps, "train"), load_user_batches(args, 4, "eval")
    loss = user_loss(args)
    with _user_code_failure_as_usage_error(args, spec.label):
        return transfer.sweep_learning_rates(
            spec.factory,
            lambda params, lr, **decay: optimizer_factory(args.optimizer, "mup", lr, **decay)(params),
            widths=args.widths, lrs=lrs, train_batches=train, eval_batches=held_out, loss_fn=loss,
            steps=args.steps, seeds=args.seeds, device=args.device, parametrization="mup",
            progress=True, eval_steps=args.eval_steps, weight_decays=args.wds,
        ), spec.label


def run_transfer(args: argparse.Namespace) -> int:
    """Run the learning-rate transfer sweep described by parsed arguments.

    With ``--eval-steps`` the runs are also evaluated at those step counts (anytime transfer): the
    optimum and its drift are reported per horizon and drawn against the steps. With ``--depths``
    the Transformer is swept across depth (depth-unaware muP against the ``--depth-alpha`` rule)
    and the drift is across depths.

    Args:
        args: namespace from the transfer parser.

    Returns:
        Exit status 0.

    Raises:
        UsageError: if the run runs out of memory, the user's model cannot be used, every learning
            rate diverges at some width, or an output file cannot be written.
    """
    start = time.perf_counter()
    keys = ["parametrization", "step"]
    axis, prefix = ("depth", "depth_transfer") if args.depths else ("width", "transfer")
    with _out_of_memory_as_usage_error(args, args.widths or experiments.TRANSFER_WIDTHS.get(args.model, ())):
        if is_user_model(args):
            sweep, label = _user_sweep(args)
        elif args.depths:
            alpha = 1.0 if args.depth_alpha is None else args.depth_alpha
            sweep = experiments.run_depth_transfer(
                model=args.model, optimizer=args.optimizer, depths=args.depths, widths=args.widths,
                base_depth=args.base_depth, depth_alpha=alpha, lrs=args.lrs, seeds=args.seeds, steps=args.steps,
                device=args.device, progress=True, eval_steps=args.eval_steps, zero_init=args.zero_init,
            )
            base_depth = min(args.depths) if args.base_depth is None else args.base_depth
            widths = " ".join(map(str, sorted(sweep["width"].unique())))
            label = f"{args.model}, width {widths}, base depth {base_depth}"
        else:
            label = args.model
            sweep = experiments.run_transfer(
                model=args.model,
                optimizer=args.optimizer,
                widths=args.widths,
                lrs=args.lrs,
                seeds=args.seeds,
                steps=args.steps,
                device=args.device,
                progress=True,
                eval_steps=args.eval_steps,
                weight_decays=args.wds,
                zero_init=args.zero_init,
            )
    points = ["width", *(["depth"] if args.depths else [])]
    mean_loss = sweep.groupby([*keys, *points, "lr"])["eval_loss"].mean()
    finite = np.isfinite(mean_loss).groupby(level=[*keys, *points]).any()
    if not finite.all():
        lost = ", ".join(f"{param} " + " ".join(f"{point} {value}" for point, value in zip(points, at))
                         + f" at step {step}" for param, step, *at in finite.index[~finite])
        raise UsageError(f"argument --lrs: every learning rate diverged ({lost}); try smaller ones")
    if args.wds:
        return _report_lr_wd(args, sweep, label, start)
    every = transfer.fit_optima(sweep, by=keys)
    drifts = transfer.optimum_drift(every, by=keys, axis=axis)
    optima = every[every["step"] == args.steps].drop(columns="step")
    drift = drifts[drifts["step"] == args.steps].drop(columns="step")
    out = Path(args.out)
    stem = f"{prefix}_{custom.file_label(args.model) if is_user_model(args) else args.model}_{args.optimizer}"
    written = [f"{stem}.csv", f"{stem}_optima.csv", f"{stem}.png"]
    _write_whole(out / f"{stem}.csv", lambda path: sweep.to_csv(path, index=False))
    _write_whole(out / f"{stem}_optima.csv", lambda path: (every if args.eval_steps else optima).to_csv(path, index=False))
    title = (f"{label}, {args.optimizer} schedule-free, {args.steps} steps: held-out loss at x "
             f"(stars: fitted optima)")
    figure = plots.plot_transfer(sweep[sweep["step"] == args.steps], optima, title=title, axis=axis)
    _write_whole(out / f"{stem}.png", lambda path: plots.save_figure(figure, path))
    fmt = {"grid_lr": "{:.3g}".format, "lr_opt": "{:.3g}".format, "log2_lr_opt": "{:.2f}".format,
           "best_loss": "{:.3f}".format, "drift_octaves": "{:.2f}".format, "trend": "{:.2f}".format}
    print(f"Optimal learning rate per {axis} (parabola vertex in log2 lr around the grid minimum):")
    print(optima.to_string(index=False, formatters=fmt))
    print(f"\nDrift of the optimum across {axis}s (octaves = factors of 2; trend = slope of log2 "
          f"lr_opt vs log2 {axis}):")
    print(drift.to_string(index=False, formatters=fmt))
    if args.eval_steps:
        written.append(f"{stem}_anytime.png")
        anytime = plots.plot_anytime(every, title=f"{label}, {args.optimizer} schedule-free: optimal lr "
                                                  "against training steps, evaluated at x in the same runs", axis=axis)
        _write_whole(out / written[-1], lambda path: plots.save_figure(anytime, path))
        rows = plots.at_largest_other(every, axis)[0]
        table = rows.pivot_table(index=["parametrization", "step"], columns=axis, values="lr_opt", sort=False)
        table.columns = [f"lr_opt {axis[0]}{w}" for w in table.columns]
        drift_rows = plots.at_largest_other(drifts, axis)[0]
        table = table.join(drift_rows.set_index(keys)[["drift_octaves", "trend"]]).reset_index()
        print("\nAnytime: the optimum per horizon, from the same runs evaluated at x after each step count:")
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"\nwrote {', '.join(written[:-1])} and {written[-1]} to {out.resolve()}/ "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


def _report_lr_wd(args: argparse.Namespace, sweep: Any, label: str, start: float) -> int:
    """Write and print the learning rate x weight decay sweep: joint optima, drift, heat maps."""
    joint = transfer.fit_joint_optima(sweep)
    drift = transfer.joint_drift(joint)
    out = Path(args.out)
    stem = f"transfer_{custom.file_label(args.model) if is_user_model(args) else args.model}_{args.optimizer}_wd"
    _write_whole(out / f"{stem}.csv", lambda path: sweep.to_csv(path, index=False))
    _write_whole(out / f"{stem}_optima.csv", lambda path: joint.to_csv(path, index=False))
    figure = plots.plot_lr_wd(sweep, joint, title=f"{label}, {args.optimizer} schedule-free, {args.steps} "
                                                  "steps: held-out loss at x (stars: joint optima)")
    _write_whole(out / f"{stem}.png", lambda path: plots.save_figure(figure, path))
    fmt = {"grid_lr": "{:.3g}".format, "lr_opt": "{:.3g}".format, "log2_lr_opt": "{:.2f}".format,
           "best_loss": "{:.3f}".format, "drift_octaves": "{:.2f}".format, "trend": "{:.2f}".format,
           "weight_decay_opt": "{:g}".format, "wd_drift_octaves": "{:.2f}".format}
    print("Joint optimum of learning rate and weight decay per width (grid minimum; lr refined by a "
          "parabola at the best weight decay):")
    print(joint.to_string(index=False, formatters=fmt))
    print("\nDrift of the joint optimum across widths (octaves = factors of 2):")
    print(drift.to_string(index=False, formatters=fmt))
    print(f"\nwrote {stem}.csv, {stem}_optima.csv and {stem}.png to {out.resolve()}/ "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


def _diagnosis_inputs(args: argparse.Namespace) -> tuple:
    """Model factory, readout name, train and eval batches and loss of a diagnosis."""
    if is_user_model(args):
        spec = prepare_user_model(args)
        return (spec.factory, spec.readout, load_user_batches(args, args.steps, "train"),
                load_user_batches(args, 4, "eval"), user_loss(args), spec.label)
    task = experiments.make_task(args.model, n_batches=args.steps, n_eval_batches=4, eval_batch_size=256,
                                 zero_init=args.zero_init)
    return (lambda width: task.build(width, "mup"), None, task.train_batches, task.eval_batches,
            experiments.cross_entropy, args.model)


def run_diagnose(args: argparse.Namespace) -> int:
    """Run the per-role learning-rate sweep described by parsed arguments.

    Args:
        args: namespace from the diagnose parser.

    Returns:
        Exit status 0.

    Raises:
        UsageError: if the run runs out of memory, the user's model cannot be used, a role
            diverges at every multiplier, or an output file cannot be written.
    """
    start = time.perf_counter()
    lr = DEFAULT_LRS[args.optimizer] if args.lr is None else args.lr
    default_widths = args.widths or experiments.TRANSFER_WIDTHS.get(args.model, ())
    guard = _user_code_failure_as_usage_error(args, args.model) if is_user_model(args) else nullcontext()
    with _out_of_memory_as_usage_error(args, default_widths), guard:
        factory, readout, train, held_out, loss, label = _diagnosis_inputs(args)
        try:
            result = diagnose.diagnose(
                factory, lambda groups, base_lr: optimizer_factory(args.optimizer, "mup", base_lr)(groups),
                widths=list(default_widths), lr=lr, train_batches=train, eval_batches=held_out,
                loss_fn=loss, steps=args.steps, multipliers=args.multipliers, roles=args.roles,
                readout=readout, seeds=args.seeds, rounds=args.rounds, device=args.device, progress=True,
            )
        except custom.ArgumentError as error:
            raise _as_usage_error(error) from None
    out = Path(args.out)
    stem = f"diagnose_{custom.file_label(args.model) if is_user_model(args) else args.model}_{args.optimizer}"
    _write_whole(out / f"{stem}.csv", lambda path: result.sweep.to_csv(path, index=False))
    _write_whole(out / f"{stem}_optima.csv", lambda path: result.optima.to_csv(path, index=False))
    title = (f"{label}, {args.optimizer} schedule-free (muP), {args.steps} steps, base lr {lr:g}: held-out "
             f"loss at x against one role's lr (stars: optima); "
             + (f"the {result.worst_role} lr breaks transfer" if result.worst_role else "the lrs transfer"))
    figure = plots.plot_transfer(result.sweep, result.optima, title=title, panel="role")
    _write_whole(out / f"{stem}.png", lambda path: plots.save_figure(figure, path))
    print(result.format())
    print(f"\nwrote {stem}.csv, {stem}_optima.csv and {stem}.png to {out.resolve()}/ "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


def run_study(args: argparse.Namespace) -> int:
    """Run (or resume) the study described by parsed arguments, then write and print its answer.

    Args:
        args: namespace from the study parser.

    Returns:
        Exit status 0.

    Raises:
        UsageError: for settings the study refuses, an output folder holding another study, running
            out of memory, or an output file that cannot be written.
    """
    start = time.perf_counter()
    try:
        settings = study.StudySettings(
            model=args.model, optimizer=args.optimizer, widths=tuple(args.widths), seeds=tuple(args.seeds),
            steps=args.steps, eval_steps=tuple(sorted(set(args.eval_steps))), batch_size=args.batch_size,
            seq_len=args.seq_len, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
            points_per_octave=args.points_per_octave)
        chosen = study.variants(zero_init=args.zero_init, split_zero_init=args.split_zero_init,
                                tune_mults=args.tune_mults or (),
                                tune_roles=args.tune_roles, betas=args.betas, epsilons=args.eps,
                                scale_eps=args.scale_eps, on_zero_init=args.on_zero_init)
    except ValueError as error:
        raise UsageError(f"argument --{_flag_of(str(error))}: {error}") from None
    out = Path(args.out)
    report = None if args.quiet else (lambda line: print(line, flush=True))
    with _out_of_memory_as_usage_error(args, args.widths):
        try:
            runs, tuned = study.run_study(settings, chosen, out=out, report=report, device=args.device)
        except ValueError as error:
            raise UsageError(f"argument --out: {error}" if "output folder" in str(error)
                             else f"argument --{_flag_of(str(error))}: {error}") from None
    summary = study.summarize(runs, settings, tuned, chosen)
    drift = study.drift(summary)
    _write_whole(out / "study_summary.csv", lambda path: summary.to_csv(path, index=False))
    _write_whole(out / "study_drift.csv", lambda path: drift.to_csv(path, index=False))
    written = ["study_runs.csv", "study_summary.csv", "study_drift.csv"]
    for step in settings.horizons:
        name = "study.png" if step == settings.steps else f"study_step{step}.png"
        title = (f"{args.model}, {args.optimizer} schedule-free, {step} steps, seeds "
                 f"{' '.join(map(str, args.seeds))}: muP tuned at width {settings.widths[0]} vs SP tuned per width")
        figure = plots.plot_study(summary, step=step, title=title)
        _write_whole(out / name, lambda path, figure=figure: plots.save_figure(figure, path))
        written.append(name)
    columns = {"variant": "variant", "step": "step", "width": "width", "sp_log2_lr": "SP log2 lr",
               "sp_test": "SP test", "sp_test_std": "+/-", "mup_log2_lr": "muP log2 lr",
               "mup_log2_lr_opt": "muP opt", "mup_test": "muP test", "mup_test_std": "+/- ",
               "gap": "gap", "gap_std": " +/-", "wider_is_better": "wider better"}
    table = summary[list(columns)].rename(columns=columns)
    print("\nTest loss at x per width: SP at its validation-best lr there, muP at the lr tuned at the base "
          "width (gap = muP - SP, paired by seed; +/- = std over seeds):")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print("\nDrift of the optimal lr across widths (octaves; trend = slope of log2 lr_opt vs log2 width):")
    print(drift.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print(f"\nwrote {', '.join(written)} to {out.resolve()}/ in {time.perf_counter() - start:.1f} s")
    return 0


def _flag_of(message: str) -> str:
    """The flag a study settings error is about (its first word, as a flag)."""
    first = message.split()[0].rstrip(":")
    return {"epsilons": "eps", "tune_mults": "tune-mults", "variant": "tune-mults",
            "start_points": "points-per-octave", "max_points": "points-per-octave"}.get(
        first, first.replace("_", "-"))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m coord_checks``.

    Args:
        argv: arguments without the program name (default ``sys.argv[1:]``). A first argument
            ``transfer`` selects the sweep, ``diagnose`` the per-role sweep, ``study`` the muP-vs-SP
            study; ``check`` (or nothing)
            the coordinate check.

    Returns:
        The exit status: that of the run, or 130 after Ctrl-C (printed as one ``interrupted``
        line; files written completely before it stay, no partial file does).

    Raises:
        SystemExit: with status 2 after one ``error:`` line on stderr, for every failure the user
            caused (see the module docstring); with status 0 after ``--help``.
    """
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        parsers = {**dict(zip(("check", "transfer", "diagnose"), build_parsers())), "study": build_study_parser()}
        command = argv[0] if argv and argv[0] in parsers else "check"
        if argv and argv[0] in parsers:
            argv = argv[1:]
        parser = parsers[command]
        args = parser.parse_args(argv)
        if command != "study":
            _check_depths(parser, args)
            _check_widths(parser, args)
        _check_device(parser, args.device)
        _check_out(parser, args.out)
        torch.set_num_threads(args.threads)
        try:
            return {"check": run_check, "transfer": run_transfer, "diagnose": run_diagnose,
                    "study": run_study}[command](args)
        except UsageError as error:
            parser.error(str(error))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (``| head``): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
