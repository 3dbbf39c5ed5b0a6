"""Model surgery: find the layers LoRA targets, wrap them, freeze the rest, and take the wrappers out again.

`lora.py` defines what one adapted layer is (`LoraConfig`, `LoRALinear`); this module applies it to a model
the way PEFT's ``inject_adapter`` does: match ``target_modules`` against module names, leave the output head
out of ``"all-linear"``, swap each match for a `LoRALinear` (`set_submodule`), and make only the adapters
trainable (`mark_trainable`). `unload` removes the wrappers without merging and `merge_lora` folds the
updates in; `lora_lab.merge_and_unload` (in `qlora.py`, which knows 4-bit bases too) does both.
"""

from __future__ import annotations

import re
import sys
import warnings

import torch
from torch import nn

from .lora import ALL_LINEAR, DEFAULT_ADAPTER, LoraConfig, LoRALinear, check_flag, check_adapter_name, check_rank, \
    float_weight, is_conv1d, is_linear_like, linear_dims
from .lora_embedding import LoRAEmbedding
from .modules_to_save import modules_to_save_names, saved_module_wrappers, wrap_modules_to_save
from .lora_init import changes_base


def apply_lora(model: nn.Module, config: LoraConfig, adapter_name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Wrap every layer matched by ``config.target_modules`` in a `LoRALinear`, in place.

    Everything is checked before anything changes: no match, a match that is not linear, or a model that
    already has LoRA layers raise and leave the model untouched. Afterwards only ``lora_A``/``lora_B`` (and
    the biases ``config.bias`` asks for) require grad. As on a PEFT model, ``model.peft_config`` maps each
    adapter's name to its config and ``model.active_adapter`` names the one in use; `lora_lab.add_adapter`
    puts a second adapter beside the first.

    Args:
        model: The model to adapt in place.
        config: Which layers, and with which rank and alpha.
        adapter_name: The adapter's name (PEFT's ``adapter_name="default"``).

    Returns:
        The same model object.
    """
    check_adapter_name(adapter_name)
    names = lora_targets(model, config)
    saved = modules_to_save_names(model, config.modules_to_save or (), exclude=tuple(f"{n}." for n in names))
    grad_flags = {p: p.requires_grad for p in model.parameters()}
    weights = base_weights_to_restore(model, names, config.init_lora_weights)
    try:
        wrappers = {name: wrap_layer(model.get_submodule(name), config, adapter_name) for name in names}
    except Exception:
        for p, flag in grad_flags.items():
            p.requires_grad_(flag)
        for p, data in weights.items():
            p.data = data  # PiSSA/OLoRA/LoftQ replaced some base weights before the failure: put them back
        raise
    _warn_fan_in_fan_out(config, wrappers)
    for name, wrapper in wrappers.items():
        set_submodule(model, name, wrapper)
    wrap_modules_to_save(model, saved, adapter_name)
    mark_trainable(model, config.bias)
    model.peft_config, model.active_adapter = {adapter_name: config}, adapter_name
    return model


def lora_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """The names `apply_lora` would wrap, after all of its checks; changes nothing.

    Raises:
        TypeError: ``config`` is not a `LoraConfig`, or a matched module is not linear.
        ValueError: the model already has LoRA layers, nothing matched, or ``r`` exceeds a layer's size.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a lora_lab.LoraConfig, got {type(config).__name__}.")
    existing = lora_layers(model)
    if existing:
        raise ValueError(f"The model already has LoRA layers ({', '.join(existing)}); call unload(model) first "
                         "or load the adapter with load_adapter.")
    names = _matched_names(model, config.target_modules)
    if config.modules_to_save:  # PEFT never puts LoRA on (or inside) a module it trains in full
        saved = modules_to_save_names(model, config.modules_to_save)
        names = [n for n in names if not any(n == m or n.startswith(f"{m}.") for m in saved)]
        if not names:
            raise ValueError(f"Every module target_modules={config.target_modules!r} matched is in modules_to_save; "
                             "LoRA needs at least one other target.")
    unused = set(names) & _unused_linears(model)
    if unused:
        raise TypeError(f"target_modules matched {sorted(unused)}, the out_proj of an nn.MultiheadAttention, which "
                        "reads out_proj.weight itself and never calls the layer, so an adapter there would never "
                        "be used (PEFT wraps it and it stays untrained). Leave it out of target_modules.")
    for name in names:
        module = model.get_submodule(name)
        if not is_linear_like(module) and not isinstance(module, nn.Embedding):
            raise TypeError(f"target_modules matched {name!r}, a {type(module).__name__}, but LoRA wraps only "
                            "linear layers (nn.Linear, transformers' Conv1D) and nn.Embedding; narrow target_modules.")
        check_rank(config.r, *layer_dims(module), where=f" for {name!r}")
    return names


