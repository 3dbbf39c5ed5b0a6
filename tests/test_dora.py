"""DoRA (use_dora=True): the same magnitudes, outputs, gradients, merged weights and files as PEFT's DoRA."""

import copy
import math
import json
from collections import OrderedDict

import pytest
import torch
from torch import nn

from peft_twin import tiny_llama
from model_state import assert_unchanged, snapshot
from toy_models import TinyLM

from lora_lab import (LoraConfig, LoRALinear, QLoRALinear, add_adapter, apply_lora, apply_qlora, count_parameters,
                      delete_adapter, dora, finetune, load_adapter, load_task, merge_and_unload, merge_lora,
                      save_adapter, set_adapter, unmerge_lora)
from lora_lab.model import LlamaConfig, LlamaForCausalLM

peft = pytest.importorskip("peft", reason="DoRA is checked against PEFT's")
transformers = pytest.importorskip("transformers", reason="the adapter round trip uses a transformers Llama")
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

PREFIX = "base_model.model."
DORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True)
# The kit computes B A as lora_B.weight @ lora_A.weight, PEFT as lora_B(lora_A(eye)).T: the same products summed
# by another kernel, so the norm ||W0 + s B A||_c, and all that follows, may differ in the last bits of fp32.
FP32 = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(transformers)


def tiny():
    """A model whose linear layers have biases, which DoRA's forward must take out of the base output and back."""
    torch.manual_seed(0)
    return TinyLM(vocab=20, d=8).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 20, (2, 6), generator=torch.Generator().manual_seed(1))


