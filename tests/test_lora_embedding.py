"""LoRA on nn.Embedding: PEFT's lora_embedding_A/B, the same outputs, gradients, merged tables and files as PEFT."""

import copy

import pytest
import torch
from torch import nn

from model_state import assert_unchanged, snapshot
from peft_twin import PREFIX, grads, peft_twin, randomize, tiny_llama, token_ids

from lora_lab import (LoraConfig, LoRAEmbedding, add_adapter, apply_lora, apply_qlora, count_parameters,
                      delete_adapter, disable_adapter, load_adapter, lora_layers, merge_and_unload, merge_lora,
                      save_adapter, set_adapter, unload, unmerge_lora)

peft = pytest.importorskip("peft", reason="the embedding tests compare with PEFT (pip install peft)")
transformers = pytest.importorskip("transformers", reason="the embedding tests build a tiny transformers Llama")
pytestmark = [pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
              pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`:UserWarning")]

TARGETS = ["embed_tokens", "q_proj"]


@pytest.fixture(scope="module")
def base():
    """A tiny LlamaForCausalLM built locally (no download), untied, in eval mode."""
    return tiny_llama(transformers, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def ids():
    return token_ids()


def ours_and_theirs(base, **kwargs):
    config = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, **kwargs}
    ours = randomize(apply_lora(copy.deepcopy(base), LoraConfig(**config)))
    return ours, peft_twin(peft, base, ours, **config)


def assert_same_function(ours, theirs):
    # The embedding's update is computed in PEFT's order, bit for bit; q_proj scales A x before B where PEFT scales
    # B (A x): the same product rounded at another point (<= 1 fp32 ulp of the update), carried through two layers.
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_a_lone_layer_is_bit_identical_to_peft_with_padding_idx():
    torch.manual_seed(0)
    table = nn.Embedding(10, 6, padding_idx=0)
    ours = LoRAEmbedding(copy.deepcopy(table), r=2, lora_alpha=6)
    theirs = peft.tuners.lora.Embedding(copy.deepcopy(table), "default", r=2, lora_alpha=6,
                                        config=peft.LoraConfig(r=2, lora_alpha=6))
    # PEFT's layout and init: A (r, num_embeddings) = 0, B (embedding_dim, r) random, so the update starts at 0.
    assert ours.lora_embedding_A["default"].shape == theirs.lora_embedding_A["default"].shape == (2, 10)
    assert ours.lora_embedding_B["default"].shape == theirs.lora_embedding_B["default"].shape == (6, 2)
    assert not ours.lora_embedding_A["default"].any() and ours.lora_embedding_B["default"].std() > 0.5
    ids = torch.tensor([[0, 3, 9, 3]])
    assert torch.equal(ours(ids), table(ids))
    randomize(ours)
    with torch.no_grad():
        for name in ("lora_embedding_A", "lora_embedding_B"):
            getattr(theirs, name)["default"].copy_(getattr(ours, name)["default"])
    out_ours, out_theirs = ours(ids), theirs(ids)
    assert torch.equal(out_ours, out_theirs) and not torch.equal(out_ours, table(ids))
    out_ours.square().sum().backward()
    out_theirs.square().sum().backward()
    for name in ("lora_embedding_A", "lora_embedding_B"):
        assert torch.equal(getattr(ours, name)["default"].grad, getattr(theirs, name)["default"].grad)
    assert not ours.lora_embedding_A["default"].grad[:, 0].any()  # padding_idx gets no gradient, as in PEFT
    assert torch.equal(ours.get_delta_weight(), theirs.get_delta_weight("default"))


def test_outputs_gradients_and_merged_weights_match_peft(base, ids):
    ours, theirs = ours_and_theirs(base)
    assert isinstance(ours.model.embed_tokens, LoRAEmbedding)
    assert set(lora_layers(ours)) == {n.removeprefix(PREFIX) for n, m in theirs.named_modules()
                                      if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert tuple(count_parameters(ours)) == theirs.get_nb_trainable_parameters()
    out_ours, out_theirs = ours(ids).logits, theirs(ids).logits
    assert_same_function(out_ours, out_theirs)
    out_ours.square().mean().backward()
    out_theirs.square().mean().backward()
    mine, their = grads(ours), grads(theirs, PREFIX)
    assert mine.keys() == their.keys() and all(g.abs().sum() > 0 for g in mine.values())
    for name, grad in mine.items():
        torch.testing.assert_close(grad, their[name], rtol=1e-4, atol=1e-7)  # the same rounding, through backward
    merged_ours = merge_and_unload(ours)
    merged_theirs = theirs.merge_and_unload()
    assert type(merged_ours.model.embed_tokens) is nn.Embedding
    # The table's delta is (B A)^T * scaling in fp32 in both, added to the same W0: exactly equal.
    assert torch.equal(merged_ours.model.embed_tokens.weight, merged_theirs.model.embed_tokens.weight)
    assert torch.equal(merged_ours.model.layers[0].self_attn.q_proj.weight,
                       merged_theirs.model.layers[0].self_attn.q_proj.weight)


def test_merge_unmerge_and_unload_give_back_the_table(base, ids):
    ours, _ = ours_and_theirs(base)
    w0 = base.model.embed_tokens.weight
    with torch.no_grad():
        before = ours(ids).logits
        merge_lora(ours)
        assert not torch.equal(ours.model.embed_tokens.base_layer.weight, w0)
        torch.testing.assert_close(ours(ids).logits, before, rtol=1e-5, atol=1e-5)  # merged: W0 + ΔW, one rounding
        unmerge_lora(ours)
        torch.testing.assert_close(ours.model.embed_tokens.base_layer.weight, w0, rtol=0, atol=1e-6)
    plain = unload(ours)
    assert type(plain.model.embed_tokens) is nn.Embedding and not hasattr(plain, "peft_config")


def test_adapter_files_round_trip_both_ways(base, ids, tmp_path):
    ours, theirs = ours_and_theirs(base)
    save_adapter(ours, tmp_path / "ours")
    from safetensors.torch import load_file
    keys = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert keys[PREFIX + "model.embed_tokens.lora_embedding_A"].shape == (4, 64)  # PEFT's key, no ".weight"
    assert keys[PREFIX + "model.embed_tokens.lora_embedding_B"].shape == (32, 4)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    with torch.no_grad():
        assert_same_function(ours(ids).logits, loaded(ids).logits)
    randomize(theirs, seed=3)
    theirs.save_pretrained(tmp_path / "theirs")
    # PEFT also writes the whole base table when an embedding is targeted (save_embedding_layers); it loads here too.
    written = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert torch.equal(written[PREFIX + "model.embed_tokens.base_layer.weight"], base.model.embed_tokens.weight)
    back = load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    with torch.no_grad():
        assert_same_function(back(ids).logits, theirs(ids).logits)
    assert torch.equal(back.model.embed_tokens.lora_embedding_A["default"],
                       theirs.base_model.model.model.embed_tokens.lora_embedding_A["default"])


def test_two_adapters_switch_disable_and_delete_as_in_peft(base, ids):
    ours, theirs = ours_and_theirs(base)
    second = {"r": 2, "lora_alpha": 2, "target_modules": ["embed_tokens"]}
    add_adapter(ours, "other", LoraConfig(**second))
    theirs.add_adapter("other", peft.LoraConfig(**second))
    with torch.no_grad():
        with disable_adapter(ours):
            assert torch.equal(ours(ids).logits, base(ids).logits)
        set_adapter(ours, "other")
        theirs.set_adapter("other")
        for table in ("lora_embedding_A", "lora_embedding_B"):
            mine = getattr(ours.model.embed_tokens, table)["other"]
            assert mine.requires_grad and not getattr(ours.model.embed_tokens, table)["default"].requires_grad
        randomize(ours, seed=5)
        for table in ("lora_embedding_A", "lora_embedding_B"):
            getattr(theirs.base_model.model.model.embed_tokens, table)["other"].copy_(
                getattr(ours.model.embed_tokens, table)["other"])
        assert_same_function(ours(ids).logits, theirs(ids).logits)
    assert tuple(count_parameters(ours)) == theirs.get_nb_trainable_parameters()
    delete_adapter(ours, "default")
    assert list(ours.model.embed_tokens.lora_embedding_A) == ["other"]
    assert type(ours.model.layers[0].self_attn.q_proj) is nn.Linear  # left without adapters: unwrapped


def test_other_module_kinds_are_refused_with_a_clear_message_and_nothing_changes(base):
    model = copy.deepcopy(base)
    before = snapshot(model)
    with pytest.raises(TypeError, match=r"linear layers \(nn.Linear, transformers' Conv1D\) and nn.Embedding"):
        apply_lora(model, LoraConfig(r=2, target_modules=["input_layernorm"]))
    with pytest.raises(TypeError, match="plain nn.Linear"):
        apply_qlora(model, LoraConfig(r=2, target_modules=["embed_tokens"]))
    with pytest.raises(ValueError, match="larger than min"):
        apply_lora(model, LoraConfig(r=33, target_modules=["embed_tokens"]))
    assert_unchanged(model, before)


def test_a_nan_embedding_adapter_is_refused_by_load_and_merge(base, tmp_path):
    ours, _ = ours_and_theirs(base)
    save_adapter(ours, tmp_path)
    with torch.no_grad():
        ours.model.embed_tokens.lora_embedding_B["default"][0, 0] = float("nan")
    before = snapshot(ours)
    with pytest.raises(ValueError, match="NaN or inf"):
        merge_lora(ours)
    assert_unchanged(ours, before)
    from safetensors.torch import load_file, save_file
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors[PREFIX + "model.embed_tokens.lora_embedding_A"][1, 2] = float("nan")
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    plain = copy.deepcopy(base)
    before = snapshot(plain)
    with pytest.raises(ValueError, match="(?i)nan|finite"):
        load_adapter(plain, tmp_path)
    assert_unchanged(plain, before)


def test_finetune_trains_an_embedding_adapter():
    import lora_lab as ll

    model = ll.load_base_model()
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["embed_tokens", "q_proj"])
    ll.finetune(model, ll.load_task(), config=config, steps=2, batch_size=4, eval_every=None)
    layer = model.model.embed_tokens
    assert isinstance(layer, LoRAEmbedding) and layer.lora_embedding_A["default"].abs().sum() > 0  # A left zero
