"""What fine-tuning forgets: the base model's own task, measured before and after fine-tuning.

Biderman et al. 2024, "LoRA Learns Less and Forgets Less" (arXiv 2405.09673), score forgetting as the fall in
the base model's benchmark scores after fine-tuning; PEFT's benchmark suite (``method_comparison/MetaMathQA``)
as the rise in the base's cross-entropy on held-out text. The kit's base model was pretrained on
`lora_lab.data.pretraining_corpus` (sentences and "copy: abc > abc" lines), so both have an exact analogue here:

    forgetting = corpus_loss(after) - corpus_loss(before)          (nats per token; PEFT's measure)
                 copy_accuracy(before) - copy_accuracy(after)      (exact match on held-out copy lines)

`forgetting_sweep` fine-tunes one copy of the base per (method, rank, learning rate) with `finetune` and returns
one tidy row per run: what it learned (the task's exact match), what it forgot, and its intruder dimensions
(`lora_lab.spectral`). `mitigation_sweep` does the same for PEFT's intruder mitigation over λ.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .data import Task, encode_batch, get_tokenizer, pretraining_corpus
from .lora import LoraConfig
from .model import loss_and_logits
from .spectral import EPSILON, TOP_K, count_intruders, model_cosines, reduce_intruder_dimension
from .train import finetune

CORPUS_SEQ_LEN = 48  # scripts/pretrain.py's sequence length: every corpus line fits


def copy_task(n_eval: int = 200, seed: int = 0) -> Task:
    """The base model's own skill as a `Task`: "copy: word > " -> "word", words from held-out copy lines.

    The words come from ``pretraining_corpus(split="eval")`` (first occurrences, in order), so the base model
    never trained on these lines; ``Task.evaluate`` then gives exact match and per-token accuracy as for any task.
    """
    if isinstance(n_eval, bool) or not isinstance(n_eval, int) or n_eval < 1:
        raise ValueError(f"n_eval must be a positive int, got {n_eval!r}.")
    words: dict[str, None] = {}
    n = 4 * n_eval
    while len(words) < n_eval:
        words = dict.fromkeys(line.split(" > ")[1] for line in pretraining_corpus(n, seed, "eval")
                              if line.startswith("copy: "))
        n *= 2
    pairs = [(f"copy: {w} > ", w) for w in list(words)[:n_eval]]
    seq_len = 1 + max(len(p) + len(a) for p, a in pairs) + 1  # bos prompt answer eos
    return Task("copy", get_tokenizer(), [], pairs, seq_len)


@torch.no_grad()
def corpus_loss(model: nn.Module, ids: torch.Tensor, batch_size: int = 256) -> float:
    """Mean next-token cross-entropy (nats) over the non-padding targets of ``ids`` (N, T), eos included.

    The per-token losses are summed in float64, in a fixed order (portable to the printed digits).
    """
    pad = get_tokenizer().pad_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64), 0
    for start in range(0, len(ids), batch_size):
        x = ids[start:start + batch_size].to(device)  # (B, T)
        logits = loss_and_logits(model(x))[1][:, :-1].float()  # (B, T-1, V)
        target = x[:, 1:].masked_fill(x[:, 1:] == pad, -100)  # (B, T-1)
        ce = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="none")
        total += ce.double().sum().cpu()
        count += int((target != -100).sum())
    model.train(was_training)
    return float(total / count)


@dataclass
class BaseProbe:
    """What the base model knew, ready to measure on any model: held-out corpus lines and copy lines."""

    corpus_ids: torch.Tensor  # (N, CORPUS_SEQ_LEN)
    copy: Task

    @classmethod
    def build(cls, n_corpus: int = 500, n_copy: int = 200, seed: int = 0) -> BaseProbe:
        """``n_corpus`` held-out lines of the pretraining corpus and ``n_copy`` held-out copy words."""
        if isinstance(n_corpus, bool) or not isinstance(n_corpus, int) or n_corpus < 1:
            raise ValueError(f"n_corpus must be a positive int, got {n_corpus!r}.")
        ids = encode_batch(get_tokenizer(), pretraining_corpus(n_corpus, seed, "eval"), CORPUS_SEQ_LEN)
        return cls(ids, copy_task(n_copy, seed))

    def skills(self, model: nn.Module) -> dict:
        """``{"corpus_loss", "copy_accuracy", "copy_token_accuracy"}`` of ``model``."""
        result = self.copy.evaluate(model)
        return {"corpus_loss": corpus_loss(model, self.corpus_ids), "copy_accuracy": result["accuracy"],
                "copy_token_accuracy": result["token_accuracy"]}


def forgetting(before: dict, after: dict) -> dict:
    """What was lost between two `BaseProbe.skills` results: positive means forgotten.

    Returns:
        ``{"corpus_loss_rise", "copy_accuracy_drop", "copy_token_accuracy_drop"}``; exactly 0 for the same model.
    """
    keys = ("corpus_loss", "copy_accuracy", "copy_token_accuracy")
    for name, skills in (("before", before), ("after", after)):
        bad = [k for k in keys if not isinstance(skills.get(k), (int, float)) or not math.isfinite(skills[k])]
        if bad:
            raise ValueError(f"{name} needs finite {bad} (a BaseProbe.skills result), got {skills!r}.")
    return {"corpus_loss_rise": after["corpus_loss"] - before["corpus_loss"],
            "copy_accuracy_drop": before["copy_accuracy"] - after["copy_accuracy"],
            "copy_token_accuracy_drop": before["copy_token_accuracy"] - after["copy_token_accuracy"]}


@dataclass
class Sweep:
    """`forgetting_sweep`'s result: one row per run, the base's skills, and the tuned models by `key`."""

    rows: list[dict]
    base_skills: dict
    models: dict = field(default_factory=dict, repr=False)

    def row(self, method: str, r: int | None, lr: float) -> dict:
        """The row of one run (``r`` None for full fine-tuning)."""
        return self.rows[[key(x["method"], x["r"], x["lr"]) for x in self.rows].index(key(method, r, lr))]


def key(method: str, r: int | None, lr: float) -> tuple:
    """A run's name in `Sweep.models` and in the widgets: ``("lora", 4, 0.005)``, ``("full", None, 0.001)``."""
    return (method, r if method == "lora" else None, float(lr))