def randomize(model, seed=0):
    """Nonzero A, B and m (at init B = 0 and m = ||W0||_c, which would make every comparison vacuous)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            elif ".lora_magnitude_vector." in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=gen))
    return model


def pair(base, **options):
    """The kit's DoRA model and PEFT's on copies of ``base``, holding the same numbers, name for name."""
    ours = randomize(apply_lora(copy.deepcopy(base), LoraConfig(**{**DORA, **options})))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**{**DORA, **options}))
    state = {PREFIX + k: v for k, v in ours.state_dict().items()}
    assert state.keys() == theirs.state_dict().keys()  # PEFT's module tree, lora_magnitude_vector.default.weight too
    theirs.load_state_dict(state)
    return ours, theirs


def logits(model, ids):
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def grads(model, prefix=""):
    return {prefix + n: p.grad for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------------- the layer


@pytest.mark.parametrize("make", [tiny, "llama"])
def test_magnitude_starts_at_peft_row_norms_and_the_output_at_the_base(make, llama, ids):
    base = llama if make == "llama" else make()
    ours = apply_lora(copy.deepcopy(base), LoraConfig(**DORA))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**DORA))
    mine = {PREFIX + k: v for k, v in ours.state_dict().items() if "magnitude" in k}
    assert mine and all(torch.equal(v, theirs.state_dict()[k]) for k, v in mine.items())  # bit for bit
    layer = ours.get_submodule("model.layers.0.self_attn.q_proj")
    norms = torch.linalg.norm(layer.base_layer.weight, dim=1)  # ||W0||_c: one per output feature, (out,)
    assert torch.equal(layer.lora_magnitude_vector["default"].weight, norms)
    with torch.no_grad():
        torch.testing.assert_close(logits(ours, ids), logits(base, ids), rtol=0, atol=1e-6)  # m / ||W0|| = 1


@pytest.mark.parametrize("make", [tiny, "llama"])
@pytest.mark.parametrize("options", [{}, {"lora_dropout": 0.25}, {"use_rslora": True}])
def test_outputs_and_gradients_of_A_B_and_m_equal_peft(make, options, llama, ids):
    ours, theirs = pair(llama if make == "llama" else make(), **options)
    ours.train(), theirs.train()
    torch.manual_seed(5)  # with dropout, both draw their masks in the same order from the same stream
    out = logits(ours, ids)
    torch.manual_seed(5)
    ref = logits(theirs, ids)
    torch.testing.assert_close(out, ref, **FP32)
    out.square().mean().backward()
    ref.square().mean().backward()
    mine, peft_grads = grads(ours, PREFIX), grads(theirs)
    assert mine.keys() == peft_grads.keys() and any("magnitude" in k for k in mine)
    for key, grad in mine.items():
        assert grad is not None and grad.abs().sum() > 0, key
        torch.testing.assert_close(grad, peft_grads[key], rtol=1e-4, atol=1e-6, msg=key)  # FP32, through backward


def test_forward_is_the_paper_formula():
    torch.manual_seed(0)
    layer = randomize(nn.Sequential(OrderedDict(q_proj=LoRALinear(nn.Linear(12, 6), r=3, lora_alpha=6,
                                                                  use_dora=True))))[0]
    W0, b = layer.base_layer.weight, layer.base_layer.bias
    A, B, m = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_magnitude_vector["default"]
    direction = W0 + 2.0 * B @ A
    expected = m.weight[:, None] * direction / direction.norm(dim=1, keepdim=True)  # W' (out, in)
    x = torch.randn(5, 12)
    torch.testing.assert_close(layer(x), x @ expected.T + b, **FP32)
    torch.testing.assert_close(layer.weight, expected, **FP32)  # .weight and get_delta_weight: W0 + (W' - W0)


def test_the_norm_is_detached_as_in_section_4_3():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(8, 4, bias=False), r=2, lora_alpha=2, use_dora=True)
    nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(3, 8)
    layer(x).sum().backward()
    A, B, m = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_magnitude_vector["default"]
    W0 = layer.base_layer.weight
    norm = (W0 + B @ A).norm(dim=1).detach()  # a constant: the gradient below does not flow through it
    B2, A2 = B.detach().requires_grad_(), A.detach().requires_grad_()
    (x @ ((m.weight.detach() / norm)[:, None] * (W0 + B2 @ A2)).T).sum().backward()
    torch.testing.assert_close(B.grad, B2.grad, **FP32)
    torch.testing.assert_close(A.grad, A2.grad, **FP32)


# ------------------------------------------------------------------------------------------- merging


@pytest.mark.parametrize("make", [tiny, "llama"])
def test_merged_weights_equal_peft_and_unmerge_restores_w0(make, llama, ids):
    base = llama if make == "llama" else make()
    ours, theirs = pair(base)
    with torch.no_grad():
        before = logits(ours, ids)
    w0 = {k: v.clone() for k, v in ours.state_dict().items() if k.endswith("base_layer.weight")}
    merge_lora(ours)
    theirs.merge_adapter()
    for key in w0:
        assert torch.equal(ours.state_dict()[key], theirs.state_dict()[PREFIX + key]), key  # the same arithmetic
    with torch.no_grad():
        torch.testing.assert_close(logits(ours, ids), before, **FP32)
    unmerge_lora(ours)
    theirs.unmerge_adapter()
    for key, weight in w0.items():
        assert torch.equal(ours.state_dict()[key], theirs.state_dict()[PREFIX + key]), key
        torch.testing.assert_close(ours.state_dict()[key], weight, rtol=0, atol=1e-6)  # rounding of / and -
    plain_ours = merge_and_unload(ours)
    plain_theirs = theirs.merge_and_unload()
    assert plain_ours.state_dict().keys() == plain_theirs.state_dict().keys()
    for key, value in plain_ours.state_dict().items():
        assert torch.equal(value, plain_theirs.state_dict()[key]), key


def test_merge_refuses_a_nan_magnitude_and_leaves_the_model_as_it_was(ids):
    model = randomize(apply_lora(tiny(), LoraConfig(**DORA)))
    with torch.no_grad():
        model.get_submodule("model.layers.1.self_attn.v_proj").lora_magnitude_vector["default"].weight[0] = float("nan")
    before = snapshot(model)
    calls = (lambda: merge_lora(model), lambda: merge_lora(model, safe_merge=True), lambda: merge_and_unload(model))
    for call in calls:
        with pytest.raises(ValueError, match="NaN"):
            call()
        assert_unchanged(model, before)


def test_get_delta_weight_needs_the_unmerged_w0():
    layer = randomize(nn.Sequential(OrderedDict(q_proj=LoRALinear(nn.Linear(8, 4), r=2, use_dora=True))))[0]
    layer.merge()
    with pytest.raises(ValueError, match="unmerge first"):
        layer.get_delta_weight()


# ------------------------------------------------------------------------------------------- files


def test_the_kit_s_dora_adapter_loads_in_peft_with_the_same_logits(llama, ids, tmp_path):
    ours, _ = pair(llama)
    save_adapter(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    from safetensors.torch import load_file
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert f"{PREFIX}model.layers.0.self_attn.q_proj.lora_magnitude_vector" in keys  # PEFT's key: no ".weight"
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(llama), tmp_path)
    assert loaded.peft_config["default"].use_dora
    with torch.no_grad():
        torch.testing.assert_close(logits(loaded, ids), logits(ours, ids), **FP32)


def test_peft_s_dora_adapter_loads_here_bit_for_bit(llama, ids, tmp_path):
    _, theirs = pair(llama)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(copy.deepcopy(llama), tmp_path)
    assert ours.peft_config["default"].use_dora
    state = theirs.state_dict()
    for key, value in ours.state_dict().items():
        assert torch.equal(value, state[PREFIX + key]), key
    with torch.no_grad():
        torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), **FP32)
    wrapped = apply_lora(copy.deepcopy(llama), LoraConfig(**DORA))  # overwrite the same adapter in place
    load_adapter(wrapped, tmp_path)
    assert all(torch.equal(v, state[PREFIX + k]) for k, v in wrapped.state_dict().items())


def test_a_dora_file_onto_a_plain_lora_adapter_is_refused_and_changes_nothing(llama, tmp_path):
    ours, _ = pair(llama)
    save_adapter(ours, tmp_path)
    plain = apply_lora(copy.deepcopy(llama), LoraConfig(**{**DORA, "use_dora": False}))
    before = snapshot(plain)
    with pytest.raises(ValueError, match="use_dora=False"):
        load_adapter(plain, tmp_path)
    assert_unchanged(plain, before)


@pytest.mark.parametrize("key, value", [("fan_in_fan_out", True), ("lora_bias", True), ("rank_pattern", {"q": 2})])
def test_peft_options_still_missing_here_are_still_refused(llama, tmp_path, key, value):
    ours, _ = pair(llama)
    save_adapter(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, key: value}))
    model = copy.deepcopy(llama)
    before = snapshot(model)
    with pytest.raises(ValueError, match=key):
        load_adapter(model, tmp_path)
    assert_unchanged(model, before)


# ------------------------------------------------------------------------------------------- NF4 base


def peft_on_linear4bit(dense: nn.Linear, **options):
    """PEFT's DoRA on bitsandbytes' Linear4bit (NF4, blocksize 64, double quantization) holding ``dense``'s weight."""
    bnb = pytest.importorskip("bitsandbytes", reason="PEFT's 4-bit DoRA runs on bitsandbytes' Linear4bit")
    four_bit = bnb.nn.Linear4bit(dense.in_features, dense.out_features, bias=dense.bias is not None,
                                 compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
    four_bit.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                        compress_statistics=True, blocksize=64)
    if dense.bias is not None:
        four_bit.bias = nn.Parameter(dense.bias.data.clone(), requires_grad=False)
    four_bit = four_bit.to("cpu")  # quantizes on the move, as loading a model does
    model = nn.Sequential(OrderedDict(q_proj=four_bit))
    model.is_loaded_in_4bit = True  # what transformers sets; PEFT then wraps the layer in its bnb Linear4bit class
    theirs = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True,
                                                       **options))
    assert type(theirs.base_model.model.q_proj) is peft.tuners.lora.bnb.Linear4bit
    return theirs


