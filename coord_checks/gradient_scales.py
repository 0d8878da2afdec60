"""Gradient scales across width, and what they mean for Adam's eps under muP.

Under muP the entries of a gradient shrink as the model widens, and so does Adam's sqrt(v) (the
root of the moving average of squared gradients). Adam divides the gradient by sqrt(v) + eps: a
fixed eps tuned at the base width is then a larger and larger share of the denominator in wide
models, their updates shrink, the best learning rate drifts up with width, and wide models lose.

``record_gradient_scales`` trains an example model (``coord_checks.models``, muP, with
``MuAdamW_ScheduleFree``) at several widths and records, per parameter role
(``coord_checks.diagnose.parameter_roles``: input, hidden, readout, attention, vector), the RMS
of the gradient at y and of Adam's bias-corrected sqrt(v) after each step, as a tidy frame.
``fit_exponents`` fits, per role and step, the slope of log2(RMS) against log2(width): the width
exponent that eps must follow for eps / sqrt(v) to stay width-independent. Each role is listed
beside the exponent of ``mup_schedulefree.scaling.EPS_RULE`` for its parameters.

``eps_coord_check`` and ``eps_transfer`` run a coordinate check and a learning-rate sweep with a
base eps large enough to matter, with eps fixed and with ``scale_eps=True``.

Every measurement here builds the example models with readout and query initialised to zero
(``zero_init=True``), so that each output is made of updates alone and an update that shrinks
with width shows as a shrinking output from the first step (with PyTorch's init the readout's
initial values, which shrink like 1/sqrt(width) by design, would mask it for a few steps).

Command line (one ``error:`` line naming the flag, exit status 2, for bad arguments)::

    python -m coord_checks.gradient_scales                      # MLP, widths 64..1024
    python -m coord_checks.gradient_scales --model transformer  # widths 32..256
    python -m coord_checks.gradient_scales check --eps 1e-3     # coordinate check, both ways
    python -m coord_checks.gradient_scales transfer --eps 1e-3  # lr sweep, both ways
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Sequence

import matplotlib
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

import mup_schedulefree as msf
from mup_schedulefree.files import replace_atomically
from mup_schedulefree.scaling import eps_scaling

from coord_checks import plots
from coord_checks.diagnose import ROLES, parameter_roles
from coord_checks.experiments import DEFAULT_WIDTHS, TRANSFER_WIDTHS, check_model_name, cross_entropy, make_task
from coord_checks.models import N_HEADS
from coord_checks.recording import check_widths, record_coords, rng_devices
from coord_checks.transfer import fit_optima, lr_grid, optimum_drift, sweep_learning_rates
from coord_checks.verdict import fit_width_scaling, judge, Verdict

PROG = "python -m coord_checks.gradient_scales"
MODELS: tuple[str, ...] = ("mlp", "transformer")
STATISTICS: tuple[str, ...] = ("grad", "sqrt_v")
COLUMNS: tuple[str, ...] = ("model", "width", "role", "step", "seed", "statistic", "value")
#: Labels of the two ways an eps experiment runs, in the ``parametrization`` column.
EPS_WAYS: dict[str, bool] = {"eps fixed": False, "eps scaled": True}
#: Base-width learning rate of the measurements (``coord_checks.optimizers.DEFAULT_LRS["adamw"]``).
DEFAULT_LR = 1e-2
#: Base-width eps of the eps experiments: about a tenth of the MLP's sqrt(v) entries at its base width.
DEFAULT_EPS = 1e-3
#: Centre of the default lr grid of ``eps_transfer``: the optima of the large-eps sweeps lie above
#: the plain sweep's (a large eps slows Adam down), so the grid is centred one octave higher.
TRANSFER_LR_CENTRE = 2 * DEFAULT_LR
#: A judged module whose statistic shrinks with a width slope below ``-SHRINK_BOUND`` has updates that
#: vanish with width (see ``shrinking``), as in ``tests/test_coord_mup_vs_sp.py``.
SHRINK_BOUND = 0.25
#: Modules exempt from that bound: with a zero-initialised query the first attention logits come from
#: gradients that are themselves o(1) in width, so they legitimately shrink early on (at any eps).
SHRINK_EXEMPT = r"attn\.(?:query|attn_logits)"


def _rms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    total = sum(float(t.numel()) for t in tensors)
    return torch.sqrt(sum(t.detach().float().square().sum() for t in tensors) / total)


def record_gradient_scales(
    model: str = "mlp",
    widths: Sequence[int] | None = None,
    steps: int = 6,
    seeds: Sequence[int] = (0, 1),
    lr: float = DEFAULT_LR,
    device: str | torch.device = "cpu",
) -> pd.DataFrame:
    """Train the example ``model`` in muP at each width and record gradient and sqrt(v) RMS per role.

    Every step sees a new batch of the example task (``make_task(..., zero_init=True)``); the
    optimizer is ``MuAdamW_ScheduleFree(lr=lr)`` with its default eps (1e-8, far below every
    sqrt(v) here, so eps does not change the run). Step ``t`` is the ``t``-th gradient, taken at
    y after ``t - 1`` updates; ``sqrt_v`` is sqrt(v / (1 - beta2^t)) after the update that used
    it, the quantity eps is added to. With the zero-initialised readout every gradient but the
    readout's is exactly zero at step 1.

    Args:
        model: ``"mlp"`` or ``"transformer"``.
        widths: at least two distinct widths (default ``coord_checks.experiments.DEFAULT_WIDTHS``).
        steps: gradients recorded per run, at least 2.
        seeds: initialisation seeds.
        lr: base-width learning rate.
        device: where to train.

    Returns:
        A tidy frame with columns ``COLUMNS``: one row per (model, width, role, step, seed,
        statistic), statistic ``"grad"`` or ``"sqrt_v"``, value the RMS over every entry of the
        role's parameters.

    Raises:
        ValueError: for an unknown model, bad widths, ``steps < 2``, no seeds or a non-positive lr.
    """
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    widths = check_widths(list(DEFAULT_WIDTHS[model] if widths is None else widths))
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"steps must be an int of at least 2, got {steps!r}")
    if not seeds:
        raise ValueError("seeds must hold at least one seed")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    device = torch.device(device)
    task = make_task(model, n_batches=steps, zero_init=True)
    batches = [(x.to(device), y.to(device)) for x, y in task.train_batches]
    rows = []
    with torch.random.fork_rng(devices=rng_devices(device)):
        for seed in seeds:
            for width in widths:
                torch.manual_seed(seed)
                net = task.build(width, "mup").to(device)
                roles = parameter_roles(net)
                params = dict(net.named_parameters())
                members = {role: [params[n] for n, r in roles.items() if r == role] for role in ROLES}
                members = {role: ps for role, ps in members.items() if ps}
                optimizer = msf.MuAdamW_ScheduleFree(net.named_parameters(), lr=lr)
                optimizer.train()
                beta2 = optimizer.defaults["betas"][1]
                for step in range(1, steps + 1):
                    inputs, targets = batches[step - 1]
                    optimizer.zero_grad(set_to_none=True)
                    cross_entropy(net(inputs), targets).backward()
                    grads = {role: _rms([p.grad for p in ps]) for role, ps in members.items()}
                    optimizer.step()
                    correction = 1.0 - beta2**step
                    roots = {role: _rms([(optimizer.state[p]["exp_avg_sq"] / correction).sqrt() for p in ps])
                             for role, ps in members.items()}
                    for statistic, values in (("grad", grads), ("sqrt_v", roots)):
                        rows += [(model, width, role, step, seed, statistic, float(value))
                                 for role, value in values.items()]
    return pd.DataFrame(rows, columns=list(COLUMNS))


def rule_exponents(model: str) -> dict[str, str]:
    """The eps exponents ``mup_schedulefree.scaling.EPS_RULE`` gives each role's parameters.

    Args:
        model: ``"mlp"`` or ``"transformer"``.

    Returns:
        ``{role: exponents}``, the distinct exponents of the role's parameters as text (e.g. ``"-1"``).
    """
    net = make_task(model, n_batches=1, zero_init=True).build(DEFAULT_WIDTHS[model][1], "mup")
    params = dict(net.named_parameters())
    found: dict[str, set[int]] = {}
    for name, role in parameter_roles(net).items():
        found.setdefault(role, set()).add(eps_scaling(params[name].infshape).exponent)
    return {role: ", ".join(f"{e:+d}" if e else "0" for e in sorted(exps)) for role, exps in found.items()}


def fit_exponents(frame: pd.DataFrame) -> pd.DataFrame:
    """Width exponent of every (model, role, statistic, step): the slope of log2(seed-mean RMS)
    against log2(width).

    Args:
        frame: a frame from ``record_gradient_scales``.

    Returns:
        One row per (model, role, statistic, step) with ``exponent`` (nan where the RMS is zero
        at some width, e.g. at step 1 behind a zero-initialised readout) and ``spread`` (max/min
        over widths).
    """
    means = frame.groupby(["model", "role", "statistic", "step", "width"], sort=False)["value"].mean()
    records = []
    for key, curve in means.groupby(level=[0, 1, 2, 3], sort=False):
        curve = curve.droplevel([0, 1, 2, 3])
        slope, spread = fit_width_scaling(curve) if (curve > 0).all() else (math.nan, math.inf)
        records.append((*key, slope, spread))
    return pd.DataFrame(records, columns=["model", "role", "statistic", "step", "exponent", "spread"])


def summarize_exponents(exponents: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, role): the measured exponents of the gradient and of sqrt(v) at the
    last step, their range over the steps where they are defined, and the eps rule's exponent.

    Args:
        exponents: a frame from ``fit_exponents``.

    Returns:
        Columns model, role, grad, sqrt_v (exponents at the last step), grad_range, sqrt_v_range
        (``"min .. max"`` over steps) and rule (``rule_exponents``).
    """
    last = int(exponents["step"].max())
    records = []
    for (model, role), rows in exponents.groupby(["model", "role"], sort=False):
        record = {"model": model, "role": role}
        for statistic in STATISTICS:
            part = rows[rows["statistic"] == statistic]
            defined = part["exponent"].dropna()
            record[statistic] = float(part.loc[part["step"] == last, "exponent"].iloc[0])
            record[f"{statistic}_range"] = f"{defined.min():+.2f} .. {defined.max():+.2f}"
        records.append(record)
    summary = pd.DataFrame(records)
    rules = {model: rule_exponents(model) for model in summary["model"].unique()}
    summary["rule"] = [rules[model].get(role, "") for model, role in zip(summary["model"], summary["role"])]
    return summary


