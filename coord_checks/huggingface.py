"""A Hugging Face model as a ``width -> model`` factory for coordinate checks (needs ``transformers``).

``causal_lm_factory(config, width_field="n_embd", base_width=64)`` returns ``make_model(width)``
that builds ``AutoModelForCausalLM.from_config`` with the config's width field set to ``width`` and
makes it muP-ready:

* a readout tied to the input embedding (GPT-2's ``lm_head``) becomes ``mup.MuSharedReadout``
  (``mup_schedulefree.integrations.transformers.tie_mu_readout``), which divides the logits by the
  width multiplier;
* with ``base_width``: base shapes are set from the same config at ``base_width`` and twice it
  (built on the meta device); weights with two width-dependent dimensions are rescaled by
  ``1 / sqrt(width_mult)`` (muP's fan-in initialisation, equal to the config's at the base width);
  and every attention module with ``scaling`` and ``head_dim`` attributes (GPT-2, Llama and most
  current ``transformers`` models) gets muP's ``sqrt(base head_dim) / head_dim`` logit scale
  (``1 / head_dim`` growth instead of ``1 / sqrt(head_dim)``; the same as the config's at the base
  width).

The head count stays fixed, so widths must be multiples of it. Set the config's dropout
probabilities to 0 for a check: dropout makes every forward pass random.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Callable

import mup
import torch
from torch import nn

from mup_schedulefree.integrations.transformers import tie_mu_readout


def _build(config: Any, width_field: str, width: int, model_class: Any) -> nn.Module:
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    setattr(config, width_field, width)
    model = AutoModelForCausalLM.from_config(config) if model_class is None else model_class(config)
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and embedding is not None and head.weight is embedding.weight:
        tie_mu_readout(model)
    return model


def causal_lm_factory(
    config: Any,
    width_field: str = "n_embd",
    base_width: int | None = None,
    model_class: Any = None,
) -> Callable[[int], nn.Module]:
    """A ``make_model(width)`` for a Hugging Face causal language model.

    Args:
        config: a ``transformers.PretrainedConfig`` (e.g. ``GPT2Config(n_layer=2, n_head=4, ...)``);
            it is copied, never changed.
        width_field: the config attribute that is the width (``n_embd`` for GPT-2,
            ``hidden_size`` for Llama-like configs).
        base_width: if given, base shapes, muP initialisation and attention scale are set (see the
            module docstring); otherwise the model comes without base shapes (pass ``base_width``
            to the check instead, which sets the shapes only).
        model_class: the model class (default ``AutoModelForCausalLM.from_config``).

    Returns:
        ``make_model(width) -> nn.Module``; the model returns a ``ModelOutput`` whose ``.logits``
        the built-in losses use.

    Raises:
        ValueError: if the config has no attribute ``width_field`` or ``base_width`` is not a
            positive int.
    """
    if not hasattr(config, width_field):
        raise ValueError(f"width_field: config {type(config).__name__} has no attribute {width_field!r}")
    if base_width is not None and (not isinstance(base_width, int) or base_width <= 0):
        raise ValueError(f"base_width must be a positive int, got {base_width!r}")

    def make_model(width: int) -> nn.Module:
        model = _build(config, width_field, width, model_class)
        if base_width is None:
            return model
        with torch.device("meta"):
            base = mup.get_shapes(_build(config, width_field, base_width, model_class))
            delta = mup.get_shapes(_build(config, width_field, 2 * base_width, model_class))
        mup.set_base_shapes(model, base, delta=delta, rescale_params=False)  # keeps the tied embedding
        for p in model.parameters():
            if p.infshape.ninf() == 2:
                p.data /= math.sqrt(p.infshape.width_mult())
        for module in model.modules():
            if hasattr(module, "scaling") and hasattr(module, "head_dim"):
                base_head_dim = module.head_dim * base_width / width
                module.scaling = math.sqrt(base_head_dim) / module.head_dim
        return model

    make_model.__qualname__ = f"causal_lm_factory({type(config).__name__}, {width_field!r})"
    return make_model

