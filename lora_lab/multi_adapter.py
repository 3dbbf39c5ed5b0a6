"""Several adapters on one model, one active at a time: PEFT's ``add_adapter``, ``set_adapter``,
``delete_adapter`` and ``disable_adapter``.

One frozen base in memory and a small adapter per task is how LoRA is served: each `LoRALinear` keeps every
adapter's ``lora_A[name]``/``lora_B[name]``, and switching tasks changes which one the forward pass adds.
The model keeps PEFT's bookkeeping: ``model.peft_config`` (name -> `LoraConfig`) and ``model.active_adapter``.
Only the active adapter's factors require grad, so an optimizer built after `set_adapter` trains that one.
Every function checks everything before it changes anything.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from .inject import layer_dims, lora_layers, set_submodule, targets_before_wrapping, wrap_layer
from .lora import LoraConfig, LoRALinear, check_adapter_name, check_rank, is_linear_like
from .modules_to_save import modules_to_save_names, saved_module_wrappers, wrap_modules_to_save
from .lora_init import changes_base


def add_adapter(model: nn.Module, adapter_name: str, config: LoraConfig) -> nn.Module:
    """Put a second (third, ...) adapter beside the existing ones; the active adapter stays active.

    The new adapter may target other layers than the first: a layer it targets that has no LoRA yet is
    wrapped, and computes its base output alone while another adapter is active. The new factors start as
    `LoRALinear` initializes them (B = 0) and stay frozen until `set_adapter(model, adapter_name)`.

    Args:
        model: A model with LoRA (from `apply_lora`, `apply_qlora` or `load_adapter`).
        adapter_name: A new name (letters, digits, ``_``, ``-``).
        config: The new adapter's `LoraConfig`; its ``bias`` must equal the existing adapters' (biases are
            shared by every adapter, so two settings could not both hold).

    Returns:
        The same model object.
    """
    configs = _configs(model)
    check_adapter_name(adapter_name)
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a lora_lab.LoraConfig, got {type(config).__name__}.")
    if adapter_name in configs:
        raise ValueError(f"The model already has an adapter named {adapter_name!r}; adapters: {list(configs)}.")
    if changes_base(config.init_lora_weights) or any(changes_base(c.init_lora_weights) for c in configs.values()):
        raise ValueError("PiSSA, OLoRA and LoftQ rewrite the base weights, so they cannot share a model with other "
                         "adapters (the others were trained on the old weights, PEFT warns likewise). Apply them to "
                         "a model without LoRA, or save_adapter(..., path_initial_model_for_weight_conversion=...) "
                         "to turn one into a plain LoRA adapter first.")
    first = next(iter(configs.values()))
    if config.bias != first.bias:
        raise ValueError(f"The new adapter has bias={config.bias!r}, the model's adapters bias={first.bias!r}; "
                         "biases are shared by every adapter, so they must agree.")
    wrapped = lora_layers(model)
    names = targets_before_wrapping(model, wrapped, config.target_modules, config.modules_to_save)
    if not names:
        raise ValueError(f"target_modules={config.target_modules!r} matched no module of this model.")
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, (LoRALinear, nn.Embedding)) and not is_linear_like(module):
            raise TypeError(f"target_modules matched {name!r}, a {type(module).__name__}; LoRA wraps only "
                            "linear layers (nn.Linear, Conv1D) and nn.Embedding. Narrow target_modules.")
        check_rank(config.r, *layer_dims(module), where=f" for {name!r}")
    saved = _saved_names(model, config, names)
    options = (config.r, config.lora_alpha, config.lora_dropout, config.use_rslora)
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear):
            module.update_layer(adapter_name, *options, init_lora_weights=config.init_lora_weights,
                                use_dora=config.use_dora)
        else:
            layer = wrap_layer(module, config, adapter_name)
            layer.set_adapter(model.active_adapter)  # pass-through until this adapter is set
            set_submodule(model, name, layer)
    wrap_modules_to_save(model, saved, adapter_name)
    for wrapper in saved_module_wrappers(model).values():
        wrapper.set_adapter(model.active_adapter)  # a new copy stays frozen until its adapter is set
    model.peft_config[adapter_name] = config
    return model


def set_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Make ``adapter_name`` the adapter every LoRA layer adds; only its factors require grad afterwards.

    Refused while the model is merged (the merged update would stay in the weights under the new adapter).
    """
    configs = _configs(model)
    if adapter_name not in configs:
        raise ValueError(f"The model has no adapter named {adapter_name!r}; adapters: {list(configs)}.")
    layers = lora_layers(model)
    merged = [n for n, m in layers.items() if m.merged]
    if merged:
        raise ValueError(f"LoRA layer {merged[0]!r} is merged; call unmerge_lora(model) before switching adapters.")
    for layer in layers.values():
        layer.set_adapter(adapter_name)
    for wrapper in saved_module_wrappers(model).values():
        wrapper.set_adapter(adapter_name)
    model.active_adapter = adapter_name
    return model


