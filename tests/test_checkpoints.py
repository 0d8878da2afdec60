"""Checkpoints: x computed out of place, files replaced atomically, loads checked before they change anything.

Every optimizer record of ``optim_infos`` is driven on the tiny MLP of ``conftest`` in the
three-group layout. References are twin runs with the same seeds and batches: ``optimizer.eval()``
on the twin gives x, and a twin that never saves gives the uninterrupted run. Schedule-free
switching is deterministic, so every comparison is exact (``torch.equal``, same dtype).
"""
from __future__ import annotations

import copy
import errno
import io
import os
from typing import Any, Callable

import pytest
import torch
from torch import nn

from mup_models import mixed_net
from mup_schedulefree import MuAdamW_ScheduleFree, load_checkpoint, save_checkpoint, state_dict_at_x
from optim_infos import (
    INFOS,
    OptimInfo,
    assert_bitwise_equal,
    assert_same_run,
    param_groups,
    run,
    to_eval,
    train_step,
)

STEPS, MORE = 9, 4            # steps before the checkpoint, steps after it
WIDTH = 256                   # hidden width: an eval()/train() round trip then moves some entries
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ADAMW = INFOS[0]
WRAPPER_ADAM = next(info for info in INFOS if info.name == "ScheduleFreeWrapper-Adam")


