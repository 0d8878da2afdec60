"""muP's per-parameter learning-rate, weight-decay and Adam-eps rules: the only place they live.

Each parameter carries an infinite-width shape (``p.infshape``, set by ``mup.set_base_shapes``)
that says which of its dimensions grow with width. muP scales the learning rate of a parameter
by a multiplier that depends only on that shape and on the optimizer's family:

    rule "adam" (entrywise-normalised updates: Adam, AdamW, RAdam, their schedule-free forms)
        matrix-like (2 infinite dims):  lr / width_mult        (width_mult of the fan-in)
        everything else ("vector-like"): unchanged
    rule "sgd" (raw-gradient updates: SGD and its schedule-free form)
        matrix-like:  lr / fanin_fanout_mult_ratio
        vector-like (1 infinite dim):  lr * width_mult
        fixed (no infinite dim):  unchanged

    rule "muon" (orthogonalised updates: torch.optim.Muon, its schedule-free form; hidden
                 matrices only, 2 infinite dims; everything else takes the "adam" rule)
        matrix-like:  lr * sqrt(m_out / m_in) * adjust(A0, B0) / adjust(A, B)
                      (derivation below; 1 for "original" when both dims grow alike,
                      1 / sqrt(width_mult) for "match_rms_adamw")

Weight decay has to follow how the optimizer couples it to the learning rate. If a step removes
``lr^q * weight_decay * p``, the decay per step is width-independent when weight_decay is scaled
by ``lr_multiplier^(-q)``:

    q = 1  decay multiplied by lr: this package's and the published schedule-free optimizers
           (decay at y), the wrapper's decay at y, torch's AdamW/SGD/Adam decay, torch's
           Muon (p <- p (1 - lr wd), with the group lr, not the shape-adjusted one)  -> x 1/lr_mult
    q = 2  decay multiplied by lr squared (AdamC-style corrected decay)          -> x 1/lr_mult^2
    q = 0  decay independent of lr (``decoupled_wd=True``)                       -> unchanged

With q = 1 this reproduces mup 1.0.0's MuAdam/MuSGD exactly (same groups, same floats: scaling is
applied by multiplying or dividing by the shape quantity, as mup does).

Adam's eps (``scale_eps=True``, "adam" rule only; off by default, where the groups are mup 1.0.0's)
is multiplied by key ** exponent (:data:`EPS_RULE`, :func:`eps_scaling`):

    infinite fan-out (dim 0): matrix-like, input weights, biases, norm gains  -> eps / fan-out width_mult
    infinite fan-in only: MuReadout weight, embeddings (vocab x width)       -> eps / width_mult
    no infinite dimension: readout bias, scalars                              -> unchanged

Why eps must scale: the entries of Adam's sqrt(v) shrink with width

mup's formulation: width multiplier m = n / n_base; hidden and input weights initialised with
variance 1/fan_in; the readout is a MuReadout, f = W_out h / m (output_mult 1), W_out
zero-initialised (or variance 1/n); Adam lr / m on matrix-like parameters, lr on the others.
muP makes every hidden vector h (dimension d) keep Theta(1) entries and move by Theta(1) per
entry in the first steps, which moves the loss by Theta(1).

1. The backward signal. A Theta(1), correlated change of the d entries of h moves the loss by
   Theta(1), so sum_i (dL/dh_i) (delta h_i) = Theta(1) over d like terms: dL/dh_i = Theta(1/d).
   At the readout this is explicit: dL/dh = W_out^T (dL/df) / m, and W_out's entries are
   Theta(1) after its first Adam steps (its lr is not scaled), so dL/dh = Theta(1/m).
2. The gradient entries, role by role (a sum over the batch, a fixed number of terms):
     hidden matrix W, h_out = W h_in:    g_ij = dL/dh_out_i * h_in_j = Theta(1/m) * Theta(1)  -> m^-1
     attention q, k, v, out projections: the same; for the query, dL/dq = (attn_mult / d_head)
                                         sum_s (dL/dlogit_s) k_s with the 1/d_head logit scale,
                                         Theta(1/m) as well                                   -> m^-1
     input weights (width x d_in):       g = dL/dh * x, x Theta(1) and fixed in size          -> m^-1
     embeddings (vocab x width):         the rows used receive dL/dh                          -> m^-1
     biases, norm gains (width):         g = dL/dh (times the normalised input for gains)     -> m^-1
     readout weight (d_out x width):     g = (dL/df) h / m = Theta(1) * Theta(1) / m          -> m^-1
                                         (only through MuReadout's 1/width_mult: a readout that
                                         put 1/n in its init and lr instead would have m^0)
     readout bias (d_out):               g = dL/df                                            -> m^0
   Each exponent is counted in the multiplier of the dimension the backward signal lives in:
   the fan-out (dim 0) when it is infinite, else the infinite fan-in (MuReadout's divisor, an
   embedding's width). When all widths grow together these equal mup's width_mult.
3. Adam's v is an average of g^2, so sqrt(v) has the exponent of g. The update g / (sqrt(v) + eps)
   keeps its size at every width only if eps / sqrt(v) does: eps x m^-1 wherever g is m^-1.
   With eps fixed at its base-width value, eps / sqrt(v) grows like m; once it passes 1 the
   update is about g / eps, which shrinks like 1/m: Adam turns into SGD with lr / eps, and muP's
   Adam learning rates (which assume updates of fixed size) under-train wide models.

Measured by ``python -m coord_checks.gradient_scales`` (slope of log2 RMS against log2 width at
y after 6 steps of MuAdamW_ScheduleFree, lr 0.01, eps 1e-8, seeds 0 and 1; gradient, then sqrt(v)):

    MLP, widths 64 .. 1024:       input -1.01 / -1.05, hidden -0.97 / -1.03, readout -0.99 / -1.04
    Transformer, widths 32 .. 256: input (embeddings) -1.00 / -1.01, hidden (MLP) -0.98 / -1.02,
                                   attention -0.98 / -0.98, readout -1.00 / -1.00,
                                   vector (LayerNorm gains and biases) -1.00 / -1.00
    A hidden matrix whose fan-in and fan-out widths vary apart (tests/test_eps_scaling.py), each
    over 16x: gradient slope -0.99 against its fan-out, -0.06 against its fan-in.

Everett et al. 2024 (arXiv 2407.05872) measure the same effect and scale eps per layer;
Megatron-LM's muP scales eps for hidden matrix-like parameters.

Muon's rule, from the spectral condition (Yang, Simon, Bernstein 2023, arXiv 2310.17813)

A hidden matrix W of shape (A, B) = (fan-out, fan-in) maps inputs with Theta(1) entries to outputs
with Theta(1) entries, and its update moves them by Theta(1), when its spectral norm and that of
its update scale as ||dW||_op ~ sqrt(A / B). Relative to the base shape (A0, B0), where the lr was
tuned, the update's spectral norm must therefore grow by sqrt((A / A0) / (B / B0)) =
sqrt(m_out / m_in), m_out and m_in the width multipliers of fan-out and fan-in (1 when finite).

torch.optim.Muon's step is W <- W - lr * adjust(A, B) * O, O the Newton-Schulz orthogonalisation
of the (momentum) gradient: every singular value of O is about 1 whatever the shape, so
||O||_op = Theta(1) and ||dW||_op = lr * adjust(A, B) * Theta(1). adjust is Muon's
``adjust_lr_fn``:

    "original" (None, the default):  adjust(A, B) = sqrt(max(1, A / B))
    "match_rms_adamw":               adjust(A, B) = 0.2 * sqrt(max(A, B))

Muon already multiplies by adjust at the current shape, so muP needs on top of it

    lr_mult = sqrt(m_out / m_in) * adjust(A0, B0) / adjust(A, B)

    "original":         sqrt(m_out / m_in) * sqrt(max(1, A0 / B0) / max(1, A / B))
                        = 1 when fan-in and fan-out grow alike (A / B fixed): the default Muon
                          is already muP for hidden matrices; sqrt(m_out / m_in) for wide
                          matrices (A <= B at both shapes) whose dims grow apart, 1 for tall ones
    "match_rms_adamw":  sqrt(m_out / m_in) * sqrt(max(A0, B0) / max(A, B))
                        = 1 / sqrt(m) when both grow by m: matching AdamW's update RMS keeps
                          the entries Theta(1), so the spectral norm, sqrt(max(A, B)) times the
                          RMS for an orthogonal O, grows like sqrt(m) unless the lr shrinks

(adjust is torch's own function, imported, not restated). Weight decay: Muon's step multiplies W
by 1 - lr * wd with the group lr (the muP-scaled one, before adjust), decay coupled to lr with
q = 1, so wd is scaled by 1 / lr_mult like AdamW's. Muon's eps is the orthogonalisation's
normaliser, not Adam's: ``scale_eps`` does not apply. The rule covers hidden matrices only:
embeddings, readout, norms and biases have no spectral constraint Muon's update meets and take
the "adam" rule (:func:`mup_schedulefree.factories.MuMuon_ScheduleFree` splits a model so).

Depth (``depth_mult`` = L / L_base, L the number of residual blocks; off by default, where the
groups are exactly those above): pre-LN residual branches are multiplied by depth_mult ** -alpha
(:func:`branch_multiplier`, applied to a model by :mod:`mup_schedulefree.depth`), alpha = 1 for
CompleteP (Dey et al. 2025, arXiv 2505.01618), alpha = 1/2 for depth-muP (Yang et al. 2023,
arXiv 2310.02244; Bordelon et al. 2023, arXiv 2309.16620). Every parameter inside a residual
block (named with the block prefix, "blocks." by default, or marked in a name -> bool mapping)
then takes, on top of its width scaling, depth_mult ** exponent (:data:`DEPTH_RULE`); parameters
outside the blocks (embeddings, final norm, readout) take none.

Why these exponents: with a branch multiplier L^-alpha the gradient of every parameter inside a
block carries L^-alpha (the backward signal of the residual stream is Theta(1) at every depth).
Each of the L blocks should move the output by Theta(1/L), so that their correlated sum is Theta(1).
    Adam (normalised update, size lr whatever the gradient's scale): one block moves the output by
        L^-alpha * lr, the L blocks by L^(1-alpha) * lr: lr x depth_mult^(alpha - 1)
        (1 at alpha = 1, 1 / sqrt(depth_mult) at alpha = 1/2: CompleteP's Table 1, and depth-muP's
        Adam rule in Yang et al. 2023; for weights, norm gains and biases in blocks alike)
    Adam's eps: sqrt(v) carries the gradient's L^-alpha, so eps x depth_mult^-alpha keeps
        eps / sqrt(v) depth-independent (CompleteP's eps rule; with ``scale_eps`` only)
    SGD (update lr * g, g carrying L^-alpha): one block moves the output by L^-2alpha * lr, the L
        blocks by L^(1-2alpha) * lr: lr x depth_mult^(2 alpha - 1) (at alpha = 1/2 depth-muP's SGD
        rule, lr constant, Yang et al. 2023 and Bordelon et al. 2023; at alpha = 1, x depth_mult,
        derived here by this count, CompleteP states Adam's rules only)
    Muon (orthogonalised update, spectral size lr whatever the gradient's scale): Adam's count,
        lr x depth_mult^(alpha - 1). Derived here by that count only; no paper states it.
    Weight decay: not depth-scaled (exponent 0), as CompleteP's Table 1 scales hidden AdamW decay
        by width only; at alpha = 1 under Adam this also keeps lr^q * weight_decay fixed, at
        alpha = 1/2 the decay per step inside blocks shrinks with the lr (x depth_mult^(q (alpha - 1))).
    Initialisation: not depth-scaled (CompleteP's Table 1 keeps the hidden init variance width-only;
        the branch multiplier replaces GPT-2's 1/sqrt(2 L) output-projection init).
Not yet measured in this package (depth coordinate checks and lr transfer across depth are next).

ScheduleFree+'s Polyak step size divides by the gradient's L1 norm summed over groups, each
weighted by its ``polyak_weight``; under muP a group's weight is its lr multiplier
(:func:`polyak_weight`), which keeps that sum, and so the step size, width-independent.
"""
from __future__ import annotations

