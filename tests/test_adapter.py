"""Adapters round-trip through PEFT's on-disk format, and a failed load changes nothing."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from peft_twin import logits, tiny_llama, token_ids
from model_state import assert_unchanged, snapshot

from lora_lab import LoraConfig, apply_lora, count_parameters, lora_layers
from lora_lab.adapter import load_adapter, save_adapter
from lora_lab.model import LlamaConfig, LlamaForCausalLM

peft = pytest.importorskip("peft", reason="the adapter interop tests compare with PEFT (pip install peft)")
transformers = pytest.importorskip("transformers", reason="the interop tests build a tiny transformers Llama")
# PEFT calls a transformers method that transformers 5 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def base():
    """A tiny LlamaForCausalLM built locally (no download), in eval mode."""
    return tiny_llama(transformers)


@pytest.fixture(scope="module")
def ids():
    return token_ids()


def randomize(model, names=("lora_A", "lora_B"), seed=0):
    """Nonzero, reproducible values for the trainable ``names`` (B = 0 at init would make comparisons vacuous)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and any(n in name for n in names):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model



def assert_same_function(ours, theirs):
    # Same weights; PEFT scales B(Ax) by s where lora_lab scales Ax before B: the same product rounded at another
    # point (<= 1 fp32 ulp of the update, exactly 0 when s is a power of two), carried through two layers.
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def saved(base, tmp_path_factory):
    """Our adapter (q/v, rsLoRA) with nonzero weights, saved once; returns (dir, its logits)."""
    model = randomize(apply_lora(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, use_rslora=True)))
    path = save_adapter(model, tmp_path_factory.mktemp("ours") / "adapter")
    return path, model


# ---------------------------------------------------------------------------------------- interop


def test_peft_loads_our_adapter_with_identical_outputs(base, ids, saved):
    path, ours = saved
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), path)
    # Same weights, same ops in the same order (base + B(A x) * scaling): bit-identical is expected.
    assert_same_function(logits(ours, ids), logits(theirs, ids))
    assert not torch.equal(logits(ours, ids), logits(base, ids))  # the adapter does change the function


@pytest.mark.parametrize("kwargs", [
    {"r": 4, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
    {"r": 2, "lora_alpha": 4, "target_modules": "all-linear", "use_rslora": True},
    {"r": 3, "lora_alpha": 3, "target_modules": r".*\.mlp\.(up|down)_proj"},
])
def test_we_load_a_peft_adapter_with_identical_outputs(base, ids, tmp_path, kwargs):
    theirs = randomize(peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(task_type="CAUSAL_LM", **kwargs)))
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(copy.deepcopy(base), tmp_path)
    assert set(lora_layers(ours)) == {n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                                      if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert_same_function(logits(ours, ids), logits(theirs, ids))


def test_all_linear_selects_what_peft_selects(base):
    ours = apply_lora(copy.deepcopy(base), LoraConfig(r=2, target_modules="all-linear"))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules="all-linear"))
    assert {"base_model.model." + n for n in lora_layers(ours)} == {
        n for n, m in theirs.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}  # lm_head excluded
    assert tuple(count_parameters(ours)) == theirs.get_nb_trainable_parameters()


class Biased(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.mid, self.v_proj = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 4)

    def forward(self, x):
        return self.v_proj(torch.tanh(self.mid(self.q_proj(x))))


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trained_biases_round_trip_both_ways(tmp_path, bias):
    torch.manual_seed(0)
    plain, x = Biased(), torch.randn(3, 6)
    ours = randomize(apply_lora(copy.deepcopy(plain), LoraConfig(r=2, bias=bias)), ("lora_", "bias"))
    save_adapter(ours, tmp_path / "ours", task_type=None)  # not a causal LM: PEFT's plain PeftModel
    # is_trainable: PEFT loads adapters frozen otherwise, and randomize (trainable parameters only) would skip them.
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(plain), tmp_path / "ours", is_trainable=True)
    assert_same_function(ours(x), theirs(x))
    loaded = {n: p.detach().clone() for n, p in theirs.named_parameters() if "lora_" in n}
    randomize(theirs, ("lora_", "bias"), seed=1)
    now = dict(theirs.named_parameters())
    # Every A and B got new, nonzero values: this direction checks PEFT's own weights, not ours echoed back.
    assert loaded and all(not torch.equal(now[n], v) and now[n].abs().min() > 0 for n, v in loaded.items())
    theirs.save_pretrained(tmp_path / "theirs")
    back = load_adapter(copy.deepcopy(plain), tmp_path / "theirs")
    assert_same_function(back(x), theirs(x))


