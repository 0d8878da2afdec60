"""accelerate: ``save_state`` inside ``eval_mode`` writes x, and ``load_state`` + ``train()`` resumes exactly.

The README's recipe, run as written on CPU: train, save through accelerate in eval mode, train on;
then a fresh model and optimizer load the state and must reproduce the same losses bit for bit.
"""
import copy
import importlib

import pytest
import torch
from torch import nn

from mup_schedulefree import AdamWScheduleFree, eval_mode


def _import_accelerate():
    try:
        return importlib.import_module("accelerate"), importlib.import_module("safetensors.torch")
    except ImportError as error:
        pytest.skip(f"accelerate not importable ({error}): pip install 'mup_schedulefree[hf]'")


def _setup(accelerate):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    optimizer = AdamWScheduleFree(model.parameters(), lr=1e-2, warmup_steps=2)
    accelerator = accelerate.Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer


def _train(accelerator, model, optimizer, batches):
    losses = []
    for inputs, targets in batches:
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(inputs), targets)
        accelerator.backward(loss)
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_save_state_in_eval_mode_holds_x_and_resume_continues_bit_identically(tmp_path):
    accelerate, safetensors_torch = _import_accelerate()
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 4, generator=generator), torch.randn(8, 1, generator=generator)) for _ in range(8)]

    accelerator, model, optimizer = _setup(accelerate)
    _train(accelerator, model, optimizer, batches[:4])
    model_copy, optimizer_copy = copy.deepcopy((model, optimizer.optimizer))
    optimizer_copy.eval()
    x = model_copy.state_dict()
    y = {k: v.clone() for k, v in model.state_dict().items()}
    with eval_mode(model, optimizer):
        accelerator.save_state(str(tmp_path))
    assert optimizer.optimizer.train_mode
    continued = _train(accelerator, model, optimizer, batches[4:])

    saved = safetensors_torch.load_file(str(tmp_path / "model.safetensors"))
    assert saved.keys() == x.keys()
    assert all(torch.equal(saved[k], x[k]) for k in x)
    assert any(not torch.equal(saved[k], y[k]) for k in y), "x equals y: the check is vacuous"

    accelerator, model, optimizer = _setup(accelerate)
    accelerator.load_state(str(tmp_path))
    optimizer.train()                              # saved in eval mode, so it loads in eval mode
    assert _train(accelerator, model, optimizer, batches[4:]) == continued
