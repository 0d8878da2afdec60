"""Example models for coordinate checks, each buildable in muP or in standard parametrization (SP).

How the two parametrizations differ, model by model (following microsoft/mup's examples):

=========================  ====================================  ==================================
piece                      muP (``parametrization="mup"``)        SP (``parametrization="sp"``)
=========================  ====================================  ==================================
base shapes                ``mup.set_base_shapes(model, base,     ``mup.set_base_shapes(model,
                           delta=...)`` from the same class at    None)``: every width_mult is 1,
                           ``base_width`` and ``2 * base_width``  so a muP optimizer factory
                                                                  reduces to the plain optimizer
readout                    ``mup.MuReadout`` (PyTorch init;       ``nn.Linear`` with PyTorch init
                           logits scaled by 1/width_mult)
attention logits           ``attn_mult * q.k / head_dim`` with    ``q.k / sqrt(head_dim)``
                           ``attn_mult = sqrt(base head_dim)``
                           (equal to SP at the base width)
query projection           PyTorch init                           PyTorch init
everything else            PyTorch default init (fan-in scaled,   the same
                           which is already muP-correct for
                           input and hidden weights); mup
                           rescales Linear/Conv biases
=========================  ====================================  ==================================

muP's readout and query can instead start at zero (``zero_init``, as in mup's examples). The default
leaves them at PyTorch's initialisation because that trains better: tuned at the base width only,
muP then matches SP tuned at every width, while a zero readout costs 0.07-0.13 in test loss
(README, "Does it pay off?"). At initialisation the readout's and the attention logits' values
then shrink like 1/sqrt(width), as muP intends; the coordinate check does not judge that step.

Width is the hidden size (MLP), the channel count (CNN) or ``d_model`` (Transformer, whose head
count is fixed so that ``head_dim`` grows with width, as in mup's Transformer example).

Module names the verdict relies on: every model calls its output layer ``readout``, and the
Transformer routes its attention logits through an ``nn.Identity`` named ``attn_logits`` so that a
forward hook can see them.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import mup
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from coord_checks.choices import check_choice
from coord_checks.data import VOCAB_SIZE

PARAMETRIZATIONS: tuple[str, ...] = ("mup", "sp")
MODEL_NAMES: tuple[str, ...] = ("mlp", "cnn", "transformer")
#: Width at which muP and SP models coincide (width_mult = 1), per example model.
BASE_WIDTHS: dict[str, int] = {"mlp": 64, "cnn": 16, "transformer": 32}
#: Attention heads of the example Transformer, fixed across widths (its widths must be multiples).
N_HEADS = 4


def check_parametrization(parametrization: str) -> str:
    """Validate a parametrization name.

    Args:
        parametrization: ``"mup"`` or ``"sp"``.

    Returns:
        The name, unchanged.

    Raises:
        ValueError: for any other name.
    """
    return check_choice("parametrization", parametrization, PARAMETRIZATIONS)


def _readout(width: int, d_out: int, parametrization: str, bias: bool = True, zero_init: bool = False,
             output_mult: float = 1.0) -> nn.Linear:
    if parametrization == "mup":
        return mup.MuReadout(width, d_out, bias=bias, readout_zero_init=zero_init, output_mult=output_mult)
    return nn.Linear(width, d_out, bias=bias)


ZERO_INIT_PARTS: tuple[str, ...] = ("readout", "query")


def _zeroed(zero_init: bool | str, part: str) -> bool:
    """Whether ``part`` ("readout" or "query") starts at zero: True zeroes both, False neither, a name that one."""
    return zero_init is True or zero_init == part


def _check_knobs(parametrization: str, zero_init: bool | str, **multipliers: float | None) -> None:
    """The muP knobs exist in muP only, the multipliers must be positive, zero_init a bool or a part."""
    if not isinstance(zero_init, bool) and zero_init not in ZERO_INIT_PARTS:
        raise ValueError(f"zero_init must be True, False or one of {ZERO_INIT_PARTS}, got {zero_init!r}")
    for name, value in multipliers.items():
        if value is not None and not (isinstance(value, (int, float)) and 0 < value < math.inf):
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    if parametrization == "sp" and (zero_init is not False or any(
            value not in (None, 1.0) for name, value in multipliers.items() if name != "attn_mult")
            or multipliers.get("attn_mult") is not None):
        raise ValueError("zero_init, input_mult, output_mult and attn_mult are muP knobs: "
                         "leave them at their defaults with parametrization='sp'")


class MLP(nn.Module):
    """ReLU multilayer perceptron: input layer, ``n_hidden`` width-by-width layers, readout.

    Args:
        width: hidden size.
        d_in: input features.
        d_out: outputs (logits).
        n_hidden: number of hidden width-by-width layers.
        parametrization: ``"mup"`` or ``"sp"`` (see the module docstring).
        zero_init: muP only: initialise the readout to zero (mup's ``readout_zero_init``; ``"readout"``
            is the same, ``"query"`` and the default ``False`` leave it at PyTorch's init).
        input_mult: muP only: multiplier of the input layer's output.
        output_mult: muP only: ``MuReadout``'s ``output_mult`` (logits scaled by it over width_mult).
    """

    def __init__(
        self, width: int, d_in: int, d_out: int, n_hidden: int = 2, parametrization: str = "mup",
        zero_init: bool | str = False, input_mult: float = 1.0, output_mult: float = 1.0,
    ) -> None:
        super().__init__()
        check_parametrization(parametrization)
        _check_knobs(parametrization, zero_init, input_mult=input_mult, output_mult=output_mult)
        self.input_mult = input_mult
        self.input = nn.Linear(d_in, width, bias=False)
        self.hidden = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(n_hidden))
        self.readout = _readout(width, d_out, parametrization, bias=False,
                                zero_init=_zeroed(zero_init, "readout"), output_mult=output_mult)

    def forward(self, x: Tensor) -> Tensor:
        """Logits over the vocabulary for one-hot character contexts."""
        h = self.input(x)
        if self.input_mult != 1.0:
            h = h * self.input_mult
        h = F.relu(h)
        for layer in self.hidden:
            h = F.relu(layer(h))
        return self.readout(h)


class SmallCNN(nn.Module):
    """Two 3x3 convolutions with BatchNorm and ReLU, global average pooling, readout.

    Args:
        width: channels of both convolutions.
        in_channels: image channels.
        n_classes: outputs (logits).
        parametrization: ``"mup"`` or ``"sp"`` (see the module docstring).
        zero_init: muP only: initialise the readout to zero (``True`` or ``"readout"``; the default
            ``False`` and ``"query"`` leave it at PyTorch's init).
    """

    def __init__(
        self, width: int, in_channels: int = 3, n_classes: int = 10, parametrization: str = "mup",
        zero_init: bool | str = False,
    ) -> None:
        super().__init__()
        check_parametrization(parametrization)
        _check_knobs(parametrization, zero_init)
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, stride=2)
        self.bn2 = nn.BatchNorm2d(width)
        self.readout = _readout(width, n_classes, parametrization, zero_init=_zeroed(zero_init, "readout"))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits for a batch of images."""
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        return self.readout(h.mean(dim=(2, 3)))


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate query, key and value projections.

    Args:
        d_model: model width.
        n_heads: number of heads (fixed across widths, so ``head_dim`` grows with width).
        parametrization: ``"mup"`` (logits scaled by ``attn_mult / head_dim``) or
            ``"sp"`` (logits scaled by ``1 / sqrt(head_dim)``).
        attn_mult: numerator of the muP logit scale; ignored in SP.
        zero_init: muP only: initialise the query projection to zero (default: PyTorch's init).
    """

    def __init__(self, d_model: int, n_heads: int, parametrization: str, attn_mult: float,
                 zero_init: bool = False) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.query = nn.Linear(d_model, d_model, bias=False)
        self.key = nn.Linear(d_model, d_model, bias=False)
        self.value = nn.Linear(d_model, d_model, bias=False)
        self.attn_logits = nn.Identity()
        self.out = nn.Linear(d_model, d_model, bias=False)
        if parametrization == "mup":
            self.scale = attn_mult / self.head_dim
            if zero_init:
                nn.init.zeros_(self.query.weight)
        else:
            self.scale = 1.0 / math.sqrt(self.head_dim)

    def forward(self, x: Tensor) -> Tensor:
        """Causal self-attention over a batch of sequences (logits pass through the attn_logits identity, for recording)."""
        batch, seq, d_model = x.shape

        def heads(t: Tensor) -> Tensor:
            return t.view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        logits = self.attn_logits(q @ k.transpose(-2, -1) * self.scale)
        causal = torch.ones(seq, seq, dtype=torch.bool, device=x.device).tril()
        weights = logits.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        mixed = (weights @ v).transpose(1, 2).reshape(batch, seq, d_model)
        return self.out(mixed)


class FeedForward(nn.Module):
    """Transformer MLP: ``d_model -> 4 d_model -> d_model`` with GELU."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, 4 * d_model, bias=False)
        self.proj = nn.Linear(4 * d_model, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """The position-wise MLP of a block."""
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-LayerNorm Transformer block."""

    def __init__(self, d_model: int, n_heads: int, parametrization: str, attn_mult: float,
                 zero_init: bool = False) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, parametrization, attn_mult, zero_init)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = FeedForward(d_model)

    def forward(self, x: Tensor) -> Tensor:
        """Pre-LayerNorm residual block: attention then feed-forward."""
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """GPT-style decoder-only Transformer over characters.

    Args:
        width: ``d_model``.
        vocab_size: token vocabulary.
        max_seq_len: longest sequence (size of the learned position embedding).
        n_layers: Transformer blocks.
        n_heads: attention heads (fixed across widths).
        parametrization: ``"mup"`` or ``"sp"`` (see the module docstring).
        base_width: the ``d_model`` at which muP's attention scale equals SP's.
        zero_init: muP only: initialise the readout and every query projection to zero (True),
            neither (False, the default), or only ``"readout"`` or only ``"query"``.
        input_mult: muP only: multiplier of the summed token and position embeddings.
        output_mult: muP only: ``MuReadout``'s ``output_mult``.
        attn_mult: muP only: numerator of the attention-logit scale ``attn_mult / head_dim``
            (default ``sqrt(base_width / n_heads)``, SP's scale at the base width).
    """

    def __init__(
        self,
        width: int,
        vocab_size: int = VOCAB_SIZE,
        max_seq_len: int = 32,
        n_layers: int = 2,
        n_heads: int = N_HEADS,
        parametrization: str = "mup",
        base_width: int = BASE_WIDTHS["transformer"],
        zero_init: bool | str = False,
        input_mult: float = 1.0,
        output_mult: float = 1.0,
        attn_mult: float | None = None,
    ) -> None:
        super().__init__()
        check_parametrization(parametrization)
        _check_knobs(parametrization, zero_init, input_mult=input_mult, output_mult=output_mult,
                     attn_mult=attn_mult)
        attn_mult = math.sqrt(base_width / n_heads) if attn_mult is None else attn_mult
        self.input_mult = input_mult
        self.tok_emb = nn.Embedding(vocab_size, width)
        self.pos_emb = nn.Embedding(max_seq_len, width)
        self.blocks = nn.ModuleList(
            Block(width, n_heads, parametrization, attn_mult, _zeroed(zero_init, "query")) for _ in range(n_layers)
        )
        self.ln_f = nn.LayerNorm(width)
        self.readout = _readout(width, vocab_size, parametrization, bias=False,
                                zero_init=_zeroed(zero_init, "readout"), output_mult=output_mult)

    def forward(self, tokens: Tensor) -> Tensor:
        """Next-character logits for every position of a batch of token sequences."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        h = self.tok_emb(tokens) + self.pos_emb(positions)
        if self.input_mult != 1.0:
            h = h * self.input_mult
        for block in self.blocks:
            h = block(h)
        return self.readout(self.ln_f(h))


_CLASSES: dict[str, type[nn.Module]] = {"mlp": MLP, "cnn": SmallCNN, "transformer": GPT}


def build_model(
    name: str,
    width: int,
    parametrization: str = "mup",
    base_width: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build an example model with its base shapes set (``p.infshape`` on every parameter).

    Seed the global generator (``torch.manual_seed``) before calling for a reproducible init.

    Args:
        name: ``"mlp"``, ``"cnn"`` or ``"transformer"``.
        width: hidden size / channels / ``d_model``.
        parametrization: ``"mup"`` or ``"sp"``.
        base_width: muP base width (default ``BASE_WIDTHS[name]``); unused by SP except as the
            Transformer's attention reference.
        **kwargs: passed to the model class (e.g. ``d_in``/``d_out`` for the MLP,
            ``n_layers``/``max_seq_len`` for the Transformer).

    Returns:
        The model, in train mode, on the CPU.

    Raises:
        ValueError: for an unknown name or parametrization, or a non-positive width.
    """
    if name not in _CLASSES:
        raise ValueError(f"name must be one of {MODEL_NAMES}, got {name!r}")
    check_parametrization(parametrization)
    base_width = BASE_WIDTHS[name] if base_width is None else base_width
    for arg, value in (("width", width), ("base_width", base_width)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{arg} must be a positive int, got {value!r}")
    if name == "transformer":
        kwargs = {"base_width": base_width, **kwargs}
    cls = _CLASSES[name]

    def make(w: int) -> nn.Module:
        return cls(w, parametrization=parametrization, **kwargs)

    if parametrization == "sp":
        return mup.set_base_shapes(make(width), None)
    base_shapes = _shapes_on_meta(make, base_width)
    delta_shapes = _shapes_on_meta(make, 2 * base_width)
    return mup.set_base_shapes(make(width), base_shapes, delta=delta_shapes)


def _shapes_on_meta(make: Callable[[int], nn.Module], width: int) -> dict[str, torch.Size]:
    """Parameter shapes of ``make(width)``, built on the meta device (no memory, no RNG draws)."""
    with torch.device("meta"):
        return mup.get_shapes(make(width))
