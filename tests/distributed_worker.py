"""Worker side of tests/test_distributed.py: two gloo processes on CPU train the muP test model.

:func:`run` is the function ``torch.multiprocessing.start_processes`` spawns. It runs every
scenario once, writes what it measured with ``torch.save`` to ``<out_dir>/<scenario>_rank<r>.pt``
(a dict of tensors and strings, or ``{"error": traceback}`` when the scenario raised), and tears
the process group down in the order that does not abort at exit. :func:`reference_run` is the
single-process run on the full batch that every scenario is compared with; the test process
calls it, so the reference never touches torch.distributed.

Every scenario trains ``mup_models.mixed_net()`` for STEPS steps (MSE loss, the full batch of
``2 * HALF`` rows split by rank) and after CHECKPOINT_AT steps calls optimizer.eval() on every
rank, writes a checkpoint, and calls optimizer.train() on every rank:

    ddp_adamw, ddp_sgd   DDP with MuAdamW_ScheduleFree / MuSGD_ScheduleFree; rank 0 writes
                         save_checkpoint. Records parameters at y and at x, and the file.
    fsdp2_adamw          fully_shard per block and at the root; MuAdamW_ScheduleFree built from
                         the sharded named_parameters() with infshapes captured before sharding;
                         the checkpoint goes through torch.distributed.checkpoint. Records full
                         tensors at y and at x, the same for a fresh sharded model and optimizer
                         resumed from the checkpoint, the factory's error without infshapes, and
                         the tensor types of parameters and of z.
    fsdp2_wrapper        the same sharding with MuScheduleFreeWrapper around torch.optim.Adam, whose
                         own passes update the local shards; records full tensors at y and at x
                         and the tensor type of z.
"""
from __future__ import annotations

import datetime
import gc
import os
import traceback
from pathlib import Path
from typing import Any, Callable

import mup
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mup_models import D_IN, D_OUT, mixed_net
from mup_schedulefree import MuAdamW_ScheduleFree, MuScheduleFreeWrapper, MuSGD_ScheduleFree, save_checkpoint

WORLD_SIZE = 2
HALF = 8                     # rows per rank; the reference run sees 2 * HALF
STEPS = 8                    # training steps per scenario
CHECKPOINT_AT = 5            # DDP scenarios: eval(), save on rank 0, train() after this many steps
MODEL_SEED = 0
DATA_SEED = 4321
TIMEOUT = datetime.timedelta(seconds=30)   # any collective that waits longer raises

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": lambda params, **kw: MuAdamW_ScheduleFree(params, lr=1e-2, weight_decay=0.1, warmup_steps=2, **kw),
    "sgd": lambda params, **kw: MuSGD_ScheduleFree(params, lr=0.05, weight_decay=0.1, **kw),
    "wrapper": lambda params, **kw: MuScheduleFreeWrapper(params, torch.optim.Adam, lr=1e-2, betas=(0.0, 0.999),
                                                          weight_decay_at_y=0.1, **kw),
}


