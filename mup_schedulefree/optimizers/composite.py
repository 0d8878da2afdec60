"""ComposedOptimizer: several schedule-free optimizers over disjoint parameters, behind one Optimizer.

Each part keeps its own math, state and state-dict format; the composition only forwards. Its
``param_groups`` are the parts' group dicts themselves (the parts' initial groups part by part,
then each added group where torch puts it: last), so LR schedulers
and code that edits groups drive the parts directly; its ``state`` maps every parameter to the
state dict of the part that owns it. One mode: ``train()``/``eval()`` switch every part, and
``step()`` refuses unless every part is in train mode.

A step runs the parts in order. Each part is atomic on its own (it validates before mutating, or
puts its parameters back when it fails), but a part that fails after an earlier one stepped
leaves the earlier one stepped.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Sequence

import torch
from torch.optim import Optimizer

from .. import kernels
from .base import Modes, train_mode_closure

#: ``split(param_group)`` -> one list of group dicts per part, for :meth:`ComposedOptimizer.add_param_group`.
Split = Callable[[dict[str, Any]], Sequence[Sequence[dict[str, Any]]]]


def check_parts(parts: Any) -> None:
    """Raise unless ``parts`` is a non-empty sequence of modal schedule-free optimizers over disjoint parameters.

    Args:
        parts: what the user passed.

    Raises:
        TypeError: ``parts`` is not a list or tuple, or an entry is not a ``torch.optim.Optimizer``
            with ``train()``, ``eval()``, ``train_mode`` and ``points_at_x()``.
        ValueError: ``parts`` is empty, or two parts hold the same parameter.
    """
    if not isinstance(parts, (list, tuple)):
        raise TypeError(f"Invalid parts: {type(parts).__name__} (must be a list or tuple of optimizers)")
    if not parts:
        raise ValueError("Invalid parts: [] (must hold at least one optimizer)")
    seen: set[int] = set()
    for index, part in enumerate(parts):
        if not isinstance(part, Optimizer) or not all(hasattr(part, name) for name in
                                                      ("train", "eval", "train_mode", "points_at_x")):
            raise TypeError(f"Invalid parts[{index}]: {type(part).__name__} (must be a schedule-free optimizer "
                            "with train(), eval(), train_mode and points_at_x(), e.g. AdamWScheduleFree)")
        ids = {id(p) for group in part.param_groups for p in group["params"]}
        if ids & seen:
            raise ValueError(f"Invalid parts[{index}]: it holds parameters an earlier part holds "
                             "(each parameter must belong to one part)")
        seen |= ids


class ComposedOptimizer(Modes, Optimizer):
    """Several schedule-free optimizers over disjoint parameters as one ``torch.optim.Optimizer``.

    Example::

        muon = ScheduleFreeWrapper(torch.optim.Muon(matrices, lr=0.02, momentum=0.0, weight_decay=0.0))
        adam = AdamWScheduleFree(others, lr=3e-3)
        opt = ComposedOptimizer([muon, adam])
        opt.train(); loss.backward(); opt.step(); opt.eval()

    Args:
        parts: the optimizers, each schedule-free with train/eval modes; they must hold disjoint
            parameters. A new composition puts every part in train mode.
        split: turns a group given to :meth:`add_param_group` into one list of groups per part;
            None: ``add_param_group`` raises TypeError.
    """

    def __init__(self, parts: Sequence[Optimizer], split: Split | None = None) -> None:
        check_parts(parts)
        self.parts = tuple(parts)
        self._split = split
        self._slots = [(index, position) for index, part in enumerate(self.parts)
                       for position in range(len(part.param_groups))]
        super().__init__(self._union(), {})
        self._relink()
        for part in self.parts:
            part.train()

    def _union(self) -> list[dict[str, Any]]:
        """The parts' groups in the composition's order: ``_slots`` holds (part, position in part)."""
        return [self.parts[index].param_groups[position] for index, position in self._slots]

    def _relink(self) -> None:
        """Point ``param_groups`` and ``state`` at the parts' (after a step, a load or a new group)."""
        self.param_groups = self._union()
        self.state = defaultdict(dict, ((p, state) for part in self.parts for p, state in part.state.items()))

    def __getstate__(self) -> dict[str, Any]:
        """Pickle/deepcopy state: torch's keeps defaults, state and groups; the parts go along."""
        return {**super().__getstate__(), "parts": self.parts, "_split": self._split, "_slots": self._slots}

    @property
    def train_mode(self) -> bool:
        """True when every part's parameters hold the training point y."""
        return all(part.train_mode for part in self.parts)

    def _switch(self, to_train: bool) -> None:
        for part in self.parts:
            part.train() if to_train else part.eval()

    def points_at_x(self) -> dict[torch.Tensor, torch.Tensor]:
        """The values ``eval()`` would give the parameters, every part's, computed out of place.

        Returns:
            A dict mapping parameter -> its value at x (see the parts' ``points_at_x``).
        """
        points: dict[torch.Tensor, torch.Tensor] = {}
        for part in self.parts:
            points.update(part.points_at_x())
        return points

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group: ``split`` turns it into groups of the parts, each added to its part.

        Every part's groups are built by ``split`` (which validates) before any part changes.

        Args:
            param_group: dict with ``params`` and optional per-group hyperparameters.

        Raises:
            TypeError: the composition was built without ``split``.
        """
        if any(param_group is group for group in self._union()):  # Optimizer.__init__ registering the parts' groups
            super().add_param_group(param_group)
            return
        if self._split is None:
            raise TypeError(f"{type(self).__name__} was built without split, so it cannot tell which part a new "
                            "group belongs to: add the group to one of its parts, then rebuild it")
        per_part = self._split(param_group)
        if len(per_part) != len(self.parts):
            raise ValueError(f"split returned {len(per_part)} lists of groups for {len(self.parts)} parts")
        for index, (part, groups) in enumerate(zip(self.parts, per_part)):
            for group in groups:
                part.add_param_group(group)
                self._slots.append((index, len(part.param_groups) - 1))
        self._relink()

    @kernels.compile_disabled
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Evaluate the closure once (at y), then step every part.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss.

        Returns:
            The closure's loss, or None.
        """
        loss = train_mode_closure(self, closure)
        for part in self.parts:
            part.step()
        self._relink()
        return loss

    def state_dict(self) -> dict[str, Any]:
        """Every part's state dict under ``"parts"``; ``"param_groups"`` lists all groups (for checks).

        Returns:
            A dict loadable by :meth:`load_state_dict`.
        """
        parts = [part.state_dict() for part in self.parts]
        groups, offset = [], 0
        for index, position in self._slots:
            group = parts[index]["param_groups"][position]
            groups.append({**group, "params": list(range(offset, offset + len(group["params"])))})
            offset += len(group["params"])
        return {"state": {}, "param_groups": groups, "parts": parts}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load every part's state; if a part refuses, the parts loaded before it get their state back.

        Args:
            state_dict: a dict returned by :meth:`state_dict`.

        Raises:
            ValueError: ``state_dict`` was not saved by a composition of as many parts (a part's
                own refusal propagates as it is).
        """
        saved = state_dict.get("parts") if isinstance(state_dict, dict) else None
        if not isinstance(saved, (list, tuple)) or len(saved) != len(self.parts):
            raise ValueError(f"Invalid state_dict: it has no 'parts' list of {len(self.parts)} entries, so it was not "
                             f"saved by {type(self).__name__}.state_dict() of the same composition")
        before = [part.state_dict() for part in self.parts]
        loaded = 0
        try:
            for part, entry in zip(self.parts, saved):
                part.load_state_dict(entry)
                loaded += 1
        except BaseException:
            for part, entry in zip(self.parts[:loaded], before):
                part.load_state_dict(entry)
            raise
        finally:
            self._relink()
