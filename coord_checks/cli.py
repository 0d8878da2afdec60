"""Command line: ``python -m coord_checks`` (coordinate check) and ``python -m coord_checks transfer``.

The check trains each example model in standard parametrization and in muP with the same
schedule-free optimizer and base-width learning rate, writes the recording frame (CSV), the
verdict table (CSV) and a figure (PNG) to the output folder, prints the verdict, and exits with 0
when the muP run passes, 1 when it fails (the SP run is expected to fail: it is the contrast).

The transfer sweep writes the sweep frame, the fitted optima (CSV) and a figure (PNG), and prints
the optimum per width and its drift across widths.

Every failure the user can cause ends with one ``prog: error: ...`` line on stderr naming the
flag, and exit status 2: bad arguments, a device that cannot compute, an output folder that cannot
be written, running out of memory, a transfer sweep whose every learning rate diverges. The
device and the output folder are checked before any compute. Ctrl-C ends with one
``prog: interrupted`` line and exit status 130. Each output file is written under a temporary name
in the output folder and renamed into place, so an interrupted run leaves complete files or none.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn, Sequence

import numpy as np
import torch

from coord_checks import experiments, plots, transfer, verdict
from coord_checks.models import MODEL_NAMES, N_HEADS
from coord_checks.optimizers import OPTIMIZER_NAMES
from coord_checks.recording import STATISTICS

PROG = "python -m coord_checks"
DEFAULT_OUT = "coord_check_out"
_SEQUENCES = {"y": ("y",), "x": ("x",), "both": ("y", "x")}
#: Largest accepted learning rate: far beyond divergence, and small enough that the optimizers'
#: scalar arithmetic (lr squared, lr times muP multipliers, as float32) cannot overflow.
_MAX_LR = 1e6
_CPUS = os.cpu_count() or 1
_OUT_OF_MEMORY = re.compile(r"out of memory|can't allocate memory", re.IGNORECASE)


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
_learning_rate = _number(float, f"a positive number up to {_MAX_LR:g}", lambda value: 0 < value <= _MAX_LR)
_seed = _number(int, "an integer in [0, 2**64)", lambda value: 0 <= value < 2**64)
_thread_count = _number(int, f"a positive integer up to {_CPUS} (the CPU count)",
                        lambda value: 0 < value <= _CPUS)


def _add_common(parser: argparse.ArgumentParser, models: Sequence[str], seeds: Sequence[int]) -> None:
    parser.add_argument("--model", choices=models, default="mlp", help="example model (default: mlp)")
    parser.add_argument("--optimizer", choices=OPTIMIZER_NAMES, default="adamw",
                        help="schedule-free optimizer; muP uses its Mu* factory (default: adamw)")
    parser.add_argument("--widths", type=_positive_int, nargs="+", metavar="W",
                        help="model widths, at least two distinct (default: per model)")
    parser.add_argument("--seeds", type=_seed, nargs="+", metavar="S", default=list(seeds),
                        help=f"initialisation seeds (default: {' '.join(map(str, seeds))})")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help=f"output folder (default: ./{DEFAULT_OUT})")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--threads", type=_thread_count, default=1,
                        help="torch intra-op threads (default: 1; more help a little on an idle "
                             "machine, but make these many tiny operations crawl when other "
                             "processes compete for the cores)")


def build_parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The parsers of the check (default command) and of the ``transfer`` subcommand.

    Returns:
        ``(check_parser, transfer_parser)``.
    """
    check = _OneLineParser(
        prog=PROG,
        description="Coordinate check of a schedule-free optimizer in standard parametrization vs "
                    "muP. Run 'python -m coord_checks transfer --help' for the learning-rate sweep.",
    )
    _add_common(check, MODEL_NAMES, seeds=(0, 1, 2))
    check.add_argument("--steps", type=_positive_int, help="recorded steps, step 1 = init "
                       "(default: 4; 10 for radam)")
    check.add_argument("--sequence", choices=tuple(_SEQUENCES), default="both",
                       help="measure at the training point y, the evaluation point x, or both (default)")
    check.add_argument("--lr", type=_learning_rate, help="base-width learning rate (default: per optimizer)")
    check.add_argument("--batches", choices=experiments.BATCH_MODES, default="fixed",
                       help="one fixed batch or a new batch per step (default: fixed)")
    check.add_argument("--statistic", choices=tuple(STATISTICS), default="l1",
                       help="statistic to judge and plot (default: l1 = mean |x|)")

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
    return check, sweep


