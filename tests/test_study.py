"""The "does muP pay off?" study: its searches, its answer, its resuming, and its command on a tiny case."""
from __future__ import annotations

import math
from dataclasses import replace

import pandas as pd
import pytest
import torch

from coord_checks import study
from coord_checks.cli import main
from coord_checks.models import build_model
from coord_checks.study import Knobs, RunStore, Study, StudySettings, Variant

TINY = dict(model="transformer", widths=(16, 32), seeds=(0, 1), steps=6, eval_steps=(3,), batch_size=4,
            seq_len=8, n_layers=1, eval_batches=1, eval_batch_size=4, start_points=3, max_points=5,
            warmup_steps=0)


class QuadraticStudy(Study):
    """A study whose runs are not trained: the validation loss is ``1 + 0.1 (log2 lr - optimum)^2``
    plus a seed offset, with the optimum given per (parametrization, width); the test loss is the
    validation loss plus 0.5."""

    def __init__(self, settings: StudySettings, optima: dict[tuple[str, int], float], level=None):
        super().__init__(settings, RunStore(None, settings.horizons))
        self.optima = optima
        self.level = level or {}
        self.calls: list[tuple[str, int, int, int]] = []

    def run(self, knobs: Knobs, width: int, k: int, seed: int):
        key = study._key({**study.asdict(knobs), "width": width, "lr": self.settings.lr(k), "seed": seed})
        stored = self.store.get(key)
        if stored is not None:
            return stored
        self.calls.append((knobs.parametrization, width, k, seed))
        log2_lr = k / self.settings.points_per_octave
        valid = (1.0 + 0.1 * (log2_lr - self.optima[knobs.parametrization, width]) ** 2
                 + self.level.get((knobs.parametrization, width), 0.0) + 0.01 * seed)
        rows = [{**study.asdict(knobs), "width": width, "lr": self.settings.lr(k), "log2_lr": log2_lr,
                 "seed": seed, "step": step, "train_loss": valid, "valid_loss": valid, "test_loss": valid + 0.5,
                 "diverged": False, "seconds": 0.0} for step in self.settings.horizons]
        self.store.add(rows)
        return rows


def quadratic_settings(**changes) -> StudySettings:
    return StudySettings(**{**dict(model="transformer", widths=(32, 64, 128, 256), seeds=(0, 1), steps=10),
                            **changes})


def test_a_search_walks_from_a_far_guess_to_a_bracketed_minimum():
    settings = quadratic_settings(max_points=20)
    fake = QuadraticStudy(settings, {("sp", 32): -9.0})
    assert fake.search(Knobs("sp"), 32, center=-4) == -18  # log2 lr -9 at 2 points per octave
    tried = sorted({k for _, _, k, _ in fake.calls})
    assert tried == list(range(-19, -1))  # the start window -6..-2, then one point at a time down to -19


def test_a_search_stops_at_max_points():
    settings = quadratic_settings(max_points=6)
    fake = QuadraticStudy(settings, {("sp", 32): -20.0})
    fake.search(Knobs("sp"), 32, center=0)
    assert len({k for _, _, k, _ in fake.calls}) == 6


def test_sp_is_tuned_at_every_width_and_mup_only_at_the_base_width():
    # SP's optimum halves per doubling, muP's stays; muP is worse by 0.05 at every width but the first.
    widths = (32, 64, 128, 256)
    optima = {**{("sp", w): -5.0 - i for i, w in enumerate(widths)},
              **{("mup", w): -5.0 + (0.5 if w == 256 else 0.0) for w in widths}}
    level = {("mup", w): 0.05 for w in widths[1:]}
    settings = quadratic_settings()
    fake = QuadraticStudy(settings, optima, level)
    tuned = fake.run_variant(Variant("mup"))
    summary = study.summarize(fake.store.frame(), settings, {"mup": tuned}, [Variant("mup")])
    final = summary[summary["step"] == 10].set_index("width")
    assert list(final["sp_log2_lr"]) == [-5.0, -6.0, -7.0, -8.0]
    assert list(final["mup_log2_lr"]) == [-5.0] * 4  # the base width's choice, carried unchanged
    assert final.loc[256, "mup_log2_lr_opt"] == pytest.approx(-4.5)  # muP's own optimum there, by parabola
    # muP at the transferred lr: 1.05 + 0.1 * 0.5**2 at width 256; SP at its optimum: 1.0 (+ 0.5 for test)
    assert final.loc[256, "gap"] == pytest.approx(0.05 + 0.025)
    assert final.loc[256, "gap_std"] == pytest.approx(0.0)  # the seed offsets cancel in the paired gap
    assert final.loc[64, "gap"] == pytest.approx(0.05)
    assert final.loc[32, "sp_test"] == pytest.approx(1.5 + 0.005)  # mean of the seed offsets 0 and 0.01
    assert final.loc[32, "sp_test_std"] == pytest.approx(0.01 / math.sqrt(2))
    sp_calls = [(w, k) for p, w, k, _ in fake.calls if p == "sp"]
    # from 128 on, the guess extrapolates the last two optima (one octave down per doubling) and lands
    # on the optimum: the first window of 5 points brackets it, two seeds each
    assert [sum(1 for w, _ in sp_calls if w == width) for width in (128, 256)] == [10, 10]
    drift = study.drift(summary).set_index("step").loc[10]
    assert drift["sp_drift_octaves"] == pytest.approx(3.0)
    assert drift["sp_trend"] == pytest.approx(-1.0)
    assert drift["mup_drift_octaves"] == pytest.approx(0.5)