def _check_runs(runs) -> list[tuple]:
    runs = [key(*run) for run in runs]
    for method, r, lr in runs:
        if method not in ("full", "lora"):
            raise ValueError(f"method must be 'full' or 'lora', got {method!r}.")
        if method == "lora" and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
            raise ValueError(f"a LoRA run needs a positive int rank, got r={r!r}.")
        if not lr > 0 or not math.isfinite(lr):
            raise ValueError(f"lr must be a positive finite number, got {lr!r}.")
    if len(set(runs)) != len(runs):
        raise ValueError("runs holds the same (method, r, lr) twice.")
    return runs


def forgetting_sweep(base: nn.Module, task, runs, probe: BaseProbe, *, steps: int = 60, batch_size: int = 16,
                     seed: int = 0, lora_alpha: float = 16, target_modules=("q_proj", "v_proj"),
                     top_k: int = TOP_K, threshold_epsilon: float = EPSILON, keep=()) -> Sweep:
    """Fine-tune a copy of ``base`` for each ``(method, r, lr)`` in ``runs`` and measure learning and forgetting.

    Args:
        base: the pretrained model (not changed).
        task: the fine-tuning task (`lora_lab.data.load_task`).
        runs: ``(method, r, lr)`` triples; ``method`` "full" (``r`` ignored) or "lora" (``LoraConfig(r=r,
            lora_alpha=lora_alpha, target_modules=target_modules)``).
        probe: what the base knew (`BaseProbe.build()`).
        keep: keys (`key`) of runs whose tuned model to keep in ``Sweep.models``.

    Returns:
        A `Sweep`; each row has method, r, lr, task_accuracy, task_loss, the `BaseProbe.skills` and `forgetting`
        entries, cosines (`model_cosines` of ``target_modules``, as lists), intruders (their count) and stopped
        (None, or why `finetune` stopped early: a diverged run is recorded, not warned about).
    """
    runs = _check_runs(runs)
    keep = {key(*k) for k in keep}
    before = probe.skills(base)
    sweep = Sweep([], before)
    for method, r, lr in runs:
        tuned = copy.deepcopy(base)
        config = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=list(target_modules)) if r else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # divergence: kept in the row's "stopped"
            history = finetune(tuned, task, method=method, config=config, steps=steps, lr=lr, batch_size=batch_size,
                               seed=seed, eval_every=None)
        after = probe.skills(tuned)
        cosines = model_cosines(base, tuned, target_modules, top_k)
        sweep.rows.append({"method": method, "r": r, "lr": lr, "task_accuracy": history.eval_accuracy[-1],
                           "task_loss": history.eval_loss[-1], **after, **forgetting(before, after),
                           "cosines": {n: c.tolist() for n, c in cosines.items()},
                           "intruders": count_intruders(cosines, threshold_epsilon),
                           "stopped": history.stopped_reason})
        if (method, r, lr) in keep:
            sweep.models[(method, r, lr)] = tuned
    return sweep


def mitigation_sweep(base: nn.Module, tuned: nn.Module, task, probe: BaseProbe, lambdas, *,
                     top_k: int = TOP_K, threshold_epsilon: float = EPSILON) -> list[dict]:
    """PEFT's `reduce_intruder_dimension` at each λ on a copy of a LoRA model, measured like a sweep's runs.

    Args:
        base: the pretrained model ``tuned`` was fine-tuned from (for the intruder count and `forgetting`).
        tuned: a LoRA model with adapter "default" (not changed).
        lambdas: the mitigation_lambda values (1 keeps the adapter as it is, 0 removes its intruders).

    Returns:
        One row per λ: lambda, layers_with_intruders, task_accuracy, task_loss, the skills, `forgetting`, and
        intruders (counted again on the mitigated model).
    """
    lambdas = [float(x) for x in lambdas]
    if not lambdas or not all(math.isfinite(x) for x in lambdas):
        raise ValueError(f"lambdas must be one or more finite numbers, got {lambdas!r}.")
    if "default" not in getattr(tuned, "peft_config", {}):
        raise ValueError("tuned needs a LoRA adapter named 'default' (a method='lora' run).")
    before, rows = probe.skills(base), []
    for lam in lambdas:
        model = copy.deepcopy(tuned)
        found = reduce_intruder_dimension(model, "default", "intruder_reduced", top_k, threshold_epsilon, lam)
        result, after = task.evaluate(model), probe.skills(model)
        rows.append({"lambda": lam, "layers_with_intruders": sum(n > 0 for n in found.values()),
                     "task_accuracy": result["accuracy"], "task_loss": result["loss"], **after,
                     **forgetting(before, after),
                     "intruders": count_intruders(model_cosines(base, model, top_k=top_k), threshold_epsilon)})
    return rows