import math
import numbers
import os
import sys
import warnings
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch

from .validation import check_range, real_number

RULES = ("adam", "sgd", "muon")
ROLE_ORDER = {"adam": ("matrix-like", "vector-like"), "sgd": ("matrix-like", "vector-like", "fixed"),
              "muon": ("matrix-like",)}
#: torch.optim.Muon's ``adjust_lr_fn`` settings (None means "original").
ADJUST_LR_FNS = (None, "original", "match_rms_adamw")
DECAY_LR_POWERS = (0, 1, 2)
#: Adam's eps rule, by which of a parameter's dimensions are infinite, as (fan-out, fan-in) =
#: (dim 0, any later dim): eps is multiplied by key ** exponent, with key the width multiplier of
#: the named dimension ("fan-out": dim 0; "fan-in": the last infinite dimension, mup's width_mult),
#: which keeps eps / sqrt(v) width-independent under mup's formulation (derivation and measured
#: exponents in the module docstring).
EPS_RULE: dict[tuple[str, str], tuple[str | None, int]] = {
    ("inf", "inf"): ("fan-out", -1),  # matrix-like: hidden weights, attention projections
    ("inf", "fin"): ("fan-out", -1),  # input weights; biases and norm gains (1-D: dim 0 only)
    ("fin", "inf"): ("fan-in", -1),   # MuReadout weight (its 1/width_mult); embeddings (vocab x width)
    ("fin", "fin"): (None, 0),        # no infinite dimension: readout bias, scalars
}

