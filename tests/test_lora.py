"""Invariants of lora_lab.lora: LoRALinear, the blog-post LoRALayer, apply_lora and friends."""

import contextlib
import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from model_state import assert_unchanged, snapshot

from lora_lab import (LoraConfig, LoRALayer, LoRALinear, ParameterCount, apply_lora, count_parameters, lora_layers,
                      merge_lora, unload, unmerge_lora)
from lora_lab.lora import lora_targets

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FAST = settings(max_examples=20, deadline=None)


class Attention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        return self.o_proj(self.q_proj(x) * self.k_proj(x) + self.v_proj(x))


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.self_attn = Attention(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.ReLU(), nn.Linear(2 * d, d))

    def forward(self, x):
        return x + self.mlp(self.self_attn(x))


class TinyLM(nn.Module):
    """Llama-like names (``model.layers.0.self_attn.q_proj``) at toy size."""

    def __init__(self, vocab=20, d=8, n_layers=2):
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(vocab, d)
        self.model.layers = nn.ModuleList(Block(d) for _ in range(n_layers))
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        h = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            h = layer(h)
        return self.lm_head(h)


def randomize_lora_B(model_or_layer, seed=0, std=1.0):
    """Give B nonzero values (at init B = 0, which would make output comparisons vacuous)."""
    gen = torch.Generator().manual_seed(seed)
    layers = [model_or_layer] if isinstance(model_or_layer, LoRALinear) else lora_layers(model_or_layer).values()
    with torch.no_grad():
        for layer in layers:
            w = layer.lora_B.weight
            w.copy_((std * torch.randn(w.shape, generator=gen)).to(w.dtype))


@st.composite
def layer_cases(draw):
    """A LoRALinear of random size/rank/dtype with random A and nonzero B, and an input with 0-3 leading dims."""
    n_in, n_out = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    r = draw(st.integers(1, min(n_in, n_out)))
    dtype = draw(st.sampled_from(DTYPES))
    lead = draw(st.lists(st.integers(1, 3), max_size=3))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    base = nn.Linear(n_in, n_out, bias=draw(st.booleans())).to(dtype)
    layer = LoRALinear(base, r, lora_alpha=draw(st.sampled_from([None, 1, 16])), use_rslora=draw(st.booleans()))
    # A ~ N(0, 1/in) (the paper's Gaussian, at Kaiming's scale); B's scale is drawn so that the update
    # B A ranges from well below |W0| (~ 1/sqrt(in)) to well above it.
    b_std = draw(st.sampled_from([1e-2, 1.0, 10.0]))
    with torch.no_grad():
        layer.lora_A.weight.copy_(torch.randn(r, n_in) / math.sqrt(n_in))
        layer.lora_B.weight.copy_(b_std * torch.randn(n_out, r))
    assert layer.delta_weight().abs().max() > 0  # with B A = 0 the merge tests would check nothing
    x = torch.randn(*lead, n_in).to(dtype)
    return layer, x


def abs_bound(layer, x):
    """|x| (|W0| + |dW|)^T + |b| + scaling |x| |A|^T |B|^T: the magnitude rounding errors scale with."""
    f = lambda t: t.detach().abs().double()  # noqa: E731
    base = layer.base_layer
    bias = f(base.bias) if base.bias is not None else 0
    return (f(x) @ (f(base.weight) + f(layer.delta_weight())).T + bias
            + layer.scaling * f(x) @ f(layer.lora_A.weight).T @ f(layer.lora_B.weight).T)


# ------------------------------------------------------------------------------------------ LoRALinear


@FAST
@given(layer_cases())
def test_output_equals_base_at_init(case):
    layer, x = case
    layer.reset_lora_parameters()
    assert torch.equal(layer(x), layer.base_layer(x))  # B = 0 makes the update exactly zero, not just small


@FAST
@given(layer_cases())
def test_merge_then_unmerge_restores_base_weight(case):
    layer, _ = case
    w0 = layer.base_layer.weight.detach().clone()
    delta = layer.delta_weight()
    layer.merge()
    layer.unmerge()
    # (W0 + d) - d is rounded twice in W0's dtype, each time by at most eps/2 of a value <= |W0| + |d|
    # (the (1 + eps) covers the second-order term); subnormals round by up to half the smallest step.
    # The bound is sharp: two roundings the same way, with W0 at the bottom of its binade, come within 3% of it.
    info = torch.finfo(w0.dtype)
    bound = info.eps * (w0.abs().double() + delta.abs().double()) * (1 + info.eps) + info.smallest_normal * info.eps
    assert ((layer.base_layer.weight.double() - w0.double()).abs() <= bound).all()


