"""Invariants of lora_lab.inject: target matching, the output head, freezing, merge_lora, unload."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from model_state import assert_unchanged, snapshot
from toy_models import TinyLM, randomize_lora_B

from lora_lab import (LoraConfig, apply_lora, count_parameters, lora_layers, merge_and_unload, merge_lora, unload,
                      unmerge_lora)
from lora_lab.inject import lora_targets

FAST = settings(max_examples=20, deadline=None)


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
    assert trainable == {f"{n}.lora_{ab}.default.weight" for n in lora_layers(model) for ab in "AB"}
    assert model.peft_config == {"default": config}


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
    assert not hasattr(model, "peft_config")


def test_apply_twice_is_refused():
    model = apply_lora(TinyLM(), LoraConfig(r=2))
    before = snapshot(model)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, LoraConfig(r=2, target_modules=["k_proj"]))
    assert_unchanged(model, before)


# ----------------------------------------------------------------------------------- merge and unload


def test_merge_unmerge_and_merge_and_unload_keep_the_function():
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
    merge_lora(model.get_submodule("model.layers.0"))  # one block merged already: merged once, not twice
    plain = merge_and_unload(model)
    assert plain is model and not lora_layers(plain) and not hasattr(plain, "peft_config")
    assert {type(m) for m in plain.modules()} == {type(m) for m in TinyLM().modules()}
    close(plain(ids), expected)


def test_unload_drops_the_adapters_without_merging():
    torch.manual_seed(0)
    base = TinyLM()
    ids = torch.randint(0, 20, (2, 5))
    expected = base(ids)
    model = apply_lora(base, LoraConfig(r=2, target_modules="all-linear"))
    randomize_lora_B(model, std=0.1)
    assert not torch.equal(model(ids), expected)
    plain = unload(model)  # PEFT's unload: the base model back, the update gone
    assert plain is model and not lora_layers(plain) and not hasattr(plain, "peft_config")
    assert {type(m) for m in plain.modules()} == {type(m) for m in TinyLM().modules()}
    assert torch.equal(plain(ids), expected)  # the base weights were never written to


def test_unload_and_merge_and_unload_match_peft():
    peft = pytest.importorskip("peft", reason="compares unload and merge_and_unload with PEFT's")

    torch.manual_seed(0)
    base = TinyLM()
    ours = apply_lora(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4))
    randomize_lora_B(ours, std=0.1)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4,
                                                                       target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            peft_layer = theirs.base_model.model.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A["default"].weight)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B["default"].weight)
    merged_ours, merged_theirs = merge_lora(copy.deepcopy(ours)), copy.deepcopy(theirs)
    merged_theirs.merge_adapter()
    for ours_out, theirs_out in [(unload(copy.deepcopy(ours)), copy.deepcopy(theirs).unload()),
                                 (merge_and_unload(copy.deepcopy(ours)), copy.deepcopy(theirs).merge_and_unload()),
                                 (unload(merged_ours), merged_theirs.unload())]:  # a merged layer keeps its update
        mine, peft_state = ours_out.state_dict(), theirs_out.state_dict()
        assert mine.keys() == peft_state.keys()
        for key in mine:  # bit for bit: the same fp32 product B @ A, scaled, added to the same weights
            assert torch.equal(mine[key], peft_state[key]), key


def tied_lm():
    """TinyLM whose head shares the embedding matrix, with LoRA (nonzero B) on the head and on q_proj."""
    model = TinyLM()
    model.lm_head.weight = model.model.embed_tokens.weight
    model = apply_lora(model, LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    randomize_lora_B(model)
    return model


@pytest.mark.parametrize("merge", [merge_lora, merge_and_unload])
def test_merging_a_head_tied_to_the_embeddings_is_refused_before_anything_changes(merge):
    model = tied_lm()
    before = snapshot(model)
    with pytest.raises(ValueError, match="model.embed_tokens.weight"):
        merge(model)
    assert_unchanged(model, before)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("merge", [merge_lora, merge_and_unload])
def test_merging_a_non_finite_update_is_refused_before_anything_changes(merge, bad):
    model = apply_lora(TinyLM(), LoraConfig(r=2, target_modules="all-linear"))
    randomize_lora_B(model)
    with torch.no_grad():
        last = list(lora_layers(model).values())[-1]  # the last layer: earlier ones come first
        last.lora_B["default"].weight[0, 0] = bad
    before = snapshot(model)
    with pytest.raises(ValueError, match="NaN or inf"):
        merge(model)
    assert_unchanged(model, before)


@pytest.mark.parametrize("call", [merge_lora, unload, merge_and_unload])
def test_merge_on_a_model_without_lora_is_refused(call):
    with pytest.raises(ValueError, match="apply_lora"):
        call(TinyLM())


def test_requantize_on_a_full_precision_lora_model_is_refused():
    model = apply_lora(TinyLM(), LoraConfig(r=2))
    randomize_lora_B(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match="requantize=True is for QLoRA"):
        merge_and_unload(model, requantize=True)
    assert_unchanged(model, before)
    assert model.peft_config["default"].r == 2