def mlp(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """Linear(4, WIDTH) - Tanh - Linear(WIDTH, 3) from ``seed``, for conftest's batches.

    At conftest's width 6, eval() followed by train() restores every entry exactly for these
    runs, so a helper that secretly switched modes would go unseen; at 256 some entries move.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(4, WIDTH), nn.Tanh(), nn.Linear(WIDTH, 3)).to(dtype)


def build(info: OptimInfo, model: nn.Module) -> Any:
    """``info``'s first config over ``model`` in the three-group layout (bfloat16: with master weights)."""
    config = dict(info.configs[0])
    if "master_weights" in info.flags and next(model.parameters()).dtype == torch.bfloat16:
        config["master_weights"] = True
    return info.make(param_groups(info, list(model.parameters()), config), config)


def trained(info: OptimInfo, make_batches: Callable[..., list], dtype: torch.dtype = torch.float32,
            seed: int = 0) -> tuple[nn.Module, Any]:
    """:func:`mlp` ``seed`` and ``info``'s optimizer after STEPS steps (modal forms: in train mode, at y)."""
    model = mlp(seed, dtype)
    opt = build(info, model)
    run(info, opt, model, make_batches(STEPS, dtype=dtype))
    return model, opt


def state(model: nn.Module, opt: Any) -> dict[str, Any]:
    """Deep copies of everything a checkpoint operation must leave alone: weights, optimizer state, mode."""
    return {"model": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(opt.state_dict()),
            "train_mode": getattr(opt, "train_mode", None)}


class Opaque:
    """A user object that only a full unpickler can rebuild."""

    def __init__(self, value: int) -> None:
        self.value = value


class Tied(nn.Module):
    """Embedding whose weight is also the output head's (two state-dict keys, one parameter)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.embed(tokens))))


def tied_run(info: OptimInfo) -> tuple[Tied, Any]:
    """:class:`Tied` (seed 0) after STEPS steps of ``info``'s first config on fixed token batches."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Tied()
    opt = info.make(model.parameters(), info.configs[0])
    gen = torch.Generator().manual_seed(7)
    for _ in range(STEPS):
        train_step(info, opt, model, (torch.randint(0, 10, (8,), generator=gen), torch.randn(8, 10, generator=gen)))
    return model, opt


def disk_full_after(limit: int, error: BaseException) -> Callable[..., None]:
    """A ``torch.save`` that writes the first ``limit`` bytes of the real file, then raises ``error``."""
    real_save = torch.save

    class Full(io.RawIOBase):
        def __init__(self, file: Any) -> None:
            self.file, self.written = file, 0

        def writable(self) -> bool:
            return True

        def write(self, data: Any) -> int:
            room = limit - self.written
            self.file.write(bytes(data[:max(room, 0)]))
            self.written += len(data)
            if room < len(data):
                raise error
            return len(data)

    def save(obj: Any, file: Any, *args: Any, **kwargs: Any) -> None:
        real_save(obj, Full(file), *args, **kwargs)

    return save


@pytest.fixture
def old_checkpoint(tmp_path, make_batches):
    """A checkpoint of AdamW-SF after STEPS steps at tmp_path/ckpt.pt, its bytes, and the run, 4 steps on."""
    path = tmp_path / "ckpt.pt"
    model, opt = trained(ADAMW, make_batches)
    save_checkpoint(path, model, opt, step=STEPS)
    run(ADAMW, opt, model, make_batches(STEPS + MORE)[STEPS:])
    return {"path": path, "bytes": path.read_bytes(), "model": model, "opt": opt}


def assert_previous_file_intact(checkpoint: dict[str, Any]) -> None:
    """Only ckpt.pt in its folder, byte for byte as before, and it still loads."""
    path = checkpoint["path"]
    assert sorted(os.listdir(path.parent)) == ["ckpt.pt"], "a temporary file was left behind"
    assert path.read_bytes() == checkpoint["bytes"]
    fresh = mlp(seed=3)
    assert load_checkpoint(path, fresh, build(ADAMW, fresh)) == {"step": STEPS}


# ----------------------------------------------------------------------------- state_dict_at_x
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("info", INFOS, ids=[info.name for info in INFOS])
def test_state_dict_at_x_is_bitwise_what_eval_gives_and_moves_nothing(info, dtype, make_batches, one_thread):
    """Every form, float32 and bfloat16 (master weights where the class has them): the result equals
    the twin's state dict after optimizer.eval(), and weights, optimizer state and mode are as before.
    In eval mode it is the state dict itself.

    Reference: a twin run after eval() (torch.equal, same dtype); deep copies taken before the call.
    """
    model, opt = trained(info, make_batches, dtype)
    twin, twin_opt = trained(info, make_batches, dtype)
    before = state(model, opt)
    at_x = state_dict_at_x(model, opt)
    to_eval(info, twin_opt)
    assert_bitwise_equal(at_x, twin.state_dict(), "state_dict_at_x")
    assert_bitwise_equal(state(model, opt), before, "after state_dict_at_x")
    if info.has_modes:
        assert any(not torch.equal(at_x[k], v) for k, v in model.state_dict().items()), "x must differ from y"
    to_eval(info, opt)
    assert_bitwise_equal(state_dict_at_x(model, opt), model.state_dict(), "state_dict_at_x in eval mode")


@pytest.mark.parametrize("info", INFOS, ids=[info.name for info in INFOS])
def test_state_dict_at_x_gives_tied_weights_x_under_every_name(info):
    """An embedding tied to the output head: both keys hold x, the same values.

    Reference: a twin run's state dict after eval() (torch.equal); the run's own state before.
    """
    model, opt = tied_run(info)
    twin, twin_opt = tied_run(info)
    before = state(model, opt)
    at_x = state_dict_at_x(model, opt)
    to_eval(info, twin_opt)
    assert_bitwise_equal(at_x, twin.state_dict(), "state_dict_at_x")
    assert torch.equal(at_x["embed.weight"], at_x["head.weight"])
    assert_bitwise_equal(state(model, opt), before, "after state_dict_at_x")


@pytest.mark.parametrize("info", [ADAMW, WRAPPER_ADAM], ids=lambda info: info.name)
def test_state_dict_at_x_sees_through_accelerate_without_moving_anything(info, make_batches):
    """Our optimizer inside accelerate's AcceleratedOptimizer: x out of place, nothing moved.

    Reference: a twin run after eval(); deep copies taken before the call (torch.equal).
    """
    accelerate = pytest.importorskip("accelerate")
    model, opt = trained(info, make_batches)
    wrapped = accelerate.Accelerator(cpu=True).prepare_optimizer(opt)
    twin, twin_opt = trained(info, make_batches)
    before = state(model, opt)
    at_x = state_dict_at_x(model, wrapped)
    twin_opt.eval()
    assert_bitwise_equal(at_x, twin.state_dict(), "state_dict_at_x")
    assert_bitwise_equal(state(model, opt), before, "after state_dict_at_x")


def test_state_dict_at_x_falls_back_to_eval_and_train_for_the_published_optimizer(make_batches):
    """schedulefree 1.4.1's AdamW-SF has no points_at_x: the result is what its eval() gives, and it
    is back in train mode with the parameters where eval(); train() puts them.

    Reference: a twin published run after eval(), then after train() (torch.equal).
    """
    def published_run() -> tuple[nn.Module, Any]:
        model = mlp(0)
        opt = ADAMW.make_published(param_groups(ADAMW, list(model.parameters()), ADAMW.configs[0]),
                                   ADAMW.configs[0])
        run(ADAMW, opt, model, make_batches(STEPS))
        return model, opt

    model, opt = published_run()
    twin, twin_opt = published_run()
    at_x = state_dict_at_x(model, opt)
    twin_opt.eval()
    assert_bitwise_equal(at_x, twin.state_dict(), "state_dict_at_x")
    twin_opt.train()
    assert all(group["train_mode"] for group in opt.param_groups)
    assert_bitwise_equal(model.state_dict(), twin.state_dict(), "after the round trip")


# ----------------------------------------------------------------------------- saving
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("info", INFOS, ids=[info.name for info in INFOS])
def test_saving_moves_nothing_so_the_run_continues_as_if_it_never_saved(info, dtype, tmp_path,
                                                                        make_batches, one_thread):
    """In train mode, save_checkpoint leaves weights, optimizer state and mode bit-identical, and
    the run continues exactly as a twin that never saved.

    Reference: deep copies taken before the save; the twin after the same MORE steps (torch.equal).
    """
    more = make_batches(STEPS + MORE, dtype=dtype)[STEPS:]
    model, opt = trained(info, make_batches, dtype)
    twin, twin_opt = trained(info, make_batches, dtype)
    before = state(model, opt)
    save_checkpoint(tmp_path / "ckpt.pt", model, opt)
    assert_bitwise_equal(state(model, opt), before, "after save_checkpoint")
    run(info, opt, model, more)
    run(info, twin_opt, twin, more)
    assert_same_run(model, opt, twin, twin_opt)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("info", INFOS, ids=[info.name for info in INFOS])
def test_resume_is_bit_identical_and_the_file_holds_x(info, dtype, tmp_path, make_batches, one_thread):
    """Save in train mode, load into a fresh model (other init) and optimizer, take MORE steps: weights
    and optimizer state equal the run that saved and went on. The saved weights are x, and loading
    without an optimizer leaves a fresh model at x.

    Reference: the run that saved and continued; a twin after eval() for x (torch.equal).
    """
    path = tmp_path / "ckpt.pt"
    more = make_batches(STEPS + MORE, dtype=dtype)[STEPS:]
    model, opt = trained(info, make_batches, dtype)
    save_checkpoint(path, model, opt)
    twin, twin_opt = trained(info, make_batches, dtype)
    to_eval(info, twin_opt)
    assert_bitwise_equal(torch.load(path)["model"], twin.state_dict(), "saved weights")
    inference = mlp(seed=2, dtype=dtype)
    load_checkpoint(path, inference)
    assert_bitwise_equal(inference.state_dict(), twin.state_dict(), "loaded without optimizer")

    fresh = mlp(seed=1, dtype=dtype)
    fresh_opt = build(info, fresh)
    load_checkpoint(path, fresh, fresh_opt)
    run(info, opt, model, more)
    run(info, fresh_opt, fresh, more)
    assert_same_run(model, opt, fresh, fresh_opt)


def test_full_disk_during_save_keeps_the_previous_checkpoint(old_checkpoint, monkeypatch):
    """torch.save fails with ENOSPC after 3000 bytes: OSError naming the path (errno kept), no
    temporary file, the previous checkpoint byte-identical and loadable.

    Reference: the previous file's bytes and its load (equality of bytes; load succeeds).
    """
    monkeypatch.setattr(torch, "save", disk_full_after(3000, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    path = old_checkpoint["path"]
    with pytest.raises(OSError, match=f"could not save checkpoint to '{path}'") as raised:
        save_checkpoint(path, old_checkpoint["model"], old_checkpoint["opt"], step=STEPS + MORE)
    assert raised.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert_previous_file_intact(old_checkpoint)


def test_keyboard_interrupt_during_save_leaves_no_temporary_file(old_checkpoint, monkeypatch):
    """KeyboardInterrupt half way through torch.save propagates as itself; no temporary file is left
    and the previous checkpoint is untouched.

    Reference: the previous file's bytes and its load.
    """
    monkeypatch.setattr(torch, "save", disk_full_after(3000, KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(old_checkpoint["path"], old_checkpoint["model"], old_checkpoint["opt"])
    monkeypatch.undo()
    assert_previous_file_intact(old_checkpoint)


def test_unpicklable_extra_entry_fails_naming_the_path_and_keeps_the_previous_checkpoint(old_checkpoint):
    """An extra entry that cannot be pickled (a lambda): RuntimeError naming the path, nothing written.

    Reference: the previous file's bytes and its load.
    """
    path = old_checkpoint["path"]
    with pytest.raises(RuntimeError, match=f"could not save checkpoint to '{path}'"):
        save_checkpoint(path, old_checkpoint["model"], old_checkpoint["opt"], hook=lambda: None)
    assert_previous_file_intact(old_checkpoint)


def test_atomic_save_gives_the_file_torch_saves_permissions_and_follows_a_symlink(tmp_path, make_batches):
    """The renamed file has the mode torch.save's own file gets (umask applied, not 0600); saving
    through a symbolic link replaces the file it points to and keeps the link.

    Reference: os.stat of a file written by torch.save in the same folder.
    """
    model, opt = trained(ADAMW, make_batches)
    torch.save({}, tmp_path / "plain.pt")
    save_checkpoint(tmp_path / "ckpt.pt", model, opt)
    assert os.stat(tmp_path / "ckpt.pt").st_mode == os.stat(tmp_path / "plain.pt").st_mode
    (tmp_path / "link.pt").symlink_to(tmp_path / "plain.pt")
    save_checkpoint(tmp_path / "link.pt", model, opt)
    assert (tmp_path / "link.pt").is_symlink()
    assert (tmp_path / "plain.pt").read_bytes() == (tmp_path / "link.pt").read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "link.pt", "plain.pt"]


def test_file_objects_still_save_and_load(make_batches):
    """A BytesIO is written in place and loads back into a fresh model and optimizer.

    Reference: the state of the run that saved (torch.equal).
    """
    model, opt = trained(ADAMW, make_batches)
    buffer = io.BytesIO()
    save_checkpoint(buffer, model, opt, step=STEPS)
    buffer.seek(0)
    fresh = mlp(seed=1)
    fresh_opt = build(ADAMW, fresh)
    assert load_checkpoint(buffer, fresh, fresh_opt) == {"step": STEPS}
    assert_same_run(model, opt, fresh, fresh_opt)


# ----------------------------------------------------------------------------- loading
def test_pickled_objects_are_refused_by_default_and_load_with_weights_only_false(tmp_path, make_batches):
    """An extra entry holding a user object: the default load raises ValueError naming the file and
    the class, leaving the model as it was; weights_only=False returns the object.

    Reference: the fresh model's state before the refused load (torch.equal).
    """
    path = tmp_path / "ckpt.pt"
    model, opt = trained(ADAMW, make_batches)
    save_checkpoint(path, model, opt, note=Opaque(5))
    fresh = mlp(seed=1)
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(ValueError, match=f"checkpoint '{path}' holds .*Opaque.*weights_only=False"):
        load_checkpoint(path, fresh)
    assert_bitwise_equal(fresh.state_dict(), before, "after the refused load")
    assert load_checkpoint(path, fresh, weights_only=False)["note"].value == 5


@pytest.mark.parametrize("keep", [0.0, 0.1, 0.5, 0.99], ids=lambda keep: f"keep{keep}")
def test_truncated_checkpoint_raises_one_error_naming_the_file(keep, tmp_path, make_batches):
    """A file cut to a fraction of its bytes: ValueError naming it as truncated or corrupted; the
    model is untouched.

    Reference: the model's state before the load (torch.equal).
    """
    path = tmp_path / "ckpt.pt"
    model, opt = trained(ADAMW, make_batches)
    save_checkpoint(path, model, opt)
    path.write_bytes(path.read_bytes()[:int(keep * path.stat().st_size)])
    fresh = mlp(seed=1)
    fresh_opt = build(ADAMW, fresh)
    before = state(fresh, fresh_opt)
    with pytest.raises(ValueError, match=f"checkpoint '{path}' is truncated or corrupted"):
        load_checkpoint(path, fresh, fresh_opt)
    assert_bitwise_equal(state(fresh, fresh_opt), before, "after the failed load")


def test_checkpoint_of_another_width_is_refused_before_anything_changes(tmp_path):
    """A muP model of width 24 saved, loaded into width 32: ValueError naming the file, the first
    parameter and both shapes; the width-32 model and its optimizer are bit-identical to before.

    Reference: deep copies of the width-32 run taken before the load.
    """
    path = tmp_path / "ckpt.pt"
    batches = [(torch.randn(8, 5, generator=torch.Generator().manual_seed(i)), torch.zeros(8, 3)) for i in range(3)]

    def mu_run(width: int) -> tuple[nn.Module, Any]:
        model = mixed_net(width=width, ff=2 * width)
        opt = MuAdamW_ScheduleFree(model.named_parameters(), lr=1e-2)
        run(ADAMW, opt, model, batches)
        return model, opt

    save_checkpoint(path, *mu_run(24))
    model, opt = mu_run(32)
    before = state(model, opt)
    with pytest.raises(ValueError, match=rf"checkpoint '{path}' does not fit this model: 'inp.weight' has "
                                         r"shape \(24, 5\) in the checkpoint and \(32, 5\) in the model"):
        load_checkpoint(path, model, opt)
    assert_bitwise_equal(state(model, opt), before, "after the refused load")


@pytest.mark.parametrize("saved_deeper", [True, False], ids=["unexpected", "missing"])
def test_checkpoint_with_other_parameter_names_is_refused(saved_deeper, tmp_path):
    """One more Linear on one side: ValueError naming the file and the first name not on both sides.

    Reference: the loading model's state before the load (torch.equal).
    """
    def net(deeper: bool) -> nn.Module:
        layers = [nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)] + ([nn.Tanh(), nn.Linear(3, 3)] if deeper else [])
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return nn.Sequential(*layers)

    path = tmp_path / "ckpt.pt"
    saved = net(saved_deeper)
    save_checkpoint(path, saved, ADAMW.make(saved.parameters(), ADAMW.configs[0]))
    model = net(not saved_deeper)
    before = copy.deepcopy(model.state_dict())
    expected = "the model has no '4.weight'" if saved_deeper else "it has no '4.weight'"
    with pytest.raises(ValueError, match=f"checkpoint '{path}' does not fit this model: {expected}"):
        load_checkpoint(path, model)
    assert_bitwise_equal(model.state_dict(), before, "after the refused load")


@pytest.mark.parametrize("layout", ["reordered", "one group"])
def test_optimizer_state_for_other_shapes_is_refused_before_anything_changes(layout, tmp_path, make_batches):
    """The model fits but the optimizer lists its parameters in another order (or in one group):
    ValueError naming the file and the parameter with both shapes (or the group counts), before
    model or optimizer change, instead of "zs and ys differ in tensor sizes" at the next step.

    Reference: deep copies of the loading run taken before the load.
    """
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, *trained(ADAMW, make_batches))
    model = mlp(seed=1)
    params = list(model.parameters())
    config = ADAMW.configs[0]
    if layout == "reordered":
        opt = ADAMW.make([{"params": params[::-1][:2]}, {"params": params[1:2]}, {"params": params[:1]}], config)
        expected = r"group 0 holds '2.bias' of shape \(3,\), its saved state is for shape \(256, 4\)"
    else:
        opt = ADAMW.make(params, config)
        expected = "holds 3 optimizer parameter groups, this optimizer has 1"
    run(ADAMW, opt, model, make_batches(2))
    before = state(model, opt)
    with pytest.raises(ValueError, match=f"checkpoint '{path}' .*{expected}"):
        load_checkpoint(path, model, opt)
    assert_bitwise_equal(state(model, opt), before, "after the refused load")


def test_optimizer_that_refuses_the_state_half_way_is_put_back_and_the_model_untouched(tmp_path,
                                                                                     make_batches, monkeypatch):
    """The wrapper loads its own state, then its base optimizer raises: the error propagates, the
    wrapper's previous state is back and the model's weights are unchanged.

    Reference: deep copies of the loading run taken before the load (torch.equal).
    """
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, *trained(WRAPPER_ADAM, make_batches))
    model, opt = trained(WRAPPER_ADAM, make_batches, seed=1)
    before = state(model, opt)
    real_load = opt.base.load_state_dict
    calls = []

    def refuse_once(state_dict: dict[str, Any]) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("base refuses")
        real_load(state_dict)

    monkeypatch.setattr(opt.base, "load_state_dict", refuse_once)
    with pytest.raises(RuntimeError, match="base refuses"):
        load_checkpoint(path, model, opt)
    assert_bitwise_equal(state(model, opt), before, "after the refused load")


def test_saving_over_a_private_checkpoint_keeps_it_private(tmp_path, make_batches):
    """A checkpoint the user made 0600 stays 0600 after another save replaces it (torch.save
    writing in place keeps the mode too)."""
    model, opt = trained(ADAMW, make_batches)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model, opt)
    os.chmod(path, 0o600)
    save_checkpoint(path, model, opt)
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_a_flipped_bit_inside_a_tensor_is_refused_naming_the_file(tmp_path, make_batches):
    """torch's reader does not check the zip records' CRC-32: the flipped bit would load as a
    wrong weight. The record's stored CRC is the reference."""
    import zipfile

    model, opt = trained(ADAMW, make_batches)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model, opt)
    with zipfile.ZipFile(path) as archive:
        record = next(info for info in archive.infolist() if "/data/" in info.filename and info.file_size >= 16)
    raw = bytearray(path.read_bytes())
    header = record.header_offset    # local header: name and extra-field lengths at bytes 26 and 28
    start = header + 30 + int.from_bytes(raw[header + 26:header + 28], "little") \
        + int.from_bytes(raw[header + 28:header + 30], "little")
    raw[start + 4] ^= 0x40
    path.write_bytes(bytes(raw))
    fresh = mlp(1)
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(ValueError, match=r"ckpt\.pt' is corrupted: record .* fails its CRC check"):
        load_checkpoint(path, fresh)
    assert_bitwise_equal(fresh.state_dict(), before)


