"""Recording: tidy frame, float32 statistics, and measuring x never perturbs training at y."""
from __future__ import annotations

import mup
import pandas as pd
import pytest
import torch
from torch import nn

from coord_checks import data
from coord_checks.experiments import cross_entropy, make_task
from coord_checks.optimizers import optimizer_factory
from coord_checks.recording import COLUMNS, STATISTICS, forward_at_x, record_coords, select_modules

pytestmark = pytest.mark.usefixtures("one_thread")


def mlp_recording(sequences=("y", "x"), statistics=("l1",), model="mlp", steps=3, widths=(64, 128),
                  optimizer="adamw", **kwargs) -> pd.DataFrame:
    task = make_task(model, n_batches=steps)
    return record_coords(
        model_factory=lambda w: task.build(w, "mup"),
        optimizer_factory=optimizer_factory(optimizer, "mup", 1e-2),
        widths=list(widths), batches=task.train_batches, loss_fn=cross_entropy, steps=steps,
        seeds=(0, 1), statistics=statistics, sequences=sequences, **kwargs,
    )


def test_frame_is_tidy_one_row_per_width_seed_step_sequence_module_statistic():
    frame = mlp_recording(statistics=("l1", "l2"))
    assert list(frame.columns) == list(COLUMNS)
    assert set(frame["module"]) == {"input", "hidden.0", "hidden.1", "readout"}
    assert len(frame) == 2 * 2 * 3 * 2 * 4 * 2  # widths, seeds, steps, sequences, modules, statistics
    assert not frame.duplicated(["width", "seed", "step", "sequence", "module", "statistic"]).any()
    assert frame["value"].dtype == float


def test_measuring_x_leaves_the_training_run_bit_for_bit_unchanged():
    """y statistics with and without the extra x forward passes are identical (no tolerance)."""
    for model, optimizer in (("mlp", "adamw"), ("cnn", "sgd"), ("mlp", "wrapper")):
        both = mlp_recording(("y", "x"), model=model, optimizer=optimizer, widths=(16, 32), steps=4)
        only_y = mlp_recording(("y",), model=model, optimizer=optimizer, widths=(16, 32), steps=4)
        y_rows = both[both["sequence"] == "y"].reset_index(drop=True)
        pd.testing.assert_frame_equal(y_rows, only_y, check_exact=True)


def test_x_equals_y_at_init_and_differs_after_updates():
    frame = mlp_recording(steps=3).pivot_table(
        index=["width", "seed", "step", "module"], columns="sequence", values="value")
    at_init = frame.xs(1, level="step")
    pd.testing.assert_series_equal(at_init["x"], at_init["y"], check_names=False, rtol=1e-6)
    later = frame.xs(3, level="step")
    assert (later["x"] - later["y"]).abs().max() > 1e-4


def test_forward_at_x_restores_parameters_buffers_and_optimizer_mode():
    torch.manual_seed(0)
    model = mup.set_base_shapes(nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)), None)
    optimizer = optimizer_factory("adamw", "sp", 0.1)(model.parameters())
    inputs = torch.randn(16, 4)
    for _ in range(3):
        optimizer.zero_grad()
        model(inputs).square().mean().backward()
        optimizer.step()
    before = [t.clone() for t in [*model.parameters(), *model.buffers()]]
    rng_before = torch.get_rng_state()
    out_x = forward_at_x(model, optimizer, inputs)
    assert all(torch.equal(a, b) for a, b in zip(before, [*model.parameters(), *model.buffers()]))
    assert torch.equal(rng_before, torch.get_rng_state())
    assert optimizer.train_mode
    assert not torch.allclose(out_x, model(inputs).detach())


def test_statistics_are_computed_in_float32_from_module_outputs():
    frame = mlp_recording(sequences=("y",), statistics=tuple(STATISTICS), steps=1, widths=(64, 128))
    task = make_task("mlp", n_batches=1)
    torch.manual_seed(0)
    model = task.build(64, "mup")
    hidden = torch.relu(model.input(task.train_batches[0][0]))
    expected = model.hidden[0](hidden).float()
    got = frame[(frame["width"] == 64) & (frame["seed"] == 0) & (frame["module"] == "hidden.0")]
    got = got.set_index("statistic")["value"]
    for name, fn in STATISTICS.items():
        assert got[name] == pytest.approx(fn(expected).item(), rel=1e-6)


