"""export_hf / import_hf against the installed transformers (local files only, no hub)."""

import json

import pytest
import torch

from lora_lab.hf import export_hf, import_hf
from lora_lab.model import LlamaConfig, LlamaForCausalLM, load_base_model

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
    from lora_lab.lora import LoraConfig, apply_lora

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
