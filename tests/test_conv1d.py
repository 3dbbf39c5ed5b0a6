"""LoRA on transformers' Conv1D (GPT-2, weight stored (in, out)): fan_in_fan_out as PEFT sets it, same numbers."""

import copy
import warnings

import pytest
import torch

from model_state import assert_unchanged, snapshot
from peft_twin import PREFIX, grads, peft_twin, randomize

from lora_lab import LoraConfig, LoRALinear, apply_lora, apply_qlora, count_parameters, load_adapter, lora_layers, \
    merge_and_unload, merge_lora, save_adapter, unmerge_lora

peft = pytest.importorskip("peft", reason="the Conv1D tests compare with PEFT (pip install peft)")
transformers = pytest.importorskip("transformers", reason="the Conv1D tests build a tiny transformers GPT-2")
pytestmark = [pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
              pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning")]


@pytest.fixture(scope="module")
def base():
    """A tiny GPT2LMHeadModel built locally (no download), in eval mode: c_attn, c_proj, c_fc are Conv1D."""
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))


def ours_and_theirs(base, **kwargs):
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_proj", "c_fc"], "fan_in_fan_out": True,
              **kwargs}
    ours = randomize(apply_lora(copy.deepcopy(base), LoraConfig(**config)))
    return ours, peft_twin(peft, base, ours, **config)


def assert_same_function(ours, theirs):
    # Same weights; PEFT scales B(Ax) by s where lora_lab scales Ax before B: the same product rounded at another
    # point (<= 1 fp32 ulp of the update), carried through two blocks.
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_dims_come_from_the_weight_and_the_delta_is_transposed(base):
    ours, theirs = ours_and_theirs(base)
    layer = ours.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoRALinear) and layer.fan_in_fan_out
    assert (layer.in_features, layer.out_features) == (32, 96)  # Conv1D weight (in, out) = (32, 96)
    assert layer.lora_A["default"].weight.shape == (4, 32) and layer.lora_B["default"].weight.shape == (96, 4)
    twin = theirs.base_model.model.transformer.h[0].attn.c_attn
    assert twin.fan_in_fan_out
    # (B A)^T * scaling in fp32 in both: exactly PEFT's delta, in the (in, out) layout of the weight.
    assert layer.get_delta_weight().shape == (32, 96)
    assert torch.equal(layer.get_delta_weight(), twin.get_delta_weight("default"))


def test_outputs_gradients_and_merged_weights_match_peft(base, ids):
    ours, theirs = ours_and_theirs(base)
    assert set(lora_layers(ours)) == {n.removeprefix(PREFIX) for n, m in theirs.named_modules()
                                      if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert tuple(count_parameters(ours)) == theirs.get_nb_trainable_parameters()
    out_ours, out_theirs = ours(ids).logits, theirs(ids).logits
    assert_same_function(out_ours, out_theirs)
    assert not torch.allclose(out_ours, base(ids).logits)
    out_ours.square().mean().backward()
    out_theirs.square().mean().backward()
    mine, their = grads(ours), grads(theirs, PREFIX)
    assert mine.keys() == their.keys() and all(g.abs().sum() > 0 for g in mine.values())
    for name, grad in mine.items():
        torch.testing.assert_close(grad, their[name], rtol=1e-4, atol=1e-6)  # the same rounding, through backward
    merged_ours, merged_theirs = merge_and_unload(ours), theirs.merge_and_unload()
    ours_sd, theirs_sd = merged_ours.state_dict(), merged_theirs.state_dict()
    assert ours_sd.keys() == theirs_sd.keys()
    for key, value in ours_sd.items():
        assert torch.equal(value, theirs_sd[key]), key  # W0 + (B A)^T s, the same fp32 ops: exact
    assert type(merged_ours.transformer.h[0].attn.c_attn).__name__ == "Conv1D"


def test_merge_unmerge_round_trips_the_weight(base, ids):
    ours, _ = ours_and_theirs(base)
    w0 = base.transformer.h[1].mlp.c_fc.weight
    with torch.no_grad():
        before = ours(ids).logits
        merge_lora(ours)
        torch.testing.assert_close(ours(ids).logits, before, rtol=1e-5, atol=1e-5)  # W0 + ΔW rounds once more
        unmerge_lora(ours)
    torch.testing.assert_close(ours.transformer.h[1].mlp.c_fc.base_layer.weight, w0, rtol=0, atol=1e-6)


def test_fan_in_fan_out_false_warns_and_is_set_as_in_peft(base):
    config = LoraConfig(r=2, target_modules=["c_attn"])
    with pytest.warns(UserWarning, match="fan_in_fan_out is set to False"):
        apply_lora(copy.deepcopy(base), config)
    with pytest.warns(UserWarning, match="fan_in_fan_out is set to False"):
        theirs_config = peft.LoraConfig(r=2, target_modules=["c_attn"])
        peft.get_peft_model(copy.deepcopy(base), theirs_config)
    assert config.fan_in_fan_out is True and theirs_config.fan_in_fan_out is True  # both set it on the config


def test_all_linear_selects_what_peft_selects(base):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = apply_lora(copy.deepcopy(base), LoraConfig(r=2, target_modules="all-linear"))
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules="all-linear"))
    assert {PREFIX + n for n in lora_layers(ours)} == {
        n for n, m in theirs.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}  # Conv1D in, lm_head out
    assert tuple(count_parameters(ours)) == theirs.get_nb_trainable_parameters()


def test_adapter_files_round_trip_both_ways(base, ids, tmp_path):
    ours, theirs = ours_and_theirs(base)
    save_adapter(ours, tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert loaded.peft_config["default"].fan_in_fan_out is True
    with torch.no_grad():
        assert_same_function(ours(ids).logits, loaded(ids).logits)
    randomize(theirs, seed=2)
    theirs.save_pretrained(tmp_path / "theirs")
    back = load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    assert back.peft_config["default"].fan_in_fan_out is True
    with torch.no_grad():
        assert_same_function(back(ids).logits, theirs(ids).logits)


def test_apply_qlora_refuses_conv1d_and_changes_nothing(base):
    model = copy.deepcopy(base)
    before = snapshot(model)
    with pytest.raises(TypeError, match="plain nn.Linear"):
        apply_qlora(model, LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    assert_unchanged(model, before)


def test_a_non_bool_fan_in_fan_out_is_refused():
    with pytest.raises(TypeError, match="fan_in_fan_out must be True or False"):
        LoraConfig(fan_in_fan_out="true")