def test_a_file_that_is_not_a_checkpoint_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("hello world")
    with pytest.raises(ValueError, match=r"notes\.pt' is not a checkpoint or is corrupted"):
        load_checkpoint(path, mlp())


def test_state_of_another_optimizer_class_is_refused(tmp_path, make_batches):
    """An AdamW-SF checkpoint loaded into SGD-SF would replace SGD's lr by AdamW's and add betas."""
    model, opt = trained(ADAMW, make_batches)
    save_checkpoint(tmp_path / "ckpt.pt", model, opt)
    sgd_info = next(info for info in INFOS if info.name == "SGDScheduleFree")
    other_model = mlp()
    other = build(sgd_info, other_model)
    with pytest.raises(ValueError, match="holds the state of a AdamWScheduleFree, this optimizer is a SGDScheduleFree"):
        load_checkpoint(tmp_path / "ckpt.pt", other_model, other)


@pytest.mark.parametrize("helper", ["state_dict_at_x", "save_checkpoint", "eval_mode"])
def test_an_optimizer_of_another_model_or_none_is_refused(helper, tmp_path, make_batches):
    """Each would otherwise hand back (or save, or evaluate) y as if it were x."""
    from mup_schedulefree import eval_mode

    model, _ = trained(ADAMW, make_batches)
    _, other_opt = trained(ADAMW, make_batches, seed=1)
    calls = {"state_dict_at_x": lambda opt: state_dict_at_x(model, opt),
             "save_checkpoint": lambda opt: save_checkpoint(tmp_path / "ckpt.pt", model, opt),
             "eval_mode": lambda opt: eval_mode(model, opt).__enter__()}
    with pytest.raises(ValueError, match="Invalid optimizer: it holds none of the model's parameters"):
        calls[helper](other_opt)
    with pytest.raises(TypeError, match=r"Invalid optimizer: NoneType \(must be a torch.optim.Optimizer"):
        calls[helper](None)
    assert not (tmp_path / "ckpt.pt").exists()