#: Residual-branch exponents alpha: the branch is multiplied by depth_mult ** -alpha.
DEPTH_ALPHAS = (0.5, 1.0)
#: Depth rule for parameters inside residual blocks, by (rule, alpha): the exponents of depth_mult
#: that multiply lr, Adam's eps (with ``scale_eps``; None where the rule has no Adam eps) and
#: weight decay (derivation and sources in the module docstring). Outside blocks every exponent is 0.
DEPTH_RULE: dict[tuple[str, float], tuple[float, float | None, float]] = {
    ("adam", 1.0): (0.0, -1.0, 0.0),    # CompleteP
    ("adam", 0.5): (-0.5, -0.5, 0.0),   # depth-muP
    ("sgd", 1.0): (1.0, None, 0.0),
    ("sgd", 0.5): (0.0, None, 0.0),     # depth-muP
    ("muon", 1.0): (0.0, None, 0.0),    # Adam's count (normalised update), not published
    ("muon", 0.5): (-0.5, None, 0.0),
}
#: Default prefix of the names of parameters inside residual blocks ("blocks.<i>.").
BLOCK_PREFIX = "blocks."


def check_rule(name: str, rule: Any) -> None:
    """Raise ValueError naming ``name`` unless ``rule`` is one of :data:`RULES`.

    Args:
        name: argument name shown in the message (e.g. ``"rule"``).
        rule: the value supplied by the user.
    """
    if not isinstance(rule, str) or rule not in RULES:
        raise ValueError(f"Invalid {name}: {rule!r} (must be one of {RULES})")


def check_adjust_lr_fn(name: str, adjust_lr_fn: Any) -> None:
    """Raise ValueError naming ``name`` unless ``adjust_lr_fn`` is one of :data:`ADJUST_LR_FNS`.

    Args:
        name: argument name shown in the message (e.g. ``"adjust_lr_fn"``).
        adjust_lr_fn: the value supplied by the user.

    Raises:
        ValueError: any other value.
    """
    if not (adjust_lr_fn is None or (isinstance(adjust_lr_fn, str) and adjust_lr_fn in ADJUST_LR_FNS)):
        raise ValueError(f"Invalid {name}: {adjust_lr_fn!r} (must be one of {ADJUST_LR_FNS})")


def muon_lr_mult(infshape: Any, adjust_lr_fn: str | None = None, name: str = "parameter") -> float:
    """muP's lr multiplier for torch.optim.Muon on a hidden matrix, on top of Muon's own ``adjust_lr_fn``.

    sqrt(m_out / m_in) * adjust(A0, B0) / adjust(A, B), with (A, B) the current and (A0, B0) the
    base (fan-out, fan-in) and adjust Muon's shape factor (derivation in the module docstring).

    Args:
        infshape: a ``mup.InfShape`` of a 2-D parameter with both dimensions infinite.
        adjust_lr_fn: Muon's ``adjust_lr_fn``: None or "original", or "match_rms_adamw".
        name: how to name the parameter in errors.

    Returns:
        The multiplier (exactly 1.0 at the base shape).

    Raises:
        ValueError: an unknown ``adjust_lr_fn``, or a parameter that is not a 2-D hidden matrix.
    """
    from torch.optim._muon import _adjust_lr

    check_adjust_lr_fn("adjust_lr_fn", adjust_lr_fn)
    if len(infshape) != 2 or infshape.ninf() != 2:
        raise ValueError(
            f"{name} has shape {infshape.shape()} with {infshape.ninf()} infinite dimensions: the 'muon' rule "
            "covers hidden matrices (2-D, both dimensions infinite) only; give the others the 'adam' rule "
            "(MuMuon_ScheduleFree splits a model this way)")
    fan_out, fan_in = infshape
    shape_ratio = _adjust_lr(1.0, adjust_lr_fn, infshape.base_shape()) / _adjust_lr(1.0, adjust_lr_fn, infshape.shape())
    return math.sqrt(fan_out.width_mult() / fan_in.width_mult()) * shape_ratio


def check_decay_lr_power(name: str, power: Any) -> None:
    """Raise ValueError naming ``name`` unless ``power`` is the int 0, 1 or 2.

    Args:
        name: argument name shown in the message (e.g. ``"decay_lr_power"``).
        power: the value supplied by the user.
    """
    if isinstance(power, bool) or not isinstance(power, numbers.Integral) or power not in DECAY_LR_POWERS:
        raise ValueError(f"Invalid {name}: {power!r} (must be the int 0, 1 or 2)")


def apply_power(value: float, key: float, exponent: int) -> float:
    """value * key**exponent, computed by repeated multiplication or division (as mup does)."""
    for _ in range(abs(exponent)):
        value = value * key if exponent > 0 else value / key
    return value