def wrap_layer(module: nn.Module, config: LoraConfig, adapter_name: str) -> LoRALinear:
    """The LoRA wrapper for one target: `LoRAEmbedding` for an ``nn.Embedding``, `LoRALinear` otherwise."""
    kind = LoRAEmbedding if isinstance(module, nn.Embedding) else LoRALinear
    return kind(module, config.r, config.lora_alpha, config.lora_dropout, config.use_rslora, adapter_name,
                use_dora=config.use_dora, init_lora_weights=config.init_lora_weights, loftq_config=config.loftq_config)


def layer_dims(module: nn.Module) -> tuple[int, int]:
    """``(in, out)`` of a target: ``(num_embeddings, embedding_dim)`` for an embedding, see `linear_dims`."""
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    return (module.in_features, module.out_features) if isinstance(module, LoRALinear) else linear_dims(module)


def _warn_fan_in_fan_out(config: LoraConfig, wrappers: dict[str, LoRALinear]) -> None:
    """PEFT's rule: a Conv1D target needs ``fan_in_fan_out=True`` and an nn.Linear ``False``; it warns and sets it."""
    conv = [n for n, w in wrappers.items() if is_conv1d(w.base_layer)]
    if conv and not config.fan_in_fan_out:
        warnings.warn(f"fan_in_fan_out is set to False but the target modules ({conv[0]!r}, ...) are transformers' "
                      "Conv1D, which stores its weight (in, out). Setting fan_in_fan_out to True.", stacklevel=3)
        config.fan_in_fan_out = True
    elif config.fan_in_fan_out and len(conv) < len(wrappers):
        warnings.warn("fan_in_fan_out is set to True but some target modules are nn.Linear (weight (out, in)); "
                      "each layer follows its own weight's layout.", stacklevel=3)