def delete_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Remove an adapter's factors from every layer and its config from ``model.peft_config``.

    Deleting the active adapter makes the first remaining one active, as PEFT does; the last adapter cannot
    be deleted (use ``unload`` to get the base model back). A layer left without adapters is unwrapped.
    """
    configs = _configs(model)
    if adapter_name not in configs:
        raise ValueError(f"The model has no adapter named {adapter_name!r}; adapters: {list(configs)}.")
    if len(configs) == 1:
        raise ValueError(f"{adapter_name!r} is the model's only adapter; call unload(model) to remove LoRA.")
    layers = lora_layers(model)
    merged = [n for n, m in layers.items() if m.merged]
    if merged:
        raise ValueError(f"LoRA layer {merged[0]!r} is merged; call unmerge_lora(model) before deleting adapters.")
    if model.active_adapter == adapter_name:
        set_adapter(model, next(n for n in configs if n != adapter_name))
    for name, layer in layers.items():
        if adapter_name not in layer.lora_A:
            continue
        if len(layer.lora_A) == 1:
            set_submodule(model, name, layer.base_layer)
        else:
            layer.delete_adapter(adapter_name)
    for name, wrapper in saved_module_wrappers(model).items():
        if adapter_name in wrapper.modules_to_save:
            if len(wrapper.modules_to_save) == 1:
                set_submodule(model, name, wrapper.original_module)
            else:
                wrapper.delete_adapter(adapter_name)
    del configs[adapter_name]
    return model


@contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Inside ``with disable_adapter(model):`` the model computes its base outputs alone (PEFT's context manager).

    A common use: the reference model of DPO, or "what did the base model say?" next to the fine-tuned
    answer, without a second copy of the weights. Refused on a merged model, whose update lives in the base
    weights (PEFT unmerges it silently there).
    """
    _configs(model)
    layers = lora_layers(model)
    merged = [n for n, m in layers.items() if m.merged]
    if merged:
        raise ValueError(f"LoRA layer {merged[0]!r} is merged, so its update is part of the base weight; call "
                         "unmerge_lora(model) first.")
    layers = {**layers, **saved_module_wrappers(model)}  # a module trained in full: its original is used
    before = {name: layer.disable_adapters for name, layer in layers.items()}
    for layer in layers.values():
        layer.disable_adapters = True
    try:
        yield model
    finally:
        for name, layer in layers.items():
            layer.disable_adapters = before[name]


def _saved_names(model: nn.Module, config: LoraConfig, lora_names: list[str]) -> list[str]:
    """The modules the new adapter trains in full: checked to be neither LoRA layers nor inside one."""
    if not config.modules_to_save:
        return []
    wrapped = [*lora_layers(model), *lora_names]
    saved = modules_to_save_names(model, config.modules_to_save, exclude=tuple(f"{n}." for n in wrapped))
    inside = tuple(f"{n}." for n in saved_module_wrappers(model))
    bad = [n for n in saved if n in wrapped or n.startswith(inside)]
    if bad:
        raise ValueError(f"modules_to_save selects {bad[0]!r}, which is a LoRA layer or inside a module another "
                         "adapter trains in full; name the module itself (e.g. 'classifier').")
    return saved


def _configs(model: nn.Module) -> dict[str, LoraConfig]:
    configs = getattr(model, "peft_config", None)
    if not lora_layers(model) or not isinstance(configs, dict) or not configs:
        raise ValueError("The model has no LoRA adapters; call apply_lora(model, config) first.")
    return configs
