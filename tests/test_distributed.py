"""Data-parallel training on PyTorch's own engines (DDP, FSDP2) equals single-process training.

Two processes with the gloo backend on CPU run :mod:`distributed_worker` once for the whole module
(spawning costs more than every scenario together); each scenario's results come back as files.
The reference is :func:`distributed_worker.reference_run`: one process, the full batch of 16 rows
per step, no torch.distributed. Each rank sees 8 of those rows and the loss is a mean, so the
averaged gradient equals the full-batch gradient up to float rounding. Measured on this machine
after 8 steps: max |distributed - reference| = 1.2e-7 (AdamW) and 6e-8 (SGD), for parameters up
to 1.0 in magnitude; the tolerance is rtol=1e-5, atol=1e-6. Errors the tests exist for are far
larger: without muP scaling the AdamW parameters end 4e-2 away, with one rank's half batch
(no gradient average) 4e-2, and x and y differ by 4e-3.

A hang cannot outlast the test: collectives time out after 30 s and the test kills the workers
50 s after spawning them.
"""
from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import distributed_worker as worker
from mup_models import mixed_net
from mup_schedulefree import load_checkpoint

RTOL, ATOL = 1e-5, 1e-6
JOIN_TIMEOUT_S = 50.0

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available in this build")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def spawned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run both ranks once; returns their exit codes, whether they were killed, and the output dir."""
    out_dir = tmp_path_factory.mktemp("distributed")
    context = mp.start_processes(worker.run, args=(free_port(), str(out_dir)), nprocs=worker.WORLD_SIZE,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    for process in context.processes:
        process.join(max(0.0, deadline - time.monotonic()))
    killed = [process.pid for process in context.processes if process.is_alive()]
    for process in context.processes:
        if process.is_alive():
            process.kill()
            process.join()
    return {"exit_codes": [process.exitcode for process in context.processes], "killed": killed, "dir": out_dir}


@pytest.fixture(scope="module")
def references() -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """Single-process full-batch runs, by optimizer key."""
    return {name: worker.reference_run(name) for name in worker.OPTIMIZERS}


def results(spawned: dict[str, Any], scenario: str) -> list[dict[str, Any]]:
    """Every rank's result file for ``scenario``; fails with the worker's traceback if it raised."""
    out = []
    for rank in range(worker.WORLD_SIZE):
        path = Path(spawned["dir"]) / f"{scenario}_rank{rank}.pt"
        if not path.exists():
            pytest.fail(f"rank {rank} wrote no result for {scenario} (exit codes {spawned['exit_codes']})")
        result = torch.load(path, weights_only=False)
        if "error" in result:
            pytest.fail(f"{scenario} raised on rank {rank}:\n{result['error']}")
        out.append(result)
    return out


def assert_close_by_name(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert list(got) == list(expected), what
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=RTOL, atol=ATOL, msg=lambda m: f"{what} {name}: {m}")


def test_workers_exit_with_code_zero_after_teardown(spawned):
    """Both ranks finish in time and exit 0 (a SIGABRT at exit would read -6).

    Reference: the teardown in distributed_worker.run (models and optimizers deleted, gc.collect(),
    barrier, destroy_process_group), measured 0/30 aborts against 2/49 for a plain destroy.
    """
    assert spawned["killed"] == [], f"ranks still running after {JOIN_TIMEOUT_S} s were killed: {spawned['killed']}"
    assert spawned["exit_codes"] == [0] * worker.WORLD_SIZE


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_ddp_matches_single_process_full_batch(spawned, references, optimizer):
    """DDP with MuAdamW_ScheduleFree / MuSGD_ScheduleFree after 8 steps, at y and at x.

    Reference: the single-process full-batch run (rtol=1e-5, atol=1e-6). The replicas are
    compared with each other exactly: DDP hands every rank the same averaged gradient.
    """
    ranks = results(spawned, f"ddp_{optimizer}")
    for point in ("y", "x"):
        for name, tensor in ranks[0][point].items():
            assert torch.equal(tensor, ranks[1][point][name]), f"replicas differ at {point}: {name}"
        assert_close_by_name(ranks[0][point], references[optimizer][point], f"DDP {optimizer} at {point}")


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_ddp_checkpoint_from_rank0_resumes_in_one_process(spawned, optimizer):
    """The file rank 0 wrote with save_checkpoint (optimizer.eval() on every rank around it)
    resumes in a single process, fresh model and optimizer, to the DDP run's final y and x.

    Reference: the DDP run itself (rtol=1e-5, atol=1e-6: the resumed steps use full-batch
    gradients, the DDP steps averaged halves).
    """
    rank0 = results(spawned, f"ddp_{optimizer}")[0]
    model = mixed_net(seed=worker.MODEL_SEED + 1)
    opt = worker.OPTIMIZERS[optimizer](model.named_parameters())
    load_checkpoint(rank0["checkpoint"], model, opt)
    assert not opt.train_mode, "the checkpoint was written in eval mode and must load in eval mode"
    opt.train()
    for x, y in worker.batches()[worker.CHECKPOINT_AT:]:
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    assert_close_by_name(worker.named_tensors(model), rank0["y"], f"resumed {optimizer} at y")
    opt.eval()
    assert_close_by_name(worker.named_tensors(model), rank0["x"], f"resumed {optimizer} at x")


def test_fsdp2_full_parameters_match_unsharded_single_process(spawned, references):
    """FSDP2 (fully_shard per block and at the root) with MuAdamW_ScheduleFree built from the
    sharded named_parameters() and infshapes captured before sharding: after 8 steps the full
    tensors (p.full_tensor()) at y and, after optimizer.eval(), at x match.

    Reference: the unsharded single-process full-batch run (rtol=1e-5, atol=1e-6). Parameters
    and z are DTensors, so the optimizer state is sharded too.
    """
    ranks = results(spawned, "fsdp2_adamw")
    for rank in ranks:
        assert rank["parameter_types"] == ["DTensor"]
        assert rank["z_types"] == ["DTensor"]
    for point in ("y", "x"):
        for name, tensor in ranks[0][point].items():
            assert torch.equal(tensor, ranks[1][point][name]), f"ranks gathered different {name} at {point}"
        assert_close_by_name(ranks[0][point], references["adamw"][point], f"FSDP2 at {point}")


def test_fsdp2_wrapper_matches_unsharded_single_process(spawned, references):
    """FSDP2 with MuScheduleFreeWrapper around torch.optim.Adam: the wrapper's passes update each
    rank's shard of y and of z (a DTensor), and after 8 steps the full tensors at y and, after
    optimizer.eval(), at x match.

    Reference: the unsharded single-process full-batch run of the same wrapper (rtol=1e-5, atol=1e-6).
    """
    ranks = results(spawned, "fsdp2_wrapper")
    for rank in ranks:
        assert rank["z_types"] == ["DTensor"]
    for point in ("y", "x"):
        assert_close_by_name(ranks[0][point], references["wrapper"][point], f"FSDP2 wrapper at {point}")
        assert_close_by_name(ranks[1][point], references["wrapper"][point], f"FSDP2 wrapper rank 1 at {point}")


def test_fsdp2_dcp_checkpoint_in_eval_mode_resumes_bit_identically(spawned):
    """torch.distributed.checkpoint save at x (optimizer.eval() first) and load into a fresh
    sharded model and optimizer; after train() and the remaining steps every full parameter
    equals the uninterrupted sharded run's, at y and at x.

    Reference: the run that saved and continued, compared with torch.equal.
    """
    for rank, result in enumerate(results(spawned, "fsdp2_adamw")):
        assert result["mode_after_load"] == "eval", f"rank {rank}: the optimizer must load in the mode it saved"
        for point in ("y", "x"):
            for name, tensor in result[point].items():
                assert torch.equal(result[f"resumed_{point}"][name], tensor), f"rank {rank}: {name} at {point}"


def test_factory_without_infshapes_after_fully_shard_names_parameter(spawned):
    """fully_shard replaces every Parameter by a DTensor without ``infshape``; the factory then
    raises ValueError naming the first parameter and pointing to set_base_shapes / infshapes=.

    Reference: the message built in mup_schedulefree.scaling for a parameter without infshape.
    """
    for result in results(spawned, "fsdp2_adamw"):
        message = result["missing_infshape_error"]
        assert "'inp.weight'" in message
        assert "set_base_shapes" in message
        assert "infshapes=" in message