def test_wider_is_better_needs_the_loss_to_fall_beyond_the_seed_spread():
    widths = (32, 64, 128, 256)
    optima = {**{("sp", w): -5.0 for w in widths}, **{("mup", w): -5.0 for w in widths}}
    level = {("mup", 64): -0.1, ("mup", 128): -0.105, ("mup", 256): -0.3}
    fake = QuadraticStudy(quadratic_settings(), optima, level)
    tuned = fake.run_variant(Variant("mup"))
    summary = study.summarize(fake.store.frame(), fake.settings, {"mup": tuned}, [Variant("mup")])
    better = summary[summary["step"] == 10].set_index("width")["wider_is_better"]
    assert math.isnan(better[32])
    assert better[64] and not better[128] and better[256]  # 0.005 lower is inside two spreads of 0.007


def test_knob_variants_tune_their_multiplier_at_the_base_width_only():
    calls = []

    class MultiplierStudy(QuadraticStudy):
        def mean_loss(self, knobs, width, k, step=None):
            calls.append((knobs.output_mult, width))
            return super().mean_loss(knobs, width, k, step) + (0.0 if knobs.output_mult == 2.0 else 0.2)

    widths = (32, 64)
    fake = MultiplierStudy(quadratic_settings(widths=widths), {(p, w): -5.0 for p in ("sp", "mup") for w in widths})
    tuned = fake.tune_at_base(Variant("tuned-mults", tune=("output",)))[0]
    assert tuned.output_mult == 2.0
    assert {width for mult, width in calls if mult != 1.0} == {32}


def test_variants_name_each_ablation_and_refuse_bad_values():
    names = [v.name for v in study.variants(zero_init=True, split_zero_init=True, tune_mults=["input", "attn"],
                                            tune_roles=True, betas=[0.95], epsilons=[1e-4], scale_eps=True)]
    assert names == ["default", "zero-init", "zero-readout-only", "zero-query-only", "tuned-mults", "tuned-roles",
                     "beta=0.95", "eps=0.0001", "eps=0.0001,scaled"]
    beta = study.variants(betas=[0.5])[1]
    assert beta.sp == Knobs("sp", beta=0.5) and beta.mup == Knobs(beta=0.5)  # the optimizer's knob changes SP too
    assert study.variants(zero_init=True)[1].mup == Knobs(zero_init=True) and Knobs().zero_init is False
    with pytest.raises(ValueError, match="tune_mults"):
        study.variants(tune_mults=["readout"])
    with pytest.raises(ValueError, match="betas"):
        study.variants(betas=[1.0])


@pytest.mark.parametrize("change, message", [
    (dict(widths=(64, 32)), "widths must be distinct and increasing"),
    (dict(widths=(30, 60)), "multiples of 4"),
    (dict(model="cnn"), "model must be"),
    (dict(optimizer="wrapper"), "optimizer must be"),
    (dict(eval_steps=(200,)), "eval_steps"),
    (dict(start_points=4), "start_points"),
    (dict(seeds=()), "seeds"),
])
def test_settings_refuse_what_a_study_cannot_run(change, message):
    with pytest.raises(ValueError, match=message):
        StudySettings(**{**TINY, **change})


