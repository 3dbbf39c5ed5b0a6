"""Save and load LoRA adapters in PEFT's on-disk format (``adapter_config.json`` + ``adapter_model.safetensors``).

A directory written by `save_adapter` loads with ``peft.PeftModel.from_pretrained(base, path)``, and one written
by ``PeftModel.save_pretrained`` loads with `load_adapter`. Tensors are named
``base_model.model.<module path>.lora_A.weight`` (r, in) and ``...lora_B.weight`` (out, r), as PEFT names them.
Only safetensors are read: a pickled ``adapter_model.bin`` can run code when loaded, so it is refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors
from torch import nn

from ._io import FLOAT_CODES, check_finite, read_header, read_json, read_safetensors
from .inject import apply_lora, is_transformers_model, lora_layers, lora_targets, output_head_names, target_matches
from .lora import ALL_LINEAR, LoraConfig, LoRALinear, is_linear_like
from .model import LlamaForCausalLM

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
FIX = "Save the adapter again."
# PEFT options this module does not implement: loading a file that turns one on would silently differ.
_UNSUPPORTED = {"use_dora": False, "fan_in_fan_out": False, "lora_bias": False, "modules_to_save": None,
                "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}, "exclude_modules": None,
                "target_parameters": None, "layer_replication": None, "trainable_token_indices": None}


def save_adapter(model: nn.Module, path: str | os.PathLike, *, task_type: str | None = "auto") -> Path:
    """Write the model's LoRA weights and config as a PEFT adapter directory.

    Args:
        model: A model with LoRA layers (from `apply_lora` or `load_adapter`).
        path: Directory to create or overwrite files in.
        task_type: PEFT's task type; ``PeftModel.from_pretrained`` picks its wrapper class by it. ``"auto"``
            reads it from the model: ``"CAUSAL_LM"`` for the kit's `LlamaForCausalLM` and for a transformers
            causal LM (``*ForCausalLM``, ``GPT2LMHeadModel``, ...), which PEFT wraps in ``PeftModelForCausalLM``
            (it needs ``prepare_inputs_for_generation``); None (null) for any other module, which loads as a
            plain ``PeftModel``.

    Returns:
        The directory path.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("The model has no LoRA layers to save; call apply_lora(model, config) first.")
    config = _model_config(model, layers)
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight  # (r, in)
        tensors[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight  # (out, r)
    for name in _bias_names(model, config.bias):
        tensors[PREFIX + name] = model.get_parameter(name)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    targets = config.target_modules
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        targets = sorted(layers)  # explicit names: PEFT's own "all-linear" keeps lm_head on non-transformers models
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _write_atomic(path / WEIGHTS_NAME, save_safetensors(tensors, metadata={"format": "pt"}))
    task_type = _task_type(model) if task_type == "auto" else task_type
    _write_atomic(path / CONFIG_NAME, json.dumps(_peft_config_dict(config, targets, task_type), indent=2).encode())
    return path


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a PEFT LoRA adapter (saved by `save_adapter` or by PEFT) onto ``model``.

    A plain model gets LoRA applied with the file's config; a model already wrapped must have the same layers,
    ``r``, ``lora_alpha``, ``use_rslora`` and target layers. Everything (files, config, tensor names, shapes,
    dtypes, values) is checked before the model changes, so a failed load leaves it exactly as it was; names,
    shapes and dtypes are read from the safetensors header before any tensor data.

    Returns:
        The same model object, with the adapter's weights in its `LoRALinear` layers.
    """
    config = read_adapter_config(path)
    file = Path(path) / WEIGHTS_NAME
    header, _ = read_header(file, FIX)
    wrapped = lora_layers(model)
    names = _check_wrapped(model, wrapped, config) if wrapped else lora_targets(model, config)
    shapes = _expected_shapes(model, names, config, wrapped=bool(wrapped))
    missing = sorted(set(shapes) - set(header))
    unknown = sorted(set(header) - set(shapes))
    if unknown:
        raise ValueError(f"The adapter has tensors for modules this model lacks or the config does not target: "
                         f"{_short(unknown)}. Load it onto the base model it was trained on.")
    if missing:
        raise ValueError(f"The adapter file is missing tensors: {_short(missing)}; it does not match its config.")
    for key, entry in header.items():
        if tuple(entry["shape"]) != shapes[key]:
            raise ValueError(f"Tensor {key!r} has shape {tuple(entry['shape'])}, but this model needs "
                             f"{shapes[key]}; the adapter was trained on a model with other layer sizes.")
        if entry["dtype"] not in FLOAT_CODES:
            raise ValueError(f"Tensor {key!r} has dtype {entry['dtype']}; LoRA weights must be floating point "
                             f"({', '.join(FLOAT_CODES)}).")
    tensors, _ = read_safetensors(file, FIX)
    check_finite(tensors, WEIGHTS_NAME, "Train or save the adapter again.")
    if not wrapped:
        apply_lora(model, config)
    with torch.no_grad():
        for key, tensor in tensors.items():
            model.get_parameter(key[len(PREFIX):]).copy_(tensor)
    return model


def read_adapter_config(path: str | os.PathLike) -> LoraConfig:
    """Read ``adapter_config.json`` (after checking both adapter files exist) into a `LoraConfig`."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{str(path)!r} is not a directory; pass the folder that save_adapter wrote.")
    if not (path / WEIGHTS_NAME).is_file():
        if (path / PICKLE_NAME).is_file():
            raise ValueError(f"{PICKLE_NAME} is a pickle, which can run arbitrary code when loaded, so it is not "
                             f"read. Re-save the adapter with PEFT's save_pretrained(safe_serialization=True).")
        raise ValueError(f"{str(path)!r} has no {WEIGHTS_NAME}; is it an adapter directory?")
    if not (path / CONFIG_NAME).is_file():
        raise ValueError(f"{str(path)!r} has no {CONFIG_NAME}; an adapter needs both files.")
    raw = read_json(path / CONFIG_NAME, FIX)
    if raw.get("peft_type") != "LORA":
        raise ValueError(f"{CONFIG_NAME} is not a LoRA adapter config (peft_type must be 'LORA').")
    for key, default in _UNSUPPORTED.items():
        if raw.get(key, default) not in (default, None, {}, []):
            raise ValueError(f"The adapter uses PEFT's {key}={raw[key]!r}, which lora_lab does not implement; "
                             "load it with peft.PeftModel.from_pretrained instead.")
    if raw.get("target_modules") is None:
        raise ValueError(f"{CONFIG_NAME} has no target_modules; lora_lab needs the module names written out.")
    fields = ("r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "bias")
    try:
        return LoraConfig(**{k: raw[k] for k in fields if k in raw})
    except (ValueError, TypeError) as err:
        raise type(err)(f"{CONFIG_NAME}: {err}") from None


# ------------------------------------------------------------------------------------------- internals


def _peft_config_dict(config: LoraConfig, targets, task_type: str | None) -> dict:
    """The fields PEFT's ``LoraConfig.from_pretrained`` reads, with PEFT's defaults for the options we lack."""
    return {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": None, "revision": None,
        "r": config.r, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
        "target_modules": targets if isinstance(targets, str) else list(targets),
        "use_rslora": config.use_rslora, "bias": config.bias, "inference_mode": True, "init_lora_weights": True,
        **_UNSUPPORTED, "layers_pattern": None,
    }


def _task_type(model: nn.Module) -> str | None:
    """``"CAUSAL_LM"`` for the kit's causal LM and transformers' causal LMs (their auto-class list), else None."""
    if isinstance(model, LlamaForCausalLM):
        return "CAUSAL_LM"
    if is_transformers_model(model):
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        if type(model).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
            return "CAUSAL_LM"
    return None


def _model_config(model: nn.Module, layers: dict[str, LoRALinear]) -> LoraConfig:
    """``model.lora_config``, checked against the layers (or rebuilt from them if the model has none)."""
    first = next(iter(layers.values()))
    config = getattr(model, "lora_config", None) or LoraConfig(
        r=first.r, lora_alpha=first.lora_alpha, use_rslora=first.use_rslora, target_modules=tuple(layers))
    for name, layer in layers.items():
        if (layer.r, layer.lora_alpha, layer.use_rslora) != (config.r, config.lora_alpha, config.use_rslora):
            raise ValueError(f"LoRA layer {name!r} has r={layer.r}, lora_alpha={layer.lora_alpha}, but the config "
                             f"says r={config.r}, lora_alpha={config.lora_alpha}; PEFT's format needs one setting.")
    return config


def _bias_names(model: nn.Module, bias: str) -> list[str]:
    """Parameter names of the biases PEFT saves for ``bias="all"`` / ``"lora_only"``."""
    if bias == "all":
        return [n for n, _ in model.named_parameters() if n == "bias" or n.endswith(".bias")]
    if bias == "lora_only":
        return [f"{n}.base_layer.bias" for n, m in lora_layers(model).items()
                if getattr(m.base_layer, "bias", None) is not None]
    return []


def _check_wrapped(model: nn.Module, wrapped: dict[str, LoRALinear], config: LoraConfig) -> list[str]:
    """For a model that already has LoRA: same hyperparameters and target layers as the file, and not merged."""
    bias = getattr(getattr(model, "lora_config", None), "bias", "none")
    if bias != config.bias:
        raise ValueError(f"The model was set up with bias={bias!r}, the adapter with bias={config.bias!r}; "
                         "load it onto the plain model instead.")
    for name, layer in wrapped.items():
        if layer.merged:
            raise ValueError(f"LoRA layer {name!r} is merged; call unmerge_lora(model) before loading weights.")
        if (layer.r, layer.lora_alpha, layer.use_rslora) != (config.r, config.lora_alpha, config.use_rslora):
            raise ValueError(f"The model's LoRA layer {name!r} has r={layer.r}, lora_alpha={layer.lora_alpha}, "
                             f"use_rslora={layer.use_rslora}; the adapter has r={config.r}, lora_alpha="
                             f"{config.lora_alpha}, use_rslora={config.use_rslora}. Load it onto the plain model.")
    targets = _targets_before_wrapping(model, wrapped, config.target_modules)
    if set(targets) != set(wrapped):
        raise ValueError(f"The adapter's target_modules={config.target_modules!r} select {_short(sorted(targets))}, "
                         f"but the model's LoRA layers are {_short(sorted(wrapped))}. Load it onto the plain model "
                         "(unload(model) first), or apply_lora with the adapter's target_modules.")
    return list(wrapped)


def _targets_before_wrapping(model: nn.Module, wrapped: dict[str, LoRALinear], targets) -> list[str]:
    """The names ``targets`` selects, read on the model as it was before its layers were wrapped."""
    inside = tuple(f"{name}." for name in wrapped)
    names = [n for n, _ in model.named_modules() if n and not n.startswith(inside)]
    if not (isinstance(targets, str) and targets.lower() == ALL_LINEAR):
        return [n for n in names if target_matches(targets, n)]
    linear = [n for n in names if n in wrapped or is_linear_like(model.get_submodule(n))]
    heads = output_head_names(model, linear)
    return [n for n in linear if n not in heads]


def _expected_shapes(model: nn.Module, names: list[str], config: LoraConfig, wrapped: bool) -> dict[str, tuple]:
    """Every key the file must hold (LoRA factors, plus the biases ``config.bias`` saves) with its shape.

    Keys use the wrapped model's names (``<layer>.base_layer.bias``), as PEFT's do, even for a plain model.
    """
    shapes = {}
    for name in names:
        module = model.get_submodule(name)
        shapes[f"{PREFIX}{name}.lora_A.weight"] = (config.r, module.in_features)
        shapes[f"{PREFIX}{name}.lora_B.weight"] = (module.out_features, config.r)
    wrapped_bias = {f"{n}.bias": f"{n}.base_layer.bias" for n in names}
    for param_name, param in model.named_parameters():
        key = param_name if wrapped else wrapped_bias.get(param_name, param_name)
        is_bias = param_name == "bias" or param_name.endswith(".bias")
        if (config.bias == "all" and is_bias) or (config.bias == "lora_only" and key.endswith(".base_layer.bias")):
            shapes[PREFIX + key] = tuple(param.shape)
    return shapes


def _write_atomic(file: Path, data: bytes) -> None:
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, file)


def _short(items: list[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")