def test_module_selection_by_name_and_predicate():
    frame = mlp_recording(sequences=("y",), modules=["readout"])
    assert set(frame["module"]) == {"readout"}
    frame = mlp_recording(sequences=("y",), modules=lambda name, m: name.startswith("hidden"))
    assert set(frame["module"]) == {"hidden.0", "hidden.1"}
    with pytest.raises(ValueError, match="not submodules"):
        select_modules(nn.Linear(2, 2), ["nope"])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [({"widths": [64]}, ValueError, "two distinct widths"),
     ({"widths": [64, 0]}, ValueError, "positive ints"),
     ({"widths": "64,128"}, TypeError, "sequence of ints"),
     ({"steps": 0}, ValueError, "steps"),
     ({"sequences": ("z",)}, ValueError, "sequences"),
     ({"statistics": ("median",)}, ValueError, "unknown"),
     ({"batches": []}, ValueError, "batches")],
)
def test_bad_arguments_raise_errors_naming_them(kwargs, error, match):
    task = make_task("mlp", n_batches=1)
    arguments = dict(model_factory=lambda w: task.build(w, "mup"),
                     optimizer_factory=optimizer_factory("adamw", "mup"), widths=[64, 128],
                     batches=task.train_batches, loss_fn=cross_entropy, steps=2)
    arguments.update(kwargs)
    with pytest.raises(error, match=match):
        record_coords(**arguments)


def test_x_sequence_needs_a_schedule_free_optimizer():
    task = make_task("mlp", n_batches=1)
    with pytest.raises(TypeError, match="no eval"):
        record_coords(lambda w: task.build(w, "sp"), lambda p: torch.optim.SGD(p, lr=0.1),
                      [64, 128], task.train_batches, cross_entropy, steps=2)


def test_stdlib_corpus_batches_are_deterministic_and_in_vocabulary():
    tokens = data.encode(data.stdlib_text(max_chars=20_000))
    assert int(tokens.max()) < data.VOCAB_SIZE and int(tokens.min()) >= 0
    first = data.char_sequence_batches(tokens, seq_len=8, batch_size=4, n_batches=2, seed=3)
    again = data.char_sequence_batches(tokens, seq_len=8, batch_size=4, n_batches=2, seed=3)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(first, again))
    inputs, targets = first[0]
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    contexts = data.char_context_batches(tokens, context=8, batch_size=4, n_batches=1)
    assert contexts[0][0].shape == (4, 8 * data.VOCAB_SIZE)
    assert contexts[0][0].square().mean().item() == pytest.approx(1.0, rel=1e-6)


def test_wrapper_returning_its_last_submodule_output_is_recorded_once():
    """``block`` returns ``block.head``'s output tensor itself: one record, under the head's name."""
    def make(width: int) -> nn.Module:
        block = nn.Sequential(nn.Linear(3, width, bias=False), nn.ReLU(), nn.Linear(width, 2))
        return mup.set_base_shapes(nn.ModuleDict({"block": block}), None)

    class Model(nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.parts = make(width)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.parts["block"](x)

    batch = (torch.randn(5, 3), torch.randint(0, 2, (5,)))
    frame = record_coords(Model, optimizer_factory("sgd", "sp", 0.1), [4, 8], [batch],
                          cross_entropy, steps=1, sequences=("y",))
    assert list(dict.fromkeys(frame["module"])) == ["parts.block.0", "parts.block.1", "parts.block.2"]


def test_recording_leaves_the_global_generator_as_found():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    mlp_recording(steps=2)
    assert torch.equal(state, torch.get_rng_state())


def test_record_steps_records_only_those_steps_of_the_same_run():
    every = mlp_recording(steps=6, widths=(16, 32))
    some = mlp_recording(steps=6, widths=(16, 32), record_steps=[1, 4, 6])
    assert sorted(some["step"].unique()) == [1, 4, 6]
    pd.testing.assert_frame_equal(
        every[every["step"].isin([1, 4, 6])].reset_index(drop=True), some, check_exact=True)
    with pytest.raises(ValueError, match="record_steps"):
        mlp_recording(steps=3, widths=(16, 32), record_steps=[0, 3])