def test_a_custom_module_round_trips_through_peft_model(tmp_path):
    torch.manual_seed(0)
    plain, x = Biased(), torch.randn(3, 6)
    ours = randomize(apply_lora(copy.deepcopy(plain), LoraConfig(r=2)))
    save_adapter(ours, tmp_path / "ours")  # the default task_type: null for a module that is not a causal LM
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(plain), tmp_path / "ours")
    assert_same_function(theirs(x), ours(x))
    theirs.save_pretrained(tmp_path / "theirs")
    assert_same_function(load_adapter(copy.deepcopy(plain), tmp_path / "theirs")(x), ours(x))


# ------------------------------------------------------------------------------------- the format


def test_on_disk_format_is_peft_format(base, saved):
    path, model = saved
    tensors = load_file(path / "adapter_model.safetensors")
    for name, layer in lora_layers(model).items():
        a, b = tensors[f"base_model.model.{name}.lora_A.weight"], tensors[f"base_model.model.{name}.lora_B.weight"]
        assert a.shape == (4, layer.in_features) and b.shape == (layer.out_features, 4)
        assert torch.equal(a, layer.lora_A["default"].weight) and torch.equal(b, layer.lora_B["default"].weight)
    assert len(tensors) == 2 * len(lora_layers(model))
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["use_rslora"], config["bias"]) == (4, 8, True, "none")
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    theirs = peft.LoraConfig.from_pretrained(path)  # PEFT's own reader accepts it
    assert (theirs.r, theirs.lora_alpha, theirs.use_rslora, set(theirs.target_modules)) == (
        4, 8, True, {"q_proj", "v_proj"})


def tiny_model(kind):
    """A small model of each kind `save_adapter` tells apart, with LoRA on q_proj/v_proj."""
    torch.manual_seed(0)
    llama = dict(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, max_position_embeddings=16)
    model = {
        "kit": lambda: LlamaForCausalLM(LlamaConfig(**llama)),
        "transformers-causal-lm": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama)),
        "transformers-seq-cls": lambda: transformers.LlamaForSequenceClassification(
            transformers.LlamaConfig(**llama, num_labels=2, pad_token_id=0)),
        "custom": Biased,
    }[kind]()
    return apply_lora(model, LoraConfig(r=2))


@pytest.mark.parametrize("kind, task_type", [("kit", "CAUSAL_LM"), ("transformers-causal-lm", "CAUSAL_LM"),
                                             ("transformers-seq-cls", None), ("custom", None)])
def test_save_adapter_writes_the_task_type_of_the_model(tmp_path, kind, task_type):
    save_adapter(tiny_model(kind), tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] == task_type


def test_config_json_matches_what_peft_writes(base, saved, tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"],
                             task_type="CAUSAL_LM")
    peft.get_peft_model(copy.deepcopy(base), config).save_pretrained(tmp_path)
    theirs = json.loads((tmp_path / "adapter_config.json").read_text())
    ours = json.loads((saved[0] / "adapter_config.json").read_text())
    assert set(ours) <= set(theirs)  # no invented keys
    assert {k: v for k, v in ours.items() if k != "target_modules"} == {
        k: theirs[k] for k in ours if k != "target_modules"}
    assert sorted(ours["target_modules"]) == sorted(theirs["target_modules"])  # PEFT writes a set