@FAST
@given(layer_cases())
def test_merged_and_unmerged_outputs_agree(case):
    layer, x = case
    unmerged = layer(x).double()
    layer.merge()
    merged = layer(x).double()
    # Both paths compute the same sum, each within (n + r + 8) * eps/2 of it relative to abs_bound: a dot product
    # of length n or r carries at most n*eps/2 (Higham's gamma_n), and the few other roundings (bias, scaling,
    # casting the fp32 delta, W0 + delta, the final add) are eps/2 each. The difference is at most twice that.
    # Values below the smallest normal round by up to half its step (eps * smallest_normal) instead.
    info = torch.finfo(x.dtype)
    roundings = layer.in_features + layer.r + 8
    tol = roundings * info.eps * abs_bound(layer, x) + roundings * info.eps * info.smallest_normal
    assert ((merged - unmerged).abs() <= tol).all()


def test_forward_is_the_paper_formula():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(12, 10), r=3, lora_alpha=6)
    randomize_lora_B(layer)
    x = torch.randn(4, 5, 12)
    W0, b, A, B = (t.detach() for t in (layer.base_layer.weight, layer.base_layer.bias,
                                        layer.lora_A.weight, layer.lora_B.weight))
    expected = x @ (W0 + (6 / 3) * B @ A).T + b  # h = (W0 + alpha/r B A) x + b
    torch.testing.assert_close(layer(x), expected)  # fp32 default tolerance: same sum, other association


@FAST
@given(layer_cases())
def test_only_lora_parameters_get_gradients(case):
    layer, x = case
    layer(x).float().sum().backward()
    assert layer.base_layer.weight.grad is None
    assert layer.base_layer.bias is None or layer.base_layer.bias.grad is None
    assert layer.lora_A.weight.grad is not None and layer.lora_B.weight.grad is not None