def plot_gradient_scales(frame: pd.DataFrame, title: str | None = None) -> Figure:
    """RMS of the gradient and of sqrt(v) against width at the last step, one line per role.

    Args:
        frame: a frame from ``record_gradient_scales`` (one model).
        title: figure title.

    Returns:
        The figure: two log-log panels, each with a dashed slope -1 guide.
    """
    last = int(frame["step"].max())
    rows = frame[frame["step"] == last]
    means = rows.groupby(["statistic", "role", "width"])["value"].mean()
    roles = [role for role in ROLES if role in set(rows["role"])]
    colours = {role: matplotlib.colormaps["tab10"](i) for i, role in enumerate(ROLES)}
    with matplotlib.rc_context({"font.size": 8, "axes.titlesize": 8, "legend.fontsize": 7, "axes.grid": True,
                                "grid.alpha": 0.3}):
        fig = Figure(figsize=(10.0, 3.4), layout="constrained")
        axes = fig.subplots(1, len(STATISTICS))
        for ax, statistic in zip(axes, STATISTICS):
            for role in roles:
                curve = means.loc[(statistic, role)]
                slope, _ = fit_width_scaling(curve)
                ax.plot(curve.index, curve.to_numpy(), marker="o", ms=3, lw=1.2, color=colours[role],
                        label=f"{role} (slope {slope:+.2f})")
            widths = np.array(sorted(rows["width"].unique()), dtype=float)
            anchor = float(means.loc[statistic].groupby(level="width").median().iloc[0])
            ax.plot(widths, anchor * widths[0] / widths, color="grey", ls="--", lw=0.9, label="slope -1")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            ax.set_xlabel("width")
            ax.set_title({"grad": "RMS of the gradient at y", "sqrt_v": "RMS of Adam's sqrt(v) (bias-corrected)"}
                         [statistic] + f", step {last}", fontweight="bold")
            ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
        axes[0].set_ylabel("RMS over the role's entries (seed mean)")
        if title:
            fig.suptitle(title)
    return fig