def test_round_trip_onto_plain_and_onto_wrapped_model(base, ids, saved):
    path, ours = saved
    fresh = load_adapter(copy.deepcopy(base), path)
    assert torch.equal(logits(fresh, ids), logits(ours, ids))
    assert fresh.peft_config["default"].r == 4 and fresh.peft_config["default"].use_rslora
    assert count_parameters(fresh) == count_parameters(ours)  # same parameters trainable
    wrapped = apply_lora(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, use_rslora=True))
    assert torch.equal(logits(load_adapter(wrapped, path), ids), logits(ours, ids))


def test_a_config_without_lora_alpha_loads_with_peft_default(base, saved, tmp_path):
    import shutil

    path, _ = saved
    out = tmp_path / "no_alpha"
    shutil.copytree(path, out)
    config = json.loads((out / "adapter_config.json").read_text())
    del config["lora_alpha"]
    (out / "adapter_config.json").write_text(json.dumps(config))
    assert peft.LoraConfig.from_pretrained(out).lora_alpha == 8
    loaded = load_adapter(copy.deepcopy(base), out)
    assert loaded.peft_config["default"].lora_alpha == 8  # PEFT's default, as PEFT reads it


def test_load_casts_weights_to_the_model_dtype(base, saved):
    path, ours = saved
    model = load_adapter(copy.deepcopy(base).to(torch.bfloat16), path)  # fp32 file, bf16 model
    for name, layer in lora_layers(model).items():
        assert layer.lora_A["default"].weight.dtype == torch.bfloat16
        expected = ours.get_submodule(name).lora_B["default"].weight.to(torch.bfloat16)
        assert torch.equal(layer.lora_B["default"].weight, expected)


def test_save_refuses_a_model_without_lora(base, tmp_path):
    with pytest.raises(ValueError, match="apply_lora"):
        save_adapter(copy.deepcopy(base), tmp_path)
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------ failed loads change nothing


def _key(tensors):
    return next(k for k in tensors if k.endswith("lora_A.weight"))


# Each damage is one edit: of the tensors, of the config, or of the files once written.
TENSOR_DAMAGE = {
    "bad_shape": lambda t, k: t.__setitem__(k, torch.zeros(4, 7)),
    "int_dtype": lambda t, k: t.__setitem__(k, t[k].to(torch.int32)),
    "nan": lambda t, k: t.__setitem__(k, torch.full_like(t[k], float("nan"))),
    "unknown_module": lambda t, k: t.__setitem__(k.replace("layers.0", "layers.9"), t[k].clone()),
    "missing_tensor": lambda t, k: t.__delitem__(k),
}
CONFIG_DAMAGE = {"dora": ("use_dora", True), "other_peft_type": ("peft_type", "IA3"), "wrong_r": ("r", 2),
                 "rslora_string": ("use_rslora", "false")}
