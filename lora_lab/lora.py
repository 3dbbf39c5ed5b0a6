"""LoRA: low-rank adaptation of a frozen linear layer (Hu et al. 2021, arXiv 2106.09685).

A pretrained weight ``W0`` (out, in) stays frozen; training learns ``B`` (out, r) and ``A`` (r, in) with
``r << min(in, out)``, and the layer computes ``h = W0 x + (alpha / r) B A x``. The names are PEFT's
(`LoraConfig`, `r`, `lora_alpha`, `lora_A`, `lora_B`, `scaling`, `merge`/`unmerge`) so what you learn here
transfers to ``peft.get_peft_model``.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

ALL_LINEAR = "all-linear"
BIAS_MODES = ("none", "all", "lora_only")


@dataclass
class LoraConfig:
    """Which layers get LoRA, and with which hyperparameters (PEFT's field names).

    Args:
        r: Rank of the update ``B A``; trainable parameters per layer are ``r * (in + out)``.
        lora_alpha: Numerator of the scaling ``alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA).
        lora_dropout: Dropout probability applied to the adapter's input only.
        target_modules: Module-name suffixes (``("q_proj", "v_proj")`` matches ``model.layers.0.self_attn.q_proj``
            at a ``.`` boundary), a regex string matched with ``re.fullmatch`` against full names, or
            ``"all-linear"`` (every linear layer except the output head, see `output_head_names`, and the
            ``out_proj`` of an ``nn.MultiheadAttention``, which never calls it).
        use_rslora: Use rank-stabilized scaling ``alpha / sqrt(r)`` (Kalajdzievski 2023, arXiv 2312.03732).
        bias: ``"none"`` (all biases frozen), ``"all"`` (every bias trains) or ``"lora_only"`` (biases of the
            wrapped layers train).
    """

    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] | str = ("q_proj", "v_proj")
    use_rslora: bool = False
    bias: str = "none"

    def __post_init__(self):
        _check_rank(self.r)
        _check_dropout(self.lora_dropout)
        _check_alpha(self.lora_alpha)
        _check_flag(self.use_rslora, "use_rslora")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"bias must be one of {BIAS_MODES}, got {self.bias!r}.")
        targets = self.target_modules
        if isinstance(targets, str):
            if not targets:
                raise ValueError("target_modules is an empty string; pass names like ('q_proj', 'v_proj').")
            try:
                re.compile(targets)  # a bad regex fails here, not in apply_lora
            except re.error as err:
                raise ValueError(f"target_modules {targets!r} is not a valid regex ({err}).") from None
        elif isinstance(targets, (list, tuple, set, frozenset)) and targets and all(
            isinstance(t, str) and t for t in targets
        ):
            self.target_modules = tuple(sorted(targets)) if isinstance(targets, (set, frozenset)) else tuple(targets)
        else:
            raise ValueError(
                "target_modules must be a non-empty list of module-name suffixes, a regex string or 'all-linear', "
                f"got {targets!r}."
            )

    @property
    def scaling(self) -> float:
        """The factor in front of ``B A``: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA."""
        return _scaling(self.lora_alpha, self.r, self.use_rslora)


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (LoRA paper, Hu et al. 2021, §4.1).

        W' = W0 + (alpha/r) B A,      h = W0 x + (alpha/r) B A x

    ``W0`` (out, in) is ``base_layer``'s frozen weight, ``lora_A.weight`` is ``A`` (r, in), ``lora_B.weight``
    is ``B`` (out, r). ``A`` starts Kaiming-uniform (``a=sqrt(5)``, as loralib and PEFT do; the paper's text
    says Gaussian), ``B`` starts at zero.

    # Note: why lora_B starts at zero
    With ``B = 0`` the update ``B A`` is zero, so the wrapped model computes exactly what the pretrained one
    did and fine-tuning starts from the pretrained function. ``A`` must not also be zero: the gradient of
    ``B`` is ``dL/dh (A x)^T``, which would then vanish, and neither factor would ever move.

    The forward only needs ``base_layer`` to be a module with ``in_features``/``out_features`` (a quantized
    NF4 linear is wrapped the same way); ``merge``/``unmerge``/``delta_weight`` use ``base_layer.weight``.

    Args:
        base: The layer to adapt (``nn.Linear`` or a linear-like module); it is frozen in place.
        r: Rank of the update, ``1 <= r <= min(in_features, out_features)``.
        lora_alpha: Scaling numerator; ``None`` means ``lora_alpha = r`` (scaling 1).
        lora_dropout: Dropout probability on the adapter's input, in ``[0, 1)``.
        use_rslora: Scale by ``lora_alpha / sqrt(r)`` instead of ``lora_alpha / r``.
    """

    def __init__(self, base: nn.Module, r: int, lora_alpha: float | None = None, lora_dropout: float = 0.0,
                 use_rslora: bool = False):
        super().__init__()
        _check_base(base)
        _check_rank(r, base.in_features, base.out_features)
        _check_dropout(lora_dropout)
        if lora_alpha is not None:
            _check_alpha(lora_alpha)
        _check_flag(use_rslora, "use_rslora")
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r = r
        self.lora_alpha = r if lora_alpha is None else lora_alpha
        self.use_rslora = use_rslora
        self.scaling = _scaling(self.lora_alpha, r, use_rslora)
        factory = {"dtype": _adapter_dtype(base), "device": _device(base)}
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **factory)   # A: (r, in)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **factory)  # B: (out, r)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.reset_lora_parameters()
        base.requires_grad_(False)
        self._merged = False

    def reset_lora_parameters(self) -> None:
        """A ~ Kaiming-uniform(a=sqrt(5)), B = 0 (see `# Note: why lora_B starts at zero`)."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def merged(self) -> bool:
        """True while ``B A`` is folded into ``base_layer.weight``."""
        return self._merged

    @property
    def weight(self) -> torch.Tensor:
        """The weight this layer applies, ``W0 + scaling * B A`` (out, in); see `# Note: code that reads .weight`.

        # Note: code that reads .weight
        Some modules read a child's ``weight`` instead of calling it: ``nn.TransformerEncoderLayer``'s inference
        fast path hands ``linear1.weight`` and ``linear2.weight`` to one fused kernel. Returning the merged weight
        keeps the update in that path (PEFT's ``lora.Linear.weight`` is ``W0``, so there its adapter is skipped
        in eval mode). While grad is on this tensor requires grad, and torch takes the ordinary path through
        `forward` instead. A new tensor each time: write to ``base_layer.weight``, not to this.
        """
        weight = getattr(self.base_layer, "weight", None)
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise AttributeError(f"{type(self.base_layer).__name__} has no floating-point weight to add B A to.")
        return weight if self._merged else weight + self.delta_weight()

    @property
    def bias(self) -> torch.Tensor | None:
        """``base_layer.bias`` (LoRA adds no bias)."""
        return getattr(self.base_layer, "bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base_layer(x) + lora_B(lora_A(dropout(x))) * scaling``; x: (..., in) -> (..., out)."""
        result = self.base_layer(x)  # (..., out)
        if self._merged:
            return result  # the update already lives in base_layer.weight
        x = x.to(self.lora_A.weight.dtype)
        # B (s A x) = s B A x: scaling the (..., r) tensor instead of the (..., out) one saves a full pass.
        update = self.lora_B(self.lora_A(self.lora_dropout(x)) * self.scaling)  # (..., r) -> (..., out)
        return result + update.to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The update ``scaling * B @ A``, shape (out, in), in the base weight's dtype."""
        weight = _float_weight(self.base_layer)
        delta = self.lora_B.weight.float() @ self.lora_A.weight.float()  # (out, r) @ (r, in), in fp32
        return (delta * self.scaling).to(weight.dtype)

    def merge(self) -> None:
        """Fold the update into the frozen weight: ``W0 <- W0 + scaling * B A`` (no extra cost at inference)."""
        if self._merged:
            raise ValueError("This LoRALinear is already merged; call unmerge() first.")
        with torch.no_grad():
            _float_weight(self.base_layer).add_(self.delta_weight())
        self._merged = True

    def unmerge(self) -> None:
        """Take the update back out: ``W0 <- W0 - scaling * B A`` (exact up to rounding in W0's dtype)."""
        if not self._merged:
            raise ValueError("This LoRALinear is not merged; call merge() first.")
        with torch.no_grad():
            _float_weight(self.base_layer).sub_(self.delta_weight())
        self._merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, merged={self._merged}"


