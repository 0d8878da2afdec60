"""Which group of parameters breaks learning-rate transfer? Sweep one role's lr at a time.

A coordinate check can pass while the learning rate still does not transfer (microsoft/mup issues
22, 23, 66); the advice there is to tune the input, output and hidden learning-rate multipliers
separately. ``diagnose`` does that across widths. Every parameter gets a *role*:

    readout    parameters of the readout module (``mup.MuReadout``, or the last ``nn.Linear``)
    attention  weights with two width-dependent dimensions inside an attention module (a module
               whose name has a part containing ``attn`` or ``attention``)
    hidden     the other weights with two width-dependent dimensions
    input      the other weights with one width-dependent dimension (input layers, embeddings)
    vector     everything else: biases, normalisation gains, scalars ("vector-like")

Each role's learning rate is ``lr * multiplier``, passed to the optimizer factory as a parameter
group (muP factories then apply their own width scaling on top). First, at the smallest width, the
roles are tuned one after the other (coordinate descent: each role's multiplier over the grid,
with the roles already tuned at their optimum and the rest at 1; ``rounds`` more passes repeat
this with every other role at its latest optimum). Then, at every width, each role's multiplier is
swept with all the other roles held at those smallest-width optima: a role whose muP scaling is
right has its optimum where it was, a role whose scaling is wrong sees it move, and holding the
others fixed keeps them from compensating. ``fit_optima`` and
``optimum_drift`` (by role) say how far each role's optimum moves across widths, in octaves, and
``transfer_cost`` what that costs: the loss at the widest width with the smallest width's optimum,
above the best. The role whose drift costs most (if at least 1 % of the loss) is the one that breaks
transfer: a wrongly scaled role also drags the others' optima along (it stays mis-set while they
are swept), but their curves are flatter, so their drift costs less.
"""
from __future__ import annotations

import itertools
import math
from typing import Callable, Iterable, NamedTuple, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from coord_checks.custom import ArgumentError, find_readout
from coord_checks.data import Batch
from coord_checks.recording import check_widths, rng_devices
from coord_checks.transfer import fit_optima, lr_grid, optimum_drift, train_and_evaluate

ROLES: tuple[str, ...] = ("input", "hidden", "readout", "attention", "vector")
#: Parts of module names that mark an attention module.
ATTENTION_PARTS: tuple[str, ...] = ("attn", "attention")
#: A role's drift counts when using the smallest width's optimum at the widest costs this share of the loss.
MIN_RELATIVE_COST = 0.01
DIAGNOSIS_COLUMNS: tuple[str, ...] = (
    "role", "width", "multiplier", "lr", "log2_lr", "seed", "train_loss", "eval_loss", "diverged"
)


def parameter_roles(model: nn.Module, readout: str | None = None,
                    attention_parts: Sequence[str] = ATTENTION_PARTS) -> dict[str, str]:
    """The role of every parameter (see the module docstring), from its ``infshape`` and its name.

    Args:
        model: a network with base shapes set.
        readout: the readout module's name (default: ``coord_checks.custom.find_readout``).
        attention_parts: substrings that make a module-name part an attention module.

    Returns:
        ``{parameter name: role}`` in registration order (shared parameters once).

    Raises:
        ValueError: if a parameter has no ``infshape``.
    """
    readout = find_readout(model) if readout is None else readout
    roles = {}
    for name, p in model.named_parameters():
        if not hasattr(p, "infshape"):
            raise ValueError(f"model: parameter {name!r} has no infshape; set base shapes first")
        module_parts = name.split(".")[:-1]
        if readout is not None and name.startswith(f"{readout}."):
            roles[name] = "readout"
        elif p.infshape.ninf() == 2:
            in_attention = any(part in piece for piece in module_parts for part in attention_parts)
            roles[name] = "attention" if in_attention else "hidden"
        elif p.infshape.ninf() == 1 and p.dim() >= 2:
            roles[name] = "input"
        else:
            roles[name] = "vector"
    return roles


def role_groups(model: nn.Module, lr: float, multipliers: dict[str, float],
                readout: str | None = None) -> list[dict]:
    """Parameter groups, one per role present, with ``lr * multipliers.get(role, 1)``.

    Args:
        model: a network with base shapes set.
        lr: the base learning rate.
        multipliers: per-role multipliers (missing roles: 1).
        readout: the readout module's name (default: found).

    Returns:
        A list of ``{"params": [...], "lr": ..., "role": ...}`` dicts (the extra ``role`` key is
        kept by torch optimizers and ignored by them).
    """
    roles = parameter_roles(model, readout)
    params = dict(model.named_parameters())
    groups = []
    for role in ROLES:
        members = [params[name] for name, r in roles.items() if r == role]
        if members:
            groups.append({"params": members, "lr": lr * multipliers.get(role, 1.0), "role": role})
    return groups