def test_zero_B_gives_B_a_gradient_and_A_none_yet():
    """Pins `# Note: why lora_B starts at zero`: at init only B moves; A starts moving once B != 0."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 16), r=4)
    layer(torch.randn(8, 16)).pow(2).sum().backward()
    assert layer.lora_B.weight.grad.abs().sum() > 0
    assert torch.equal(layer.lora_A.weight.grad, torch.zeros_like(layer.lora_A.weight))


def test_init_is_kaiming_uniform_for_A_and_zero_for_B():
    layer = LoRALinear(nn.Linear(256, 64), r=64)
    bound = 1 / math.sqrt(256)  # kaiming_uniform(a=sqrt(5)): sqrt(6 / ((1 + 5) * fan_in))
    a = layer.lora_A.weight
    assert a.abs().max() <= bound and a.abs().max() > 0.95 * bound  # 16k uniform draws reach the edge
    assert abs(a.std().item() - bound / math.sqrt(3)) < 0.02 * bound  # std of U(-b, b) is b/sqrt(3)
    assert torch.equal(layer.lora_B.weight, torch.zeros(64, 64))


@pytest.mark.parametrize("alpha, rslora, expected", [(16, False, 4.0), (16, True, 8.0), (None, False, 1.0)])
def test_scaling(alpha, rslora, expected):
    layer = LoRALinear(nn.Linear(8, 8), r=4, lora_alpha=alpha, use_rslora=rslora)
    assert layer.scaling == expected  # alpha/r, alpha/sqrt(r), and alpha=None means alpha=r
    if alpha:
        assert LoraConfig(r=4, lora_alpha=alpha, use_rslora=rslora).scaling == expected


@pytest.mark.parametrize("dtype", DTYPES)
def test_adapters_take_the_base_dtype_and_shapes(dtype):
    layer = LoRALinear(nn.Linear(12, 7, dtype=dtype), r=5)
    assert layer.lora_A.weight.shape == (5, 12) and layer.lora_B.weight.shape == (7, 5)
    assert layer.lora_A.weight.dtype == layer.lora_B.weight.dtype == dtype
    assert layer(torch.randn(2, 12, dtype=dtype)).dtype == dtype
    assert layer.delta_weight().shape == (7, 12)


def test_forward_needs_only_in_and_out_features():
    """A quantized base (no float weight) is wrapped the same way; only merging needs base_layer.weight."""

    class Packed(nn.Module):
        in_features, out_features = 6, 4

        def __init__(self):
            super().__init__()
            self.register_buffer("weight", torch.zeros(12, dtype=torch.uint8))  # packed storage

        def forward(self, x):
            return x[..., :4] * 2

    layer = LoRALinear(Packed(), r=2)
    assert layer.lora_A.weight.dtype == torch.float32
    x = torch.randn(3, 6)
    assert torch.equal(layer(x), x[..., :4] * 2)
    with pytest.raises(TypeError, match="Packed"):
        layer.merge()


@pytest.mark.parametrize("kwargs, match", [
    ({"r": 0}, "positive int"), ({"r": 2.0}, "positive int"), ({"r": 9}, "min"),
    ({"r": 2, "lora_dropout": 1.0}, r"\[0, 1\)"), ({"r": 2, "lora_dropout": -0.1}, r"\[0, 1\)"),
])
def test_layer_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRALinear(nn.Linear(16, 8), **kwargs)


@pytest.mark.parametrize("alpha", [0, -1, float("nan"), float("inf"), True, "16"])
def test_layer_rejects_a_lora_alpha_that_is_not_positive_and_finite(alpha):
    with pytest.raises(ValueError, match="lora_alpha"):
        LoRALinear(nn.Linear(16, 8), r=2, lora_alpha=alpha)


@pytest.mark.parametrize("make", [lambda flag: LoraConfig(use_rslora=flag),
                                  lambda flag: LoRALinear(nn.Linear(4, 4), r=2, use_rslora=flag)],
                         ids=["LoraConfig", "LoRALinear"])
@pytest.mark.parametrize("flag", ["false", 0, 1, None])
def test_use_rslora_must_be_a_real_bool(make, flag):
    with pytest.raises(TypeError, match="True or False"):
        make(flag)


def test_layer_rejects_non_linear_and_double_wrapping():
    with pytest.raises(TypeError, match="Conv1d"):
        LoRALinear(nn.Conv1d(4, 4, 1), r=2)
    with pytest.raises(ValueError, match="already a LoRALinear"):
        LoRALinear(LoRALinear(nn.Linear(4, 4), r=2), r=2)


def test_merge_state_errors():
    layer = LoRALinear(nn.Linear(4, 4), r=2)
    with pytest.raises(ValueError, match="not merged"):
        layer.unmerge()
    layer.merge()
    assert layer.merged
    with pytest.raises(ValueError, match="already merged"):
        layer.merge()


def test_dropout_touches_only_the_adapter_path():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(8, 8), r=2, lora_dropout=0.5)
    assert isinstance(layer.lora_dropout, nn.Dropout)
    x = torch.randn(64, 8)
    assert torch.equal(layer(x), layer.base_layer(x))  # train mode, dropout on, but B = 0: base is untouched
    randomize_lora_B(layer)
    layer.eval()
    torch.testing.assert_close(layer(x), x @ (layer.base_layer.weight + layer.delta_weight()).T
                               + layer.base_layer.bias)  # eval: no dropout; fp32 default tolerance


# ------------------------------------------------------------------------------------- the blog post

BLOG_EXAMPLE = """
import torch
import torch.nn as nn
from lora_lab import LoRALayer

# 예제: 기존 Linear 레이어에 LoRA 적용
original_layer = nn.Linear(768, 768)
lora_layer = LoRALayer(original_layer, rank=8) # rank 값 조정 가능

# 입력 데이터
x = torch.randn(1, 768)
output = lora_layer(x)

