"""Deterministic data for coordinate checks and learning-rate sweeps, with nothing to download.

Text comes from the Python standard library's own source files (found through ``importlib``), so
every machine with Python has it; the exact characters depend on the Python version, which is
fine for comparisons made within one run. Characters are mapped onto a fixed 96-symbol vocabulary
(printable ASCII plus newline), so model shapes never depend on the corpus.

A *batch* is a pair ``(inputs, targets)`` of tensors; a batch list is what the recording and
sweep loops consume (step ``t`` uses ``batches[(t - 1) % len(batches)]``).
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

Batch = tuple[Tensor, Tensor]

#: Pure-Python standard-library modules whose source files make up the default text corpus.
STDLIB_MODULES: tuple[str, ...] = (
    "argparse",
    "textwrap",
    "difflib",
    "heapq",
    "fractions",
    "statistics",
    "calendar",
    "dataclasses",
    "enum",
    "shlex",
)

#: The fixed vocabulary: newline followed by the 95 printable ASCII characters.
VOCAB: str = "\n" + "".join(chr(c) for c in range(32, 127))
VOCAB_SIZE: int = len(VOCAB)
_UNKNOWN = VOCAB.index("?")
_LOOKUP = {ch: i for i, ch in enumerate(VOCAB)}


def stdlib_text(modules: Sequence[str] = STDLIB_MODULES, max_chars: int | None = None) -> str:
    """Concatenated source code of standard-library modules, read from their installed files.

    Args:
        modules: importable module names; modules without a readable ``.py`` source are skipped.
        max_chars: if given, truncate the text to this many characters.

    Returns:
        The sources joined by blank lines, in the order given.

    Raises:
        ValueError: if ``max_chars`` is not positive or no module source could be read.
    """
    if max_chars is not None and max_chars <= 0:
        raise ValueError(f"max_chars must be positive, got {max_chars}")
    parts = []
    for name in modules:
        spec = importlib.util.find_spec(name)
        origin = None if spec is None else spec.origin
        if origin is None or not origin.endswith(".py") or not Path(origin).is_file():
            logger.warning("no Python source for module %r; skipped", name)
            continue
        parts.append(Path(origin).read_text(encoding="utf-8"))
    if not parts:
        raise ValueError(f"modules: no readable source among {list(modules)}")
    text = "\n\n".join(parts)
    return text if max_chars is None else text[:max_chars]


def encode(text: str) -> Tensor:
    """Map text onto ``VOCAB`` indices (tabs become spaces, other symbols become ``?``).

    Args:
        text: any string.

    Returns:
        A 1-D int64 tensor of the same length as ``text``.
    """
    text = text.replace("\t", " ")
    return torch.tensor([_LOOKUP.get(ch, _UNKNOWN) for ch in text], dtype=torch.long)


def split_tokens(tokens: Tensor, held_out_fraction: float = 0.1) -> tuple[Tensor, Tensor]:
    """Split a token stream into a training head and a held-out tail.

    Args:
        tokens: 1-D token tensor.
        held_out_fraction: share of the stream, taken from its end, kept for evaluation.

    Returns:
        ``(train_tokens, held_out_tokens)``.

    Raises:
        ValueError: if ``held_out_fraction`` is not strictly between 0 and 1.
    """
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    cut = int(len(tokens) * (1.0 - held_out_fraction))
    return tokens[:cut], tokens[cut:]


def _window_starts(n_tokens: int, length: int, count: int, seed: int) -> Tensor:
    if n_tokens <= length:
        raise ValueError(f"token stream of length {n_tokens} is too short for windows of {length}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_tokens - length, (count,), generator=generator)


def char_sequence_batches(
    tokens: Tensor, seq_len: int, batch_size: int, n_batches: int, seed: int = 0
) -> list[Batch]:
    """Next-character batches for a sequence model: random windows of the token stream.

    Args:
        tokens: 1-D token tensor (see ``encode``).
        seq_len: characters per sequence.
        batch_size: sequences per batch.
        n_batches: number of batches.
        seed: seed of the window positions.

    Returns:
        ``n_batches`` pairs ``(inputs, targets)`` of int64 tensors of shape
        ``(batch_size, seq_len)``, where ``targets`` is ``inputs`` shifted by one character.
    """
    _check_positive(seq_len=seq_len, batch_size=batch_size, n_batches=n_batches)
    starts = _window_starts(len(tokens), seq_len + 1, batch_size * n_batches, seed)
    windows = torch.stack([tokens[s : s + seq_len + 1] for s in starts.tolist()])
    windows = windows.view(n_batches, batch_size, seq_len + 1)
    return [(w[:, :-1].contiguous(), w[:, 1:].contiguous()) for w in windows]


def char_context_batches(
    tokens: Tensor, context: int, batch_size: int, n_batches: int, seed: int = 0
) -> list[Batch]:
    """Next-character batches for a feed-forward model: one-hot contexts of fixed length.

    Args:
        tokens: 1-D token tensor (see ``encode``).
        context: characters of context before the predicted one.
        batch_size: examples per batch.
        n_batches: number of batches.
        seed: seed of the context positions.

    Returns:
        ``n_batches`` pairs ``(inputs, targets)``: float32 inputs of shape
        ``(batch_size, context * VOCAB_SIZE)`` (concatenated one-hot characters, scaled by
        ``sqrt(VOCAB_SIZE)`` so every input coordinate has unit mean square, like standardised
        features) and int64 targets of shape ``(batch_size,)``.
    """
    _check_positive(context=context, batch_size=batch_size, n_batches=n_batches)
    starts = _window_starts(len(tokens), context + 1, batch_size * n_batches, seed)
    windows = torch.stack([tokens[s : s + context + 1] for s in starts.tolist()])
    one_hot = torch.nn.functional.one_hot(windows[:, :-1], VOCAB_SIZE).float() * VOCAB_SIZE**0.5
    inputs = one_hot.reshape(n_batches, batch_size, context * VOCAB_SIZE)
    targets = windows[:, -1].reshape(n_batches, batch_size)
    return list(zip(inputs.unbind(0), targets.unbind(0)))


def gaussian_image_batches(
    channels: int,
    size: int,
    n_classes: int,
    batch_size: int,
    n_batches: int,
    seed: int = 0,
) -> list[Batch]:
    """Synthetic image-classification batches: Gaussian images labelled by a fixed linear teacher.

    Args:
        channels: image channels.
        size: image height and width.
        n_classes: number of labels.
        batch_size: images per batch.
        n_batches: number of batches.
        seed: seed of the images and of the teacher.

    Returns:
        ``n_batches`` pairs of float32 images ``(batch_size, channels, size, size)`` and int64
        labels ``(batch_size,)``.
    """
    _check_positive(
        channels=channels, size=size, n_classes=n_classes, batch_size=batch_size, n_batches=n_batches
    )
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n_batches, batch_size, channels, size, size, generator=generator)
    teacher = torch.randn(channels * size * size, n_classes, generator=generator)
    labels = (images.flatten(2) @ teacher).argmax(-1)
    return list(zip(images.unbind(0), labels.unbind(0)))


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
