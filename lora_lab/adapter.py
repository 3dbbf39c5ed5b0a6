"""Save and load LoRA adapters in PEFT's on-disk format (``adapter_config.json`` + ``adapter_model.safetensors``).

A directory written by `save_adapter` loads with ``peft.PeftModel.from_pretrained(base, path)``, and one written
by ``PeftModel.save_pretrained`` loads with `load_adapter`. Tensors are named
``base_model.model.<module path>.lora_A.weight`` (r, in) and ``...lora_B.weight`` (out, r), as PEFT names them:
the adapter's name is not part of the file. An embedding's factors are ``...lora_embedding_A`` (r, num_embeddings)
and ``...lora_embedding_B`` (embedding_dim, r), and a module in ``modules_to_save`` is stored under its own name
(``base_model.model.classifier.weight``). A model with several adapters (`lora_lab.add_adapter`) is saved as
PEFT saves one: ``"default"`` in the directory itself, every other adapter in a subdirectory of its name.
Only safetensors are read: a pickled ``adapter_model.bin`` can run code when loaded, so it is refused.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors
from torch import nn

from ._io import FLOAT_CODES, check_finite, read_header, read_json, read_safetensors
from .inject import apply_lora, is_transformers_model, layer_dims, lora_layers, lora_targets, targets_before_wrapping
from .lora import ALL_LINEAR, DEFAULT_ADAPTER, LoraConfig, LoRALinear, check_adapter_name
from .lora_embedding import LoRAEmbedding
from .lora_init import changes_base, pissa_niter, subtract_initial
from .model import LlamaForCausalLM
from .modules_to_save import modules_to_save_names, saved_module_wrappers
from .multi_adapter import add_adapter

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
FIX = "Save the adapter again."
# PEFT options this module does not implement: loading a file that turns one on would silently differ.
_UNSUPPORTED = {"lora_bias": False,
                "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}, "exclude_modules": None,
                "target_parameters": None, "layer_replication": None, "trainable_token_indices": None}
# PEFT inits that lora_lab lacks but that leave the base weight alone: their adapters load as plain LoRA.
_INITS_THAT_KEEP_THE_BASE = ("eva", "orthogonal")


def save_adapter(model: nn.Module, path: str | os.PathLike, *, task_type: str | None = "auto",
                 selected_adapters: list[str] | None = None,
                 path_initial_model_for_weight_conversion: str | os.PathLike | None = None) -> Path:
    """Write the model's LoRA adapters and configs as PEFT adapter directories.

    An adapter started with PiSSA or OLoRA is saved with its ``init_lora_weights``, as PEFT saves it: loading
    it onto the original model recomputes the residual base (see `lora_lab.lora_init`, ``# Note: what a changed
    base means for saving``); ``"pissa_niter_N"`` is random, so such a file is for the conversion below only.
    LoftQ's adapter is saved with its ``loftq_config`` and loads the same way (PEFT runs LoftQ on CUDA only).
    For a QLoRA model, whose base is the quantized residual, call ``apply_qlora(model, the same config)`` and
    then `load_adapter`: that recomputes the same 4-bit base and overwrites the factors.

    Args:
        model: A model with LoRA layers (from `apply_lora` or `load_adapter`).
        path: Directory to create or overwrite files in. Adapter ``"default"`` goes into it; any other adapter
            into ``path / name`` (PEFT's ``save_pretrained`` layout).
        task_type: PEFT's task type; ``PeftModel.from_pretrained`` picks its wrapper class by it. ``"auto"``
            reads it from the model: ``"CAUSAL_LM"`` for the kit's `LlamaForCausalLM` and for a transformers
            causal LM (``*ForCausalLM``, ``GPT2LMHeadModel``, ...), which PEFT wraps in ``PeftModelForCausalLM``
            (it needs ``prepare_inputs_for_generation``); None (null) for any other module, which loads as a
            plain ``PeftModel``.
        selected_adapters: The adapters to save (PEFT's argument); None saves every one.
        path_initial_model_for_weight_conversion: PEFT's argument: the directory `save_adapter` wrote right after
            a PiSSA/OLoRA init, before training. The adapter is then saved as a plain LoRA adapter on the original
            weights: rank 2r, ``[B, -B0] [A; A0]`` (`lora_init.subtract_initial`), ``init_lora_weights=True``.

    Returns:
        The directory path.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("The model has no LoRA layers to save; call apply_lora(model, config) first.")
    configs = _model_configs(model, layers)
    names = list(configs) if selected_adapters is None else list(selected_adapters)
    unknown = [n for n in names if n not in configs]
    if unknown or not names:
        raise ValueError(f"selected_adapters={selected_adapters!r}: the model's adapters are {list(configs)}.")
    initial = None
    if path_initial_model_for_weight_conversion is not None:
        initial = _initial_factors(model, layers, configs, names, path_initial_model_for_weight_conversion)
    path = Path(path)
    task_type = _task_type(model) if task_type == "auto" else task_type
    for adapter in names:
        _save_one(model, layers, adapter, configs[adapter], path if adapter == DEFAULT_ADAPTER else path / adapter,
                  task_type, initial)
    return path


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Load a PEFT LoRA adapter (saved by `save_adapter` or by PEFT) onto ``model`` as ``adapter_name``.

    A plain model gets LoRA applied with the file's config. On a model that already has LoRA, a new
    ``adapter_name`` is added beside the others (`add_adapter`; the active adapter stays active, as PEFT's
    ``load_adapter`` does), and an existing one is overwritten, which needs the same ``r``, ``lora_alpha``,
    ``use_rslora`` and target layers. Everything (files, config, tensor names, shapes, dtypes, values) is
    checked before the model changes, so a failed load leaves it exactly as it was; names, shapes and dtypes
    are read from the safetensors header before any tensor data.

    Returns:
        The same model object, with the adapter's weights in its `LoRALinear` layers.
    """
    check_adapter_name(adapter_name)
    config = read_adapter_config(path)
    file = Path(path) / WEIGHTS_NAME
    header, _ = read_header(file, FIX)
    wrapped = lora_layers(model)
    existing = getattr(model, "peft_config", {}) if wrapped else {}
    if adapter_name in existing:
        names, fresh = _check_wrapped(model, wrapped, config, adapter_name), False
    elif wrapped:
        names, fresh = targets_before_wrapping(model, wrapped, config.target_modules, config.modules_to_save), True
        _check_bias(model, config)
    else:
        names, fresh = lora_targets(model, config), True
    shapes = _expected_shapes(model, names, config, wrapped=bool(wrapped))
    saved = _saved_module_keys(model, names, config, adapter_name)
    shapes.update({key: shape for key, (_, shape) in saved.items()})
    optional = _base_weight_keys(model, names)
    missing = sorted(set(shapes) - set(header))
    shapes.update(optional)
    unknown = sorted(set(header) - set(shapes))
    if unknown:
        raise ValueError(f"The adapter has tensors for modules this model lacks or the config does not target: "
                         f"{_short(unknown)}. Load it onto the base model it was trained on.")
    if missing:
        dora_hint = " (use_dora=true needs each layer's lora_magnitude_vector)" if config.use_dora else ""
        raise ValueError(f"The adapter file is missing tensors: {_short(missing)}; it does not match its "
                         f"config{dora_hint}.")
    for key, entry in header.items():
        if tuple(entry["shape"]) != shapes[key]:
            raise ValueError(f"Tensor {key!r} has shape {tuple(entry['shape'])}, but this model needs "
                             f"{shapes[key]}; the adapter was trained on a model with other layer sizes.")
        if entry["dtype"] not in FLOAT_CODES:
            raise ValueError(f"Tensor {key!r} has dtype {entry['dtype']}; LoRA weights must be floating point "
                             f"({', '.join(FLOAT_CODES)}).")
    tensors, _ = read_safetensors(file, FIX)
    check_finite(tensors, WEIGHTS_NAME, "Train or save the adapter again.")
    if fresh and not wrapped:
        apply_lora(model, config, adapter_name)
    elif fresh:
        add_adapter(model, adapter_name, config)
    with torch.no_grad():
        for key, tensor in tensors.items():
            name = saved[key][0] if key in saved else _parameter_name(key, adapter_name)
            _model_tensor(model, name).copy_(tensor)
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
    fields = ("r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "bias", "use_dora",
              "fan_in_fan_out", "modules_to_save", "init_lora_weights", "loftq_config")
    if raw.get("init_lora_weights") in _INITS_THAT_KEEP_THE_BASE:
        raw = {**raw, "init_lora_weights": True}  # the file's factors replace the init; the base is W0 either way
    try:
        config = LoraConfig(**{k: raw[k] for k in fields if k in raw})
    except (ValueError, TypeError) as err:
        raise type(err)(f"{CONFIG_NAME}: {err}") from None
    if pissa_niter(config.init_lora_weights) is not None:
        raise ValueError(f"The adapter was started with init_lora_weights={config.init_lora_weights!r}, a random SVD, "
                         "so its residual base cannot be recomputed from the original weights (PEFT would silently "
                         "compute another one). Convert it to plain LoRA when saving: save_adapter(model, path, "
                         "path_initial_model_for_weight_conversion=<the adapter saved right after init>).")
    return config


# ------------------------------------------------------------------------------------------- internals


def _peft_config_dict(config: LoraConfig, targets, task_type: str | None) -> dict:
    """The fields PEFT's ``LoraConfig.from_pretrained`` reads, with PEFT's defaults for the options we lack."""
    return {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": None, "revision": None,
        "r": config.r, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
        "target_modules": targets if isinstance(targets, str) else list(targets),
        "use_rslora": config.use_rslora, "bias": config.bias, "inference_mode": True,
        "init_lora_weights": config.init_lora_weights, "loftq_config": config.loftq_config,
        **_UNSUPPORTED, "layers_pattern": None, "use_dora": config.use_dora, "fan_in_fan_out": config.fan_in_fan_out,
        "modules_to_save": None if config.modules_to_save is None else list(config.modules_to_save),
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


def _save_one(model: nn.Module, layers: dict[str, LoRALinear], adapter: str, config: LoraConfig, path: Path,
              task_type: str | None, initial: dict | None = None) -> None:
    """One adapter's two files: its factors (and the biases ``config.bias`` saves) and its config.

    With ``initial`` (the factors right after a PiSSA/OLoRA init, by file key) the adapter is converted to
    plain LoRA of rank 2r on the original weights (`lora_init.subtract_initial`).
    """
    holders = {name: layer for name, layer in layers.items() if adapter in layer.lora_A}
    tensors = {}
    for name, layer in holders.items():
        key_A, key_B = _factor_keys(name, layer)
        tensors[key_A], tensors[key_B] = layer.factors(adapter)  # A (r, in), B (out, r)
        if adapter in layer.lora_magnitude_vector:  # DoRA's m (out,), under PEFT's key (no ".weight")
            tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector[adapter].weight
        if initial is not None:  # PiSSA/OLoRA (linear layers only) converted to plain LoRA of rank 2r
            tensors[key_A], tensors[key_B] = subtract_initial(tensors[key_A].detach(), tensors[key_B].detach(),
                                                              initial[key_A], initial[key_B])
    if initial is not None:
        alpha = config.lora_alpha * (2 ** 0.5 if config.use_rslora else 2)  # same scaling at rank 2r
        config = replace(config, r=2 * config.r, lora_alpha=alpha, init_lora_weights=True)
    for name, wrapper in saved_module_wrappers(model).items():  # PEFT drops "modules_to_save.<adapter>."
        if adapter in wrapper.modules_to_save:
            for key, tensor in wrapper.modules_to_save[adapter].state_dict().items():
                tensors[f"{PREFIX}{name}.{key}"] = tensor
    for name in _bias_names(model, config.bias):
        tensors[PREFIX + name] = model.get_parameter(name)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    targets = config.target_modules
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        targets = sorted(holders)  # explicit names: PEFT's own "all-linear" keeps lm_head on non-transformers models
    path.mkdir(parents=True, exist_ok=True)
    _write_atomic(path / WEIGHTS_NAME, save_safetensors(tensors, metadata={"format": "pt"}))
    _write_atomic(path / CONFIG_NAME, json.dumps(_peft_config_dict(config, targets, task_type), indent=2).encode())


def _factor_keys(name: str, module: nn.Module) -> tuple[str, str]:
    """The file keys of a layer's A and B: ``lora_A.weight`` for a linear, ``lora_embedding_A`` for an embedding."""
    if isinstance(module, (nn.Embedding, LoRAEmbedding)):
        return f"{PREFIX}{name}.lora_embedding_A", f"{PREFIX}{name}.lora_embedding_B"
    return f"{PREFIX}{name}.lora_A.weight", f"{PREFIX}{name}.lora_B.weight"


def _saved_module_keys(model: nn.Module, lora_names: list[str], config: LoraConfig,
                       adapter: str) -> dict[str, tuple[str, tuple]]:
    """File key -> (the model's tensor once loaded, shape) for every module the config trains in full."""
    if not config.modules_to_save:
        return {}
    wrappers = saved_module_wrappers(model)
    inside = tuple(f"{n}." for n in [*lora_names, *lora_layers(model), *wrappers])
    names = modules_to_save_names(model, config.modules_to_save, exclude=inside)
    keys = {}
    for name in names:
        module = wrappers[name].original_module if name in wrappers else model.get_submodule(name)
        for key, tensor in module.state_dict().items():
            keys[f"{PREFIX}{name}.{key}"] = (f"{name}.modules_to_save.{adapter}.{key}", tuple(tensor.shape))
    return keys


def _base_weight_keys(model: nn.Module, names: list[str]) -> dict[str, tuple]:
    """Keys a file may add: a target's whole base weight, which PEFT saves for an embedding (``save_embedding_layers``).

    PEFT writes ``<table>.base_layer.weight`` when an embedding is targeted, in case the vocabulary was resized,
    and loads it into the base; `load_adapter` does the same. `save_adapter` leaves it out.
    """
    keys = {}
    for name in names:
        module = model.get_submodule(name)
        weight = getattr(module.base_layer if isinstance(module, LoRALinear) else module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.is_floating_point():
            keys[f"{PREFIX}{name}.base_layer.weight"] = tuple(weight.shape)
    return keys


def _model_tensor(model: nn.Module, name: str) -> torch.Tensor:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    return module.get_parameter(leaf) if leaf in module._parameters else module.get_buffer(leaf)


def _initial_factors(model: nn.Module, layers: dict[str, LoRALinear], configs: dict[str, LoraConfig],
                     names: list[str], initial_path) -> dict[str, torch.Tensor]:
    """The factors `save_adapter` wrote right after init, checked against the adapter being converted."""
    if len(names) != 1:
        raise ValueError(f"path_initial_model_for_weight_conversion converts one adapter; pass selected_adapters="
                         f"[name] (the model has {names}).")
    config = configs[names[0]]
    if not (changes_base(config.init_lora_weights) and config.init_lora_weights != "loftq"):
        raise ValueError(f"Adapter {names[0]!r} has init_lora_weights={config.init_lora_weights!r}; the conversion is "
                         "for PiSSA and OLoRA, whose base is W0 minus the initial factors. (LoftQ's base is 4-bit: "
                         "keep the whole model with save_quantized instead.)")
    initial_path = Path(initial_path)
    if not (initial_path / CONFIG_NAME).is_file() or not (initial_path / WEIGHTS_NAME).is_file():
        raise ValueError(f"{str(initial_path)!r} is not an adapter directory; pass what save_adapter wrote right "
                         "after init, before training.")
    raw = read_json(initial_path / CONFIG_NAME, FIX)
    if (raw.get("r"), raw.get("init_lora_weights")) != (config.r, config.init_lora_weights):
        raise ValueError(f"The initial adapter has r={raw.get('r')!r}, init_lora_weights="
                         f"{raw.get('init_lora_weights')!r}; the model's has r={config.r}, "
                         f"{config.init_lora_weights!r}. Pass the adapter saved right after this model's init.")
    tensors, _ = read_safetensors(initial_path / WEIGHTS_NAME, FIX)
    wanted = {f"{PREFIX}{n}.lora_{f}.weight" for n, m in layers.items() if names[0] in m.lora_A for f in "AB"}
    if set(tensors) != wanted:
        raise ValueError(f"The initial adapter in {str(initial_path)!r} holds other layers than adapter "
                         f"{names[0]!r}; pass the adapter saved right after this model's init.")
    check_finite(tensors, WEIGHTS_NAME, "Save the initial adapter again.")
    return tensors


def _parameter_name(key: str, adapter: str) -> str:
    """File key -> model parameter: ``base_model.model.x.lora_A.weight`` -> ``x.lora_A.<adapter>.weight``."""
    name = key[len(PREFIX):]
    if name.endswith(".lora_magnitude_vector"):
        return f"{name}.{adapter}.weight"
    if name.endswith((".lora_embedding_A", ".lora_embedding_B")):
        return f"{name}.{adapter}"
    for factor in (".lora_A.weight", ".lora_B.weight"):
        if name.endswith(factor):
            return name[:-len(".weight")] + f".{adapter}.weight"
    return name


def _model_configs(model: nn.Module, layers: dict[str, LoRALinear]) -> dict[str, LoraConfig]:
    """``model.peft_config``, checked against the layers (or rebuilt from them if the model has none)."""
    configs = getattr(model, "peft_config", None)
    if not configs:
        first = next(iter(layers.values()))
        name = first.active_adapter
        configs = {name: LoraConfig(r=first.r[name], lora_alpha=first.lora_alpha[name],
                                    use_rslora=first.use_rslora[name], target_modules=tuple(layers),
                                    use_dora=first.use_dora[name])}
    for adapter, config in configs.items():
        for name, layer in layers.items():
            if adapter not in layer.lora_A:
                continue
            mine = (layer.r[adapter], layer.lora_alpha[adapter], layer.use_rslora[adapter], layer.use_dora[adapter])
            if mine != (config.r, config.lora_alpha, config.use_rslora, config.use_dora):
                raise ValueError(f"LoRA layer {name!r} has r={mine[0]}, lora_alpha={mine[1]}, use_dora={mine[3]} "
                                 f"for adapter {adapter!r}, but its config says r={config.r}, lora_alpha="
                                 f"{config.lora_alpha}, use_dora={config.use_dora}; PEFT's format needs one setting "
                                 "per adapter.")
    return configs


def _bias_names(model: nn.Module, bias: str) -> list[str]:
    """Parameter names of the biases PEFT saves for ``bias="all"`` / ``"lora_only"``."""
    if bias == "all":
        return [n for n, _ in model.named_parameters() if n == "bias" or n.endswith(".bias")]
    if bias == "lora_only":
        return [f"{n}.base_layer.bias" for n, m in lora_layers(model).items()
                if getattr(m.base_layer, "bias", None) is not None]
    return []


def _check_bias(model: nn.Module, config: LoraConfig) -> None:
    configs = getattr(model, "peft_config", None) or {}
    bias = next(iter(configs.values())).bias if configs else "none"
    if bias != config.bias:
        raise ValueError(f"The model was set up with bias={bias!r}, the adapter with bias={config.bias!r}; "
                         "load it onto the plain model instead.")


def _check_wrapped(model: nn.Module, wrapped: dict[str, LoRALinear], config: LoraConfig, adapter: str) -> list[str]:
    """Overwriting adapter ``adapter``: same hyperparameters and target layers as the file, and not merged."""
    _check_bias(model, config)
    mine = model.peft_config[adapter].modules_to_save
    if (mine or ()) != (config.modules_to_save or ()):
        raise ValueError(f"Adapter {adapter!r} has modules_to_save={mine!r}, the file {config.modules_to_save!r}; "
                         "load it under another adapter_name, or onto the plain model.")
    holders = {name: layer for name, layer in wrapped.items() if adapter in layer.lora_A}
    for name, layer in wrapped.items():
        if layer.merged:
            raise ValueError(f"LoRA layer {name!r} is merged; call unmerge_lora(model) before loading weights.")
    own = getattr(model, "peft_config", {}).get(adapter)
    own_init = own.init_lora_weights if own is not None else True
    if (changes_base(own_init) or changes_base(config.init_lora_weights)) and own_init != config.init_lora_weights:
        raise ValueError(f"Adapter {adapter!r} was set up with init_lora_weights={own_init!r}, the file with "
                         f"{config.init_lora_weights!r}: PiSSA/OLoRA/LoftQ factors belong with the base weights their "
                         "init wrote. Load the file onto the plain model instead.")
    for name, layer in holders.items():
        mine = (layer.r[adapter], layer.lora_alpha[adapter], layer.use_rslora[adapter], layer.use_dora[adapter])
        if mine != (config.r, config.lora_alpha, config.use_rslora, config.use_dora):
            raise ValueError(f"The model's LoRA layer {name!r} has r={mine[0]}, lora_alpha={mine[1]}, "
                             f"use_rslora={mine[2]}, use_dora={mine[3]} for adapter {adapter!r}; the file has "
                             f"r={config.r}, lora_alpha={config.lora_alpha}, use_rslora={config.use_rslora}, "
                             f"use_dora={config.use_dora}. Load it under another adapter_name, or onto the plain "
                             "model.")
    targets = targets_before_wrapping(model, wrapped, config.target_modules, config.modules_to_save)
    if set(targets) != set(holders):
        raise ValueError(f"The adapter's target_modules={config.target_modules!r} select {_short(sorted(targets))}, "
                         f"but adapter {adapter!r} is on {_short(sorted(holders))}. Load it under another "
                         "adapter_name, or onto the plain model (unload(model) first).")
    return list(holders)


def _expected_shapes(model: nn.Module, names: list[str], config: LoraConfig, wrapped: bool) -> dict[str, tuple]:
    """Every key the file must hold (LoRA factors, plus the biases ``config.bias`` saves) with its shape.

    Keys use the wrapped model's names (``<layer>.base_layer.bias``), as PEFT's do, even for a plain model.
    """
    shapes = {}
    for name in names:
        module = model.get_submodule(name)
        key_A, key_B = _factor_keys(name, module)
        shapes[key_A] = (config.r, layer_dims(module)[0])
        shapes[key_B] = (layer_dims(module)[1], config.r)
        if config.use_dora:
            shapes[f"{PREFIX}{name}.lora_magnitude_vector"] = (layer_dims(module)[1],)
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