def base_weights_to_restore(model: nn.Module, names: list[str], init_lora_weights) -> dict:
    """For an init that rewrites base weights (`lora_init.changes_base`): ``{weight: its tensor now}``, else {}.

    Refuses a weight shared with another module (tied embeddings), which the rewrite would change too.
    """
    if not changes_base(init_lora_weights):
        return {}
    weights = {name: getattr(model.get_submodule(name), "weight", None) for name in names}
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    for name, weight in weights.items():
        others = [n for n in owners.get(id(weight), []) if n != f"{name}.weight"]
        if others:
            raise ValueError(f"init_lora_weights={init_lora_weights!r} rewrites {name!r}'s weight, which is shared "
                             f"with {others[0]!r} (tied embeddings), so it would change that module too. Untie "
                             "it or leave it out of target_modules.")
    return {w: w.data for w in weights.values() if isinstance(w, torch.Tensor)}


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Full names (as in ``named_modules``) of the LoRA-wrapped layers, mapped to the wrappers."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module, safe_merge: bool = False) -> nn.Module:
    """Merge the active adapter into every LoRA layer (``W0 <- W0 + scaling * B A``); all-or-nothing.

    Refused before any weight changes when a base weight is shared with another module (tied embeddings)
    or an adapter factor holds NaN/inf.

    Args:
        model: A model with LoRA layers, none merged.
        safe_merge: Also compute every merged weight ``W0 + scaling * B A`` before writing any, and refuse if
            one holds NaN or inf (PEFT's ``safe_merge``). It catches what finite factors can still do: overflow
            a float16 or bfloat16 weight. It costs one extra pass over the weights, which is why PEFT, and the
            kit, leave it off by default.
    """
    check_flag(safe_merge, "safe_merge")
    layers = _checked_layers(model, want_merged=False)
    check_mergeable(model, layers, safe_merge)
    for layer in layers.values():
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo `merge_lora` on every LoRA layer; all-or-nothing."""
    for layer in _checked_layers(model, want_merged=True).values():
        layer.unmerge()
    return model


def unload(model: nn.Module) -> nn.Module:
    """Replace each `LoRALinear` by its base layer, without merging (PEFT's ``unload``); returns the base model.

    The adapters are dropped: an unmerged layer gives back ``W0`` as it was before `apply_lora`, a 4-bit base
    stays 4-bit. A layer merged with `merge_lora` keeps the update in its weight, as in PEFT (call
    `unmerge_lora` first to get ``W0`` back). To keep the fine-tune, use `lora_lab.merge_and_unload`.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("The model has no LoRA layers; call apply_lora(model, config) first.")
    for name, layer in layers.items():
        if name == "":
            return layer.base_layer
        set_submodule(model, name, layer.base_layer)
    for name, wrapper in saved_module_wrappers(model).items():  # PEFT keeps the active (trained) copy
        set_submodule(model, name, wrapper.active_module)
    forget_adapters(model)
    return model


def output_head_names(model: nn.Module, linear_names: list[str]) -> set[str]:
    """The output head that ``"all-linear"`` leaves out (and `apply_qlora` keeps in full precision).

    A transformers ``PreTrainedModel`` says which layer it is: ``model.get_output_embeddings()``, PEFT's rule
    (``_maybe_include_all_linear_layers``). That is ``lm_head`` for a ``*ForCausalLM`` and None for ``BertModel``
    and ``*ForSequenceClassification``, whose ``classifier``/``score`` is then a target like any linear, as
    in PEFT without a ``task_type`` (PEFT with ``task_type="SEQ_CLS"`` trains the head fully instead, through
    ``modules_to_save``: pass ``LoraConfig(modules_to_save=["classifier"])`` for the same model here).

    Any other module (PEFT leaves every linear in): a layer its ``get_output_embeddings()`` returns, any layer
    named ``lm_head``, and the last linear if it maps back to the vocabulary: its weight is an ``nn.Embedding``'s
    (tied), or its ``out_features`` equals the number of rows of the input embedding, ``get_input_embeddings()``
    or else the first ``nn.Embedding`` (the token table in GPT-, Llama- and BERT-style code). Comparing sizes
    with that one table only, not with every table, keeps a 2-label classifier from looking like a head
    because of a 2-row token-type or a 512-row position table.
    """
    def names_of(module):
        return {n for n, m in model.named_modules() if module is not None and m is module}

    output = getattr(model, "get_output_embeddings", None)
    heads = names_of(output() if callable(output) else None)
    if is_transformers_model(model):
        return heads
    heads |= {n for n in linear_names if n.rsplit(".", 1)[-1] == "lm_head"}
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    get_input = getattr(model, "get_input_embeddings", None)
    tokens = get_input() if callable(get_input) else None
    tokens = tokens if isinstance(tokens, nn.Embedding) else next(iter(embeddings), None)
    if linear_names and tokens is not None:
        last = model.get_submodule(linear_names[-1])
        tied = any(getattr(last, "weight", None) is e.weight for e in embeddings)
        if tied or linear_dims(last)[1] == tokens.num_embeddings:
            heads.add(linear_names[-1])
    return heads


def is_transformers_model(model: nn.Module) -> bool:
    """True for a transformers ``PreTrainedModel``, without importing transformers when it is not loaded."""
    modeling_utils = sys.modules.get("transformers.modeling_utils")
    return modeling_utils is not None and isinstance(model, modeling_utils.PreTrainedModel)


def _unused_linears(model: nn.Module) -> set[str]:
    """Names of linears their parent never calls: every ``nn.MultiheadAttention.out_proj``.

    ``nn.MultiheadAttention`` passes ``out_proj.weight`` and ``out_proj.bias`` to
    ``F.multi_head_attention_forward``; ``out_proj`` is an ``nn.Linear`` subclass only so that quantization
    tools find it.
    """
    return {f"{n}.out_proj" if n else "out_proj" for n, m in model.named_modules()
            if isinstance(m, nn.MultiheadAttention)}


def _matched_names(model: nn.Module, targets) -> list[str]:
    linear_names = [n for n, m in model.named_modules() if n and is_linear_like(m)]
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        skipped = output_head_names(model, linear_names) | _unused_linears(model)
        names = [n for n in linear_names if n not in skipped]
    else:
        names = [n for n, _ in model.named_modules() if n and target_matches(targets, n)]
    if not names:
        shown = ", ".join(linear_names[:30]) + (", ..." if len(linear_names) > 30 else "") or "(none)"
        raise ValueError(f"target_modules={targets!r} matched no module. The model's linear layers are: {shown}. "
                         "Pass suffixes of these names (e.g. 'q_proj'), a regex, or 'all-linear'.")
    return names


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` (e.g. ``model.layers.0.self_attn.q_proj``) by ``module``."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def mark_trainable(model: nn.Module, bias: str) -> None:
    """Freeze everything but the active adapter's lora_A/lora_B, then unfreeze biases as ``bias`` says."""
    model.requires_grad_(False)
    for layer in lora_layers(model).values():
        if layer.active_adapter in layer.lora_A:
            layer.lora_A[layer.active_adapter].requires_grad_(True)
            layer.lora_B[layer.active_adapter].requires_grad_(True)
        if layer.active_adapter in layer.lora_magnitude_vector:  # DoRA's magnitude m trains too
            layer.lora_magnitude_vector[layer.active_adapter].requires_grad_(True)
    for wrapper in saved_module_wrappers(model).values():
        wrapper.set_adapter(wrapper.active_adapter)
    if bias == "all":
        for name, p in model.named_parameters():
            if name == "bias" or name.endswith(".bias"):
                p.requires_grad_(True)
    elif bias == "lora_only":
        for layer in lora_layers(model).values():
            if getattr(layer.base_layer, "bias", None) is not None:
                layer.base_layer.bias.requires_grad_(True)


def target_matches(targets, name: str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def forget_adapters(model: nn.Module) -> None:
    """Drop the model-level adapter bookkeeping (``peft_config``, ``active_adapter``) once no wrapper is left."""
    for attr in ("peft_config", "active_adapter"):
        if attr in model.__dict__:
            delattr(model, attr)


def targets_before_wrapping(model: nn.Module, wrapped: dict[str, LoRALinear], targets,
                            modules_to_save=None) -> list[str]:
    """The names ``targets`` selects, read on the model as it was before its layers were wrapped.

    Modules trained in full (already wrapped, or named in ``modules_to_save``) are never LoRA targets, as in PEFT.
    """
    saved = [*saved_module_wrappers(model)]
    if modules_to_save:
        wrapped_inside = tuple(f"{name}." for name in [*wrapped, *saved])
        saved += modules_to_save_names(model, modules_to_save, exclude=wrapped_inside)
    inside = tuple(f"{name}." for name in [*wrapped, *saved])
    names = [n for n, _ in model.named_modules() if n and not n.startswith(inside) and n not in saved]
    if not (isinstance(targets, str) and targets.lower() == ALL_LINEAR):
        return [n for n in names if target_matches(targets, n)]
    linear = [n for n in names if n in wrapped or is_linear_like(model.get_submodule(n))]
    heads = output_head_names(model, linear)
    return [n for n in linear if n not in heads]


def check_mergeable(model: nn.Module, layers: dict[str, LoRALinear], safe_merge: bool = True) -> None:
    """Merging writes into each base weight: refuse one shared with another module, or non-finite values.

    The adapter's factors must be finite; with ``safe_merge`` the merged weight ``W0 + scaling * B A`` must be
    too (one layer's sum in memory at a time).
    """
    def keys(p):  # the same Parameter, or another tensor over the same memory
        return [("id", id(p))] + ([] if p.is_meta else [("storage", p.untyped_storage().data_ptr())])

    owners: dict[tuple, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        for key in keys(p):
            owners.setdefault(key, []).append(name)
    for name, layer in layers.items():
        weight = float_weight(layer.base_layer)
        own = f"{name}.base_layer." if name else "base_layer."
        others = sorted({n for key in keys(weight) for n in owners.get(key, []) if not n.startswith(own)})
        if others:
            raise ValueError(f"LoRA layer {name!r} shares its weight with {others[0]!r} (tied embeddings), so "
                             "merging would change that module too. Untie it before apply_lora (give it its own "
                             "nn.Parameter(weight.detach().clone())) or leave it out of target_modules.")
        adapter = layer.active_adapter
        factors = layer.factors(adapter)
        factors += tuple(m.weight for n, m in layer.lora_magnitude_vector.items() if n == adapter)  # DoRA's m
        if not weight.is_meta and not all(torch.isfinite(f).all() for f in factors):
            raise ValueError(f"Merging LoRA layer {name!r} would write NaN or inf into its base weight (adapter "
                             f"{adapter!r} holds non-finite values; training diverged?). Load a finite adapter first.")
        if safe_merge and not weight.is_meta:
            with torch.no_grad():
                finite = torch.isfinite(weight + layer.get_delta_weight()).all()
            if not finite:
                raise ValueError(f"Merging LoRA layer {name!r} would overflow its {weight.dtype} base weight to inf "
                                 "(safe_merge checked the merged weights); nothing was changed.")


# ------------------------------------------------------------------------------------------- internals


def _checked_layers(model: nn.Module, want_merged: bool | None) -> dict[str, LoRALinear]:
    """The LoRA layers the active adapter is on (a second adapter may target fewer layers), checked."""
    if not lora_layers(model):
        raise ValueError("The model has no LoRA layers; call apply_lora(model, config) first.")
    layers = {n: m for n, m in lora_layers(model).items() if m.active_adapter in m.lora_A}
    for name, layer in layers.items():
        if want_merged is not None and layer.merged != want_merged:
            state = "already merged; call unmerge_lora first" if layer.merged else "not merged; call merge_lora first"
            raise ValueError(f"LoRA layer {name!r} is {state}.")
        float_weight(layer.base_layer)
    return layers
