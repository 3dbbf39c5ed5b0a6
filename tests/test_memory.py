"""lora_lab.memory: byte accounting against tensors built by hand, through `lora_lab.train.measure`."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lora_lab.inject import apply_lora
from lora_lab.lora import LoraConfig, count_parameters
from lora_lab.memory import SavedTensors, unique_bytes
from lora_lab.model import LlamaConfig, LlamaForCausalLM
from lora_lab.train import measure

F32 = 4  # bytes per float32 element


class TwoLinear(nn.Module):
    """loss = sum(relu(W2 (W1 x) + b2)^2): W1 (3, 4) frozen, W2 (2, 3) + b2 (2,) trainable, a float64 buffer (5,)."""

    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(4, 3, bias=False).requires_grad_(False)
        self.head = nn.Linear(3, 2)
        self.register_buffer("table", torch.zeros(5, dtype=torch.float64))

    def forward(self, x, labels=None):
        h = self.frozen(x)  # (B, 3); nothing before it needs grad, so nothing is saved
        r = torch.relu(self.head(h))  # addmm saves h (and W2.t(), a view of a parameter); relu saves r
        return (r * r).sum(), r  # mul saves r twice: one storage


@settings(max_examples=5, deadline=None)
@given(batch=st.integers(1, 16))
def test_breakdown_counts_hand_built_tensors(batch):
    model = TwoLinear()
    mem = measure(model, (torch.randn(batch, 4), None))
    assert mem.frozen_weights == 3 * 4 * F32 + 5 * 8  # W1 + the float64 buffer
    assert mem.trainable_weights == (2 * 3 + 2) * F32
    assert mem.gradients == (2 * 3 + 2) * F32
    assert mem.optimizer_state == 2 * (2 * 3 + 2) * F32 + 2 * F32  # exp_avg, exp_avg_sq + a float32 step each
    assert mem.activations == batch * 3 * F32 + batch * 2 * F32  # h and r; r saved twice counts once
    assert mem.total == sum(mem.as_dict().values())


def test_a_view_counts_its_whole_storage_once():
    base = torch.zeros(10, 10)
    assert unique_bytes([base, base[2:4], base.t()]) == 100 * F32  # memory is held by storage, not by views


def test_saved_parameters_are_not_activations():
    lin = nn.Linear(8, 8)
    x = torch.randn(2, 8, requires_grad=True)
    with SavedTensors(lin) as saved:
        lin(x).sum()
    assert saved.nbytes == x.numel() * F32  # addmm saves x and W.t(); W is a weight, already counted


def test_measure_leaves_the_weights_unchanged():
    torch.manual_seed(0)
    model = apply_lora(LlamaForCausalLM(LlamaConfig()), LoraConfig())
    for layer in model.modules():  # make B nonzero so a real step would move A
        if hasattr(layer, "lora_B"):
            nn.init.normal_(layer.lora_B["default"].weight)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    measure(model, (ids, ids))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_measure_reads_the_loss_of_a_transformers_causal_lm():
    transformers = pytest.importorskip("transformers", reason="builds a tiny transformers LlamaForCausalLM")
    torch.manual_seed(0)
    model = apply_lora(transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=16)), LoraConfig(r=2))
    ids = torch.randint(0, 40, (2, 16))
    mem = measure(model, (ids, ids))  # the forward returns a CausalLMOutputWithPast, not (loss, logits)
    assert mem.trainable_weights == count_parameters(model).trainable * F32