def eps_optimizer_factory(lr: float, eps: float, scale_eps: bool):
    """``params -> MuAdamW_ScheduleFree(params, lr=lr, eps=eps, scale_eps=scale_eps)``.

    Args:
        lr: base-width learning rate.
        eps: base-width eps.
        scale_eps: scale eps with width (``mup_schedulefree.scaling.EPS_RULE``).

    Returns:
        The factory.
    """
    return lambda params: msf.MuAdamW_ScheduleFree(params, lr=lr, eps=eps, scale_eps=scale_eps)


def eps_coord_check(
    model: str = "mlp",
    eps: float = DEFAULT_EPS,
    widths: Sequence[int] | None = None,
    steps: int = 4,
    seeds: Sequence[int] = (0, 1),
    lr: float = DEFAULT_LR,
    device: str | torch.device = "cpu",
) -> pd.DataFrame:
    """Coordinate check of ``MuAdamW_ScheduleFree`` with base eps ``eps``, fixed and width-scaled.

    As ``coord_checks.experiments.run_coord_check`` in muP (one fixed batch, y and x), with the
    ``parametrization`` column saying ``"eps fixed"`` or ``"eps scaled"``.

    Args:
        model: ``"mlp"`` or ``"transformer"``.
        eps: base-width eps.
        widths: at least two distinct widths (default ``DEFAULT_WIDTHS[model]``).
        steps: recorded steps, step 1 being the initialisation.
        seeds: initialisation seeds.
        lr: base-width learning rate.
        device: where to train.

    Returns:
        The recording frame of both runs (``coord_checks.recording.COLUMNS``).

    Raises:
        ValueError: for an unknown model or bad widths, steps or seeds.
    """
    check_model_name(model)
    task = make_task(model, n_batches=1, zero_init=True)
    return pd.concat([
        record_coords(model_factory=lambda w: task.build(w, "mup"),
                      optimizer_factory=eps_optimizer_factory(lr, eps, scaled),
                      widths=list(DEFAULT_WIDTHS[model] if widths is None else widths),
                      batches=task.train_batches, loss_fn=cross_entropy, steps=steps, seeds=seeds,
                      device=device, parametrization=label)
        for label, scaled in EPS_WAYS.items()
    ], ignore_index=True)