@pytest.mark.filterwarnings("ignore:Merge lora module to 4-bit linear:UserWarning")  # PEFT says it requantizes
def test_on_an_nf4_base_outputs_gradients_and_merge_equal_peft_on_bitsandbytes():
    torch.manual_seed(0)
    dense = nn.Linear(128, 64)
    theirs = peft_on_linear4bit(dense)
    ours = nn.Sequential(OrderedDict(q_proj=QLoRALinear(copy.deepcopy(dense), r=4, lora_alpha=8, use_dora=True)))
    dequantized = ours.q_proj.base_layer.dequantized_weight(torch.float32)
    from peft.utils.integrations import dequantize_module_weight
    assert torch.equal(dequantized, dequantize_module_weight(theirs.base_model.model.q_proj.base_layer).float())
    # m starts at the row norms of the dequantized W0 in both
    assert torch.equal(ours.q_proj.lora_magnitude_vector["default"].weight,
                       theirs.base_model.model.q_proj.lora_magnitude_vector["default"].weight)
    randomize(ours)
    mine = {k: v for k, v in ours.state_dict().items() if "lora_" in k}
    theirs.load_state_dict({PREFIX + k: v for k, v in mine.items()}, strict=False)
    x = torch.randn(3, 5, 128, requires_grad=True)
    out, ref = ours(x), theirs(x)
    torch.testing.assert_close(out, ref, **FP32)
    out.square().sum().backward()
    mine_grads = grads(ours, PREFIX)
    x_grad, x.grad = x.grad, None
    ref.square().sum().backward()
    for key, grad in grads(theirs).items():
        torch.testing.assert_close(mine_grads[key], grad, rtol=1e-4, atol=1e-5, msg=key)
    torch.testing.assert_close(x_grad, x.grad, rtol=1e-4, atol=1e-5)
    # merging: W' = m / ||dequant(W0) + s B A||_c (dequant(W0) + s B A); PEFT requantizes it to NF4 as it merges
    with torch.no_grad():
        expected = ours(x)
    merged, report = merge_and_unload(copy.deepcopy(ours), requantize=True)
    theirs.merge_adapter()
    theirs_merged = dequantize_module_weight(theirs.base_model.model.q_proj.base_layer).float()
    assert torch.equal(merged.q_proj.dequantized_weight(torch.float32), theirs_merged)
    dense_merged = merge_and_unload(ours)
    assert type(dense_merged.q_proj) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(dense_merged(x), expected, **FP32)
    assert report.mean_abs_delta["q_proj"] > 0