print(f"Output shape: {output.shape}")
"""


def test_blog_post_example_runs_unchanged():
    scope, out = {}, io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(BLOG_EXAMPLE, scope)
    assert out.getvalue() == "Output shape: torch.Size([1, 768])\n"
    layer, x = scope["lora_layer"], scope["x"]
    assert isinstance(layer, LoRALinear) and layer.r == layer.rank == 8 and layer.scaling == 1.0
    assert layer.original_layer is scope["original_layer"] and not layer.base_layer.weight.requires_grad
    assert torch.equal(scope["output"], scope["original_layer"](x))


def test_blog_post_formula_with_trained_factors():
    """The post computes original(x) + x @ A @ B with A (in, r), B (r, out): our lora_A.weight.T, lora_B.weight.T."""
    torch.manual_seed(0)
    layer = LoRALayer(nn.Linear(32, 16), rank=4)
    randomize_lora_B(layer)
    x = torch.randn(5, 32)
    A, B = layer.lora_A.weight.detach().T, layer.lora_B.weight.detach().T
    torch.testing.assert_close(layer(x), layer.original_layer(x) + x @ A @ B)  # fp32 default tolerance


# ------------------------------------------------------------------------------------------ apply_lora


@pytest.mark.parametrize("targets, expected", [
    (("q_proj", "v_proj"), {f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")}),
    (["self_attn.o_proj"], {"model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"}),
    (r"model\.layers\.0\.self_attn\.[qk]_proj", {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"}),
    ("all-linear", {f"model.layers.{i}.{p}" for i in (0, 1) for p in ("mlp.0", "mlp.2")}
     | {f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qkvo"}),
])
def test_target_modules_select_the_right_layers(targets, expected):
    model = apply_lora(TinyLM(), LoraConfig(r=2, target_modules=targets))
    assert set(lora_layers(model)) == expected  # suffixes at a '.' boundary, regex fullmatch, all but lm_head
    assert all(model.get_submodule(n) is m for n, m in lora_layers(model).items())


class BertLikeClassifier(nn.Module):
    """A 30-token table, then a 2-row token-type table (as in BERT), under a 2-label classifier."""

    def __init__(self):
        super().__init__()
        self.word_embeddings, self.token_type_embeddings = nn.Embedding(30, 8), nn.Embedding(2, 8)
        self.dense, self.classifier = nn.Linear(8, 8), nn.Linear(8, 2)


def tied_lm():
    """A position table registered before the token table, and a head tied to the token table."""
    model = nn.Sequential(nn.Embedding(16, 8), nn.Embedding(30, 8), nn.Linear(8, 8), nn.Linear(8, 30, bias=False))
    model[3].weight = model[1].weight
    return model


@pytest.mark.parametrize("make, expected", [
    (lambda: nn.Sequential(nn.Embedding(30, 8), nn.Linear(8, 8), nn.Linear(8, 30)), {"1"}),  # out == vocab: head
    (tied_lm, {"2"}),  # tied to an embedding: head, whichever table comes first
    (BertLikeClassifier, {"dense", "classifier"}),  # 2 labels == 2 token types, but not the vocab: a target
], ids=["vocab-sized", "tied", "2-label-classifier"])
def test_all_linear_on_a_plain_module_skips_only_a_vocabulary_head(make, expected):
    model = apply_lora(make(), LoraConfig(r=2, target_modules="all-linear"))
    assert set(lora_layers(model)) == expected


def _transformers_models():
    """Small random transformers models (no download), one per family, by name."""
    t = pytest.importorskip("transformers", reason="the all-linear comparison builds transformers models")
    size = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=40, max_position_embeddings=32, pad_token_id=0, bos_token_id=1,
                eos_token_id=2)
    bert = {k: v for k, v in size.items() if k != "num_key_value_heads"}
    return {
        "llama": lambda: t.LlamaForCausalLM(t.LlamaConfig(**size)),
        "qwen2": lambda: t.Qwen2ForCausalLM(t.Qwen2Config(**size)),
        "mistral": lambda: t.MistralForCausalLM(t.MistralConfig(**size)),
        "gemma": lambda: t.GemmaForCausalLM(t.GemmaConfig(**size, head_dim=8)),  # lm_head tied to embed_tokens
        "phi3": lambda: t.Phi3ForCausalLM(t.Phi3Config(**size)),  # fused qkv_proj and gate_up_proj
        "opt": lambda: t.OPTForCausalLM(t.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                                   num_attention_heads=4, vocab_size=40, max_position_embeddings=32,
                                                   word_embed_proj_dim=16)),  # adds project_in/project_out
        "bert": lambda: t.BertModel(t.BertConfig(**bert)),  # no head: the pooler is a target
        "bert-seq-cls": lambda: t.BertForSequenceClassification(t.BertConfig(**bert, num_labels=2)),
        "llama-seq-cls": lambda: t.LlamaForSequenceClassification(t.LlamaConfig(**size, num_labels=2)),
    }


TORCH_MODELS = {
    "encoder-layer": lambda: nn.TransformerEncoderLayer(16, 2, 32, batch_first=True),
    "transformer": lambda: nn.Transformer(16, 2, 1, 1, 32, batch_first=True),
}
FAMILIES = ["llama", "qwen2", "mistral", "gemma", "phi3", "opt", "bert", "bert-seq-cls", "llama-seq-cls",
            *TORCH_MODELS]


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # PEFT on transformers 5
@pytest.mark.parametrize("family", FAMILIES)
def test_all_linear_targets_what_peft_targets(family):
    peft = pytest.importorskip("peft", reason="the all-linear comparison runs PEFT's get_peft_model")
    make = TORCH_MODELS.get(family) or _transformers_models()[family]
    ours = set(lora_targets(make(), LoraConfig(r=2, target_modules="all-linear")))
    theirs = peft.get_peft_model(make(), peft.LoraConfig(r=2, target_modules="all-linear"))
    theirs = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
              if isinstance(m, peft.tuners.lora.LoraLayer)}
    # PEFT also wraps each nn.MultiheadAttention.out_proj, whose forward MHA never calls: an adapter that stays 0.
    unused = {f"{n}.out_proj" for n, m in make().named_modules() if isinstance(m, nn.MultiheadAttention)}
    assert ours == theirs - unused


@pytest.mark.parametrize("make", [lambda: nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True),
                                  lambda: nn.TransformerEncoder(nn.TransformerEncoderLayer(
                                      16, 2, 32, dropout=0.0, batch_first=True), 2, enable_nested_tensor=False)],
                         ids=["layer", "stack"])
def test_lora_on_torch_transformer_counts_in_its_fused_inference_path(make):
    torch.manual_seed(0)
    model = apply_lora(make(), LoraConfig(r=2, target_modules=["linear1", "linear2"]))
    randomize_lora_B(model, std=0.1)
    x = torch.randn(2, 5, 16)
    ordinary = model.train()(x)  # training mode calls linear1/linear2, so LoRALinear.forward runs
    with torch.no_grad():
        fused = model.eval()(x)  # eval + no_grad: one fused kernel that reads linear1.weight/linear2.weight
    # The fused kernel sums in another order than the separate matmuls: a few fp32 ulps of outputs of size ~1.
    torch.testing.assert_close(fused, ordinary, rtol=1e-5, atol=1e-5)


def test_naming_a_multihead_attention_out_proj_is_refused():
    model = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    before = snapshot(model)
    with pytest.raises(TypeError, match="never calls the layer"):
        apply_lora(model, LoraConfig(r=2, target_modules=["out_proj", "linear1"]))
    assert_unchanged(model, before)


def test_apply_freezes_everything_else_and_records_config():
    config = LoraConfig(r=2)
    model = apply_lora(TinyLM(), config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}.weight" for n in lora_layers(model) for ab in "AB"}
    assert model.lora_config is config


@FAST
@given(st.integers(1, 8), st.integers(1, 3), st.sampled_from(["none", "all", "lora_only"]))
def test_trainable_count_is_r_times_in_plus_out(r, n_layers, bias):
    model = TinyLM(d=8, n_layers=n_layers)
    apply_lora(model, LoraConfig(r=r, target_modules="all-linear", bias=bias))
    layers = lora_layers(model).values()
    biases = {"none": 0, "lora_only": sum(m.out_features for m in layers),
              "all": sum(p.numel() for n, p in model.named_parameters() if n.endswith(".bias"))}[bias]
    expected = sum(r * (m.in_features + m.out_features) for m in layers) + biases
    assert count_parameters(model).trainable == expected


def test_bias_modes_unfreeze_the_right_biases():
    model = apply_lora(TinyLM(), LoraConfig(r=2, bias="lora_only"))
    trainable_biases = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}
    assert trainable_biases == {f"{n}.base_layer.bias" for n in lora_layers(model)}


@pytest.mark.parametrize("config, error, match", [
    (LoraConfig(target_modules=["nope"]), ValueError, "model.layers.0.self_attn.q_proj"),  # lists the Linears
    (LoraConfig(target_modules=["proj"]), ValueError, "matched no module"),  # suffix must follow a '.'
    (LoraConfig(target_modules=r".*self_attn"), TypeError, "Attention"),
    (LoraConfig(r=9, target_modules="all-linear"), ValueError, "model.layers.0"),  # r=9 > d=8: names the layer
])
def test_failed_apply_leaves_model_unchanged(config, error, match):
    model = TinyLM()
    before = snapshot(model)
    with pytest.raises(error, match=match):
        apply_lora(model, config)
    assert_unchanged(model, before)
    assert not hasattr(model, "lora_config")


def test_apply_twice_is_refused():
    model = apply_lora(TinyLM(), LoraConfig(r=2))
    before = snapshot(model)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, LoraConfig(r=2, target_modules=["k_proj"]))
    assert_unchanged(model, before)


@pytest.mark.parametrize("kwargs", [{"r": 0}, {"lora_alpha": 0}, {"lora_alpha": float("nan")},
                                    {"lora_alpha": float("inf")}, {"bias": "some"}, {"target_modules": []},
                                    {"target_modules": ""}, {"target_modules": "("}, {"lora_dropout": 1}])
def test_config_validates_on_construction(kwargs):
    with pytest.raises(ValueError):
        LoraConfig(**kwargs)


# ----------------------------------------------------------------------------------- merge and unload


def test_merge_unmerge_and_unload_keep_the_function():
    torch.manual_seed(0)
    model = apply_lora(TinyLM(), LoraConfig(r=2, lora_alpha=2, target_modules="all-linear"))
    randomize_lora_B(model, std=0.1)
    ids = torch.randint(0, 20, (2, 5))
    expected = model(ids)
    # fp32 re-associated sums (~1e-7 relative per layer) pass through ~12 layers and a q*k product: 1e-5 covers it.
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # noqa: E731
    merge_lora(model)
    close(model(ids), expected)
    with pytest.raises(ValueError, match="already merged"):
        merge_lora(model)
    unmerge_lora(model)
    close(model(ids), expected)
    plain = unload(model)
    assert plain is model and not lora_layers(plain) and not hasattr(plain, "lora_config")
    assert {type(m) for m in plain.modules()} == {type(m) for m in TinyLM().modules()}
    close(plain(ids), expected)


def tied_lm():
    """TinyLM whose head shares the embedding matrix, with LoRA (nonzero B) on the head and on q_proj."""
    model = TinyLM()
    model.lm_head.weight = model.model.embed_tokens.weight
    model = apply_lora(model, LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    randomize_lora_B(model)
    return model


@pytest.mark.parametrize("merge", [merge_lora, unload])
def test_merging_a_head_tied_to_the_embeddings_is_refused_before_anything_changes(merge):
    model = tied_lm()
    before = snapshot(model)
    with pytest.raises(ValueError, match="model.embed_tokens.weight"):
        merge(model)
    assert_unchanged(model, before)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("merge", [merge_lora, unload])
def test_merging_a_non_finite_update_is_refused_before_anything_changes(merge, bad):
    model = apply_lora(TinyLM(), LoraConfig(r=2, target_modules="all-linear"))
    randomize_lora_B(model)
    with torch.no_grad():
        list(lora_layers(model).values())[-1].lora_B.weight[0, 0] = bad  # the last layer: earlier ones come first
    before = snapshot(model)
    with pytest.raises(ValueError, match="NaN or inf"):
        merge(model)
    assert_unchanged(model, before)


def test_merge_on_a_model_without_lora_is_refused():
    with pytest.raises(ValueError, match="apply_lora"):
        merge_lora(TinyLM())


# ------------------------------------------------------------------------------------ count_parameters


def test_count_parameters_and_its_printout():
    model = TinyLM()
    total = sum(p.numel() for p in model.parameters())
    assert count_parameters(model) == (total, total)
    apply_lora(model, LoraConfig(r=2))
    count = count_parameters(model)
    assert isinstance(count, ParameterCount) and count.total == total + count.trainable
    assert count.percent == pytest.approx(100 * count.trainable / count.total)
    assert str(count) == (f"trainable params: {count.trainable:,} || all params: {count.total:,} "
                          f"|| trainable%: {count.percent:.4f}")


def test_count_parameters_counts_tied_weights_once_and_uses_logical_numel():
    model = TinyLM()
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as in many LMs
    assert count_parameters(model).total == sum(p.numel() for p in model.parameters())

    class Packed4bit(nn.Module):  # two 4-bit weights per stored byte
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(32, dtype=torch.uint8), requires_grad=False)

        def logical_numel(self):
            return 2 * self.weight.numel()

    assert count_parameters(nn.Sequential(Packed4bit(), nn.Linear(2, 3))) == (9, 64 + 9)
