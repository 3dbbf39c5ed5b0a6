"""Several named adapters on one model: the same outputs, trainable sets and files as PEFT's."""

import copy

import pytest
import torch
from torch import nn

from peft_twin import logits, tiny_llama, token_ids
from model_state import assert_unchanged, snapshot

from lora_lab import (LoraConfig, add_adapter, apply_lora, count_parameters, delete_adapter, disable_adapter,
                      merge_lora, set_adapter, unmerge_lora)
from lora_lab.adapter import load_adapter, save_adapter

peft = pytest.importorskip("peft", reason="the multi-adapter API is checked against PEFT's")
transformers = pytest.importorskip("transformers", reason="the base model is a transformers Llama")
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

PREFIX = "base_model.model."
FIRST = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
SECOND = dict(r=2, lora_alpha=16, target_modules=["q_proj", "k_proj"])  # k_proj: a layer the first leaves alone


@pytest.fixture(scope="module")
def base():
    return tiny_llama(transformers)


@pytest.fixture(scope="module")
def ids():
    return token_ids()



def randomize(model, seed=0):
    """Nonzero values in every adapter's factors, frozen or not (B = 0 would make every comparison vacuous)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def two_adapters(base):
    """The kit's model and PEFT's, each with adapters "default" and "second", holding the same numbers."""
    ours = apply_lora(copy.deepcopy(base), LoraConfig(**FIRST))
    add_adapter(ours, "second", LoraConfig(**SECOND))
    randomize(ours)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**FIRST))
    theirs.add_adapter("second", peft.LoraConfig(**SECOND))
    state = {PREFIX + k: v for k, v in ours.state_dict().items()}
    assert state.keys() == theirs.state_dict().keys()  # PEFT's module tree, name for name
    theirs.load_state_dict(state)
    return ours, theirs


def assert_same_function(ours, theirs):
    # PEFT scales B(Ax) by s where lora_lab scales Ax before B: one fp32 rounding apart per layer.
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def trainable(model, prefix=""):
    return {prefix + n for n, p in model.named_parameters() if p.requires_grad}


def test_switching_adapters_gives_peft_outputs_and_trainable_sets(base, ids):
    ours, theirs = two_adapters(base)
    outputs = {}
    for name in ("default", "second", "default"):
        set_adapter(ours, name)
        theirs.set_adapter(name)
        assert ours.active_adapter == theirs.active_adapter == name
        assert trainable(ours, PREFIX) == trainable(theirs)  # only the active adapter's factors
        outputs[name] = logits(ours, ids)
        assert_same_function(outputs[name], logits(theirs, ids))
    assert not torch.allclose(outputs["default"], outputs["second"])  # the switch changed the function


def test_disable_adapter_gives_the_base_model_and_restores_after_an_error(base, ids):
    ours, theirs = two_adapters(base)
    adapted = logits(ours, ids)
    with pytest.raises(RuntimeError, match="inside"):
        with disable_adapter(ours), theirs.disable_adapter():
            assert torch.equal(logits(ours, ids), logits(base, ids))  # exactly W0 x: no update is added
            assert torch.equal(logits(theirs, ids), logits(base, ids))
            raise RuntimeError("inside")
    assert torch.equal(logits(ours, ids), adapted)


def test_adding_an_adapter_changes_nothing_while_another_is_active(base, ids):
    model = randomize(apply_lora(copy.deepcopy(base), LoraConfig(**FIRST)))
    before = logits(model, ids)
    add_adapter(model, "second", LoraConfig(**SECOND))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the new factors nonzero; k_proj was wrapped for "second" only
        for name, p in model.named_parameters():
            if ".second." in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    assert torch.equal(logits(model, ids), before)  # bit for bit: a waiting adapter adds nothing
    set_adapter(model, "second")
    assert not torch.allclose(logits(model, ids), before)  # ... and it is not zero


def test_merge_folds_the_active_adapter_as_peft_does(base, ids):
    ours, theirs = two_adapters(base)
    set_adapter(ours, "second")
    theirs.set_adapter("second")
    merge_lora(ours)
    theirs.merge_adapter()
    for key, value in ours.state_dict().items():  # the same fp32 product B @ A, scaled, added to the same weights
        assert torch.equal(value, theirs.state_dict()[PREFIX + key]), key
    with pytest.raises(ValueError, match="merged"):
        set_adapter(ours, "default")
    unmerge_lora(ours)
    set_adapter(ours, "default")
    theirs.unmerge_adapter()
    theirs.set_adapter("default")
    assert_same_function(logits(ours, ids), logits(theirs, ids))


def test_parameter_counts_match_peft_with_two_adapters(base):
    ours, theirs = two_adapters(base)
    assert tuple(count_parameters(ours)) == theirs.get_nb_trainable_parameters()


def test_both_adapters_round_trip_through_peft_in_its_layout(base, ids, tmp_path):
    ours, theirs = two_adapters(base)
    path = save_adapter(ours, tmp_path / "ours")
    assert (path / "adapter_model.safetensors").is_file() and (path / "second" / "adapter_model.safetensors").is_file()
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), path)
    loaded.load_adapter(path / "second", adapter_name="second")
    theirs.save_pretrained(tmp_path / "theirs")
    mine = load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    load_adapter(mine, tmp_path / "theirs" / "second", adapter_name="second")
    for name in ("default", "second"):
        set_adapter(ours, name)
        set_adapter(mine, name)
        loaded.set_adapter(name)
        expected = logits(ours, ids)
        assert_same_function(logits(loaded, ids), expected)  # ours -> PEFT
        assert torch.equal(logits(mine, ids), expected)  # PEFT -> ours: the same numbers in the same layers


def test_delete_adapter_follows_peft_and_unwraps_layers_left_empty(base, ids):
    ours, theirs = two_adapters(base)
    delete_adapter(ours, "default")
    theirs.delete_adapter("default")
    assert ours.active_adapter == theirs.active_adapter == "second"
    assert list(ours.peft_config) == ["second"]
    assert type(ours.get_submodule("model.layers.0.self_attn.v_proj")) is nn.Linear  # v_proj held only "default"
    assert_same_function(logits(ours, ids), logits(theirs, ids))
    before = snapshot(ours)
    with pytest.raises(ValueError, match="only adapter"):
        delete_adapter(ours, "second")
    assert_unchanged(ours, before)


@pytest.mark.parametrize("call, match", [
    (lambda m: add_adapter(m, "default", LoraConfig(**SECOND)), "already has an adapter"),
    (lambda m: add_adapter(m, "a b", LoraConfig(**SECOND)), "adapter name"),
    (lambda m: add_adapter(m, "wide", LoraConfig(r=64, target_modules=["q_proj"])), "larger than"),
    (lambda m: add_adapter(m, "other_bias", LoraConfig(bias="all")), "bias"),
    (lambda m: add_adapter(m, "norm", LoraConfig(target_modules=["input_layernorm"])), "linear"),
    (lambda m: set_adapter(m, "missing"), "no adapter named"),
    (lambda m: delete_adapter(m, "missing"), "no adapter named"),
])
def test_bad_calls_are_refused_and_change_nothing(base, call, match):
    model = randomize(apply_lora(copy.deepcopy(base), LoraConfig(**FIRST)))
    add_adapter(model, "second", LoraConfig(**SECOND))
    before = snapshot(model)
    with pytest.raises((ValueError, TypeError), match=match):
        call(model)
    assert_unchanged(model, before)
    assert model.active_adapter == "default" and list(model.peft_config) == ["default", "second"]


def test_disable_adapter_refuses_a_merged_model(base):
    model = merge_lora(randomize(apply_lora(copy.deepcopy(base), LoraConfig(**FIRST))))
    with pytest.raises(ValueError, match="merged"):
        with disable_adapter(model):
            pass


def test_loading_a_bad_file_as_a_new_adapter_changes_nothing(base, tmp_path):
    other = randomize(apply_lora(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj"])))
    path = save_adapter(other, tmp_path / "q")
    model = randomize(apply_lora(copy.deepcopy(base), LoraConfig(**FIRST)))
    small = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32))
    wrong = save_adapter(randomize(apply_lora(small, LoraConfig(r=4, target_modules=["q_proj"]))), tmp_path / "w")
    before = snapshot(model)
    with pytest.raises(ValueError, match="shape"):
        load_adapter(model, wrong, adapter_name="second")
    assert_unchanged(model, before)
    assert list(model.peft_config) == ["default"]
    load_adapter(model, path, adapter_name="second")  # the right file loads beside the first adapter
    assert list(model.peft_config) == ["default", "second"] and model.active_adapter == "default"


# ------------------------------------------------------------------------------------------ safe_merge


def overflowing_model():
    """A float16 layer whose merged weight overflows although every factor is finite."""
    model = nn.Sequential(nn.Linear(4, 4, dtype=torch.float16))
    with torch.no_grad():
        model[0].weight.fill_(60000.0)  # float16's largest finite value is 65504
    model = apply_lora(model, LoraConfig(r=2, lora_alpha=2, target_modules=["0"]))
    with torch.no_grad():
        model[0].lora_A["default"].weight.fill_(100.0)
        model[0].lora_B["default"].weight.fill_(100.0)  # delta = 2 * 100 * 100 = 20000 per entry
    return model


def test_safe_merge_refuses_an_overflow_like_peft_and_changes_nothing():
    ours = overflowing_model()
    before = snapshot(ours)
    with pytest.raises(ValueError, match="overflow"):
        merge_lora(ours, safe_merge=True)
    assert_unchanged(ours, before)
    assert not ours[0].merged
    theirs = peft.get_peft_model(nn.Sequential(nn.Linear(4, 4, dtype=torch.float16)),
                                 peft.LoraConfig(r=2, lora_alpha=2, target_modules=["0"]))
    theirs.load_state_dict({PREFIX + k: v for k, v in ours.state_dict().items()})
    with pytest.raises(ValueError, match="NaN"):  # PEFT refuses it too (its message says NaNs)
        theirs.merge_adapter(safe_merge=True)


def test_without_safe_merge_non_finite_factors_are_still_refused():
    model = overflowing_model()
    with torch.no_grad():
        model[0].lora_B["default"].weight[0, 0] = float("nan")
    before = snapshot(model)
    with pytest.raises(ValueError, match="non-finite"):
        merge_lora(model)
    assert_unchanged(model, before)