class LoRALayer(LoRALinear):
    """The blog post's ``LoRALayer(original_layer, rank)``, as a correct `LoRALinear`.

    The post's version has no ``alpha / r`` scaling, which is ``lora_alpha = r`` here (scaling 1). Unlike the
    post, ``A`` is stored as ``lora_A.weight`` (r, in) and ``B`` as ``lora_B.weight`` (out, r), PEFT's layout.

    Args:
        original_layer: The linear layer to adapt (frozen in place).
        rank: The LoRA rank ``r``.
        alpha: ``lora_alpha``; ``None`` means ``alpha = rank``.
    """

    def __init__(self, original_layer: nn.Module, rank: int, alpha: float | None = None):
        super().__init__(original_layer, r=rank, lora_alpha=alpha)

    @property
    def original_layer(self) -> nn.Module:
        """The post's name for ``base_layer``."""
        return self.base_layer

    @property
    def rank(self) -> int:
        """The post's name for ``r``."""
        return self.r


def apply_lora(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Wrap every layer matched by ``config.target_modules`` in a `LoRALinear`, in place.

    Everything is checked before anything changes: no match, a match that is not linear, or a model that
    already has LoRA layers raise and leave the model untouched. Afterwards only ``lora_A``/``lora_B`` (and
    the biases ``config.bias`` asks for) require grad, and ``model.lora_config`` holds the config.

    Returns:
        The same model object.
    """
    names = lora_targets(model, config)
    grad_flags = {p: p.requires_grad for p in model.parameters()}
    try:
        wrappers = {name: LoRALinear(model.get_submodule(name), config.r, config.lora_alpha, config.lora_dropout,
                                     config.use_rslora) for name in names}
    except Exception:
        for p, flag in grad_flags.items():
            p.requires_grad_(flag)
        raise
    for name, wrapper in wrappers.items():
        set_submodule(model, name, wrapper)
    mark_trainable(model, config.bias)
    model.lora_config = config
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
    unused = set(names) & _unused_linears(model)
    if unused:
        raise TypeError(f"target_modules matched {sorted(unused)}, the out_proj of an nn.MultiheadAttention, which "
                        "reads out_proj.weight itself and never calls the layer, so an adapter there would never "
                        "be used (PEFT wraps it and it stays untrained). Leave it out of target_modules.")
    for name in names:
        module = model.get_submodule(name)
        if not _is_linear_like(module):
            raise TypeError(f"target_modules matched {name!r}, a {type(module).__name__}, but LoRA wraps only "
                            "linear layers; narrow target_modules to the nn.Linear names.")
        _check_rank(config.r, module.in_features, module.out_features, where=f" for {name!r}")
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Full names (as in ``named_modules``) of the LoRA-wrapped layers, mapped to the wrappers."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every LoRA layer (``W0 <- W0 + scaling * B A``); all-or-nothing.

    Refused before any weight changes when a base weight is shared with another module (tied embeddings)
    or an update holds NaN/inf.
    """
    layers = _checked_layers(model, want_merged=False)
    _check_mergeable(model, layers)
    for layer in layers.values():
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo `merge_lora` on every LoRA layer; all-or-nothing."""
    for layer in _checked_layers(model, want_merged=True).values():
        layer.unmerge()
    return model


def unload(model: nn.Module) -> nn.Module:
    """Replace each `LoRALinear` by its base layer with the update merged in; returns a plain model."""
    layers = _checked_layers(model, want_merged=None)
    _check_mergeable(model, {name: layer for name, layer in layers.items() if not layer.merged})
    for name, layer in layers.items():
        if not layer.merged:
            layer.merge()
        if name == "":
            return layer.base_layer
        set_submodule(model, name, layer.base_layer)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


class ParameterCount(NamedTuple):
    """Trainable and total parameter counts, printed like PEFT's ``print_trainable_parameters``."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        """Trainable share of all parameters, in percent."""
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


def count_parameters(model: nn.Module) -> ParameterCount:
    """Count trainable and total parameters (shared tensors once).

    A module that defines ``logical_numel()`` (quantized layers do) reports the logical number of weights
    its own parameters stand for, instead of the numel of their packed storage.
    """
    seen: set[int] = set()
    trainable = total = 0
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for p in own)
        trainable += sum(p.numel() for p in own if p.requires_grad)
        hook = getattr(module, "logical_numel", None)
        total += int(hook()) if callable(hook) else sum(p.numel() for p in own)
    return ParameterCount(trainable, total)