def test_ablations_on_zero_init_keep_sp_and_carry_the_zero_init_in_name_and_knobs():
    on_zero = study.variants(zero_init=True, tune_mults=["output"], tune_roles=True, betas=[0.95], epsilons=[1e-4],
                             scale_eps=True, on_zero_init=True)
    assert [v.name for v in on_zero] == ["default", "zero-init", "zero-init,tuned-mults", "zero-init,tuned-roles",
                                         "zero-init,beta=0.95", "zero-init,eps=0.0001", "zero-init,eps=0.0001,scaled"]
    assert all(v.mup.zero_init is True for v in on_zero[1:]) and on_zero[0].mup == Knobs()
    plain = study.variants(tune_mults=["output"], tune_roles=True, betas=[0.95], epsilons=[1e-4], scale_eps=True)
    assert len(plain) == len(on_zero) - 1
    for zeroed, default in zip(on_zero[2:], plain[1:]):
        assert zeroed.name == "zero-init," + default.name
        assert zeroed.sp == default.sp and zeroed.tune == default.tune
        assert zeroed.mup == replace(default.mup, zero_init=True)


def test_sp_runs_written_when_the_models_zero_initialised_by_default_are_found_again(tmp_path):
    """Files written before the examples' default changed say zero_init=True on SP rows, which SP never used."""
    settings = StudySettings(**TINY)
    runs, _ = study.run_study(settings, study.variants(), out=tmp_path)
    csv = tmp_path / "study_runs.csv"
    old = pd.read_csv(csv)
    old["zero_init"] = old["zero_init"].astype(str).where(old["parametrization"] == "mup", "True")
    old.to_csv(csv, index=False)
    again: list[str] = []
    study.run_study(settings, study.variants(), out=tmp_path, report=again.append)
    assert again == []


def test_model_knobs_change_the_muP_model_only():
    torch.manual_seed(0)
    plain = build_model("transformer", 32, "mup", max_seq_len=8)
    assert plain.readout.weight.any() and plain.blocks[0].attn.query.weight.any()
    zeroed = build_model("transformer", 32, "mup", max_seq_len=8, zero_init=True)
    assert not zeroed.readout.weight.any() and not zeroed.blocks[0].attn.query.weight.any()
    torch.manual_seed(0)
    warm = build_model("transformer", 32, "mup", max_seq_len=8, zero_init=False, output_mult=2.0, attn_mult=4.0)
    assert warm.readout.weight.any() and warm.blocks[0].attn.query.weight.any()
    assert warm.readout.output_mult == 2.0 and warm.blocks[0].attn.scale == 4.0 / 8
    tokens = torch.randint(0, 96, (2, 8))
    torch.manual_seed(0)
    doubled = build_model("transformer", 32, "mup", max_seq_len=8, zero_init=False, input_mult=2.0)
    torch.manual_seed(0)
    single = build_model("transformer", 32, "mup", max_seq_len=8, zero_init=False)
    assert not torch.equal(doubled(tokens), single(tokens))
    torch.manual_seed(0)
    readout_only = build_model("transformer", 32, "mup", max_seq_len=8, zero_init="readout")
    assert not readout_only.readout.weight.any() and readout_only.blocks[0].attn.query.weight.any()
    torch.manual_seed(0)
    query_only = build_model("transformer", 32, "mup", max_seq_len=8, zero_init="query")
    assert query_only.readout.weight.any() and not query_only.blocks[0].attn.query.weight.any()
    with pytest.raises(ValueError, match="zero_init must be"):
        build_model("transformer", 32, "mup", zero_init="keys")
    with pytest.raises(ValueError, match="muP knobs"):
        build_model("transformer", 32, "sp", zero_init=True)
    with pytest.raises(ValueError, match="input_mult must be a positive number"):
        build_model("mlp", 64, "mup", d_in=8, d_out=4, input_mult=0.0)


