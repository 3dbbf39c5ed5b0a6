"""Tests for lora_lab.forgetting: the base task before and after fine-tuning, and the sweeps over runs."""

import copy

import pytest
import torch

from model_state import assert_unchanged, snapshot

from lora_lab import load_base_model, load_task, pretraining_corpus
from lora_lab.forgetting import (BaseProbe, copy_task, corpus_loss, forgetting, forgetting_sweep, key,
                                 mitigation_sweep)


@pytest.fixture(scope="module")
def base():
    return load_base_model("cpu")


@pytest.fixture(scope="module")
def probe():
    return BaseProbe.build(n_corpus=64, n_copy=40)


@pytest.fixture(scope="module")
def task():
    return load_task("vowel", n_train=64, n_eval=20)


def test_copy_task_holds_held_out_copy_lines_of_the_corpus():
    copy_lines = set(pretraining_corpus(800, split="eval"))
    task = copy_task(n_eval=50)
    assert len({a for _, a in task.eval}) == 50  # distinct words
    assert all(p + a in copy_lines and p == f"copy: {a} > " for p, a in task.eval)


def test_the_base_model_copies_held_out_words(base, probe):
    assert probe.skills(base)["copy_accuracy"] >= 0.95  # what it was pretrained on (measured: every word)


def test_corpus_loss_is_the_models_own_mean_loss(base, probe):
    ids = probe.corpus_ids
    labels = ids.masked_fill(ids == 0, -100)
    with torch.no_grad():
        own = base(ids, labels=labels)[0]  # the model shifts labels itself, as transformers does
    assert corpus_loss(base, ids, batch_size=64) == pytest.approx(float(own), rel=1e-5)


def test_an_unchanged_model_forgets_exactly_nothing(base, probe):
    assert set(forgetting(probe.skills(base), probe.skills(copy.deepcopy(base))).values()) == {0.0}


def test_forgetting_is_positive_when_skills_fall_and_refuses_nan():
    before = {"corpus_loss": 0.5, "copy_accuracy": 1.0, "copy_token_accuracy": 1.0}
    after = {"corpus_loss": 0.75, "copy_accuracy": 0.5, "copy_token_accuracy": 0.875}
    assert forgetting(before, after) == {"corpus_loss_rise": 0.25, "copy_accuracy_drop": 0.5,
                                         "copy_token_accuracy_drop": 0.125}
    with pytest.raises(ValueError, match="finite"):
        forgetting(before, {**after, "corpus_loss": float("nan")})


def test_a_sweep_row_is_the_skills_of_its_tuned_model(base, task, probe):
    before = snapshot(base)
    runs = [("full", None, 1e-3), ("lora", 2, 5e-3)]
    sweep = forgetting_sweep(base, task, runs, probe, steps=3, batch_size=8, keep=[("lora", 2, 5e-3)])
    assert_unchanged(base, before)
    assert [(r["method"], r["r"], r["lr"]) for r in sweep.rows] == [key(*run) for run in runs]
    row, tuned = sweep.row("lora", 2, 5e-3), sweep.models[key("lora", 2, 5e-3)]
    assert {k: row[k] for k in sweep.base_skills} == probe.skills(tuned)
    assert row["corpus_loss_rise"] == row["corpus_loss"] - sweep.base_skills["corpus_loss"]
    assert row["task_accuracy"] == task.evaluate(tuned)["accuracy"]
    assert len(row["cosines"]) == 8 and row["intruders"] == sum(c < 0.5 for v in row["cosines"].values() for c in v)


@pytest.mark.parametrize("runs, match", [
    ([("qlora", 4, 1e-3)], "method"),
    ([("lora", 0, 1e-3)], "rank"),
    ([("full", None, 0.0)], "lr"),
    ([("full", None, 1e-3), ("full", 8, 1e-3)], "twice"),  # full fine-tuning has no rank: the same run
])
def test_bad_runs_are_refused_before_any_training(base, task, probe, runs, match):
    with pytest.raises(ValueError, match=match):
        forgetting_sweep(base, task, runs, probe, steps=1)


def test_mitigation_at_lambda_one_measures_the_tuned_model_unchanged(base, task, probe):
    sweep = forgetting_sweep(base, task, [("lora", 2, 5e-2)], probe, steps=5, batch_size=8,
                             keep=[("lora", 2, 5e-2)])
    tuned = sweep.models[key("lora", 2, 5e-2)]
    before = snapshot(tuned)
    rows = mitigation_sweep(base, tuned, task, probe, [0.0, 1.0])
    assert_unchanged(tuned, before)
    one = rows[1]
    assert one["task_accuracy"] == task.evaluate(tuned)["accuracy"]
    assert one["copy_accuracy"] == sweep.rows[0]["copy_accuracy"]
    assert one["corpus_loss"] == pytest.approx(sweep.rows[0]["corpus_loss"], rel=1e-5)  # a refit, same update
    with pytest.raises(ValueError, match="finite"):
        mitigation_sweep(base, tuned, task, probe, [float("nan")])
    with pytest.raises(ValueError, match="LoRA adapter"):
        mitigation_sweep(base, base, task, probe, [1.0])