# ------------------------------------------------------------------------------------------- internals


def _scaling(lora_alpha: float, r: int, use_rslora: bool) -> float:
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def _check_rank(r, in_features: int | None = None, out_features: int | None = None, where: str = "") -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"r must be a positive int, got {r!r}.")
    if in_features is not None and r > min(in_features, out_features):
        raise ValueError(f"r={r} is larger than min(in_features, out_features) = min({in_features}, "
                         f"{out_features}){where}; a rank above that adds parameters but no expressiveness.")


def _check_alpha(alpha) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < math.inf:
        raise ValueError(f"lora_alpha must be a positive, finite number (e.g. 16, or 2 * r), got {alpha!r}.")


def _check_flag(value, name: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}; a string such as 'false' would count as on.")


def _check_dropout(p) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
        raise ValueError(f"lora_dropout must be a number in [0, 1), got {p!r}.")


def _is_linear_like(module) -> bool:
    if isinstance(module, LoRALinear):
        return False
    if isinstance(module, nn.Linear):
        return True
    dims = (getattr(module, "in_features", None), getattr(module, "out_features", None))
    return isinstance(module, nn.Module) and all(isinstance(d, int) and d > 0 for d in dims)


def _check_base(base) -> None:
    if isinstance(base, LoRALinear):
        raise ValueError("This layer is already a LoRALinear; wrap its base_layer instead, or unload it first.")
    if not _is_linear_like(base):
        raise TypeError(f"LoRA wraps an nn.Linear-like module (with in_features/out_features), got "
                        f"{type(base).__name__}.")