def _check_widths(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.widths is not None and len(set(args.widths)) < 2:
        parser.error(f"argument --widths: need at least two distinct widths, got {args.widths}")
    if args.model == "transformer" and args.widths is not None:
        bad = [w for w in args.widths if w % N_HEADS]
        if bad:
            parser.error(f"argument --widths: transformer widths must be multiples of {N_HEADS} "
                         f"(the head count), got {bad}")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"argument --seeds: seeds must be distinct, got {args.seeds}")


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


def _write_whole(path: Path, write: Callable[[Path], object]) -> None:
    """Write ``path`` as ``write(temporary)`` then rename the temporary file onto it, so that
    ``path`` is always absent or complete; the temporary file is removed on any failure."""
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(temporary)
        os.replace(temporary, path)
    except OSError as error:
        raise UsageError(f"argument --out: cannot write {str(path)!r}: {error.strerror or error}") from None
    finally:
        temporary.unlink(missing_ok=True)


@contextmanager
def _out_of_memory_as_usage_error(args: argparse.Namespace, default_widths: Sequence[int]) -> Iterator[None]:
    """Turn running out of memory (host or device) into a ``UsageError`` naming ``--widths``."""
    try:
        yield
    except (MemoryError, RuntimeError) as error:
        if isinstance(error, RuntimeError) and not _OUT_OF_MEMORY.search(str(error)):
            raise
        widest = max(args.widths or default_widths)
        raise UsageError(f"argument --widths: out of memory on {args.device!r} at width up to "
                         f"{widest}; try smaller widths") from None


def run_check(args: argparse.Namespace) -> int:
    """Run the coordinate check described by parsed arguments.

    Args:
        args: namespace from the check parser.

    Returns:
        Exit status: 0 if the muP run passes, 1 if it fails.

    Raises:
        UsageError: if the run runs out of memory or an output file cannot be written.
    """
    start = time.perf_counter()
    with _out_of_memory_as_usage_error(args, experiments.DEFAULT_WIDTHS[args.model]):
        frame = experiments.run_coord_check(
            model=args.model,
            optimizer=args.optimizer,
            widths=args.widths,
            steps=args.steps,
            seeds=args.seeds,
            sequences=_SEQUENCES[args.sequence],
            lr=args.lr,
            batches=args.batches,
            statistics=(args.statistic,),
            device=args.device,
            progress=True,
        )
    judged = verdict.judge(frame, statistic=args.statistic)
    out = Path(args.out)
    stem = f"coord_check_{args.model}_{args.optimizer}"
    _write_whole(out / f"{stem}.csv", lambda path: frame.to_csv(path, index=False))
    _write_whole(out / f"{stem}_verdict.csv", lambda path: judged.table.to_csv(path, index=False))
    lr = args.lr if args.lr is not None else experiments.default_lr(args.model, args.optimizer)
    title = (f"{args.model}, {args.optimizer} schedule-free, base-width lr {lr:g}: "
             f"mean {args.statistic} of module outputs vs width (SP {judged.headline('sp')}, "
             f"muP {judged.headline('mup')})")
    figure = plots.plot_coords(frame, statistic=args.statistic, title=title)
    _write_whole(out / f"{stem}.png", lambda path: plots.save_figure(figure, path))
    print(judged.format())
    print(f"\nwrote {stem}.csv, {stem}_verdict.csv and {stem}.png to {out.resolve()}/ "
          f"in {time.perf_counter() - start:.1f} s")
    return 0 if judged.passed("mup") else 1