class Diagnosis(NamedTuple):
    """What ``diagnose`` returns.

    Attributes:
        sweep: one row per (role, width, multiplier, seed) (``DIAGNOSIS_COLUMNS``).
        optima: ``fit_optima`` by role: the optimal ``lr`` of each role per width, with
            ``multiplier_opt`` (its ratio to the base lr).
        drift: ``optimum_drift`` by role with ``transfer_cost`` and ``relative_cost`` (see
            ``transfer_cost``), costliest first.
        rounds: the coordinate-descent passes after the first.
        held: each role's optimal multiplier at the smallest width, where it is held while the
            other roles are swept.
    """

    sweep: pd.DataFrame
    optima: pd.DataFrame
    drift: pd.DataFrame
    rounds: int
    held: dict[str, float]

    @property
    def worst_role(self) -> str | None:
        """The role whose drift costs most loss at the widest width, if that is at least
        ``MIN_RELATIVE_COST`` of the loss (a drift along a flat curve breaks nothing); else None."""
        costly = self.drift[self.drift["relative_cost"] >= MIN_RELATIVE_COST]
        return None if costly.empty else str(costly.loc[costly["relative_cost"].idxmax(), "role"])

    def format(self) -> str:
        """One screen: optima per role and width, drift per role, and the worst role.

        Returns:
            Multi-line text.
        """
        fmt = {"grid_lr": "{:.3g}".format, "lr_opt": "{:.3g}".format, "log2_lr_opt": "{:.2f}".format,
               "multiplier_opt": "{:.3g}".format, "best_loss": "{:.3f}".format,
               "drift_octaves": "{:.2f}".format, "trend": "{:.2f}".format}
        fmt.update(transfer_cost="{:.4f}".format, relative_cost="{:.1%}".format)
        if self.worst_role is None:
            headline = (f"Diagnosis: no role's drift costs {MIN_RELATIVE_COST:.0%} of the loss at the widest "
                        "width: the learning rates transfer")
        else:
            worst = self.drift.set_index("role").loc[self.worst_role]
            headline = (f"Diagnosis: the {self.worst_role} lr breaks transfer: its optimum moves "
                        f"{worst['drift_octaves']:.2f} octaves over {worst['width_ratio']:g}x width (trend "
                        f"{worst['trend']:+.2f}, a factor {2 ** worst['trend']:.2f} per doubling), and its "
                        f"smallest-width optimum costs {worst['relative_cost']:.1%} more loss at the widest width")
        return "\n".join([
            headline,
            "  each role's lr multiplier swept at every width with the other roles at their optimum at the "
            f"smallest width ({self.rounds + 1} passes of coordinate descent there): "
            + ", ".join(f"{role} x{m:.3g}" for role, m in self.held.items()),
            "",
            "Drift of each role's optimal lr across widths (octaves = factors of 2), and the loss its "
            "smallest-width optimum costs at the widest width:",
            self.drift.to_string(index=False, formatters=fmt),
            "",
            "Optimal lr per role and width (parabola vertex in log2 lr):",
            self.optima.to_string(index=False, formatters=fmt),
        ])

    def __str__(self) -> str:
        return self.format()


def _train_one(model_factory, optimizer_factory, width, lr, multipliers, readout, seed, device,
               train_batches, eval_batches, loss_fn, steps) -> tuple[float, float]:
    torch.manual_seed(seed)
    model = model_factory(width).to(device)
    optimizer = optimizer_factory(role_groups(model, lr, multipliers, readout), lr)
    return train_and_evaluate(model, optimizer, train_batches, eval_batches, loss_fn, steps)