def _float_weight(base: nn.Module) -> torch.Tensor:
    weight = getattr(base, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError(f"Cannot merge into a {type(base).__name__}: its weight is not a floating-point tensor "
                        "(a quantized layer has its own merge path).")
    return weight


def _adapter_dtype(base: nn.Module) -> torch.dtype:
    """The base weight's dtype; for a packed (quantized) weight, the layer's ``compute_dtype`` or fp32."""
    weight = getattr(base, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return weight.dtype
    compute_dtype = getattr(base, "compute_dtype", None)
    return compute_dtype if isinstance(compute_dtype, torch.dtype) else torch.float32


def _device(base: nn.Module) -> torch.device:
    for tensor in list(base.parameters()) + list(base.buffers()):
        return tensor.device
    return torch.device("cpu")


def _target_matches(targets, name: str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def output_head_names(model: nn.Module, linear_names: list[str]) -> set[str]:
    """The output head that ``"all-linear"`` leaves out (and `apply_qlora` keeps in full precision).

    A transformers ``PreTrainedModel`` says which layer it is: ``model.get_output_embeddings()``, PEFT's rule
    (``_maybe_include_all_linear_layers``). That is ``lm_head`` for a ``*ForCausalLM`` and None for ``BertModel``
    and ``*ForSequenceClassification``, whose ``classifier``/``score`` is then a target like any linear, as
    in PEFT without a ``task_type`` (PEFT with ``task_type="SEQ_CLS"`` trains the head fully instead, through
    ``modules_to_save``, which lora_lab does not have).

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
    if _is_transformers_model(model):
        return heads
    heads |= {n for n in linear_names if n.rsplit(".", 1)[-1] == "lm_head"}
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    get_input = getattr(model, "get_input_embeddings", None)
    tokens = get_input() if callable(get_input) else None
    tokens = tokens if isinstance(tokens, nn.Embedding) else next(iter(embeddings), None)
    if linear_names and tokens is not None:
        last = model.get_submodule(linear_names[-1])
        tied = any(getattr(last, "weight", None) is e.weight for e in embeddings)
        if tied or last.out_features == tokens.num_embeddings:
            heads.add(linear_names[-1])
    return heads


def _is_transformers_model(model: nn.Module) -> bool:
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
    linear_names = [n for n, m in model.named_modules() if n and _is_linear_like(m)]
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        skipped = output_head_names(model, linear_names) | _unused_linears(model)
        names = [n for n in linear_names if n not in skipped]
    else:
        names = [n for n, _ in model.named_modules() if n and _target_matches(targets, n)]
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
    """Freeze everything but lora_A/lora_B, then unfreeze biases as PEFT's ``bias`` option says."""
    model.requires_grad_(False)
    for layer in lora_layers(model).values():
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
    if bias == "all":
        for name, p in model.named_parameters():
            if name == "bias" or name.endswith(".bias"):
                p.requires_grad_(True)
    elif bias == "lora_only":
        for layer in lora_layers(model).values():
            if getattr(layer.base_layer, "bias", None) is not None:
                layer.base_layer.bias.requires_grad_(True)


def _checked_layers(model: nn.Module, want_merged: bool | None) -> dict[str, LoRALinear]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError("The model has no LoRA layers; call apply_lora(model, config) first.")
    for name, layer in layers.items():
        if want_merged is not None and layer.merged != want_merged:
            state = "already merged; call unmerge_lora first" if layer.merged else "not merged; call merge_lora first"
            raise ValueError(f"LoRA layer {name!r} is {state}.")
        _float_weight(layer.base_layer)
    return layers


def _check_mergeable(model: nn.Module, layers: dict[str, LoRALinear]) -> None:
    """Merging writes into each base weight: refuse one shared with another module, or a non-finite result."""
    def keys(p):  # the same Parameter, or another tensor over the same memory
        return [("id", id(p))] + ([] if p.is_meta else [("storage", p.untyped_storage().data_ptr())])

    owners: dict[tuple, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        for key in keys(p):
            owners.setdefault(key, []).append(name)
    for name, layer in layers.items():
        weight = _float_weight(layer.base_layer)
        own = f"{name}.base_layer." if name else "base_layer."
        others = sorted({n for key in keys(weight) for n in owners.get(key, []) if not n.startswith(own)})
        if others:
            raise ValueError(f"LoRA layer {name!r} shares its weight with {others[0]!r} (tied embeddings), so "
                             "merging would change that module too. Untie it before apply_lora (give it its own "
                             "nn.Parameter(weight.detach().clone())) or leave it out of target_modules.")
        with torch.no_grad():
            finite = torch.isfinite(weight + layer.delta_weight()).all()
        if not weight.is_meta and not finite:
            raise ValueError(f"Merging LoRA layer {name!r} would write NaN or inf into its base weight (the "
                             "adapter holds non-finite values; training diverged?). Load a finite adapter first.")
