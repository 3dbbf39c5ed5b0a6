"""lora_lab.memory: byte accounting against tensors built by hand, the meta-device estimate against measurement."""

import resource

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lora_lab.inject import apply_lora
from lora_lab.lora import LoraConfig, count_parameters
from lora_lab.memory import (CATEGORIES, PRESETS, PUBLISHED_PARAMS, SavedTensors, estimate, measure, model_config,
                             unique_bytes)
from lora_lab.model import LlamaConfig, LlamaForCausalLM
from lora_lab.train import prepare_model

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
            nn.init.normal_(layer.lora_B.weight)
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


def _measured_and_estimated(method, checkpointing, batch=4, seq_len=26):
    """The base model's measured breakdown on CPU (float32) and the meta-device estimate for the same settings."""
    torch.manual_seed(0)
    config = LlamaConfig()
    model = prepare_model(LlamaForCausalLM(config), method, LoraConfig() if method != "full" else None)
    ids = torch.randint(3, config.vocab_size, (batch, seq_len))
    measured = measure(model, (ids, ids), gradient_checkpointing=checkpointing)
    estimated = estimate(config, method, batch_size=batch, seq_len=seq_len, gradient_checkpointing=checkpointing,
                         dtype=torch.float32, optimizer_state_dtype=None)
    return measured, estimated


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_estimate_matches_measurement_on_the_base_model(method, checkpointing):
    measured, estimated = _measured_and_estimated(method, checkpointing)
    for name in CATEGORIES:
        # 5%: the brief's bar. Both run the same code, so only kernel choices on meta could differ.
        assert estimated.breakdown.as_dict()[name] == pytest.approx(getattr(measured, name), rel=0.05), name
    assert estimated.total_bytes == pytest.approx(measured.total, rel=0.05)


def test_checkpointing_keeps_fewer_activations():
    config = LlamaConfig(num_hidden_layers=16)
    without = estimate(config, "lora", seq_len=64, gradient_checkpointing=False).breakdown.activations
    with_ = estimate(config, "lora", seq_len=64, gradient_checkpointing=True).breakdown.activations
    assert with_ < without / 3  # 16 layers: inputs of 15 plus one layer's activations, vs all 16 layers'


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_have_the_published_parameter_counts(name):
    with torch.device("meta"):
        total = count_parameters(LlamaForCausalLM(model_config(name))).total
    # 3%: "70B" and "175B" are rounded names (Llama-2-70B has 68.98B); LLaMA's 6.7B etc. are exact to 0.1B.
    assert total == pytest.approx(PUBLISHED_PARAMS[name], rel=0.03)


def test_gpt3_lora_trainable_params_and_checkpoint_match_the_lora_paper():
    est = estimate("gpt3-175b", "lora", r=4, seq_len=8, gradient_checkpointing=False)  # short: counts only
    assert est.trainable_params == 2 * 96 * 12288 * 4 * 2  # |Θ| = 2 · L · d_model · r, q and v (LoRA §5.1)
    assert est.adapter_bytes == pytest.approx(35e6, rel=0.1)  # "roughly 35MB" for 37.7 MB of fp16 (§4.2)


def test_full_finetuning_costs_twelve_bytes_per_parameter_plus_activations():
    est = estimate("llama-65b", "full", seq_len=8, gradient_checkpointing=False)  # weights dominate
    mem, n = est.breakdown, est.trainable_params
    assert (mem.frozen_weights, mem.trainable_weights, mem.gradients) == (0, 2 * n, 2 * n)
    assert mem.optimizer_state == pytest.approx(8 * n, rel=1e-6)  # two fp32 moments; + 4-byte step counters
    assert est.total_bytes > 780e9  # QLoRA §1: "more than 780 GB of GPU memory"


def test_meta_build_allocates_no_real_memory():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    estimate("llama-65b", "lora", seq_len=8, gradient_checkpointing=False)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 2**20  # < 1 GiB of peak growth, for a model whose real bf16 weights are 130 GB


def test_estimate_rejects_unknown_models_and_long_sequences():
    with pytest.raises(ValueError, match="preset"):
        estimate("llama-8b", "lora")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        estimate("llama-7b", "lora", seq_len=4096)


@pytest.mark.parametrize("kwargs", [{"batch_size": 0}, {"batch_size": -2}, {"seq_len": 0}, {"batch_size": 1.5}])
def test_estimate_refuses_an_empty_or_negative_batch(kwargs):
    with pytest.raises(ValueError, match="batch_size|seq_len"):
        estimate(LlamaConfig(), "lora", **kwargs)
