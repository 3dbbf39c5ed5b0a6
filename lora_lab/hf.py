"""Export to and import from the transformers on-disk format (config.json + model.safetensors).

Because `lora_lab.model` uses Llama's module names, the state_dict keys are already transformers'
keys: exporting is writing the tensors plus a config.json that `transformers.LlamaForCausalLM.
from_pretrained(directory)` understands. Everything is local; transformers is not needed to export.

Example:
    >>> export_hf(merge_and_unload(model), "my-tiny-llama")            # doctest: +SKIP
    >>> transformers.LlamaForCausalLM.from_pretrained("my-tiny-llama")   # doctest: +SKIP
"""

import json
from dataclasses import fields
from pathlib import Path

import torch

from ._io import read_json
from .checkpoint import load_checkpoint, read_checkpoint
from .data import CharTokenizer
from .model import LlamaConfig, LlamaForCausalLM, resolve_device

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


def hf_config_dict(config: LlamaConfig, dtype: torch.dtype = torch.float32) -> dict:
    """transformers' LlamaConfig fields for `config` (as written to config.json)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **{f.name: getattr(config, f.name) for f in fields(config)},
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "initializer_range": 0.02,
        "pad_token_id": CharTokenizer.pad_id,
        "bos_token_id": CharTokenizer.bos_id,
        "eos_token_id": CharTokenizer.eos_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def export_hf(model: LlamaForCausalLM, directory) -> Path:
    """Write `config.json` and `model.safetensors` into `directory` (created if needed).

    The model must be a plain LlamaForCausalLM: merge and unload LoRA/QLoRA layers first.

    Returns:
        The directory as a Path.
    """
    from safetensors.torch import save_file

    if not isinstance(model, LlamaForCausalLM):
        raise TypeError(f"export_hf expects a lora_lab LlamaForCausalLM, got {type(model).__name__}.")
    state = model.state_dict()
    with torch.device("meta"):  # only the key names are needed, no memory
        expected = LlamaForCausalLM(model.config).state_dict().keys()
    foreign = [k for k in state if k not in expected]
    if foreign:
        raise ValueError(f"the model has tensors transformers' Llama does not know, e.g. '{foreign[0]}'; "
                         "merge and unload the LoRA layers first (lora_lab.merge_and_unload).")
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    if model.config.tie_word_embeddings:
        del state["lm_head.weight"]  # transformers re-ties it from embed_tokens on load
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dtype = state["model.embed_tokens.weight"].dtype
    (directory / CONFIG_NAME).write_text(json.dumps(hf_config_dict(model.config, dtype), indent=2) + "\n")
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    return directory


def import_hf(directory, device=None, strict: bool = False) -> LlamaForCausalLM:
    """Load a transformers Llama checkpoint (config.json + model.safetensors) as a lora_lab model.

    The config's sizes are checked against the tensors' shapes in the safetensors header before the model is
    built or any tensor is read.

    Args:
        device: as in `lora_lab.checkpoint.load_base_model`: None picks CUDA when available; "cuda" without CUDA
            falls back to the CPU with a warning, or raises ValueError when ``strict``.

    Raises:
        ValueError: the directory is not a plain Llama (other model_type, biases, rope scaling, a
            head_dim other than hidden_size / num_attention_heads), a file is damaged, or a tensor does not fit.
    """
    device = resolve_device(device, strict)
    directory = Path(directory)
    if not (directory / CONFIG_NAME).exists() or not (directory / WEIGHTS_NAME).exists():
        raise ValueError(f"{directory} needs {CONFIG_NAME} and a single {WEIGHTS_NAME}; "
                         "save with save_pretrained(..., safe_serialization=True).")
    fix = "Save it again with save_pretrained(..., safe_serialization=True)."
    config = _config_from_hf(read_json(directory / CONFIG_NAME, fix))
    state = read_checkpoint(config, directory / WEIGHTS_NAME, fix)
    model = LlamaForCausalLM(config)
    load_checkpoint(model, state)
    return model.to(device).eval()


_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def _config_from_hf(hf: dict) -> LlamaConfig:
    if hf.get("model_type") != "llama":
        raise ValueError(f"model_type is {hf.get('model_type')!r}; only 'llama' checkpoints can be imported.")
    unsupported = {"hidden_act": hf.get("hidden_act", "silu") != "silu",
                   "attention_bias": bool(hf.get("attention_bias")),
                   "mlp_bias": bool(hf.get("mlp_bias")),
                   "rope_scaling": bool(hf.get("rope_scaling")) or
                   (hf.get("rope_parameters") or {}).get("rope_type", "default") != "default"}
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"this Llama uses {bad[0]}={hf.get(bad[0])!r}, which lora_lab's model does not "
                         "implement; only plain Llama (silu, no biases, default rope) is supported.")
    missing = [k for k in _REQUIRED if hf.get(k) is None]
    if missing:
        raise ValueError(f"config.json has no {missing[0]}; it is not a complete Llama config. Save it again with "
                         "save_pretrained.")
    kwargs = {f.name: hf[f.name] for f in fields(LlamaConfig) if hf.get(f.name) is not None}
    kwargs.setdefault("num_key_value_heads", hf["num_attention_heads"])
    if "rope_theta" not in hf and isinstance(hf.get("rope_parameters"), dict):
        kwargs["rope_theta"] = hf["rope_parameters"].get("rope_theta", LlamaConfig.rope_theta)
    config = LlamaConfig(**kwargs)
    if hf.get("head_dim") not in (None, config.head_dim):
        raise ValueError(f"head_dim {hf['head_dim']} differs from hidden_size / num_attention_heads "
                         f"({config.head_dim}); lora_lab's model derives head_dim from those.")
    return config


__all__ = ["export_hf", "import_hf", "hf_config_dict"]
