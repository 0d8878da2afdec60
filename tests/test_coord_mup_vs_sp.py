"""The claim of the package: muP factories keep activations width-independent at y and at x, and
standard parametrization (SP) with the same optimizer and base-width learning rate does not.

Tolerances: the verdict's defaults (pass |slope| < 0.1 and spread < 1.5, fail slope > 0.25), plus
a symmetric bound |slope| < 0.25 on every muP module outside attention, so that updates that
vanish with width (a slope well below 0) fail these tests as surely as updates that blow up. The
attention query and logits are exempt from that bound: with a zero-initialised query their first
values come from gradients that are themselves o(1) in width, so early on they legitimately shrink
(the verdict lists them as warnings).
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


@pytest.fixture(scope="module")
def verdicts():
    cache = {}

    def get(model: str, optimizer: str):
        if (model, optimizer) not in cache:
            frame = run_coord_check(model, optimizer, steps=4, seeds=(0, 1), **SETTINGS[model])
            cache[model, optimizer] = judge(frame)
        return cache[model, optimizer]

    return get


@pytest.mark.parametrize("model", ["mlp", "transformer"])
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_mup_factory_passes_at_y_and_x(verdicts, model, optimizer):
    verdict = verdicts(model, optimizer)
    for sequence in ("y", "x"):
        assert verdict.passed("mup", sequence), verdict.format()
    rows = verdict.table[(verdict.table["parametrization"] == "mup") & (verdict.table["status"] != "init")]
    outside_attention = rows[~rows["module"].str.contains(r"attn\.(?:query|attn_logits)")]
    assert outside_attention["slope"].abs().max() < SYMMETRIC_BOUND, verdict.format()


@pytest.mark.parametrize("model", ["mlp", "transformer"])
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_standard_parametrization_fails_at_y_and_x(verdicts, model, optimizer):
    verdict = verdicts(model, optimizer)
    for sequence in ("y", "x"):
        assert not verdict.passed("sp", sequence), verdict.format()


def test_mlp_mup_run_is_clean_with_adamw():
    """On the MLP with AdamW-SF not even a warning: every judged muP row passes outright."""
    frame = run_coord_check("mlp", "adamw", steps=4, seeds=(0, 1), parametrizations=("mup",))
    assert judge(frame).status() == "pass", judge(frame).format()


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