class Scaling(NamedTuple):
    """muP scaling of one parameter: its lr is multiplied by ``key ** exponent``.

    Attributes:
        role: "matrix-like", "vector-like" or "fixed" (mup's names).
        key: the shape quantity that defines the group (width_mult or fan-in/fan-out ratio;
            under the "muon" rule the multiplier itself, with exponent +1).
        exponent: -1, 0 or +1.
    """

    role: str
    key: float
    exponent: int

    @property
    def lr_mult(self) -> float:
        """Multiplier on the learning rate."""
        return apply_power(1.0, self.key, self.exponent)

    def scale_lr(self, lr: float) -> float:
        """The muP learning rate of this parameter for base learning rate ``lr``."""
        return apply_power(lr, self.key, self.exponent)

    def scale_weight_decay(self, weight_decay: float, decay_lr_power: int) -> float:
        """Weight decay that keeps lr^q * weight_decay width-independent, q = ``decay_lr_power``.

        Args:
            weight_decay: base-width weight decay.
            decay_lr_power: q, the power of lr that multiplies the decay in the optimizer's step
                (1: decay x lr, 2: decay x lr^2, 0: decoupled).
        """
        check_decay_lr_power("decay_lr_power", decay_lr_power)
        return apply_power(weight_decay, self.key, -decay_lr_power * self.exponent)


def polyak_weight(group: Mapping[str, Any]) -> float:
    """ScheduleFree+'s Polyak weight of a muP group: its ``polyak_weight`` (default 1) times its lr multiplier.

    Why: Adam's update is about sign-like, so a group's first-order loss decrease is about
    lr_G * |g_G|_1, which muP keeps width-independent; the group's L1 norm weighted by its lr
    multiplier is therefore width-independent too, whereas the hidden groups' plain L1 norms grow
    like the width (derivation in :mod:`mup_schedulefree.optimizers.adamc_plus`). At the base width
    every multiplier is 1 and the weights are the group's own.

    Args:
        group: a group built by :func:`mu_param_groups` (it records ``mup_lr_mult``).

    Returns:
        The weight of the group's gradient L1 norm in the Polyak denominator.
    """
    return group.get("polyak_weight", 1.0) * group["mup_lr_mult"]


def check_depth(depth_mult: Any, depth_alpha: Any, block_prefix: Any) -> None:
    """Raise unless the depth arguments are consistent: both None (no depth scaling), or a positive
    finite ``depth_mult`` with ``depth_alpha`` in :data:`DEPTH_ALPHAS`; ``block_prefix`` a
    non-empty str or a mapping name -> bool.

    Args:
        depth_mult: L / L_base, or None.
        depth_alpha: the residual-branch exponent alpha, or None.
        block_prefix: prefix of the names of parameters inside residual blocks, or a mapping
            name -> bool.

    Raises:
        TypeError: a non-number ``depth_mult`` or a ``block_prefix`` of the wrong type.
        ValueError: ``depth_mult`` out of (0, inf), ``depth_alpha`` not in :data:`DEPTH_ALPHAS`,
            one of the two given without the other, or an empty ``block_prefix``.
    """
    if depth_mult is None:
        if depth_alpha is not None:
            raise ValueError(f"Invalid depth_alpha: {depth_alpha!r} (needs depth_mult = L / L_base; "
                             "leave both None for no depth scaling)")
    else:
        check_range("depth_mult", depth_mult, 0.0, low_open=True)
        if isinstance(depth_alpha, bool) or depth_alpha not in DEPTH_ALPHAS:
            raise ValueError(f"Invalid depth_alpha: {depth_alpha!r} (must be one of {DEPTH_ALPHAS}: "
                             "1 for CompleteP, 0.5 for depth-muP)")
    if isinstance(block_prefix, str):
        if not block_prefix:
            raise ValueError("Invalid block_prefix: '' (must name the blocks, e.g. 'blocks.')")
    elif not isinstance(block_prefix, Mapping):
        raise TypeError(f"Invalid block_prefix: {block_prefix!r} (must be a str or a mapping name -> bool, "
                        f"got {type(block_prefix).__name__})")


def branch_multiplier(depth_mult: float, depth_alpha: float) -> float:
    """The residual-branch multiplier (L_base / L) ** alpha = depth_mult ** -alpha.

    Args:
        depth_mult: L / L_base, positive.
        depth_alpha: alpha, one of :data:`DEPTH_ALPHAS`.

    Returns:
        The multiplier (exactly 1.0 at depth_mult = 1).

    Raises:
        TypeError, ValueError: as :func:`check_depth`.
    """
    check_depth(depth_mult, depth_alpha, BLOCK_PREFIX)
    return float(depth_mult) ** -float(depth_alpha)


class DepthScaling(NamedTuple):
    """Depth scaling of one parameter, on top of its width scaling (:data:`DEPTH_RULE`).

    Attributes:
        in_block: whether the parameter lies inside a residual block.
        lr_mult: multiplier on lr.
        eps_mult: multiplier on Adam's eps (1.0 where the rule has no Adam eps).
        wd_mult: multiplier on weight decay.
    """

    in_block: bool
    lr_mult: float
    eps_mult: float
    wd_mult: float


#: No depth scaling: every multiplier 1.
NO_DEPTH = DepthScaling(False, 1.0, 1.0, 1.0)


def depth_scaling(rule: str, depth_mult: float, depth_alpha: float, in_block: bool) -> DepthScaling:
    """The depth scaling of a parameter under ``rule`` (:data:`DEPTH_RULE`; derivation in the module docstring).

    Args:
        rule: "adam", "sgd" or "muon".
        depth_mult: L / L_base.
        depth_alpha: the residual-branch exponent alpha, one of :data:`DEPTH_ALPHAS`.
        in_block: whether the parameter lies inside a residual block (outside: every multiplier 1).

    Returns:
        The multipliers, depth_mult ** exponent each.

    Raises:
        ValueError: an unknown rule, or depth arguments :func:`check_depth` refuses.
    """
    check_rule("rule", rule)
    check_depth(depth_mult, depth_alpha, BLOCK_PREFIX)
    if not in_block:
        return NO_DEPTH
    lr_exp, eps_exp, wd_exp = DEPTH_RULE[(rule, float(depth_alpha))]
    mult = float(depth_mult)
    return DepthScaling(True, mult ** lr_exp, 1.0 if eps_exp is None else mult ** eps_exp, mult ** wd_exp)


def _times(value: Any, mult: float) -> Any:
    """value * mult, or ``value`` itself when mult is 1 (so that groups without depth scaling are unchanged)."""
    return value if mult == 1.0 else value * mult