FILE_DAMAGE = {
    "truncated": lambda out, blob: (out / "adapter_model.safetensors").write_bytes(blob[: len(blob) // 2]),
    "garbage": lambda out, blob: (out / "adapter_model.safetensors").write_bytes(b"\x00" * 64),
    "bad_json": lambda out, blob: (out / "adapter_config.json").write_text("{ not json"),
    "nan_alpha": lambda out, blob: (out / "adapter_config.json").write_text(
        (out / "adapter_config.json").read_text().replace('"lora_alpha": 8', '"lora_alpha": NaN')),
    "no_config": lambda out, blob: (out / "adapter_config.json").unlink(),
    "pickle_only": lambda out, blob: (out / "adapter_model.safetensors").rename(out / "adapter_model.bin"),
}


def corrupt(path, tmp_path, how):
    """A copy of the adapter at ``path`` damaged in one way."""
    out = tmp_path / "bad"
    out.mkdir()
    config = json.loads((path / "adapter_config.json").read_text())
    tensors = load_file(path / "adapter_model.safetensors")
    blob = (path / "adapter_model.safetensors").read_bytes()
    if how in TENSOR_DAMAGE:
        TENSOR_DAMAGE[how](tensors, _key(tensors))
    if how in CONFIG_DAMAGE:
        name, value = CONFIG_DAMAGE[how]
        config[name] = value
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(config))
    if how in FILE_DAMAGE:
        FILE_DAMAGE[how](out, blob)
    return out


@pytest.mark.parametrize("how, match", [
    ("bad_shape", "shape"), ("int_dtype", "floating point"), ("nan", "NaN"), ("unknown_module", "layers.9"),
    ("missing_tensor", "missing"), ("dora", "use_dora"), ("other_peft_type", "LORA"), ("wrong_r", "shape"),
    ("truncated", "damaged or truncated"), ("garbage", "damaged or truncated"), ("bad_json", "JSON"),
    ("no_config", "adapter_config.json"), ("pickle_only", "pickle"), ("nan_alpha", "NaN"),
])
@pytest.mark.parametrize("target", ["plain", "wrapped"])
def test_failed_load_leaves_the_model_exactly_as_it_was(base, saved, tmp_path, how, match, target):
    model = copy.deepcopy(base)
    if target == "wrapped":
        apply_lora(model, LoraConfig(r=4, lora_alpha=8, use_rslora=True))
    before = snapshot(model)
    with pytest.raises(ValueError, match=match if target == "plain" or how != "wrong_r" else "r=4"):
        load_adapter(model, corrupt(saved[0], tmp_path, how))
    assert_unchanged(model, before)


def test_a_use_rslora_string_in_the_config_is_refused(base, saved, tmp_path):
    model = copy.deepcopy(base)
    before = snapshot(model)
    with pytest.raises(TypeError, match="use_rslora"):
        load_adapter(model, corrupt(saved[0], tmp_path, "rslora_string"))
    assert_unchanged(model, before)


def test_load_onto_a_model_with_other_lora_settings_is_refused(base, saved):
    model = apply_lora(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=16))
    before = snapshot(model)
    with pytest.raises(ValueError, match="lora_alpha=16"):
        load_adapter(model, saved[0])
    assert_unchanged(model, before)


def test_load_onto_a_model_with_another_bias_mode_is_refused(base, saved):
    model = apply_lora(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, use_rslora=True, bias="all"))
    before = snapshot(model)
    with pytest.raises(ValueError, match="bias='all'"):
        load_adapter(model, saved[0])
    assert_unchanged(model, before)


def test_load_from_a_missing_directory(base, tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        load_adapter(copy.deepcopy(base), tmp_path / "nowhere")


def test_load_onto_a_model_wrapped_on_other_layers_is_refused(base, saved):
    model = apply_lora(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, use_rslora=True,
                                                       target_modules=["q_proj", "k_proj", "v_proj"]))
    before = snapshot(model)
    with pytest.raises(ValueError, match="target_modules"):
        load_adapter(model, saved[0])
    assert_unchanged(model, before)


@pytest.mark.parametrize("how, match", [("bad_shape", "shape"), ("int_dtype", "floating point"),
                                        ("unknown_module", "layers.9"), ("truncated", "truncated")])
def test_names_shapes_and_dtypes_are_checked_from_the_header_before_any_data_is_read(
        base, saved, tmp_path, monkeypatch, how, match):
    bad = corrupt(saved[0], tmp_path, how)

    def no_data(*args, **kwargs):
        raise AssertionError("the tensor data was read before the header was checked")

    monkeypatch.setattr("safetensors.torch.load_file", no_data)
    with pytest.raises(ValueError, match=match):
        load_adapter(copy.deepcopy(base), bad)


def test_running_out_of_memory_is_not_reported_as_a_damaged_file(base, saved, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr("safetensors.torch.load_file", out_of_memory)
    model = copy.deepcopy(base)
    before = snapshot(model)
    with pytest.raises(MemoryError):
        load_adapter(model, saved[0])
    assert_unchanged(model, before)
