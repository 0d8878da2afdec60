"""The claim of the package: muP factories keep activations width-independent at y and at x, and
standard parametrization (SP) with the same optimizer and base-width learning rate does not.

Tolerances: the verdict's defaults (pass |slope| < 0.1 and spread < 1.5, fail slope > 0.25), plus
a symmetric bound |slope| < 0.25, so that updates that vanish with width (a slope well below 0)
fail these tests as surely as updates that blow up.

Two initialisations are checked. With the example models' default (readout and query at
PyTorch's init) the readout's output and the attention logits start at a size that shrinks like
1/sqrt(width), as muP intends, and the trained part only overtakes them after some steps: they are
held to that derived -0.5 slope at initialisation and exempt from the symmetric bound. With
``zero_init=True`` (readout and query at zero, as in mup's examples) every output is made of
updates alone, so the symmetric bound holds for every module outside attention: that is the test
that updates neither vanish nor blow up. The attention query and logits stay exempt there: with a
zero query their first values come from gradients that are themselves o(1) in width.
"""
from __future__ import annotations

import pytest

from coord_checks.experiments import cross_entropy, make_task, run_coord_check
from coord_checks.optimizers import optimizer_factory
from coord_checks.recording import record_coords
from coord_checks.verdict import judge

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = {
    "mlp": {"widths": (64, 128, 256, 512, 1024)},   # 16x
    "transformer": {"widths": (32, 64, 128, 256)},  # 8x, d_model; head_dim 8..64
}
SYMMETRIC_BOUND = 0.25
INIT_SLOPE = -0.5       # 1/sqrt(width): MuReadout rescales PyTorch's init by sqrt(m), its output by 1/m;
INIT_TOLERANCE = 0.1    # q.k sums head_dim products of independent O(1) entries, divided by head_dim
STARTS_SMALL = r"^readout$|attn\.attn_logits"
ATTENTION = r"attn\.(?:query|attn_logits)"


@pytest.fixture(scope="module")
def verdicts():
    cache = {}

    def get(model: str, optimizer: str, zero_init: bool = False):
        if (model, optimizer, zero_init) not in cache:
            frame = run_coord_check(model, optimizer, steps=4, seeds=(0, 1), zero_init=zero_init, **SETTINGS[model])
            cache[model, optimizer, zero_init] = judge(frame)
        return cache[model, optimizer, zero_init]

    return get


def judged_mup_rows(verdict):
    table = verdict.table
    return table[(table["parametrization"] == "mup") & (table["status"] != "init")]


@pytest.mark.parametrize("model", ["mlp", "transformer"])
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_mup_factory_passes_at_y_and_x(verdicts, model, optimizer):
    verdict = verdicts(model, optimizer)
    for sequence in ("y", "x"):
        assert verdict.passed("mup", sequence), verdict.format()
    rows = judged_mup_rows(verdict)
    trained_from_their_init = rows[~rows["module"].str.contains(STARTS_SMALL)]
    assert trained_from_their_init["slope"].abs().max() < SYMMETRIC_BOUND, verdict.format()


@pytest.mark.parametrize("model", ["mlp", "transformer"])
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_mup_readout_and_attention_logits_start_at_one_over_sqrt_width(verdicts, model, optimizer):
    table = verdicts(model, optimizer).table
    at_init = table[(table["parametrization"] == "mup") & (table["status"] == "init")]
    assert set(at_init["module"].str.contains(STARTS_SMALL)) == {True}
    expected = {"readout"} | ({f"blocks.{i}.attn.attn_logits" for i in (0, 1)} if model == "transformer" else set())
    assert set(at_init["module"]) == expected
    assert (at_init["slope"] - INIT_SLOPE).abs().max() < INIT_TOLERANCE, at_init.to_string()


@pytest.mark.parametrize("model", ["mlp", "transformer"])
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_with_zero_init_updates_neither_vanish_nor_blow_up(verdicts, model, optimizer):
    verdict = verdicts(model, optimizer, zero_init=True)
    for sequence in ("y", "x"):
        assert verdict.passed("mup", sequence), verdict.format()
    rows = judged_mup_rows(verdict)
    outside_attention = rows[~rows["module"].str.contains(ATTENTION)]
    assert outside_attention["slope"].abs().max() < SYMMETRIC_BOUND, verdict.format()


@pytest.mark.parametrize("model", ["mlp", "transformer"])
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_standard_parametrization_fails_at_y_and_x(verdicts, model, optimizer):
    verdict = verdicts(model, optimizer)
    for sequence in ("y", "x"):
        assert not verdict.passed("sp", sequence), verdict.format()


def test_mlp_mup_run_is_clean_with_adamw_and_zero_init():
    """On the MLP with AdamW-SF and a zero readout not even a warning: every judged muP row passes."""
    verdict = judge(run_coord_check("mlp", "adamw", steps=4, seeds=(0, 1), parametrizations=("mup",), zero_init=True))
    assert verdict.status() == "pass", verdict.format()


def test_mlp_readout_at_pytorch_init_levels_off_within_four_adamw_steps():
    """Its initial 1/sqrt(width) part fades as Adam's updates, O(1) at every width, take over."""
    verdict = judge(run_coord_check("mlp", "adamw", steps=4, seeds=(0, 1), parametrizations=("mup",)))
    table = verdict.table
    for sequence in ("y", "x"):
        readout = table[(table["module"] == "readout") & (table["sequence"] == sequence)].set_index("step")["slope"]
        assert readout[1] < -0.4 and abs(readout[4]) < 0.1, readout.to_string()


def test_mup_model_with_unscaled_optimizer_fails():
    """The muP model alone is not enough: without the factory's per-group learning rates (plain
    AdamW-SF on muP base shapes) hidden activations grow with width, and the check says so."""
    task = make_task("mlp", n_batches=1)
    frame = record_coords(
        model_factory=lambda w: task.build(w, "mup"),
        optimizer_factory=optimizer_factory("adamw", "sp", 1e-2),
        widths=SETTINGS["mlp"]["widths"], batches=task.train_batches, loss_fn=cross_entropy,
        steps=4, seeds=(0,), parametrization="mup-model-plain-optimizer",
    )
    verdict = judge(frame)
    assert not verdict.passed(), verdict.format()