def _in_block(name: str | None, index: int, p: torch.Tensor, block_prefix: str | Mapping[str, bool]) -> bool:
    """Whether a parameter lies inside a residual block: its name starts with ``block_prefix``, or
    the mapping ``block_prefix`` says so."""
    if name is None:
        raise ValueError(f"depth_mult needs parameter names to find the residual blocks, but "
                         f"{_name_of(index, name, p)} is unnamed: pass model.named_parameters()")
    if isinstance(block_prefix, str):
        return name.startswith(block_prefix)
    if name not in block_prefix:
        raise ValueError(f"Invalid block_prefix: parameter {name!r} is missing from the mapping "
                         f"(it has {len(block_prefix)} entries)")
    inside = block_prefix[name]
    if not isinstance(inside, bool):
        raise TypeError(f"Invalid block_prefix[{name!r}]: {inside!r} (must be True or False)")
    return inside


class EpsScaling(NamedTuple):
    """Width scaling of one parameter's Adam eps: eps is multiplied by ``key ** exponent``.

    Attributes:
        dims: which dimensions are infinite, (fan-out, fan-in), each "inf" or "fin" (the key of
            :data:`EPS_RULE`).
        key: the width multiplier :data:`EPS_RULE` names for ``dims`` (1 without an infinite dimension).
        exponent: -1, or 0 without an infinite dimension.
    """

    dims: tuple[str, str]
    key: float
    exponent: int

    @property
    def eps_mult(self) -> float:
        """Multiplier on eps."""
        return apply_power(1.0, self.key, self.exponent)

    def scale_eps(self, eps: float) -> float:
        """The width-scaled eps of this parameter for base-width eps ``eps``."""
        return apply_power(eps, self.key, self.exponent)


def eps_scaling(infshape: Any) -> EpsScaling:
    """The width scaling of Adam's eps for a parameter with shape ``infshape`` (see :data:`EPS_RULE`).

    Args:
        infshape: a ``mup.InfShape`` (a sequence of dimensions with ``isinf()`` and
            ``width_mult()``, and ``width_mult()`` itself).

    Returns:
        Which dimensions are infinite, the key and the eps exponent.
    """
    dims = ("inf" if len(infshape) and infshape[0].isinf() else "fin",
            "inf" if any(dim.isinf() for dim in list(infshape)[1:]) else "fin")
    source, exponent = EPS_RULE[dims]
    if source == "fan-out":
        key = infshape[0].width_mult()
    elif source == "fan-in":
        key = infshape.width_mult()
    else:
        key = 1.0
    return EpsScaling(dims, float(key), exponent)


def check_scale_eps(name: str, scale_eps: Any, rule: str) -> None:
    """Raise unless ``scale_eps`` is a bool, and False under the "sgd" and "muon" rules (no Adam eps).

    Args:
        name: argument name shown in the message (e.g. ``"scale_eps"``).
        scale_eps: the value supplied by the user.
        rule: the muP rule it would apply under.

    Raises:
        TypeError: ``scale_eps`` is not a bool.
        ValueError: ``scale_eps`` is True under the "sgd" or "muon" rule.
    """
    if not isinstance(scale_eps, bool):
        raise TypeError(f"Invalid {name}: {scale_eps!r} (must be True or False, got {type(scale_eps).__name__})")
    if scale_eps and rule == "sgd":
        raise ValueError(f"Invalid {name}: True (the 'sgd' rule's updates have no eps to scale; "
                         "only Adam-rule optimizers take scale_eps=True)")
    if scale_eps and rule == "muon":
        raise ValueError(f"Invalid {name}: True (Muon's eps normalises the orthogonalisation, it is not "
                         "Adam's; only Adam-rule optimizers take scale_eps=True)")


def parameter_scaling(infshape: Any, rule: str, name: str = "parameter", adjust_lr_fn: str | None = None) -> Scaling:
    """The muP learning-rate scaling of a parameter with shape ``infshape`` under ``rule``.

    Args:
        infshape: a ``mup.InfShape`` (anything with ``ninf()``, ``width_mult()``,
            ``fanin_fanout_mult_ratio()``).
        rule: "adam", "sgd" or "muon".
        name: how to name the parameter in errors.
        adjust_lr_fn: Muon's ``adjust_lr_fn`` (read under the "muon" rule only).

    Returns:
        Its role, grouping key and lr exponent.

    Raises:
        ValueError: an unknown rule, more than 2 infinite dimensions, or (rule "muon") a parameter
            that is not a hidden matrix or an unknown ``adjust_lr_fn``.
    """
    check_rule("rule", rule)
    if rule == "muon":
        return Scaling("matrix-like", muon_lr_mult(infshape, adjust_lr_fn, name), 1)
    ninf = infshape.ninf()
    if ninf > 2:
        raise ValueError(
            f"{name} has {ninf} infinite dimensions (infshape {infshape}); muP defines scaling for at most 2. "
            "Mark the extra width dimensions finite in the base shapes."
        )
    if rule == "adam":
        if ninf == 2:
            return Scaling("matrix-like", infshape.width_mult(), -1)
        return Scaling("vector-like", 1.0, 0)
    if ninf == 2:
        return Scaling("matrix-like", infshape.fanin_fanout_mult_ratio(), -1)
    if ninf == 1:
        return Scaling("vector-like", infshape.width_mult(), 1)
    return Scaling("fixed", 1.0, 0)


def _name_of(index: int, name: str | None, p: torch.Tensor) -> str:
    return f"parameter {name!r}" if name is not None else f"parameter #{index} (shape {tuple(p.shape)})"


def _normalise(params: Any) -> list[dict[str, Any]]:
    """Turn any torch-style ``params`` argument into group dicts with (name or None, p) pairs."""
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be an iterable of tensors, of (name, tensor) pairs or of dicts, got a Tensor")
    items = list(params)
    if not items:
        raise ValueError("params is empty: the optimizer got no parameters")
    groups = items if isinstance(items[0], dict) else [{"params": items}]
    out = []
    for index, group in enumerate(groups):
        if not isinstance(group, dict):
            raise TypeError(f"params mixes dicts and non-dicts (entry {index} is {type(group).__name__})")
        members = group["params"]
        members = [members] if isinstance(members, torch.Tensor) else list(members)
        pairs = []
        for member in members:
            if isinstance(member, tuple) and len(member) == 2 and isinstance(member[0], str):
                pairs.append(member)
            elif isinstance(member, torch.Tensor):
                pairs.append((None, member))
            else:
                raise TypeError(f"params group {index} holds a {type(member).__name__}; expected tensors or (name, tensor)")
        out.append({**group, "params": pairs})
    return out


