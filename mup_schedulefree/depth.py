"""Depth transfer on the model side: multiply a pre-LN model's residual branches by (L_base / L) ** alpha.

A pre-LN block computes x <- x + F(LN(x)) for each of its branches F (attention, MLP). CompleteP
(alpha = 1, Dey et al. 2025, arXiv 2505.01618) and depth-muP (alpha = 1/2, Yang et al. 2023,
arXiv 2310.02244) make it x <- x + (L_base / L) ** alpha * F(LN(x)), L the number of blocks and
L_base the base model's; the optimizer side (lr, eps inside the blocks) is the depth rule of
:mod:`mup_schedulefree.scaling`, which the factories apply with ``depth_mult=`` and ``depth_alpha=``.

:func:`scale_residual_branches` does this without touching the model's code: a forward hook on
each branch module multiplies its output by the multiplier, so the branch's contribution to the
residual stream is scaled and nothing else is (the LayerNorm input, the parameters, their names
and the state dict are unchanged). It changes no initialisation: CompleteP's Table 1 keeps the
hidden weights' init variance width-only (no depth factor, and no GPT-2-style 1/sqrt(2 L)
scaling of the output projections, whose role the multiplier takes), so the example GPT's init
stays as it is.

Example::

    model = build_model("transformer", width=64, n_layers=8)           # L = 8, L_base = 2
    scale_residual_branches(model, depth_mult=8 / 2, depth_alpha=1.0)  # CompleteP
    opt = MuAdamW_ScheduleFree(model.named_parameters(), lr=3e-3, depth_mult=8 / 2, depth_alpha=1.0)
"""
from __future__ import annotations

import re
from typing import Any, Sequence

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .scaling import BLOCK_PREFIX, branch_multiplier

#: Branch modules of a block of :class:`coord_checks.models.GPT` (``blocks.<i>.attn``, ``blocks.<i>.mlp``).
BRANCHES = ("attn", "mlp")


class BranchScale:
    """Forward hook that multiplies a branch module's output by ``multiplier``.

    Args:
        multiplier: the residual-branch multiplier, depth_mult ** -alpha.
    """

    def __init__(self, multiplier: float) -> None:
        self.multiplier = multiplier

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> Tensor:
        """The branch's output times the multiplier.

        Args:
            module: the branch module.
            inputs: its inputs (unused).
            output: its output.

        Returns:
            ``output * multiplier``.

        Raises:
            TypeError: the branch returns something other than a tensor.
        """
        if not isinstance(output, Tensor):
            raise TypeError(f"Invalid branch output: {type(output).__name__} (scale_residual_branches needs the "
                            f"branch {type(module).__name__} to return a tensor)")
        return output * self.multiplier


def scale_residual_branches(model: nn.Module, depth_mult: float, depth_alpha: float,
                            block_prefix: str = BLOCK_PREFIX,
                            branches: Sequence[str] = BRANCHES) -> list[RemovableHandle]:
    """Multiply every residual branch of a pre-LN model by depth_mult ** -alpha, with forward hooks.

    The branches are the modules named ``<block_prefix><i>.<branch>`` for each block index i and
    each name in ``branches`` (for :class:`coord_checks.models.GPT`: ``blocks.<i>.attn`` and
    ``blocks.<i>.mlp``, whose outputs the blocks add to the residual stream). At depth_mult = 1 the
    multiplier is exactly 1 and the forward is the plain model's, bit for bit. Call it once per
    model; build the optimizer with the same ``depth_mult`` and ``depth_alpha``.

    Args:
        model: the model.
        depth_mult: L / L_base, the number of blocks over the base model's.
        depth_alpha: 1 (CompleteP) or 0.5 (depth-muP).
        block_prefix: the blocks' name prefix in ``model.named_modules()`` (default "blocks.").
        branches: the names of each block's branch modules (default "attn", "mlp").

    Returns:
        The hooks' handles (``handle.remove()`` undoes the scaling).

    Raises:
        TypeError, ValueError: depth arguments :func:`mup_schedulefree.scaling.check_depth` refuses.
        ValueError: no block found under ``block_prefix``, a block without one of ``branches``,
            or a branch already scaled.
    """
    multiplier = branch_multiplier(depth_mult, depth_alpha)
    branches = tuple(branches)
    if not branches or not all(isinstance(branch, str) and branch for branch in branches):
        raise ValueError(f"Invalid branches: {branches!r} (must be non-empty names of branch modules)")
    pattern = re.compile(rf"{re.escape(block_prefix)}(\d+)\.({'|'.join(map(re.escape, branches))})")
    found: dict[str, dict[str, nn.Module]] = {}
    for name, module in model.named_modules():
        match = pattern.fullmatch(name)
        if match is not None:
            found.setdefault(match.group(1), {})[match.group(2)] = module
    if not found:
        raise ValueError(f"Invalid block_prefix: {block_prefix!r} (no module named {block_prefix}<i>.<branch> "
                         f"for a branch in {branches})")
    for index, modules in found.items():
        missing = [branch for branch in branches if branch not in modules]
        if missing:
            raise ValueError(f"Invalid branches: {branches!r} (block {block_prefix}{index} has no {missing[0]!r})")
        for branch, module in modules.items():
            if any(isinstance(hook, BranchScale) for hook in module._forward_hooks.values()):
                raise ValueError(f"Invalid model: {block_prefix}{index}.{branch} is already scaled "
                                 "(call scale_residual_branches once per model)")
    return [module.register_forward_hook(BranchScale(multiplier))
            for index in sorted(found, key=int) for module in found[index].values()]


__all__ = ["BRANCHES", "BranchScale", "scale_residual_branches"]
