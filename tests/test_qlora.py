"""lora_lab.qlora: QLoRA equals LoRA on the dequantized weight, both backends agree, merge and save work."""

import subprocess
import sys

import pytest
import torch
from torch import nn

from model_state import assert_unchanged, snapshot

from lora_lab import apply_lora, nf4, unload
from lora_lab.lora import LoraConfig, LoRALinear, count_parameters
from lora_lab.qlora import (NF4Linear, QLoRALinear, apply_qlora, load_quantized, merge_and_unload,
                            quantized_memory_report, save_quantized)

# bitsandbytes is a hard dependency, imported only by the test of its backend: a broken install fails that test
# (test_nf4.py::test_bitsandbytes_imports says why) and the torch backend's tests still run.


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 64)
        self.q_proj, self.v_proj, self.up_proj = nn.Linear(64, 64), nn.Linear(64, 64, bias=False), nn.Linear(64, 128)
        self.lm_head = nn.Linear(128, 50, bias=False)

    def forward(self, ids):
        h = self.embed(ids)
        return self.lm_head(self.up_proj(self.q_proj(h) + self.v_proj(h)))


def trained_qlora(backend="torch", seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(128, 64)
    layer = QLoRALinear(base, r=4, lora_alpha=8, backend=backend)
    nn.init.normal_(layer.lora_B["default"].weight, std=0.1)  # a non-zero update, as after some training
    return layer


def test_qlora_equals_lora_on_the_dequantized_weight():
    layer = trained_qlora()
    dense = nn.Linear(128, 64)
    with torch.no_grad():
        dense.weight.copy_(layer.base_layer.dequantized_weight())
        dense.bias.copy_(layer.base_layer.bias)
    lora = LoRALinear(dense, r=4, lora_alpha=8)
    lora.load_state_dict({k: v for k, v in layer.state_dict().items() if "lora_" in k}, strict=False)
    x = torch.randn(3, 5, 128)
    # Same fp32 operations in the same order: equal up to matmul blocking differences (a few ulps).
    torch.testing.assert_close(layer(x), lora(x), rtol=1e-6, atol=1e-6)


def test_base_weight_is_only_4bit_buffers_and_gradients_reach_input_and_adapters_only():
    layer = trained_qlora()
    trainable = [n for n, p in layer.named_parameters() if p.requires_grad]
    assert trainable == ["lora_A.default.weight", "lora_B.default.weight"]
    assert layer.base_layer.weight.dtype == torch.uint8 and "weight" in dict(layer.base_layer.named_buffers())
    x = torch.randn(4, 128, requires_grad=True)
    layer(x).square().sum().backward()
    assert x.grad is not None and layer.lora_A["default"].weight.grad is not None and layer.base_layer.bias.grad is None


def test_backward_does_not_keep_the_dequantized_weight():
    layer = trained_qlora()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        layer(torch.randn(2, 128, requires_grad=True)).sum()
    assert (64, 128) not in saved and (128, 64) not in saved


def test_input_gradient_equals_the_dense_layer():
    layer = trained_qlora()
    w = layer.base_layer.dequantized_weight().requires_grad_(False)
    x = torch.randn(6, 128, requires_grad=True)
    layer.base_layer(x).sum().backward()
    # d(sum(x W^T))/dx = ones @ W; the same fp32 numbers summed in one matmul: ulp-level differences only.
    torch.testing.assert_close(x.grad, torch.ones(6, 64) @ w, rtol=1e-6, atol=1e-6)


def large_nf4_layer(seed):
    torch.manual_seed(seed)  # 1024 x 1024 = nf4.FAST_MIN_NUMEL: dequantized into the reused CPU buffer
    return NF4Linear.from_linear(nn.Linear(1024, 1024, bias=False), compute_dtype=torch.bfloat16)


def test_a_large_layer_through_the_reused_buffer_equals_a_fresh_dequantize():
    first, second = large_nf4_layer(0), large_nf4_layer(1)  # one shape: both write the one buffer
    x = torch.randn(3, 1024, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(3, 1024, dtype=torch.bfloat16)
    y = first(x)
    second(x.detach())  # overwrites the buffer between first's forward and its backward
    (y * grad).sum().backward()
    w = nf4.dequantize(first.quant_state, torch.bfloat16)  # a fresh tensor
    assert torch.equal(y, x.detach() @ w.T) and torch.equal(x.grad, grad @ w)


def test_layers_of_one_shape_share_one_reused_buffer():
    from lora_lab import qlora

    layers = [large_nf4_layer(seed) for seed in range(3)]
    x = torch.randn(2, 1024, dtype=torch.bfloat16)
    qlora._scratch.__dict__.pop("buffers", None)
    for layer in layers:
        layer(x)
    buffers = qlora._scratch.buffers
    assert list(buffers) == [((1024, 1024), torch.bfloat16)]  # one 16-bit weight for three layers


def test_torch_and_bitsandbytes_backends_give_the_same_outputs_and_gradients():
    results = []
    for backend in ("torch", "bitsandbytes"):
        layer = trained_qlora(backend)
        x = torch.randn(2, 7, 128, generator=torch.Generator().manual_seed(1), requires_grad=True)
        out = layer(x)
        out.square().mean().backward()
        results.append((out, x.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad))
    assert torch.equal(trained_qlora("torch").base_layer.weight, trained_qlora("bitsandbytes").base_layer.weight)
    for a, b in zip(*results):
        # Same dequantized fp32 weight; the matmuls may be blocked differently: fp32 rounding only.
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_package_and_the_torch_backend_work_without_bitsandbytes():
    code = ("import sys; sys.modules['bitsandbytes'] = None\n"  # None in sys.modules makes the import fail
            "import torch, lora_lab\n"
            "layer = lora_lab.QLoRALinear(torch.nn.Linear(64, 32), r=2)\n"
            "assert layer(torch.randn(2, 64)).shape == (2, 32)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr  # bitsandbytes is imported lazily, by its backend only


def test_apply_qlora_quantizes_all_linears_but_the_head_and_wraps_the_targets():
    model = Tiny()
    apply_qlora(model, LoraConfig(r=4, target_modules=("q_proj", "v_proj")))
    assert isinstance(model.q_proj, QLoRALinear) and isinstance(model.v_proj, QLoRALinear)
    assert isinstance(model.up_proj, NF4Linear) and type(model.lm_head) is nn.Linear
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.lora_{x}.default.weight" for m in ("q_proj", "v_proj") for x in "AB"}


def test_parameter_count_is_logical_not_packed():
    model = Tiny()
    before = count_parameters(model).total
    apply_qlora(model, LoraConfig(r=4, target_modules=("q_proj", "v_proj")))
    assert count_parameters(model).total == before + 2 * 4 * (64 + 64)  # + the adapters, nothing halved


def test_apply_qlora_checks_before_changing_anything():
    model = Tiny()
    with torch.no_grad():
        model.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        apply_qlora(model, LoraConfig(r=4, target_modules=("q_proj",)))
    assert type(model.q_proj) is nn.Linear and type(model.up_proj) is nn.Linear
    with pytest.raises(ValueError, match="matched no module"):
        apply_qlora(Tiny(), LoraConfig(r=4, target_modules=("k_proj",)))


@pytest.mark.parametrize("compute_dtype", ["bf16", torch.int8, torch.float64])
def test_a_bad_compute_dtype_is_refused_at_construction(compute_dtype):
    with pytest.raises(TypeError, match="compute_dtype"):
        QLoRALinear(nn.Linear(64, 64), r=4, compute_dtype=compute_dtype)


def test_apply_qlora_refuses_a_bad_compute_dtype_before_changing_anything():
    model = Tiny()
    before = snapshot(model)
    with pytest.raises(TypeError, match="compute_dtype"):
        apply_qlora(model, LoraConfig(r=4, target_modules=("q_proj",)), compute_dtype="bf16")
    assert_unchanged(model, before)


def test_merge_and_unload_returns_dense_layers_with_the_update():
    model = Tiny()
    apply_qlora(model, LoraConfig(r=4, target_modules=("q_proj", "v_proj")))
    for layer in (model.q_proj, model.v_proj):  # every merged layer carries an update
        nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    ids = torch.randint(0, 50, (2, 9))
    expected = model(ids)
    merged = merge_and_unload(model)
    assert all(type(m) is nn.Linear for m in (merged.q_proj, merged.v_proj, merged.up_proj))
    torch.testing.assert_close(merged(ids), expected, rtol=1e-5, atol=1e-5)  # fp32 reassociation of W x + B A x


def test_unload_keeps_the_4bit_base_and_drops_the_adapters():
    model = Tiny()
    apply_qlora(model, LoraConfig(r=4, target_modules=("q_proj", "v_proj")))
    q_proj = model.q_proj.base_layer
    ids = torch.randint(0, 50, (2, 9))
    for layer in (model.q_proj, model.v_proj):
        nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    without = {name: model.get_submodule(name).base_layer for name in ("q_proj", "v_proj")}
    expected = model.lm_head(model.up_proj(without["q_proj"](model.embed(ids)) + without["v_proj"](model.embed(ids))))
    plain = unload(model)  # PEFT's unload: no merge, the NF4 layers stay NF4
    assert plain.q_proj is q_proj and all(type(m) is NF4Linear for m in (plain.q_proj, plain.v_proj, plain.up_proj))
    assert not hasattr(plain, "peft_config")
    assert torch.equal(plain(ids), expected)


def test_merge_and_unload_merges_a_lora_layer_on_an_nf4_base_and_refuses_a_mix():
    model = Tiny()
    model.q_proj = NF4Linear.from_linear(model.q_proj)  # e.g. unload(qlora_model), then load_adapter onto it
    apply_lora(model, LoraConfig(r=4, target_modules=("q_proj", "v_proj")))  # q_proj on 4 bits, v_proj not
    for layer in (model.q_proj, model.v_proj):
        nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    before = snapshot(model)
    with pytest.raises(ValueError, match="mixes 4-bit LoRA layers with full-precision ones such as 'v_proj'"):
        merge_and_unload(model)
    assert_unchanged(model, before)
    model.v_proj = model.v_proj.base_layer  # only the 4-bit one left
    ids = torch.randint(0, 50, (2, 9))
    expected = model(ids)
    merged = merge_and_unload(model)
    assert type(merged.q_proj) is nn.Linear
    torch.testing.assert_close(merged(ids), expected, rtol=1e-5, atol=1e-5)  # fp32 reassociation of W x + B A x


def test_requantized_merge_reports_an_error_within_half_a_code_gap():
    model = Tiny()
    apply_qlora(model, LoraConfig(r=4, target_modules=("q_proj",)), double_quant=False)
    nn.init.normal_(model.q_proj.lora_B["default"].weight, std=0.1)
    merged, report = merge_and_unload(model, requantize=True)
    assert isinstance(merged.q_proj, NF4Linear)
    absmax = merged.q_proj.quant_state.absmax.max().item()
    widest_gap = nf4.nf4_codebook().diff().max().item()
    assert 0 < report.mean_abs_error["q_proj"] <= report.max_abs_error["q_proj"] <= absmax * widest_gap / 2 + 1e-6


def test_state_dict_round_trips_through_safetensors(tmp_path):
    model = apply_qlora(Tiny(), LoraConfig(r=4, target_modules=("q_proj", "v_proj")))
    for layer in (model.q_proj, model.v_proj):  # every saved adapter nonzero, so each must round-trip
        nn.init.normal_(layer.lora_B["default"].weight)
    save_quantized(model, tmp_path / "m.safetensors")
    fresh = apply_qlora(Tiny(), LoraConfig(r=4, target_modules=("q_proj", "v_proj")))
    load_quantized(fresh, tmp_path / "m.safetensors")
    ids = torch.randint(0, 50, (2, 5))
    assert torch.equal(fresh(ids), model(ids))
    other = apply_qlora(Tiny(), LoraConfig(r=4, target_modules=("q_proj", "v_proj")), blocksize=32)
    with pytest.raises(ValueError, match="does not fit"):
        load_quantized(other, tmp_path / "m.safetensors")


def test_memory_report_counts_packed_bytes():
    model = apply_qlora(Tiny(), LoraConfig(r=4, target_modules=("q_proj",)), double_quant=False)
    report = quantized_memory_report(model)
    # up_proj: 128*64 weights at 4 bits + one fp32 absmax per 64 + 16 fp32 code values + 128 fp32 biases.
    assert report["up_proj"] == 128 * 64 // 2 + 128 * 64 // 64 * 4 + 16 * 4 + 128 * 4
    assert report["total"] == sum(v for k, v in report.items() if k != "total")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("requantize", [False, True])
def test_a_non_finite_adapter_in_a_later_layer_is_refused_before_anything_changes(requantize, bad):
    model = apply_qlora(Tiny(), LoraConfig(r=4, target_modules=("q_proj", "v_proj")))
    nn.init.normal_(model.q_proj.lora_B["default"].weight, std=0.1)
    with torch.no_grad():
        model.v_proj.lora_B["default"].weight[0, 0] = bad  # v_proj comes after q_proj
    before = snapshot(model)
    with pytest.raises(ValueError, match="NaN or inf"):
        merge_and_unload(model, requantize=requantize)
    assert_unchanged(model, before)
    assert hasattr(model, "peft_config")


class TiedTiny(nn.Module):
    """The output head shares the embedding matrix (tied embeddings)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 64)
        self.q_proj, self.v_proj = nn.Linear(64, 64), nn.Linear(64, 64)
        self.lm_head = nn.Linear(64, 50, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        return self.lm_head(self.q_proj(h) + self.v_proj(h))


def test_a_tied_model_round_trips_and_loads_back_tied(tmp_path):
    torch.manual_seed(0)
    model = apply_qlora(TiedTiny(), LoraConfig(r=4, target_modules=("q_proj", "v_proj")))
    for layer in (model.q_proj, model.v_proj):
        nn.init.normal_(layer.lora_B["default"].weight)
    save_quantized(model, tmp_path / "m.safetensors")
    torch.manual_seed(1)
    fresh = load_quantized(apply_qlora(TiedTiny(), LoraConfig(r=4, target_modules=("q_proj", "v_proj"))),
                           tmp_path / "m.safetensors")
    ids = torch.randint(0, 50, (2, 5))
    assert torch.equal(fresh(ids), model(ids)) and fresh.lm_head.weight is fresh.embed.weight


def damage(path, tmp_path, how):
    """A copy of the save_quantized file at ``path`` damaged in one way."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    out = tmp_path / f"{how}.safetensors"
    with safe_open(str(path), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    blob = path.read_bytes()
    if how == "truncated":
        out.write_bytes(blob[: len(blob) // 2])
    elif how == "garbage":
        out.write_bytes(b"\xff" * 64)
    elif how == "nan_bias":
        tensors["q_proj.base_layer.bias"] = torch.full_like(tensors["q_proj.base_layer.bias"], float("nan"))
        save_file(tensors, str(out), metadata)
    elif how == "nan_absmax":
        tensors["up_proj.nested_absmax"] = torch.full_like(tensors["up_proj.nested_absmax"], float("nan"))
        save_file(tensors, str(out), metadata)
    elif how == "bad_metadata":
        save_file(tensors, str(out), {**metadata, "lora_lab.nf4_layers": "{not json"})
    elif how == "int_weight":
        tensors["lm_head.weight"] = tensors["lm_head.weight"].to(torch.int32)
        save_file(tensors, str(out), metadata)
    return out


@pytest.mark.parametrize("how, match", [
    ("truncated", "truncated"), ("garbage", "damaged"), ("nan_bias", "NaN"), ("nan_absmax", "NaN"),
    ("bad_metadata", "metadata"), ("int_weight", "lm_head.weight"),
])
def test_a_damaged_quantized_file_is_refused_before_anything_changes(tmp_path, how, match):
    model = apply_qlora(Tiny(), LoraConfig(r=4, target_modules=("q_proj", "v_proj")))
    save_quantized(model, tmp_path / "m.safetensors")
    fresh = apply_qlora(Tiny(), LoraConfig(r=4, target_modules=("q_proj", "v_proj")))
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=match):
        load_quantized(fresh, damage(tmp_path / "m.safetensors", tmp_path, how))
    assert_unchanged(fresh, before)