def resolve_infshapes(infshapes: Mapping[str, Any] | str | os.PathLike | None) -> Mapping[str, Any] | None:
    """Load an infshape mapping from a mup base-shape file path, or pass a mapping through.

    Args:
        infshapes: None, a mapping name -> InfShape (or base shape list), or the path of a file
            written by ``mup.save_base_shapes`` / ``mup.make_base_shapes(..., savefile=...)``.

    Returns:
        A mapping name -> InfShape-like, or None.
    """
    if infshapes is None or isinstance(infshapes, Mapping):
        return infshapes
    if isinstance(infshapes, (str, os.PathLike)):
        import mup

        return mup.load_base_shapes(os.fspath(infshapes))
    raise TypeError(f"infshapes must be a mapping name -> InfShape or a base-shape file path, got {type(infshapes).__name__}")


def _infshape(p: torch.Tensor, name: str | None, index: int, infshapes: Mapping[str, Any] | None) -> Any:
    if infshapes is not None:
        if name is None:
            raise ValueError("infshapes was given but the parameters are unnamed: pass model.named_parameters()")
        if name not in infshapes:
            raise ValueError(f"{_name_of(index, name, p)} is missing from infshapes (it has {len(infshapes)} entries)")
        from mup.infshape import zip_infshape

        return zip_infshape(infshapes[name], list(p.shape))
    if not hasattr(p, "infshape"):
        raise ValueError(
            f"{_name_of(index, name, p)} has no infshape: call mup.set_base_shapes(model, base, delta=...) "
            "before building the optimizer, or pass infshapes=<name -> InfShape mapping or base-shape file> "
            "(needed after copy.deepcopy or FSDP2 fully_shard, which drop the attribute)."
        )
    return p.infshape