def diagnose(
    model_factory: Callable[[int], nn.Module],
    optimizer_factory: Callable[[Iterable, float], torch.optim.Optimizer],
    widths: Sequence[int],
    lr: float,
    train_batches: Sequence[Batch],
    eval_batches: Sequence[Batch],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    steps: int,
    multipliers: Sequence[float] | None = None,
    roles: Sequence[str] | None = None,
    readout: str | None = None,
    seeds: Sequence[int] = (0,),
    rounds: int = 1,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> Diagnosis:
    """Sweep each role's learning-rate multiplier across widths and find the role that breaks transfer.

    Args:
        model_factory: ``width -> model`` with base shapes set.
        optimizer_factory: ``(param_groups, lr) -> optimizer``; the groups carry their own ``lr``
            (e.g. ``lambda groups, lr: MuAdamW_ScheduleFree(groups, lr=lr)``).
        widths: at least two distinct widths.
        lr: the base learning rate (ideally tuned at the smallest width).
        train_batches: training batches, cycled.
        eval_batches: held-out batches; the loss is measured at x after ``steps`` steps.
        loss_fn: ``(output, targets) -> scalar loss``.
        steps: optimizer steps per run.
        multipliers: the grid of multipliers (default ``lr_grid(1, 4)``: 1/16 .. 16, one per octave).
        roles: roles to sweep (default: every role the model has).
        readout: the readout module's name (default: found).
        seeds: initialisation seeds.
        rounds: passes of coordinate descent at the smallest width after the first (0: each role
            tuned once, with the roles tuned before it at their optimum and the rest at 1).
        device: where to train.
        progress: show a tqdm bar.

    Returns:
        A ``Diagnosis``.

    Raises:
        ValueError: for bad widths, a non-positive lr or multiplier, or a negative ``rounds``.
        ArgumentError: naming ``roles`` for roles the model does not have, ``multipliers`` when a
            role diverges at every multiplier.
    """
    widths = sorted(check_widths(widths))
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    multipliers = lr_grid(1.0, 4) if multipliers is None else list(multipliers)
    if len(multipliers) < 3 or any(not m > 0 for m in multipliers):
        raise ValueError(f"multipliers must be at least three positive numbers, got {multipliers}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"rounds must be a non-negative int, got {rounds!r}")
    device = torch.device(device)
    with torch.random.fork_rng():
        present = set(parameter_roles(model_factory(widths[0]), readout).values())
    roles = [r for r in ROLES if r in present] if roles is None else list(roles)
    unknown = [r for r in roles if r not in present]
    if unknown or not roles:
        raise ArgumentError("roles", f"the model has roles {[r for r in ROLES if r in present]}, got {roles}")
    train_batches = [(x.to(device), y.to(device)) for x, y in train_batches]
    eval_batches = [(x.to(device), y.to(device)) for x, y in eval_batches]
    bar = tqdm(total=(1 + rounds + len(widths)) * len(roles) * len(multipliers) * len(seeds),
               desc="diagnose", leave=False, disable=None if progress else True)

    def sweep(width: int, role: str, held: dict[str, float]) -> pd.DataFrame:
        rows = []
        for multiplier, seed in itertools.product(multipliers, seeds):
            train_loss, eval_loss = _train_one(
                model_factory, optimizer_factory, width, lr, {**held, role: multiplier}, readout, seed,
                device, train_batches, eval_batches, loss_fn, steps)
            rows.append((role, width, multiplier, lr * multiplier, math.log2(lr * multiplier), seed,
                         train_loss, eval_loss, math.isnan(eval_loss)))
            bar.update()
        return pd.DataFrame(rows, columns=list(DIAGNOSIS_COLUMNS))

    held: dict[str, float] = {}
    try:
        with torch.random.fork_rng(devices=rng_devices(device)):
            for _ in range(1 + rounds):
                for role in roles:
                    curve = sweep(widths[0], role, held)
                    held[role] = float(_optima_or_raise(curve, warn=False)["lr_opt"].iloc[0]) / lr
            frame = pd.concat([sweep(width, role, held) for width in widths for role in roles],
                              ignore_index=True)
    finally:
        bar.close()
    optima = _optima_or_raise(frame)
    optima["multiplier_opt"] = optima["lr_opt"] / lr
    drift = optimum_drift(optima, by=("role",)).merge(transfer_cost(frame), on="role")
    drift = drift.sort_values("relative_cost", ascending=False, kind="stable").reset_index(drop=True)
    return Diagnosis(frame, optima, drift, rounds, held)


def transfer_cost(sweep: pd.DataFrame) -> pd.DataFrame:
    """What each role's drift costs: the loss at the widest width with the multiplier that was best
    at the smallest width, above the widest width's best (both on the grid, seed means).

    Args:
        sweep: a diagnosis sweep (``DIAGNOSIS_COLUMNS``).

    Returns:
        One row per role: ``transfer_cost`` (in loss units) and ``relative_cost`` (over the widest
        width's best loss).
    """
    means = sweep.groupby(["role", "width", "multiplier"])["eval_loss"].mean()
    smallest, widest = sweep["width"].min(), sweep["width"].max()
    records = []
    for role in dict.fromkeys(sweep["role"]):
        first = means.loc[(role, smallest)].fillna(np.inf)
        last = means.loc[(role, widest)].fillna(np.inf)
        best = float(last.min())
        cost = float(last.loc[first.idxmin()]) - best
        records.append((role, cost, cost / abs(best) if best else np.inf))
    return pd.DataFrame(records, columns=["role", "transfer_cost", "relative_cost"])


def _optima_or_raise(frame: pd.DataFrame, warn: bool = True) -> pd.DataFrame:
    finite = frame.groupby(["role", "width"])["eval_loss"].apply(lambda s: bool(np.isfinite(s).any()))
    if not finite.all():
        role, width = finite.index[~finite][0]
        raise ArgumentError("multipliers", f"every multiplier of the {role} lr diverged at width {width}; "
                                           "try a smaller lr or smaller multipliers")
    return fit_optima(frame, by=("role",), warn_at_edge=warn)