def batches(steps: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The full batches, ``2 * HALF`` rows each, from a fixed generator."""
    gen = torch.Generator().manual_seed(DATA_SEED)
    return [(torch.randn(2 * HALF, D_IN, generator=gen), torch.randn(2 * HALF, D_OUT, generator=gen))
            for _ in range(steps)]


def named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the parameters by name; DTensors are gathered with ``full_tensor()``
    (a collective: every rank must call this)."""
    out = {}
    for name, p in model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = full.detach().clone()
    return out


def reference_run(optimizer: str) -> dict[str, dict[str, torch.Tensor]]:
    """The single-process run on the full batch, with the scenarios' eval()/train() after
    CHECKPOINT_AT steps: parameters at y after STEPS steps, and at x.

    Args:
        optimizer: key of :data:`OPTIMIZERS`.
    """
    model = mixed_net(seed=MODEL_SEED)
    opt = OPTIMIZERS[optimizer](model.named_parameters())
    for step, (x, y) in enumerate(batches()):
        if step == CHECKPOINT_AT:
            opt.eval()
            opt.train()
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    at_y = named_tensors(model)
    opt.eval()
    return {"y": at_y, "x": named_tensors(model)}


def _train(model: nn.Module, opt: torch.optim.Optimizer, rank: int,
           data: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """One step per batch of ``data`` on this rank's rows (``model`` is the DDP or sharded module)."""
    rows = slice(rank * HALF, (rank + 1) * HALF)
    for x, y in data:
        opt.zero_grad()
        F.mse_loss(model(x[rows]), y[rows]).backward()
        opt.step()


def _at_y_and_x(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, dict[str, torch.Tensor]]:
    """Full parameters now (at y), then after optimizer.eval() (at x); every rank must call this."""
    at_y = named_tensors(model)
    opt.eval()
    return {"y": at_y, "x": named_tensors(model)}


def _ddp(rank: int, optimizer: str, out_dir: Path) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = mixed_net(seed=MODEL_SEED)
    ddp = DDP(model)
    opt = OPTIMIZERS[optimizer](model.named_parameters())
    checkpoint = out_dir / f"ddp_{optimizer}.ckpt"
    data = batches()
    _train(ddp, opt, rank, data[:CHECKPOINT_AT])
    opt.eval()
    if rank == 0:
        save_checkpoint(checkpoint, model, opt)
    dist.barrier()
    opt.train()
    _train(ddp, opt, rank, data[CHECKPOINT_AT:])
    return {**_at_y_and_x(model, opt), "checkpoint": str(checkpoint)}


def _freeze_readout_width_mult(model: nn.Module) -> None:
    """Fix every MuReadout's width multiplier as a constant before sharding.

    mup's ``MuReadout.forward`` divides by ``self.weight.infshape.width_mult()``; fully_shard
    replaces the weight by a DTensor without ``infshape``, so the forward would fail its assert.
    """
    for module in model.modules():
        if isinstance(module, mup.MuReadout):
            width_mult = module.width_mult()
            module.width_mult = lambda width_mult=width_mult: width_mult


def _sharded(seed: int, optimizer: str = "adamw") -> tuple[nn.Module, torch.optim.Optimizer, str]:
    """mixed_net(seed) sharded with fully_shard per block and at the root, and its optimizer.

    Returns:
        The model, the ``optimizer`` factory's optimizer built from the sharded
        ``named_parameters()`` with infshapes captured before sharding, and the message of the
        ValueError MuAdamW_ScheduleFree raises without them.
    """
    from torch.distributed.fsdp import fully_shard

    model = mixed_net(seed=seed)
    infshapes = mup.get_infshapes(model)
    _freeze_readout_width_mult(model)
    for block in (model.hidden, model.up, model.down):
        fully_shard(block)
    fully_shard(model)
    try:
        OPTIMIZERS["adamw"](model.named_parameters())
        missing_infshape_error = "no error raised"
    except ValueError as error:
        missing_infshape_error = str(error)
    return model, OPTIMIZERS[optimizer](model.named_parameters(), infshapes=infshapes), missing_infshape_error


def _fsdp2(rank: int, out_dir: Path) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    checkpoint = str(out_dir / "fsdp2_dcp")
    data = batches()
    model, opt, missing_infshape_error = _sharded(MODEL_SEED)
    _train(model, opt, rank, data[:CHECKPOINT_AT])
    opt.eval()
    model_state, optim_state = get_state_dict(model, opt)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=checkpoint)
    opt.train()
    parameter_types = sorted({type(p).__name__ for p in model.parameters()})
    z_types = sorted({type(state["z"]).__name__ for state in opt.state.values()})
    _train(model, opt, rank, data[CHECKPOINT_AT:])
    uninterrupted = _at_y_and_x(model, opt)
    del model, opt, model_state, optim_state

    fresh, fresh_opt, _ = _sharded(MODEL_SEED + 1)
    model_state, optim_state = get_state_dict(fresh, fresh_opt)
    loaded = {"model": model_state, "optim": optim_state}
    dcp.load(loaded, checkpoint_id=checkpoint)
    set_state_dict(fresh, fresh_opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    mode_after_load = "train" if fresh_opt.train_mode else "eval"
    fresh_opt.train()
    _train(fresh, fresh_opt, rank, data[CHECKPOINT_AT:])
    resumed = _at_y_and_x(fresh, fresh_opt)
    return {**uninterrupted, "resumed_y": resumed["y"], "resumed_x": resumed["x"],
            "missing_infshape_error": missing_infshape_error, "parameter_types": parameter_types,
            "z_types": z_types, "mode_after_load": mode_after_load}


def _fsdp2_wrapper(rank: int, out_dir: Path) -> dict[str, Any]:
    """The wrapper around torch's Adam on the sharded model, with the eval()/train() switch."""
    data = batches()
    model, opt, _ = _sharded(MODEL_SEED, "wrapper")
    _train(model, opt, rank, data[:CHECKPOINT_AT])
    opt.eval()
    opt.train()
    _train(model, opt, rank, data[CHECKPOINT_AT:])
    z_types = sorted({type(state["z"]).__name__ for state in opt.state.values()})
    return {**_at_y_and_x(model, opt), "z_types": z_types}


SCENARIOS: dict[str, Callable[[int, Path], dict[str, Any]]] = {
    "ddp_adamw": lambda rank, out_dir: _ddp(rank, "adamw", out_dir),
    "ddp_sgd": lambda rank, out_dir: _ddp(rank, "sgd", out_dir),
    "fsdp2_adamw": _fsdp2,
    "fsdp2_wrapper": _fsdp2_wrapper,
}


def run(rank: int, port: int, out_dir: str) -> None:
    """Entry point of one spawned rank (``start_processes`` passes ``rank`` first).

    Args:
        rank: this process's rank.
        port: free TCP port on 127.0.0.1 for the rendezvous.
        out_dir: directory the result files go to.
    """
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=TIMEOUT)
    out = Path(out_dir)
    for name, scenario in SCENARIOS.items():
        try:
            result = scenario(rank, out)
        except Exception:
            result = {"error": traceback.format_exc()}
        torch.save(result, out / f"{name}_rank{rank}.pt")
        del result
        gc.collect()
        dist.barrier()
    # Teardown that does not abort at exit: every model and optimizer is gone (scenario locals,
    # collected above) before the last barrier, then the group is destroyed.
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