def test_apply_qlora_with_dora_trains_only_A_B_and_m():
    model = apply_qlora(tiny(), LoraConfig(**DORA))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    expected = sorted(f"model.layers.{i}.self_attn.{p}.{t}.default.weight" for i in range(2)
                      for p in ("q_proj", "v_proj") for t in ("lora_A", "lora_B", "lora_magnitude_vector"))
    assert trainable == expected


# ------------------------------------------------------------------------------------------- the rest of the API


def test_count_parameters_counts_m_as_peft_does(llama):
    ours, theirs = pair(llama)
    count = count_parameters(ours)
    assert (count.trainable, count.total) == theirs.get_nb_trainable_parameters()
    plain = count_parameters(apply_lora(copy.deepcopy(llama), LoraConfig(**{**DORA, "use_dora": False})))
    assert count.trainable - plain.trainable == 2 * (32 + 16)  # one m entry per output: q_proj 32, v_proj 16 (GQA)


def test_a_second_dora_adapter_switches_and_deletes_like_peft(llama):
    ours, theirs = pair(llama)
    second = dict(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj"], use_dora=True)
    add_adapter(ours, "second", LoraConfig(**second))
    theirs.add_adapter("second", peft.LoraConfig(**second))
    assert {PREFIX + k for k in ours.state_dict()} == theirs.state_dict().keys()
    set_adapter(ours, "second")
    theirs.set_adapter("second")
    assert grads_wanted(ours, PREFIX) == grads_wanted(theirs)
    set_adapter(ours, "default")
    delete_adapter(ours, "second")
    assert not any("second" in k for k in ours.state_dict())


def grads_wanted(model, prefix=""):
    return sorted(prefix + n for n, p in model.named_parameters() if p.requires_grad)


def test_finetune_trains_a_dora_config_for_lora_and_qlora():
    task = load_task()
    for method in ("lora", "qlora"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig())
        config = LoraConfig(r=4, lora_alpha=8, use_dora=True)
        history = finetune(model, task, method=method, config=config, steps=4, batch_size=8, eval_every=None,
                           eval_examples=16, device="cpu")
        assert history.train_loss[-1] < history.train_loss[0]
        layer = model.get_submodule("model.layers.0.self_attn.q_proj")
        norms = torch.linalg.norm(dora.base_weight(layer.base_layer, torch.float32), dim=1)
        assert not torch.equal(layer.lora_magnitude_vector["default"].weight, norms)  # m moved


@pytest.mark.parametrize("make", [lambda f: LoraConfig(use_dora=f),
                                  lambda f: LoRALinear(nn.Linear(4, 4), r=2, use_dora=f)])
def test_use_dora_must_be_a_real_bool(make):
    with pytest.raises(TypeError, match="use_dora"):
        make("false")


def test_dora_needs_a_floating_point_base_weight():
    class Packed(nn.Module):
        in_features, out_features = 8, 4

        def __init__(self):
            super().__init__()
            self.register_buffer("weight", torch.zeros(16, dtype=torch.uint8))

    with pytest.raises(TypeError, match="use_dora=False"):
        LoRALinear(Packed(), r=2, use_dora=True)
    layer = LoRALinear(Packed(), r=2)  # plain LoRA needs only in_features/out_features
    before = snapshot(layer)
    with pytest.raises(TypeError, match="use_dora=False"):
        layer.update_layer("second", 2, 2, use_dora=True)
    assert_unchanged(layer, before)


def test_a_dora_adapter_is_not_added_beside_a_merged_one():
    layer = LoRALinear(nn.Linear(8, 4), r=2)
    nn.init.normal_(layer.lora_B["default"].weight)
    layer.merge()
    before = snapshot(layer)
    with pytest.raises(ValueError, match="unmerge before adding a DoRA adapter"):
        layer.update_layer("second", 2, 2, use_dora=True)
    assert_unchanged(layer, before)


# ------------------------------------------------------------------------------ ΔM and ΔD (DoRA paper §3)

def test_an_unchanged_weight_has_no_magnitude_or_direction_change():
    w = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    assert dora.magnitude_direction_change(w, w.clone()) == pytest.approx((0.0, 0.0), abs=1e-15)


def test_a_rescale_of_each_output_changes_magnitude_only():
    w = torch.randn(6, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    c = torch.tensor([0.5, 1.0, 2.0, 1.5, 0.9, 1.1], dtype=torch.float64)
    d_m, d_d = dora.magnitude_direction_change(w, c[:, None] * w)
    assert d_d == pytest.approx(0.0, abs=1e-12)
    assert d_m == pytest.approx(float(((c - 1).abs() * torch.linalg.norm(w, dim=1)).mean()), rel=1e-12)


def test_a_rotation_at_equal_norms_changes_direction_only():
    w = torch.zeros(3, 4, dtype=torch.float64)
    w[:, 0] = torch.tensor([1.0, 2.0, 3.0])
    angle = 0.3
    turned = torch.zeros_like(w)
    turned[:, 0], turned[:, 1] = w[:, 0] * math.cos(angle), w[:, 0] * math.sin(angle)
    d_m, d_d = dora.magnitude_direction_change(w, turned)
    assert d_m == pytest.approx(0.0, abs=1e-12)
    assert d_d == pytest.approx(1 - math.cos(angle), rel=1e-12)


def test_a_dora_layer_s_magnitude_change_is_its_magnitude_vector_s():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(8, 6), r=2, lora_alpha=4, use_dora=True)
    m0 = layer.lora_magnitude_vector["default"].weight.detach().clone()  # ||W0||_c
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
        layer.lora_magnitude_vector["default"].weight.mul_(torch.linspace(0.8, 1.3, 6))
    w0 = layer.base_layer.weight.detach()
    d_m, _ = dora.magnitude_direction_change(w0, w0 + layer.get_delta_weight())
    m = layer.lora_magnitude_vector["default"].weight.detach()
    assert d_m == pytest.approx(float((m - m0).abs().double().mean()), rel=1e-5)  # fp32 norms of the merged rows


@pytest.mark.parametrize("bad, match", [(torch.zeros(6, 4), "one \\(out, in\\) shape"),
                                        (torch.full((6, 5), float("nan")), "NaN"),
                                        (torch.zeros(6, 5), "all zero")])
def test_a_bad_checkpoint_is_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        dora.magnitude_direction_change(torch.ones(6, 5), bad)