def shrinking(verdict: Verdict, bound: float = SHRINK_BOUND, exempt: str = SHRINK_EXEMPT) -> pd.DataFrame:
    """The judged rows whose statistic shrinks with width faster than ``width ** -bound``.

    The verdict only fails growth; updates that vanish with width show as a negative slope
    (a warning). The coordinate-check tests treat a slope below ``-bound`` as a failure too.

    Args:
        verdict: a judged coordinate check.
        bound: the largest accepted shrinking slope, as a positive number.
        exempt: regular expression of module names not held to the bound.

    Returns:
        The rows of ``verdict.table`` (not ``init``, not ``exempt``) with slope below ``-bound``.
    """
    table = verdict.table
    judged = (table["status"] != "init") & ~table["module"].str.contains(exempt)
    return table[judged & (table["slope"] < -bound)].reset_index(drop=True)


def eps_transfer(
    model: str = "mlp",
    eps: float = DEFAULT_EPS,
    widths: Sequence[int] | None = None,
    lrs: Sequence[float] | None = None,
    steps: int = 100,
    seeds: Sequence[int] = (0,),
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> pd.DataFrame:
    """Learning-rate sweep of ``MuAdamW_ScheduleFree`` with base eps ``eps``, fixed and width-scaled.

    As ``coord_checks.experiments.run_transfer`` in muP (a fresh batch every step, held-out loss
    at x), with the ``parametrization`` column saying ``"eps fixed"`` or ``"eps scaled"``.

    Args:
        model: ``"mlp"`` or ``"transformer"``.
        eps: base-width eps.
        widths: at least two distinct widths (default ``TRANSFER_WIDTHS[model]``).
        lrs: learning-rate grid (default 9 points, one per octave, centred on ``TRANSFER_LR_CENTRE``).
        steps: optimizer steps per run.
        seeds: initialisation seeds.
        device: where to train.
        progress: show tqdm progress bars.

    Returns:
        The sweep frame (``coord_checks.transfer.SWEEP_COLUMNS``) of both ways.

    Raises:
        ValueError: for an unknown model or bad widths, learning rates or steps.
    """
    if model not in TRANSFER_WIDTHS:
        raise ValueError(f"model must be one of {tuple(TRANSFER_WIDTHS)}, got {model!r}")
    task = make_task(model, n_batches=steps, batch_size=32, n_eval_batches=4, eval_batch_size=256, zero_init=True)
    lrs = lr_grid(TRANSFER_LR_CENTRE, octaves=4) if lrs is None else list(lrs)
    return pd.concat([
        sweep_learning_rates(model_factory=lambda w: task.build(w, "mup"),
                             optimizer_factory=lambda params, lr, s=scaled: eps_optimizer_factory(lr, eps, s)(params),
                             widths=list(TRANSFER_WIDTHS[model] if widths is None else widths), lrs=lrs,
                             train_batches=task.train_batches, eval_batches=task.eval_batches,
                             loss_fn=cross_entropy, steps=steps, seeds=seeds, device=device,
                             parametrization=label, progress=progress)
        for label, scaled in EPS_WAYS.items()
    ], ignore_index=True)


def transfer_report(sweep: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Optima per width and their drift, with what the widest width loses, per way.

    Args:
        sweep: a frame from ``eps_transfer``.

    Returns:
        ``(optima, drift)``: ``fit_optima`` and ``optimum_drift`` by parametrization, the drift
        with ``widest_loss`` (the best seed-mean held-out loss at the widest width) and
        ``transferred_loss`` (the widest width's loss at the grid learning rate that is best at
        the smallest width: what tuning at the small width buys) added.
    """
    optima = fit_optima(sweep)
    drift = optimum_drift(optima)
    means = sweep.groupby(["parametrization", "width", "lr"])["eval_loss"].mean().fillna(math.inf)
    smallest, widest = sweep["width"].min(), sweep["width"].max()
    drift["widest_loss"] = [float(means.loc[(label, widest)].min()) for label in drift["parametrization"]]
    drift["transferred_loss"] = [float(means.loc[(label, widest)].loc[means.loc[(label, smallest)].idxmin()])
                                 for label in drift["parametrization"]]
    return optima, drift


# ---------------------------------------------------------------- command line


class _Parser(argparse.ArgumentParser):
    """Errors are one line, ``prog: error: message``, with exit status 2."""

    def error(self, message: str) -> None:
        """Print ``prog: error: message`` on one line and exit with status 2."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _positive(convert, what: str):
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value

    return parse


def _parser(command: str) -> _Parser:
    parser = _Parser(prog=PROG if command == "measure" else f"{PROG} {command}", description={
        "measure": "RMS of the gradient and of Adam's sqrt(v) per parameter role across widths, and its width "
                   "exponent (the exponent eps must follow)",
        "check": "coordinate check of MuAdamW_ScheduleFree with a large base eps, fixed and with scale_eps=True",
        "transfer": "learning-rate sweep with a large base eps, fixed and with scale_eps=True",
    }[command])
    parser.add_argument("--model", choices=MODELS, default="mlp", help="example model (default: mlp)")
    parser.add_argument("--widths", type=_positive(int, "a positive integer"), nargs="+", metavar="W",
                        help="model widths, at least two distinct (default: per model)")
    parser.add_argument("--seeds", type=int, nargs="+", metavar="S", default=[0] if command == "transfer" else [0, 1],
                        help="initialisation seeds")
    parser.add_argument("--steps", type=_positive(int, "a positive integer"),
                        default={"measure": 6, "check": 4, "transfer": 100}[command],
                        help="steps per run (measure: gradients recorded; check: recorded steps, step 1 the "
                             "initialisation; transfer: optimizer steps)")
    if command != "measure":
        parser.add_argument("--eps", type=_positive(float, "a positive number"), default=DEFAULT_EPS,
                            help=f"base-width eps (default: {DEFAULT_EPS:g})")
    if command == "transfer":
        parser.add_argument("--lrs", type=_positive(float, "a positive number"), nargs="+", metavar="LR",
                            help=f"learning-rate grid (default: {TRANSFER_LR_CENTRE:g} x 2^-4 .. 2^4)")
    else:
        parser.add_argument("--lr", type=_positive(float, "a positive number"), default=DEFAULT_LR,
                            help=f"base-width learning rate (default: {DEFAULT_LR:g})")
    parser.add_argument("--out", default="gradient_scales_out", metavar="DIR",
                        help="output folder (default: ./gradient_scales_out)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--threads", type=_positive(int, "a positive integer"), default=1,
                        help="torch intra-op threads (default: 1)")
    return parser


def _check_arguments(parser: _Parser, args: argparse.Namespace, command: str) -> None:
    if args.widths is not None and len(set(args.widths)) < 2:
        parser.error(f"argument --widths: need at least two distinct widths, got {args.widths}")
    if args.model == "transformer" and args.widths and any(w % N_HEADS for w in args.widths):
        parser.error(f"argument --widths: transformer widths must be multiples of its {N_HEADS} heads, "
                     f"got {args.widths}")
    if command == "measure" and args.steps < 2:
        parser.error(f"argument --steps: need at least 2 (step 1's gradients are zero behind the "
                     f"zero-initialised readout), got {args.steps}")
    if command == "check" and args.steps < 2:
        parser.error(f"argument --steps: need at least 2 (step 1 is the initialisation), got {args.steps}")
    if command == "transfer" and args.lrs is not None and len(args.lrs) < 3:
        parser.error(f"argument --lrs: need at least three learning rates to locate an optimum, got {args.lrs}")
    if any(s < 0 for s in args.seeds):
        parser.error(f"argument --seeds: seeds must be non-negative, got {args.seeds}")
    try:
        (torch.zeros(1, device=args.device) + 1).cpu()
    except (RuntimeError, AssertionError, ImportError) as error:
        parser.error(f"argument --device: cannot compute on {args.device!r}: {str(error).splitlines()[0]}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"argument --out: not a folder: {args.out!r} is an existing file")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".gradient_scales_probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        parser.error(f"argument --out: cannot write to {args.out!r}: {error.strerror or error}")


def _write_csv(path: Path, frame: pd.DataFrame) -> None:
    replace_atomically(path, lambda temporary: frame.to_csv(temporary, index=False))


def _write_png(path: Path, figure: Figure) -> None:
    replace_atomically(path, lambda temporary: plots.save_figure(figure, temporary))


def _measure(args: argparse.Namespace, out: Path) -> str:
    frame = record_gradient_scales(args.model, args.widths, args.steps, args.seeds, args.lr, args.device)
    exponents = fit_exponents(frame)
    summary = summarize_exponents(exponents)
    stem = f"gradient_scales_{args.model}"
    widths = sorted(frame["width"].unique())
    figure = plot_gradient_scales(frame, title=f"{args.model}, muP, AdamW-SF lr {args.lr:g}: gradient entries "
                                               f"across width {widths[0]}..{widths[-1]} ({len(args.seeds)} seeds)")
    _write_csv(out / f"{stem}.csv", frame)
    _write_csv(out / f"{stem}_exponents.csv", exponents)
    _write_png(out / f"{stem}.png", figure)
    fmt = {"grad": "{:+.2f}".format, "sqrt_v": "{:+.2f}".format}
    print(f"Width exponents (slope of log2 RMS vs log2 width, widths {widths[0]}..{widths[-1]}) at step "
          f"{args.steps}, their range over steps 2..{args.steps}, and the eps rule's exponent "
          "(mup_schedulefree.scaling.EPS_RULE):")
    print(summary.to_string(index=False, formatters=fmt))
    return f"{stem}.csv, {stem}_exponents.csv and {stem}.png"


def _check(args: argparse.Namespace, out: Path) -> str:
    frame = eps_coord_check(args.model, args.eps, args.widths, args.steps, args.seeds, args.lr, args.device)
    verdict = judge(frame)
    stem = f"eps_check_{args.model}_adamw"
    figure = plots.plot_coords(frame, title=f"{args.model}, MuAdamW-SF, base eps {args.eps:g}, lr {args.lr:g}: "
                                            "eps fixed (left) and scaled with width (right)")
    _write_csv(out / f"{stem}.csv", frame)
    _write_csv(out / f"{stem}_verdict.csv", verdict.table)
    _write_png(out / f"{stem}.png", figure)
    print(verdict.format())
    shrunk = shrinking(verdict)
    print(f"\nModules shrinking with width (slope below -{SHRINK_BOUND:g}, the attention query and logits exempt: "
          "updates that vanish, a failure):")
    for label in EPS_WAYS:
        rows = shrunk[shrunk["parametrization"] == label]
        worst = f"worst slope {rows['slope'].min():+.2f}" if len(rows) else "none"
        print(f"  {label}: {'FAIL' if len(rows) else 'PASS'} ({len(rows)} rows, {worst})")
    return f"{stem}.csv, {stem}_verdict.csv and {stem}.png"


def _transfer(args: argparse.Namespace, out: Path) -> str:
    sweep = eps_transfer(args.model, args.eps, args.widths, args.lrs, args.steps, args.seeds, args.device,
                         progress=True)
    optima, drift = transfer_report(sweep)
    stem = f"eps_transfer_{args.model}_adamw"
    figure = plots.plot_transfer(sweep, optima, title=f"{args.model}, MuAdamW-SF, base eps {args.eps:g}, "
                                                      f"{args.steps} steps: held-out loss at x (stars: optima)")
    _write_csv(out / f"{stem}.csv", sweep)
    _write_csv(out / f"{stem}_optima.csv", optima)
    _write_png(out / f"{stem}.png", figure)
    fmt = {"grid_lr": "{:.3g}".format, "lr_opt": "{:.3g}".format, "log2_lr_opt": "{:.2f}".format,
           "best_loss": "{:.3f}".format, "drift_octaves": "{:.2f}".format, "trend": "{:.2f}".format,
           "widest_loss": "{:.3f}".format, "transferred_loss": "{:.3f}".format}
    print(optima.to_string(index=False, formatters=fmt))
    print()
    print(drift.to_string(index=False, formatters=fmt))
    return f"{stem}.csv, {stem}_optima.csv and {stem}.png"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m coord_checks.gradient_scales``.

    Args:
        argv: arguments without the program name (default ``sys.argv[1:]``); a first argument
            ``check`` or ``transfer`` selects that experiment, anything else the measurement.

    Returns:
        Exit status 0, or 130 after Ctrl-C.

    Raises:
        SystemExit: with status 2 after one ``error:`` line naming the flag, for bad arguments, a
            device that cannot compute or an output folder that cannot be written.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in ("check", "transfer") else "measure"
    parser = _parser(command)
    args = parser.parse_args(argv)
    _check_arguments(parser, args, command)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    start = time.perf_counter()
    try:
        written = {"measure": _measure, "check": _check, "transfer": _transfer}[command](args, out)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    print(f"\nwrote {written} to {out.resolve()}/ in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
