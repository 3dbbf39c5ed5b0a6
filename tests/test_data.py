"""Tokenizer, generated corpus and the fine-tuning task."""

import hashlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_lab.data import ALPHABET, Rng, get_tokenizer, load_task, pretraining_corpus
from lora_lab.model import load_base_model

# sha256 of the first examples, recorded once; a change means the generated data changed everywhere.
GOLDEN = {
    "corpus": "dafe05a73cc753a1a285e5c9ef47999665b70dd979c44840f10b77b6f7884e90",
    "task": "c9f3766acba8a7cd7948f48b06ec60b1eb15383b2c4a050e89f9a7b9bca8fafc",
}


def sha256(lines) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def first_task_lines(n=200):
    task = load_task()
    return [p + a for p, a in task.train[:n] + task.eval[:n]]


def test_generated_data_is_deterministic_and_matches_golden_hash():
    assert sha256(pretraining_corpus(500)) == sha256(pretraining_corpus(500)) == GOLDEN["corpus"]
    assert sha256(first_task_lines()) == sha256(first_task_lines()) == GOLDEN["task"]


def test_rng_is_splitmix64():
    # first output of splitmix64 seeded with 0 (reference value from the algorithm's published C code)
    assert Rng(0).next() == 0xE220A8397B1DCDAF


@settings(max_examples=30, deadline=None)
@given(st.text(alphabet=ALPHABET, max_size=40))
def test_tokenizer_roundtrip(text):
    tok = get_tokenizer()
    ids = tok.encode(text, bos=True, eos=True)
    assert tok.decode(ids) == text and len(ids) == len(text) + 2 and max(ids, default=0) < tok.vocab_size


def test_tokenizer_rejects_unknown_characters():
    with pytest.raises(ValueError, match="alphabet"):
        get_tokenizer().encode("Hello!")


def test_held_out_words_are_new():
    task = load_task()
    assert not {p for p, _ in task.train} & {p for p, _ in task.eval}
    # the corpus's held-out split is another random stream (short template sentences do repeat)
    assert pretraining_corpus(100) != pretraining_corpus(100, split="eval")


def test_labels_mask_prompt_and_padding():
    task, tok = load_task(), get_tokenizer()
    ids, labels = task.get_batch("train", 16, torch.Generator().manual_seed(0))
    assert ids.shape == labels.shape == (16, task.seq_len)
    for row_ids, row_labels in zip(ids, labels):
        text = tok.decode(row_ids)
        prompt, answer = text.split("> ")
        scored = row_labels[row_labels != -100]
        assert scored.tolist() == tok.encode(answer, eos=True)  # the answer and eos, nothing else
        assert (row_labels[: 1 + len(prompt) + 2] == -100).all()  # bos + "reverse: word > "


def test_evaluate_counts_exact_matches():
    """A model that copies the label at each position scores 100%; one off by a token scores 0%."""
    task = load_task()

    class Oracle(torch.nn.Module):
        def __init__(self, shift):
            super().__init__()
            self.shift, self.w = shift, torch.nn.Parameter(torch.zeros(1))

        def forward(self, ids):
            ids_all, labels = task._encoded("eval")
            rows = [next(i for i in range(len(ids_all)) if torch.equal(ids_all[i], r)) for r in ids]
            target = ids_all[rows].roll(-1, dims=1)  # next token at every position
            target = torch.where(labels[rows].roll(-1, dims=1) == -100, target, (target + self.shift) % 34)
            return torch.nn.functional.one_hot(target, 34).float() * 20

    assert task.evaluate(Oracle(0), max_examples=20)["accuracy"] == 1.0
    assert task.evaluate(Oracle(1), max_examples=20)["accuracy"] == 0.0


def test_base_model_cannot_do_the_task():
    assert load_task().evaluate(load_base_model(device="cpu"))["accuracy"] < 0.05

# That default LoRA learns the task is tested through the trainer: tests/test_train.py.