def run_transfer(args: argparse.Namespace) -> int:
    """Run the learning-rate transfer sweep described by parsed arguments.

    Args:
        args: namespace from the transfer parser.

    Returns:
        Exit status 0.

    Raises:
        UsageError: if the run runs out of memory, every learning rate diverges at some width, or
            an output file cannot be written.
    """
    start = time.perf_counter()
    with _out_of_memory_as_usage_error(args, experiments.TRANSFER_WIDTHS[args.model]):
        sweep = experiments.run_transfer(
            model=args.model,
            optimizer=args.optimizer,
            widths=args.widths,
            lrs=args.lrs,
            seeds=args.seeds,
            steps=args.steps,
            device=args.device,
            progress=True,
        )
    mean_loss = sweep.groupby(["parametrization", "width", "lr"])["eval_loss"].mean()
    finite = np.isfinite(mean_loss).groupby(level=["parametrization", "width"]).any()
    if not finite.all():
        lost = ", ".join(f"{param} width {width}" for param, width in finite.index[~finite])
        raise UsageError(f"argument --lrs: every learning rate diverged ({lost}); try smaller ones")
    optima = transfer.fit_optima(sweep)
    drift = transfer.optimum_drift(optima)
    out = Path(args.out)
    stem = f"transfer_{args.model}_{args.optimizer}"
    _write_whole(out / f"{stem}.csv", lambda path: sweep.to_csv(path, index=False))
    _write_whole(out / f"{stem}_optima.csv", lambda path: optima.to_csv(path, index=False))
    title = (f"{args.model}, {args.optimizer} schedule-free, {args.steps} steps: held-out loss at x "
             f"(stars: fitted optima)")
    figure = plots.plot_transfer(sweep, optima, title=title)
    _write_whole(out / f"{stem}.png", lambda path: plots.save_figure(figure, path))
    fmt = {"grid_lr": "{:.3g}".format, "lr_opt": "{:.3g}".format, "log2_lr_opt": "{:.2f}".format,
           "best_loss": "{:.3f}".format, "drift_octaves": "{:.2f}".format, "trend": "{:.2f}".format}
    print("Optimal learning rate per width (parabola vertex in log2 lr around the grid minimum):")
    print(optima.to_string(index=False, formatters=fmt))
    print("\nDrift of the optimum across widths (octaves = factors of 2; trend = slope of log2 "
          "lr_opt vs log2 width):")
    print(drift.to_string(index=False, formatters=fmt))
    print(f"\nwrote {stem}.csv, {stem}_optima.csv and {stem}.png to {out.resolve()}/ "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m coord_checks``.

    Args:
        argv: arguments without the program name (default ``sys.argv[1:]``). A first argument
            ``transfer`` selects the sweep; ``check`` (or nothing) the coordinate check.

    Returns:
        The exit status: that of the run, or 130 after Ctrl-C (printed as one ``interrupted``
        line; files written completely before it stay, no partial file does).

    Raises:
        SystemExit: with status 2 after one ``error:`` line on stderr, for every failure the user
            caused (see the module docstring); with status 0 after ``--help``.
    """
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        check_parser, transfer_parser = build_parsers()
        command = argv[0] if argv and argv[0] in ("check", "transfer") else "check"
        if argv and argv[0] in ("check", "transfer"):
            argv = argv[1:]
        parser = transfer_parser if command == "transfer" else check_parser
        args = parser.parse_args(argv)
        _check_widths(parser, args)
        _check_device(parser, args.device)
        _check_out(parser, args.out)
        torch.set_num_threads(args.threads)
        try:
            return run_transfer(args) if command == "transfer" else run_check(args)
        except UsageError as error:
            parser.error(str(error))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
