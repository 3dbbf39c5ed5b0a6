"""lora_lab.checkpoint: the shipped weights load; a damaged file or a mismatched state is refused, changing nothing."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_lab.checkpoint import WEIGHTS_DIR, load_base_model, load_checkpoint
from lora_lab.model import LlamaConfig, LlamaForCausalLM

SMALL = dict(vocab_size=34, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)


def small_model(**overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**SMALL, **overrides})).eval()


def test_checkpoint_mismatch_names_the_tensor_and_changes_nothing():
    model, other = small_model(), small_model(intermediate_size=48)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight"):
        load_checkpoint(model, other.state_dict())
    state = dict(small_model().state_dict())
    del state["model.norm.weight"]
    with pytest.raises(ValueError, match=r"model\.norm\.weight"):
        load_checkpoint(model, state)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback on a machine without CUDA")
def test_cuda_request_without_cuda_warns_or_raises():
    with pytest.warns(UserWarning, match="CUDA"):
        model = load_base_model(device="cuda")
    assert next(model.parameters()).device.type == "cpu"
    with pytest.raises(ValueError, match="CUDA"):
        load_base_model(device="cuda", strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert next(load_base_model().parameters()).device.type == "cpu"


def damaged_base(tmp_path, how):
    """A copy of the shipped weights (base.safetensors + base_config.json) damaged in one way."""
    config = json.loads((WEIGHTS_DIR / "base_config.json").read_text())
    tensors = load_file(WEIGHTS_DIR / "base.safetensors")
    key = "model.norm.weight"
    if how == "nan_weight":
        tensors[key][0] = float("nan")
    elif how == "int_weight":
        tensors[key] = tensors[key].to(torch.int64)
    elif how == "unknown_field":
        config["hidden_sise"] = 128
    save_file(tensors, tmp_path / "base.safetensors")
    (tmp_path / "base_config.json").write_text(json.dumps(config))
    if how == "truncated":
        blob = (tmp_path / "base.safetensors").read_bytes()
        (tmp_path / "base.safetensors").write_bytes(blob[: len(blob) // 2])
    elif how == "bad_json":
        (tmp_path / "base_config.json").write_text('{"vocab_size": 34,')
    elif how == "no_weights":
        (tmp_path / "base.safetensors").unlink()
    return tmp_path


@pytest.mark.parametrize("how, match", [
    ("nan_weight", "NaN"), ("int_weight", "floating point"), ("unknown_field", "hidden_sise"),
    ("truncated", "truncated"), ("bad_json", "JSON"), ("no_weights", "base.safetensors"),
])
def test_load_base_model_refuses_damaged_files_with_a_clear_error(tmp_path, how, match):
    with pytest.raises(ValueError, match=match):
        load_base_model(device="cpu", directory=damaged_base(tmp_path, how))