def test_a_study_resumes_where_it_stopped_and_ends_where_an_uninterrupted_one_does(tmp_path):
    settings = StudySettings(**TINY)
    chosen = study.variants(zero_init=True)
    lines: list[str] = []
    runs, tuned = study.run_study(settings, chosen, out=tmp_path, report=lines.append)
    assert lines and len(runs) == len(lines) * len(settings.horizons)
    again: list[str] = []
    resumed, tuned_again = study.run_study(settings, chosen, out=tmp_path, report=again.append)
    assert again == [] and tuned_again == tuned
    pd.testing.assert_frame_equal(resumed.reset_index(drop=True), runs.reset_index(drop=True))

    csv = tmp_path / "study_runs.csv"
    text = csv.read_text()
    csv.write_text(text[:-20])  # cut inside the last run's last row, as a kill while writing would
    cut: list[str] = []
    repaired, _ = study.run_study(settings, chosen, out=tmp_path, report=cut.append)
    assert len(cut) == 1  # only the run that was cut is trained again
    assert csv.read_text().count("\n") == text.count("\n")  # the cut run's other rows were dropped, not doubled
    key = ["parametrization", "zero_init", "width", "lr", "seed", "step"]
    assert repaired.sort_values(key)["valid_loss"].tolist() == runs.sort_values(key)["valid_loss"].tolist()


def test_an_output_folder_holding_another_study_is_refused_before_any_run(tmp_path):
    study.run_study(StudySettings(**TINY), [Variant("mup")], out=tmp_path)
    before = (tmp_path / "study_runs.csv").read_text()
    with pytest.raises(ValueError, match="steps=6, not 7"):
        study.run_study(StudySettings(**{**TINY, "steps": 7}), [Variant("mup")], out=tmp_path)
    assert (tmp_path / "study_runs.csv").read_text() == before


def test_the_study_command_writes_its_answer_on_a_tiny_case(tmp_path, capsys):
    out = tmp_path / "study"
    status = main(["study", "--widths", "16", "32", "--seeds", "0", "--steps", "4", "--eval-steps", "2",
                   "--batch-size", "4", "--seq-len", "8", "--warmup-steps", "0", "--tune-mults", "output",
                   "--out", str(out), "--quiet"])
    assert status == 0
    printed = capsys.readouterr().out
    assert "gap" in printed and "tuned-mults" in printed
    for name in ("study.json", "study_runs.csv", "study_summary.csv", "study_drift.csv", "study.png",
                 "study_step2.png"):
        assert (out / name).stat().st_size > 0, name
    summary = pd.read_csv(out / "study_summary.csv")
    assert set(summary["variant"]) == {"default", "tuned-mults"} and set(summary["width"]) == {16, 32}
    assert set(summary["step"]) == {2, 4}


@pytest.mark.parametrize("argv, flag", [
    (["--widths", "32", "16"], "--widths"),
    (["--eval-steps", "9", "--steps", "4"], "--eval-steps"),
    (["--betas", "1.5"], "--betas"),
    (["--tune-mults", "readout"], "--tune-mults"),
    (["--zero-init", "--on-zero-init"], "--on-zero-init"),
])
def test_study_command_errors_are_one_line_naming_the_flag(tmp_path, capsys, argv, flag):
    with pytest.raises(SystemExit) as exit_:
        main(["study", "--out", str(tmp_path), *argv])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and flag in error


def test_the_eps_variants_reach_the_optimizer():
    settings = StudySettings(**TINY)
    data = study.StudyData(settings)
    torch.manual_seed(0)
    _, scaled = study.build_run(settings, data, Knobs(eps=1e-4, scale_eps=True), 32, 1e-3)
    _, fixed = study.build_run(settings, data, Knobs("sp", eps=1e-4, beta=0.5), 32, 1e-3)
    hidden = [g for g in scaled.param_groups if g["mup_role"] == "matrix-like"][0]
    assert hidden["eps"] == pytest.approx(1e-4 / 2) and hidden["mup_eps_mult"] == pytest.approx(0.5)  # width_mult 2
    assert all(g["eps"] == 1e-4 and g["betas"] == (0.5, 0.999) for g in fixed.param_groups)


def test_a_study_reads_only_its_own_widths_and_seeds_from_a_shared_folder(tmp_path):
    study.run_study(StudySettings(**TINY), [Variant("default")], out=tmp_path)
    one_seed = StudySettings(**{**TINY, "seeds": (0,)})
    runs, tuned = study.run_study(one_seed, [Variant("default")], out=tmp_path)
    assert set(runs["seed"]) == {0}  # the folder's seed-1 runs are left out
    summary = study.summarize(runs, one_seed, tuned, [Variant("default")])
    assert (summary["sp_test_std"] == 0).all() and (summary["gap_std"] == 0).all()