def split_hidden_matrices(params: Any, infshapes: Mapping[str, Any] | str | os.PathLike | None = None
                          ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split every parameter group into its hidden matrices (the "muon" rule's) and the rest.

    A hidden matrix is 2-D with both dimensions infinite; embeddings, input and readout weights,
    norms and biases are the rest. Each incoming group gives at most one group to each side, with
    the group's own keys; empty sides are left out.

    Args:
        params: parameters, (name, parameter) pairs, or group dicts holding either.
        infshapes: a mapping name -> InfShape or a mup base-shape file, used instead of
            ``p.infshape`` (requires named parameters).

    Returns:
        (groups of hidden matrices, groups of the other parameters), members as given.

    Raises:
        TypeError: params of the wrong kind.
        ValueError: no parameters, or a parameter without an infshape.
    """
    shapes = resolve_infshapes(infshapes)
    matrices: list[dict[str, Any]] = []
    others: list[dict[str, Any]] = []
    index = 0
    for group in _normalise(params):
        sides: tuple[list[Any], list[Any]] = ([], [])
        for name, p in group["params"]:
            infshape = _infshape(p, name, index, shapes)
            index += 1
            hidden = len(infshape) == 2 and infshape.ninf() == 2
            sides[0 if hidden else 1].append(p if name is None else (name, p))
        for members, out in zip(sides, (matrices, others)):
            if members:
                out.append({**group, "params": members})
    return matrices, others


def mu_param_groups(
    params: Any,
    rule: str,
    *,
    lr: float,
    decay_keys: Mapping[str, float],
    decay_lr_power: int = 1,
    infshapes: Mapping[str, Any] | str | None = None,
    scale_eps: bool = False,
    eps: float | None = None,
    adjust_lr_fn: str | None = None,
    depth_mult: float | None = None,
    depth_alpha: float | None = None,
    block_prefix: str | Mapping[str, bool] = BLOCK_PREFIX,
) -> list[dict[str, Any]]:
    """Split every parameter group by muP role and scale its lr and weight decay (and eps, if asked).

    Each incoming group (with the user's own keys kept, e.g. ``weight_decay=0`` for norms) is split
    into sub-groups of equal scaling, ordered by role (matrix-like, vector-like, fixed) and then by
    first appearance. Every sub-group records ``mup_rule``, ``mup_role``, ``mup_lr_mult``,
    ``mup_wd_mult`` and ``mup_eps_mult`` (None unless ``scale_eps``), each the product of the width
    and depth multipliers, and ``mup_depth_mult`` / ``mup_depth_alpha`` (None without depth
    scaling); parameters given with names keep them (torch stores ``param_names``). With
    ``scale_eps`` the vector-like groups are also split by their eps multiplier, and with depth
    scaling every group by its depth multipliers (parameters inside and outside the blocks share a
    group where those are equal, e.g. everywhere at depth_mult = 1).

    Args:
        params: parameters, (name, parameter) pairs (e.g. ``model.named_parameters()``), or group
            dicts holding either.
        rule: "adam" or "sgd" (see the module docstring).
        lr: base learning rate for groups that set none.
        decay_keys: weight-decay keys to scale, with the default for groups that set none
            (e.g. ``{"weight_decay": 0.0}``).
        decay_lr_power: how the optimizer couples decay to lr (see :meth:`Scaling.scale_weight_decay`).
        infshapes: a mapping name -> InfShape or a mup base-shape file, used instead of
            ``p.infshape`` (requires named parameters).
        scale_eps: multiply each group's eps by ``width_mult ** exponent`` (:func:`eps_scaling`),
            so that eps keeps its size relative to sqrt(v) at every width. Default False: eps is
            left alone, as mup 1.0.0 does. Only under the "adam" rule.
        eps: base-width eps for groups that set none; required with ``scale_eps``.
        adjust_lr_fn: under the "muon" rule, Muon's ``adjust_lr_fn`` for groups that set none
            (a group's own ``adjust_lr_fn`` key wins, as it does in Muon's step).
        depth_mult: L / L_base, the number of residual blocks over the base model's; None (default)
            for no depth scaling, mup 1.0.0's groups. Needs named parameters.
        depth_alpha: the residual-branch exponent, 1 (CompleteP) or 0.5 (depth-muP); required
            with ``depth_mult`` (rule in :data:`DEPTH_RULE`).
        block_prefix: which parameters lie inside residual blocks: those whose name starts with
            this str (default "blocks."; include any wrapper prefix such as "module."), or a
            mapping name -> bool over every parameter. A warning names it when no parameter lies
            inside a block.

    Returns:
        The new group dicts, ready for an optimizer constructor.

    Raises:
        TypeError: a non-number lr, decay, eps or depth_mult (argument or group entry), a non-bool
            ``scale_eps``, a ``block_prefix`` of the wrong type, or params of the wrong kind.
        ValueError: an unknown rule, decay_lr_power or adjust_lr_fn, ``scale_eps`` under the "sgd"
            or "muon" rule or without an eps, no parameters, a parameter without an infshape, or
            (rule "muon") one that is not a hidden matrix; depth arguments :func:`check_depth`
            refuses, an unnamed parameter with ``depth_mult``, or a name missing from a
            ``block_prefix`` mapping. Every argument is checked before any group is built.
    """
    check_rule("rule", rule)
    real_number("lr", lr)
    for key, default in decay_keys.items():
        real_number(key, default)
    check_decay_lr_power("decay_lr_power", decay_lr_power)
    check_scale_eps("scale_eps", scale_eps, rule)
    check_adjust_lr_fn("adjust_lr_fn", adjust_lr_fn)
    check_depth(depth_mult, depth_alpha, block_prefix)
    if scale_eps:
        if eps is None:
            raise ValueError("Invalid eps: None (scale_eps=True needs the base-width eps)")
        real_number("eps", eps)
    shapes = resolve_infshapes(infshapes)
    groups = _normalise(params)
    for number, group in enumerate(groups):
        for key in ("lr", *decay_keys, *(("eps",) if scale_eps else ())):
            if key in group:
                real_number(f"{key} of params group {number}", group[key])
        if rule == "muon" and "adjust_lr_fn" in group:
            check_adjust_lr_fn(f"adjust_lr_fn of params group {number}", group["adjust_lr_fn"])
    new_groups: list[dict[str, Any]] = []
    index = 0
    any_in_block = False
    for group in groups:
        buckets: dict[tuple[Any, ...], dict[str, Any]] = {}
        for name, p in group["params"]:
            infshape = _infshape(p, name, index, shapes)
            scaling = parameter_scaling(infshape, rule, _name_of(index, name, p),
                                        group.get("adjust_lr_fn", adjust_lr_fn))
            eps_rule = eps_scaling(infshape) if scale_eps else None
            eps_mult = None if eps_rule is None else eps_rule.eps_mult
            depth = NO_DEPTH
            if depth_mult is not None:
                depth = depth_scaling(rule, depth_mult, depth_alpha, _in_block(name, index, p, block_prefix))
                any_in_block = any_in_block or depth.in_block
            index += 1
            # grouped by the multipliers, not by membership: at equal multipliers blocks share groups
            bucket_key = (scaling.role, scaling.key, eps_mult, depth.lr_mult, depth.eps_mult, depth.wd_mult)
            bucket = buckets.get(bucket_key)
            if bucket is None:
                bucket = {key: value for key, value in group.items() if key != "params"}
                bucket["lr"] = _times(scaling.scale_lr(group.get("lr", lr)), depth.lr_mult)
                for key, default in decay_keys.items():
                    bucket[key] = _times(scaling.scale_weight_decay(group.get(key, default), decay_lr_power),
                                         depth.wd_mult)
                if eps_rule is not None:
                    bucket["eps"] = _times(eps_rule.scale_eps(group.get("eps", eps)), depth.eps_mult)
                bucket.update(mup_rule=rule, mup_role=scaling.role, mup_lr_mult=_times(scaling.lr_mult, depth.lr_mult),
                              mup_wd_mult=_times(scaling.scale_weight_decay(1.0, decay_lr_power), depth.wd_mult),
                              mup_eps_mult=None if eps_mult is None else _times(eps_mult, depth.eps_mult),
                              mup_depth_mult=None if depth_mult is None else float(depth_mult),
                              mup_depth_alpha=None if depth_alpha is None else float(depth_alpha), params=[])
                buckets[bucket_key] = bucket
            bucket["params"].append(p if name is None else (name, p))
        order = ROLE_ORDER[rule]
        new_groups.extend(sorted(buckets.values(), key=lambda g: order.index(g["mup_role"])))
    if depth_mult is not None and not any_in_block:
        warnings.warn(f"depth_mult={depth_mult!r} scales nothing: no parameter lies inside a residual block "
                      f"(block_prefix={block_prefix!r} if a str: names must start with it)", stacklevel=2)
    return new_groups


GROUP_SIGNATURE = ("mup_rule", "mup_role", "mup_lr_mult", "mup_wd_mult", "mup_eps_mult", "mup_polyak",
                   "mup_depth_mult", "mup_depth_alpha")
#: Signature keys a state dict saved before they existed lacks (or a group that has none of its
#: kind: ``mup_polyak`` is ScheduleFree+'s), with the value that means.
SIGNATURE_DEFAULTS = {"mup_eps_mult": None, "mup_polyak": None, "mup_depth_mult": None, "mup_depth_alpha": None}


def _eps_scaled(groups: Sequence[dict[str, Any]]) -> bool:
    return any(group.get("mup_eps_mult") is not None for group in groups)


def _depth(groups: Sequence[dict[str, Any]]) -> tuple[float | None, float | None]:
    first = groups[0] if groups else {}
    return first.get("mup_depth_mult"), first.get("mup_depth_alpha")


def _polyak_rule(groups: Sequence[dict[str, Any]]) -> str | None:
    return next((group["mup_polyak"] for group in groups if group.get("mup_polyak") is not None), None)


def check_same_grouping(saved_groups: Sequence[dict[str, Any]], groups: Sequence[dict[str, Any]]) -> None:
    """Raise ValueError unless saved muP groups line up with the current ones.

    Compares whether eps was width-scaled (``scale_eps``), ScheduleFree+'s Polyak weighting
    (``polyak``, recorded as ``mup_polyak``) and the depth scaling (``depth_mult`` and
    ``depth_alpha``, recorded as ``mup_depth_mult`` and ``mup_depth_alpha``), then, group by
    group, the muP signature, the parameter count and (when both sides have them) the parameter
    names, so that optimizer state is never attached to the wrong parameter. A state dict saved
    before groups recorded ``mup_eps_mult`` counts as saved without ``scale_eps``, one saved
    before they recorded ``mup_depth_mult`` as saved without depth scaling.

    Args:
        saved_groups: ``state_dict()["param_groups"]`` of the saved optimizer.
        groups: the current optimizer's ``param_groups``.

    Raises:
        ValueError: naming the first difference.
    """
    if _eps_scaled(saved_groups) != _eps_scaled(groups):
        raise ValueError(
            f"state_dict was saved with scale_eps={_eps_scaled(saved_groups)} but this muP optimizer has "
            f"scale_eps={_eps_scaled(groups)}: build it with the same scale_eps to load it"
        )
    polyak = [_polyak_rule(side) for side in (saved_groups, groups)]
    if polyak[0] != polyak[1]:
        raise ValueError(
            f"state_dict was saved with polyak={polyak[0]!r} but this muP optimizer has polyak={polyak[1]!r}: "
            "build it with the same polyak to load it"
        )
    depth = [_depth(side) for side in (saved_groups, groups)]
    if depth[0] != depth[1]:
        raise ValueError(
            f"state_dict was saved with (depth_mult, depth_alpha)={depth[0]!r} but this muP optimizer has "
            f"{depth[1]!r}: build it with the same depth_mult and depth_alpha to load it"
        )
    if len(saved_groups) != len(groups):
        raise ValueError(
            f"state_dict has {len(saved_groups)} parameter groups but this muP optimizer has {len(groups)}: "
            "it was saved from an optimizer with a different muP grouping"
        )
    for index, (saved, current) in enumerate(zip(saved_groups, groups)):
        if any(key not in saved and key not in SIGNATURE_DEFAULTS for key in GROUP_SIGNATURE):
            raise ValueError(f"state_dict group {index} has no muP signature: it was not saved by a muP factory")
        for key in GROUP_SIGNATURE:
            was, now = (group.get(key, SIGNATURE_DEFAULTS.get(key)) for group in (saved, current))
            if was != now:
                raise ValueError(
                    f"state_dict group {index} has {key}={was!r} but this optimizer's group {index} has "
                    f"{now!r}: the muP grouping differs, so state would attach to the wrong parameters"
                )
        if len(saved["params"]) != len(current["params"]):
            raise ValueError(
                f"state_dict group {index} ({saved['mup_role']}) has {len(saved['params'])} parameters, this "
                f"optimizer's has {len(current['params'])}"
            )
        saved_names, names = saved.get("param_names"), current.get("param_names")
        if saved_names is not None and names is not None and list(saved_names) != list(names):
            raise ValueError(
                f"state_dict group {index} holds parameters {list(saved_names)} but this optimizer's group {index} "
                f"holds {list(names)}"
            )


def grouping_guard(optimizer: torch.optim.Optimizer) -> Callable[..., None]:
    """Register on ``optimizer`` a load_state_dict pre-hook that runs :func:`check_same_grouping`.

    It runs before any other pre-hook: a different grouping is the first thing to report.

    Works for any ``torch.optim.Optimizer`` (ours, the published schedule-free classes, torch's).

    Args:
        optimizer: an optimizer built from :func:`mu_param_groups`.

    Returns:
        The handle's ``remove`` function.
    """
    handle = optimizer.register_load_state_dict_pre_hook(_check_hook, prepend=True)
    return handle.remove


def _check_hook(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
    check_same_grouping(state_dict["param_groups"], optimizer.param_groups)


# Classes of the published schedulefree package, by name (it is an optional dependency).
PUBLISHED_SGD_LIKE = ("SGDScheduleFree", "SGDScheduleFreeClosure", "SGDScheduleFreeReference")
PUBLISHED_ADAM_LIKE = ("AdamWScheduleFree", "AdamWScheduleFreeClosure", "AdamWScheduleFreeReference",
                       "AdamWScheduleFreePaper", "RAdamScheduleFree", "RAdamScheduleFreeClosure")


def infer_rule(optimizer_class: type) -> str | None:
    """The muP rule an optimizer class follows, or None when it is not known.

    A class states its rule in a ``mup_rule`` attribute ("adam", "sgd" or "muon"), as this
    package's optimizers do. Otherwise torch.optim's and the published ``schedulefree`` package's
    classes are known: SGD-like ones follow "sgd", Adam-like ones (entrywise-normalised updates)
    "adam", torch.optim.Muon "muon".

    Args:
        optimizer_class: an optimizer class.

    Returns:
        The rule, or None when the class is not a class, or neither states nor has a known rule.

    Raises:
        ValueError: the class states a ``mup_rule`` that is not one of :data:`RULES`.
    """
    if not isinstance(optimizer_class, type):
        return None
    stated = getattr(optimizer_class, "mup_rule", None)
    if stated is not None:
        check_rule(f"{optimizer_class.__name__}.mup_rule", stated)
        return stated
    optim = torch.optim
    sgd_like = [optim.SGD, optim.ASGD]
    adam_like = [optim.Adam, optim.AdamW, optim.RAdam, optim.NAdam, optim.Adamax, optim.RMSprop, optim.Adagrad]
    published = sys.modules.get("schedulefree")  # loaded whenever one of its classes exists
    if published is not None:
        sgd_like += [getattr(published, name) for name in PUBLISHED_SGD_LIKE if hasattr(published, name)]
        adam_like += [getattr(published, name) for name in PUBLISHED_ADAM_LIKE if hasattr(published, name)]
    if issubclass(optimizer_class, tuple(sgd_like)):
        return "sgd"
    if issubclass(optimizer_class, tuple(adam_like)):
        return "adam"
    muon = getattr(optim, "Muon", None)
    if muon is not None and issubclass(optimizer_class, muon):
        return "muon"
    return None


__all__ = [
    "RULES",
    "ADJUST_LR_FNS",
    "EPS_RULE",
    "Scaling",
    "EpsScaling",
    "DEPTH_ALPHAS",
    "DEPTH_RULE",
    "BLOCK_PREFIX",
    "DepthScaling",
    "depth_scaling",
    "branch_multiplier",
    "check_depth",
    "eps_scaling",
    "polyak_weight",
    "check_scale_eps",
    "check_rule",
    "check_adjust_lr_fn",
    "muon_lr_mult",
    "check_decay_lr_power",
    "parameter_scaling",
    "apply_power",
    "mu_param_groups",
    "split_hidden_matrices",
    "resolve_infshapes",
    "check_same_grouping",
    "grouping_guard",
    "infer_rule",
]
