"""export_hf / import_hf against the installed transformers (local files only, no hub)."""

import json

import pytest
import torch

from lora_lab.hf import export_hf, import_hf
from lora_lab.checkpoint import load_base_model
from lora_lab.model import LlamaConfig, LlamaForCausalLM

transformers = pytest.importorskip("transformers", reason="test extra: pip install 'lora_lab[test]'")

# Same float32 math in both implementations, but transformers' kernels (sdpa path, repeat_kv, rotary
# via matmul) may sum in another order: differences stay at a few ulps of logits of size ~10.
ATOL = 1e-5


def small_model(**overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = dict(vocab_size=34, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(LlamaConfig(**{**config, **overrides})).eval()


@pytest.mark.parametrize("model_fn", [load_base_model, lambda: small_model(tie_word_embeddings=True)],
                         ids=["shipped-base", "tied-embeddings"])
def test_transformers_loads_export_with_same_logits(tmp_path, model_fn):
    model = model_fn()
    export_hf(model, tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(model.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=ATOL, rtol=0)


def test_import_hf_reads_transformers_save_pretrained(tmp_path):
    torch.manual_seed(1)
    config = transformers.LlamaConfig(vocab_size=34, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=32,
                                      rope_theta=500.0)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path)
    model = import_hf(tmp_path)
    assert model.config.num_key_value_heads == 1 and model.config.rope_theta == 500.0
    ids = torch.randint(34, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=ATOL, rtol=0)


def test_roundtrip_is_bit_exact(tmp_path):
    model = small_model()
    back = import_hf(export_hf(model, tmp_path))
    assert back.config == model.config
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())


def test_export_refuses_lora_layers(tmp_path):
    from lora_lab import LoraConfig, apply_lora

    model = apply_lora(small_model(), LoraConfig(r=2))
    with pytest.raises(ValueError, match="unload"):
        export_hf(model, tmp_path)
    assert not (tmp_path / "model.safetensors").exists()


def test_import_refuses_features_the_model_lacks(tmp_path):
    export_hf(small_model(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "attention_bias": True}))
    with pytest.raises(ValueError, match="attention_bias"):
        import_hf(tmp_path)


def damaged_export(tmp_path, how):
    """An export_hf directory of small_model() damaged in one way."""
    from safetensors.torch import load_file, save_file

    export_hf(small_model(), tmp_path)
    config_file, weights_file = tmp_path / "config.json", tmp_path / "model.safetensors"
    config, tensors = json.loads(config_file.read_text()), load_file(weights_file)
    key = "model.layers.0.mlp.up_proj.weight"
    if how == "nan_weight":
        tensors[key][0, 0] = float("nan")
    elif how == "int_weight":
        tensors[key] = tensors[key].to(torch.int32)
    elif how == "huge_config":  # a 1 KB config declaring a model far larger than its tensors
        config.update(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                      head_dim=128)
    elif how == "no_heads":
        del config["num_attention_heads"]
    save_file(tensors, weights_file, metadata={"format": "pt"})
    config_file.write_text(json.dumps(config))
    if how == "truncated":
        weights_file.write_bytes(weights_file.read_bytes()[:1000])
    elif how == "garbage":
        weights_file.write_bytes(b"\xff" * 64)
    elif how == "bad_json":
        config_file.write_text("{ not json")
    elif how == "nan_literal":
        config_file.write_text(json.dumps(config).replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": NaN'))
    return tmp_path


@pytest.mark.parametrize("how, match", [
    ("nan_weight", "NaN"), ("int_weight", "floating point"), ("huge_config", "shape"), ("no_heads", "num_attention"),
    ("truncated", "truncated"), ("garbage", "damaged"), ("bad_json", "JSON"), ("nan_literal", "NaN"),
])
def test_import_refuses_a_damaged_checkpoint_with_a_clear_error(tmp_path, how, match):
    with pytest.raises(ValueError, match=match):
        import_hf(damaged_export(tmp_path, how))


def test_import_checks_the_config_against_the_tensors_before_building_the_model(tmp_path, monkeypatch):
    directory = damaged_export(tmp_path, "huge_config")

    def no_build(config):
        raise AssertionError(f"built a model of hidden_size {config.hidden_size} before checking the tensors")

    monkeypatch.setattr("lora_lab.hf.LlamaForCausalLM", no_build)
    with pytest.raises(ValueError, match="shape"):
        import_hf(directory)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback on a machine without CUDA")
def test_import_asked_for_cuda_without_cuda_falls_back_like_load_base_model(tmp_path):
    export_hf(small_model(), tmp_path)
    with pytest.warns(UserWarning, match="CUDA"):
        model = import_hf(tmp_path, device="cuda")
    assert next(model.parameters()).device.type == "cpu"
    with pytest.raises(ValueError, match="CUDA"):
        import_hf(tmp_path, device="cuda", strict=True)
