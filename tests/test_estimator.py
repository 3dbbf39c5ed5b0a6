"""lora_lab.estimator: the meta-device estimate against measurement and the papers, and the grid arithmetic
(depth extrapolation, `EstimateGrid`) against direct estimates, byte for byte."""

import dataclasses
import resource
from fractions import Fraction

import pytest
import torch

from lora_lab.estimator import (PRESETS, PUBLISHED_PARAMS, EstimateCache, EstimateGrid, depth_extrapolated, estimate,
                               model_config, multilinear)
from lora_lab.lora import LoraConfig, count_parameters
from lora_lab.memory import CATEGORIES
from lora_lab.model import LlamaConfig, LlamaForCausalLM
from lora_lab.train import measure, prepare_model


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


# ------------------------------------------------------------------------ fast answers for the sliders

def test_cache_calls_estimator_once_per_setting():
    calls = []
    est = EstimateCache(lambda p, m, **kw: calls.append(1) or len(calls))
    assert est("a", "lora", r=1) == est("a", "lora", r=1) == 1
    assert est("a", "lora", r=2) == 2 and len(est.cache) == 2


def test_depth_extrapolation_equals_full_depth_estimate():
    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=7,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    fast = depth_extrapolated(estimate, lambda name: cfg)
    for method, gc in (("lora", True), ("full", False)):
        kw = dict(r=4, batch_size=2, seq_len=16, gradient_checkpointing=gc)
        want, got = estimate(cfg, method, **kw), fast("tiny", method, **kw)
        assert got.breakdown.as_dict() == want.breakdown.as_dict()  # exact: every category is linear in depth
        assert (got.trainable_params, got.total_params) == (want.trainable_params, want.total_params)


# ---------------------------------------------------------------------- EstimateGrid: corners, then arithmetic

def _two_layer(name):
    return dataclasses.replace(model_config(name), num_hidden_layers=2)  # depth is linear (test above)


def _estimate_two_layer(preset, method, **kw):
    return estimate(_two_layer(preset), method, **kw)


def test_multilinear_is_exact_on_a_multilinear_function():
    def f(r, b, t):
        return {"x": 7 + 3 * t + 5 * b * t + 11 * r * b * t + 2 * r}

    axes = ((8, 64), (2, 4), (512, 1024))
    corners = {(r, b, t): f(r, b, t) for r in axes[0] for b in axes[1] for t in axes[2]}
    for point in ((1, 32, 128), (256, 3, 2048), (8, 2, 512)):
        assert multilinear(point, axes, corners) == {"x": Fraction(f(*point)["x"])}


# One combination per method, chosen to cover both target sets, checkpointing on and off, both optimizers;
# points cover batch_size 1 (its own slab) and 2..32, r from 1 to 256, seq_len from 128 to 2048.
GRID_CASES = [
    ("llama-7b", "lora", dict(target_modules=("q_proj", "v_proj"), gradient_checkpointing=True, optimizer="adamw"),
     [(1, 1, 128), (256, 32, 2048), (32, 2, 256), (4, 16, 1024)]),
    ("llama-2-70b", "qlora", dict(target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"), gradient_checkpointing=False, optimizer="sgd"),
     [(2, 1, 2048), (128, 8, 128), (1, 2, 512)]),
    ("gpt3-175b", "full", dict(target_modules=("q_proj", "v_proj"), gradient_checkpointing=False, optimizer="adamw"),
     [(16, 1, 256), (8, 32, 2048), (1, 2, 128)]),
    ("llama-7b", "qlora", dict(target_modules=("q_proj", "v_proj"), gradient_checkpointing=True, optimizer="adamw"),
     [(1, 1, 2048), (64, 4, 128)]),  # QLoRA = LoRA's arithmetic + a constant, here on the first case's corners
]


def test_estimate_grid_equals_the_estimator_byte_for_byte():
    grid = EstimateGrid(_estimate_two_layer, _two_layer)
    for preset, method, combo, points in GRID_CASES:
        for r, b, t in points:
            kw = dict(r=r, batch_size=b, seq_len=t, **combo)
            got, want = grid(preset, method, **kw), _estimate_two_layer(preset, method, **kw)
            assert got.breakdown == want.breakdown, (preset, method, kw)  # integers, no tolerance
            assert (got.trainable_params, got.total_params) == (want.trainable_params, want.total_params)
    # every answer came from the corners: 2x2 at batch 1 + 2x2x2 above (full: r is not an axis, so half);
    # QLoRA runs LoRA's corners and one QLoRA corner per slab
    assert len(grid.corners) == 12 + (12 + 2) + 6 + 2


def test_estimate_grid_leaves_other_calls_to_the_estimator():
    calls = []

    def spy(preset, method, **kw):
        calls.append(kw)
        return _estimate_two_layer(preset, method, **kw)

    grid = EstimateGrid(spy, _two_layer)
    grid("llama-7b", "lora", r=4)  # not the slider set: one direct call, no corners
    assert calls == [{"r": 4}] and not grid.corners
    with pytest.raises(ValueError, match="max_position_embeddings"):  # the estimator's own error, not extrapolated
        grid("llama-7b", "lora", r=8, target_modules=("q_proj", "v_proj"), batch_size=1, seq_len=4096,
             gradient_checkpointing=True,
             optimizer="adamw")


def test_estimate_grid_warm_runs_the_corners_so_slider_moves_are_arithmetic():
    calls = []

    def spy(preset, method, **kw):
        calls.append(kw)
        return _estimate_two_layer(preset, method, **kw)

    grid = EstimateGrid(spy, _two_layer)
    combo = dict(target_modules=("q_proj", "v_proj"), gradient_checkpointing=True, optimizer="adamw")
    grid.warm("llama-7b", ("full", "lora"), **combo)
    assert len(calls) == len(grid.corners) == (2 + 4) + (4 + 8)  # full: 1x1x2 + 1x2x2; lora: 2x1x2 + 2x2x2
    for r, b, t in ((1, 1, 128), (256, 32, 2048), (16, 3, 700)):
        grid("llama-7b", "lora", r=r, batch_size=b, seq_len=t, **combo)
    assert len(calls) == len(grid.corners)  # no new estimates


# ------------------------------------------------------------------ the meta-device path, without patching

def test_nf4_on_meta_stores_the_shapes_and_dtypes_of_a_real_quantization():
    from lora_lab.nf4 import quantize

    w = torch.randn(96, 64)
    real, meta = quantize(w), quantize(w.to("meta"))
    for name in ("packed", "absmax", "nested_absmax", "code", "nested_code", "offset"):
        a, b = getattr(real, name), getattr(meta, name)
        assert (a.shape, a.dtype) == (b.shape, b.dtype) and b.is_meta, name
    assert meta.nbytes == real.nbytes


def test_meta_attention_saves_what_a_fused_kernel_saves():
    from torch.nn import functional as F

    from lora_lab.memory import SavedTensors
    from lora_lab.model import causal_attention

    q, k, v = (torch.randn(2, 4, 16, 8, requires_grad=True) for _ in range(3))
    torch.testing.assert_close(causal_attention(q, k, v), F.scaled_dot_product_attention(q, k, v, is_causal=True))
    with SavedTensors(torch.nn.Module()) as saved:
        causal_attention(*(t.detach().to("meta").requires_grad_() for t in (q, k, v)))
    # q, k, v, the output (2, 4, 16, 8) and a (2, 4, 16) logsumexp: no (2, 4, 16, 16) attention matrix
    assert saved.nbytes == 4 * (2 * 4 * 16 * 8) * 4 + (2 * 4 * 16) * 4
