"""lora_lab.loraplus: LoRA+'s parameter groups equal PEFT's, and B's step is loraplus_lr_ratio times A's."""

import copy

import pytest
import torch
from torch import nn

from model_state import assert_unchanged, snapshot

from lora_lab import apply_lora, create_loraplus_optimizer, loraplus_param_groups
from lora_lab.data import load_task
from lora_lab.lora import LoraConfig
from lora_lab.model import LlamaConfig, LlamaForCausalLM
from lora_lab.train import finetune

peft = pytest.importorskip("peft", reason="the LoRA+ tests compare with PEFT (pip install peft)")
transformers = pytest.importorskip("transformers", reason="the interop tests build a tiny transformers Llama")
from peft.optimizers import create_loraplus_optimizer as peft_create_loraplus_optimizer  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


class Net(nn.Module):
    """A LayerNorm (its weight and bias: no decay), an RMSNorm-like 1-D weight (decay), linears with biases."""

    def __init__(self):
        super().__init__()
        self.q_proj, self.v_proj = nn.Linear(16, 16), nn.Linear(16, 16, bias=False)
        self.norm, self.scale = nn.LayerNorm(16), nn.Parameter(torch.ones(16))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.norm(self.q_proj(x) + self.v_proj(x)) * self.scale)


def both(bias="all"):
    """The kit's and PEFT's model from the same weights; trainable: the factors, plus biases and norms."""
    torch.manual_seed(0)
    net = Net()
    ours = apply_lora(copy.deepcopy(net), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], bias=bias,
                                                     init_lora_weights=False))
    theirs = peft.get_peft_model(copy.deepcopy(net), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                                     bias=bias, init_lora_weights=False))
    for model in (ours, theirs):
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "scale")):
                p.requires_grad_(True)
    with torch.no_grad():
        for p, q in zip(ours.parameters(), theirs.parameters()):
            q.copy_(p)  # the same factors too (init_lora_weights=False drew them independently)
    return ours, theirs


def names_by_group(model, groups):
    """Each group's parameters by name (PEFT's ``base_model.model.`` prefix dropped), with its lr and decay."""
    names = {id(p): n.removeprefix("base_model.model.") for n, p in model.named_parameters()}
    return [(sorted(names[id(p)] for p in g["params"]), g["lr"], g["weight_decay"]) for g in groups]


@pytest.mark.parametrize("bias", ["none", "all"])
def test_the_groups_equal_peft_s(bias):
    ours, theirs = both(bias)
    mine = create_loraplus_optimizer(ours, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16,
                                     loraplus_weight_decay=0.1)
    peft_s = peft_create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16,
                                            loraplus_weight_decay=0.1)
    assert names_by_group(ours, mine.param_groups) == names_by_group(theirs, peft_s.param_groups)
    groups = names_by_group(ours, mine.param_groups)
    assert groups[0][1:] == (1e-3, 0.1) and all("lora_A" in n for n in groups[0][0])
    assert groups[2][1:] == (16e-3, 0.1) and any("lora_B" in n for n in groups[2][0]) and "scale" in groups[2][0]
    assert groups[3][1:] == (16e-3, 0.0) and "norm.weight" in groups[3][0]  # LayerNorm and biases: no decay


def test_one_adamw_step_equals_peft_s():
    ours, theirs = both()
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    for model, create in ((ours, create_loraplus_optimizer), (theirs, peft_create_loraplus_optimizer)):
        optimizer = create(model, torch.optim.AdamW, lr=1e-2, loraplus_lr_ratio=4)
        model(x).square().mean().backward()
        optimizer.step()
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        # Same groups and gradients; the LoRA forward rounds its scaling at another point (see test_adapter.py).
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_an_sgd_step_moves_b_by_exactly_the_ratio():
    ours, _ = both("none")
    before = {n: p.detach().clone() for n, p in ours.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD(loraplus_param_groups(ours, 0.5, 8), lr=0.5)
    ours(torch.randn(8, 16, generator=torch.Generator().manual_seed(1))).square().mean().backward()
    grads = {n: p.grad.clone() for n, p in ours.named_parameters() if p.requires_grad}
    optimizer.step()
    for name, p in ours.named_parameters():
        if "lora_A" in name or "lora_B" in name:
            rate = 0.5 * 8 if "lora_B" in name else 0.5
            assert grads[name].abs().max() > 0  # B is random (init False), so A gets a gradient too
            assert torch.equal(p.detach(), before[name] - rate * grads[name]), name  # SGD's own arithmetic


def test_the_first_adam_step_is_the_ratio_larger_for_b():
    ours, _ = both("none")
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    optimizer = torch.optim.Adam(loraplus_param_groups(ours, 1e-3, 16), lr=1e-3)
    ours(torch.randn(8, 16, generator=torch.Generator().manual_seed(1))).square().mean().backward()
    optimizer.step()
    steps = {n: (p.detach() - before[n]).abs().max().item() for n, p in ours.named_parameters() if "lora_" in n}
    # Adam's first step is lr * g / (|g| + eps): lr wherever |g| >> eps = 1e-8.
    for name, step in steps.items():
        assert step == pytest.approx(16e-3 if "lora_B" in name else 1e-3, rel=1e-4), name


def test_a_model_without_trainable_b_is_refused():
    with pytest.raises(ValueError, match="no lora_B trains"):
        loraplus_param_groups(nn.Linear(4, 4), 1e-3, 16)


@pytest.mark.parametrize("ratio", [0, -1, float("nan"), float("inf"), True, "16"])
def test_a_bad_ratio_is_refused(ratio):
    ours, _ = both()
    with pytest.raises(ValueError, match="loraplus_lr_ratio"):
        loraplus_param_groups(ours, 1e-3, ratio)


# -------------------------------------------------------------------------------------- finetune


@pytest.fixture(scope="module")
def task():
    return load_task()


QUICK = dict(steps=3, batch_size=8, eval_every=None, eval_examples=16, device="cpu")


def test_finetune_trains_with_loraplus(task):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig())
    history = finetune(model, task, loraplus_lr_ratio=16, **QUICK)
    assert history.steps == 3 and history.stopped_reason is None
    torch.manual_seed(0)
    plain = finetune(LlamaForCausalLM(LlamaConfig()), task, **QUICK)
    assert history.train_loss[0] == plain.train_loss[0]  # the same model before the first update
    assert history.train_loss[1:] != plain.train_loss[1:]  # B moved 16 times further


@pytest.mark.parametrize("method, ratio, match", [
    ("lora", 0, "positive, finite"), ("lora", float("nan"), "positive, finite"), ("full", 16, "no LoRA factors"),
    (None, 16, "no LoRA factors"),
])
def test_finetune_refuses_loraplus_that_makes_no_sense_before_changing_the_model(task, method, ratio, match):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig())
    if method is None:
        model.lm_head.requires_grad_(True)
        model.model.requires_grad_(False)
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        finetune(model, task, method=method, loraplus_lr_ratio=ratio, **QUICK)
    assert_unchanged(model, before)


@pytest.mark.parametrize("method, init", [("lora", "pissa"), ("qlora", "loftq")])
def test_finetune_with_a_decomposing_init_and_loraplus_runs(task, method, init):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig())
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=init, loftq_config={"loftq_iter": 1} if init == "loftq"
                        else {})
    history = finetune(model, task, method=method, config=config, loraplus_lr_ratio=4, **QUICK)
    assert history.steps == 3 and history.stopped_reason is None
