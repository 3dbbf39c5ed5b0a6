"""LoRA: low-rank adaptation of a frozen linear layer (Hu et al. 2021, arXiv 2106.09685).

A pretrained weight ``W0`` (out, in) stays frozen; training learns ``B`` (out, r) and ``A`` (r, in) with
``r << min(in, out)``, and the layer computes ``h = W0 x + (alpha / r) B A x``. The names are PEFT's
(`LoraConfig`, `r`, `lora_alpha`, `lora_A`, `lora_B`, `scaling`, `merge`/`unmerge`) so what you learn here
transfers to ``peft.get_peft_model``. Putting layers into a model (`apply_lora`, `unload`) is `lora_lab.inject`.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from . import dora
from . import lora_init
from .lora_init import LoftQConfig

ALL_LINEAR = "all-linear"
DEFAULT_ADAPTER = "default"  # PEFT's name for the first adapter
BIAS_MODES = ("none", "all", "lora_only")


@dataclass
class LoraConfig:
    """Which layers get LoRA, and with which hyperparameters (PEFT's field names).

    Args:
        r: Rank of the update ``B A``; trainable parameters per layer are ``r * (in + out)``.
        lora_alpha: Numerator of the scaling ``alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA). PEFT's default 8
            gives scaling 1 at the default r=8; the kit's notebooks pass ``lora_alpha=2 * r`` or 16.
        lora_dropout: Dropout probability applied to the adapter's input only.
        target_modules: Module-name suffixes (``("q_proj", "v_proj")`` matches ``model.layers.0.self_attn.q_proj``
            at a ``.`` boundary), a regex string matched with ``re.fullmatch`` against full names, or
            ``"all-linear"`` (every linear layer except the output head, see `output_head_names`, and the
            ``out_proj`` of an ``nn.MultiheadAttention``, which never calls it). The default is what PEFT's
            ``target_modules=None`` picks for a Llama model.
        use_rslora: Use rank-stabilized scaling ``alpha / sqrt(r)`` (Kalajdzievski 2023, arXiv 2312.03732).
        bias: ``"none"`` (all biases frozen), ``"all"`` (every bias trains) or ``"lora_only"`` (biases of the
            wrapped layers train).
        use_dora: Weight-decomposed LoRA (Liu et al. 2024, arXiv 2402.09353): a trained magnitude per output
            feature times the normalized ``W0 + s B A``, see `lora_lab.dora`.
        fan_in_fan_out: True for a layer that stores its weight (in, out), transformers' ``Conv1D`` in GPT-2;
            as in PEFT, `apply_lora` sets it (with a warning) when the targets are ``Conv1D`` layers.
        modules_to_save: Names (suffixes, as in ``target_modules``) of modules trained fully and saved with
            the adapter, e.g. ``["classifier"]`` or ``["lm_head"]`` (`lora_lab.modules_to_save`).
        init_lora_weights: How the factors start (PEFT's name and default True), see `lora_lab.lora_init`:
            True, False, ``"gaussian"``, ``"pissa"``, ``"pissa_niter_N"``, ``"olora"`` or ``"loftq"``. The last
            three rewrite the base weights (so that the model's output is unchanged at the start).
        loftq_config: `LoftQConfig` (stored as a dict, as in PEFT) for ``init_lora_weights="loftq"``; else empty.
    """

    r: int = 8
    lora_alpha: float = 8  # PEFT's default, so a config without lora_alpha means the same here and there
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] | str = ("q_proj", "v_proj")
    use_rslora: bool = False
    bias: str = "none"
    use_dora: bool = False  # PEFT's default: plain LoRA
    fan_in_fan_out: bool = False  # PEFT's default; Conv1D targets need True
    modules_to_save: tuple[str, ...] | None = None  # PEFT's default: nothing besides the adapters trains
    init_lora_weights: bool | str = True  # PEFT's default: A Kaiming-uniform, B = 0
    loftq_config: LoftQConfig | dict = field(default_factory=dict)

    def __post_init__(self):
        check_rank(self.r)
        lora_init.check_init_lora_weights(self.init_lora_weights)
        self.loftq_config = lora_init.check_loftq_config(self.init_lora_weights, self.loftq_config)
        check_dropout(self.lora_dropout)
        check_alpha(self.lora_alpha)
        check_flag(self.use_rslora, "use_rslora")
        check_flag(self.use_dora, "use_dora")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"bias must be one of {BIAS_MODES}, got {self.bias!r}.")
        check_flag(self.fan_in_fan_out, "fan_in_fan_out")
        if self.use_dora and self.fan_in_fan_out:
            raise ValueError("use_dora=True with fan_in_fan_out=True (DoRA on Conv1D) is not implemented in lora_lab.")
        if self.use_dora and lora_init.changes_base(self.init_lora_weights):
            raise ValueError(f"use_dora=True with init_lora_weights={self.init_lora_weights!r} is not implemented in "
                             "lora_lab; DoRA starts from init_lora_weights=True, False or 'gaussian'.")
        saved = self.modules_to_save
        if saved is not None:
            if isinstance(saved, str) or not isinstance(saved, (list, tuple)) or not saved or not all(
                    isinstance(m, str) and m for m in saved):
                raise ValueError(f"modules_to_save must be None or a non-empty list of module names such as "
                                 f"['classifier'], got {saved!r}.")
            self.modules_to_save = tuple(saved)
            if self.bias != "none":
                raise ValueError("modules_to_save with bias='all' or 'lora_only' is not implemented in lora_lab (which "
                                 "copy's bias would train?); use bias='none', or put the bias's module in "
                                 "modules_to_save.")
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
        return lora_scaling(self.lora_alpha, self.r, self.use_rslora)


class LoRALinear(nn.Module):
    """A frozen linear layer plus trainable low-rank updates, one per named adapter (Hu et al. 2021, §4.1).

        W' = W0 + (alpha/r) B A,      h = W0 x + (alpha/r) B A x

    ``W0`` (out, in) is ``base_layer``'s frozen weight. Each adapter has a name (``"default"`` unless you pick
    one) and its own ``lora_A[name].weight`` = ``A`` (r, in), ``lora_B[name].weight`` = ``B`` (out, r),
    ``r[name]``, ``lora_alpha[name]`` and ``scaling[name]``: PEFT's layout, so ``layer.lora_A["default"]`` is
    the same expression in both. One adapter is active at a time (`set_adapter`); the others are kept,
    frozen, and cost nothing in the forward pass. ``A`` starts Kaiming-uniform (``a=sqrt(5)``, as loralib and
    PEFT do; the paper's text says Gaussian), ``B`` starts at zero; ``init_lora_weights`` picks another start
    (`lora_lab.lora_init`: Gaussian, PiSSA, OLoRA, LoftQ).

    # Note: why lora_B starts at zero
    With ``B = 0`` the update ``B A`` is zero, so the wrapped model computes exactly what the pretrained one
    did and fine-tuning starts from the pretrained function. ``A`` must not also be zero: the gradient of
    ``B`` is ``dL/dh (A x)^T``, which would then vanish, and neither factor would ever move.

    The forward only needs ``base_layer`` to be a module with ``in_features``/``out_features`` (a quantized
    NF4 linear is wrapped the same way); ``merge``/``unmerge`` use ``base_layer.weight``.

    Args:
        base_layer: The layer to adapt (``nn.Linear`` or a linear-like module); it is frozen in place.
        r: Rank of the update, ``1 <= r <= min(in_features, out_features)`` (default 8, as in `LoraConfig`).
        lora_alpha: Scaling numerator (default 8, as in `LoraConfig`); ``lora_alpha = r`` gives scaling 1.
        lora_dropout: Dropout probability on the adapter's input, in ``[0, 1)``.
        use_rslora: Scale by ``lora_alpha / sqrt(r)`` instead of ``lora_alpha / r``.
        adapter_name: The first adapter's name, which is also the active one.
        use_dora: Make the first adapter a DoRA one (`lora_lab.dora`): ``lora_magnitude_vector[name].weight``
            holds its magnitude ``m`` (out,).
        init_lora_weights, loftq_config: How the factors start, as in `LoraConfig` (see `reset_lora_parameters`).
    """

    def __init__(self, base_layer: nn.Module, r: int = LoraConfig.r, lora_alpha: float = LoraConfig.lora_alpha,
                 lora_dropout: float = 0.0, use_rslora: bool = False, adapter_name: str = DEFAULT_ADAPTER,
                 use_dora: bool = False, *, init_lora_weights: bool | str = True, loftq_config: dict | None = None):
        super().__init__()
        _check_base(base_layer)
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_dims(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)  # weight stored (in, out): see `get_delta_weight`
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.scaling: dict[str, float] = {}
        self.lora_A, self.lora_B, self.lora_dropout = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        self.use_dora: dict[str, bool] = {}
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters only: name -> MagnitudeVector, m (out,)
        self._dora_norms: dict[str, torch.Tensor] = {}  # while merged: ||W0 + s B A||_c, which unmerge needs
        self.merged_adapters: list[str] = []
        self.disable_adapters = False  # PEFT's flag: True computes base_layer(x) alone (see `disable_adapter`)
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, loftq_config,
                          use_dora=use_dora)
        self.active_adapter = adapter_name
        base_layer.requires_grad_(False)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                     use_rslora: bool = False, init_lora_weights: bool | str = True,
                     loftq_config: dict | None = None, *, use_dora: bool = False) -> None:
        """Add an adapter called ``adapter_name`` (PEFT's method name); everything is checked first."""
        check_adapter_name(adapter_name)
        lora_init.check_init_lora_weights(init_lora_weights)
        loftq_config = lora_init.check_loftq_config(init_lora_weights, loftq_config or {})
        self._check_new_adapter(adapter_name, r, lora_alpha, lora_dropout, use_rslora)
        check_flag(use_dora, "use_dora")
        factory = {"dtype": adapter_dtype(self.base_layer), "device": layer_device(self.base_layer)}
        if lora_init.changes_base(init_lora_weights) and (use_dora or self.fan_in_fan_out):
            raise ValueError(f"init_lora_weights={init_lora_weights!r} with DoRA or on a Conv1D layer is not "
                             "implemented in lora_lab; use init_lora_weights=True there.")
        if use_dora and self.fan_in_fan_out:
            raise ValueError("DoRA (use_dora=True) on a Conv1D layer (fan_in_fan_out) is not implemented in lora_lab; "
                             "target nn.Linear layers with a DoRA config.")
        if use_dora and self.merged_adapters:
            raise ValueError(f"Adapter {self.merged_adapters[0]!r} is merged into this layer, and DoRA's magnitude "
                             "starts from the unmerged W0; unmerge before adding a DoRA adapter.")
        w0 = dora.base_weight(self.base_layer, factory["dtype"]) if use_dora else None  # (out, in); checks the base
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False, **factory)   # A: (r, in)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False, **factory)  # B: (out, r)
        self._record_adapter(adapter_name, r, lora_alpha, lora_dropout, use_rslora, use_dora)
        try:
            self.reset_lora_parameters(adapter_name, init_lora_weights, loftq_config)
        except Exception:  # e.g. PiSSA on a NaN or 4-bit base: the layer keeps only the adapters it had
            for table in (self.lora_A, self.lora_B, self.lora_dropout, self.r, self.lora_alpha, self.use_rslora,
                          self.scaling, self.use_dora):
                del table[adapter_name]
            raise
        if use_dora:  # m = ||W0 + s B A||_c with the initialized factors (||W0||_c at B = 0), as PEFT computes it
            with torch.no_grad():
                lora_weight = self.lora_B[adapter_name].weight @ self.lora_A[adapter_name].weight  # (out, in)
                norm = dora.weight_norm(w0, lora_weight, self.scaling[adapter_name])
            self.lora_magnitude_vector[adapter_name] = dora.MagnitudeVector(norm)
        if getattr(self, "active_adapter", adapter_name) != adapter_name:  # a second adapter waits, frozen
            for table in (self.lora_A, self.lora_B, self.lora_magnitude_vector):
                if adapter_name in table:
                    table[adapter_name].requires_grad_(False)

    def _check_new_adapter(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float,
                           use_rslora: bool) -> None:
        """What every LoRA layer checks before it adds an adapter (a linear one's and an embedding's alike)."""
        if adapter_name in self.lora_A:
            raise ValueError(f"This layer already has an adapter named {adapter_name!r}; pick another name or "
                             "delete_adapter it first.")
        check_rank(r, self.in_features, self.out_features)
        check_dropout(lora_dropout)
        check_alpha(lora_alpha)
        check_flag(use_rslora, "use_rslora")

    def _record_adapter(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float, use_rslora: bool,
                        use_dora: bool) -> None:
        """An adapter's dropout and hyperparameters, ``scaling = lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA)."""
        self.lora_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.r[adapter_name], self.lora_alpha[adapter_name] = r, lora_alpha
        self.use_rslora[adapter_name] = use_rslora
        self.scaling[adapter_name] = lora_scaling(lora_alpha, r, use_rslora)
        self.use_dora[adapter_name] = use_dora

    def reset_lora_parameters(self, adapter_name: str | None = None, init_lora_weights: bool | str = True,
                              loftq_config: dict | None = None) -> None:
        """Initialize an adapter's factors as ``init_lora_weights`` says (PEFT's method; `lora_lab.lora_init`).

        True: A ~ Kaiming-uniform(a=sqrt(5)), B = 0 (see `# Note: why lora_B starts at zero`); False: both
        random; ``"gaussian"``: A ~ N(0, 1/r^2), B = 0. ``"pissa"``, ``"pissa_niter_N"``, ``"olora"`` and
        ``"loftq"`` also REPLACE ``base_layer.weight`` (a new tensor, the old one is not written to): by the
        residual ``W0 - s B A``, or for LoftQ by ``dequant(Q_T)`` in W0's dtype (PEFT's LoftQ on a
        full-precision model); they need a floating-point base (on a 4-bit one, use `lora_lab.apply_qlora`).
        """
        name = self._name(adapter_name)
        if not lora_init.changes_base(init_lora_weights):
            lora_init.reset_factors(self.lora_A[name], self.lora_B[name], init_lora_weights, self.r[name])
            return
        weight, r, s = getattr(self.base_layer, "weight", None), self.r[name], self.scaling[name]
        if init_lora_weights == "loftq":
            iters = lora_init.check_loftq_config("loftq", loftq_config or {})["loftq_iter"]
            A, B, q = lora_init.loftq_init(weight, r, s, iters)
            new_weight = q.dequantize(weight.dtype)
        elif init_lora_weights == "olora":
            A, B, new_weight = lora_init.olora_init(weight, r, s)
        else:
            A, B, new_weight = lora_init.pissa_init(weight, r, s, lora_init.pissa_niter(init_lora_weights))
        with torch.no_grad():
            self.lora_A[name].weight.copy_(A)
            self.lora_B[name].weight.copy_(B)
        weight.data = new_weight  # `apply_lora` keeps the old tensor to put back if another layer fails

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the one the forward pass uses; its factors train, every other one is frozen.

        A name this layer does not hold is accepted, as in PEFT: the model's adapter may skip this layer, which
        then computes ``base_layer(x)`` alone. `lora_lab.set_adapter` checks the name against the model.
        """
        check_adapter_name(adapter_name)
        if self.merged_adapters:
            raise ValueError(f"Adapter {self.merged_adapters[0]!r} is merged into this layer; unmerge before "
                             "switching adapters.")
        self.active_adapter = adapter_name
        for name in self.lora_A:
            self.lora_A[name].requires_grad_(name == adapter_name)
            self.lora_B[name].requires_grad_(name == adapter_name)
        for name in self.lora_magnitude_vector:
            self.lora_magnitude_vector[name].requires_grad_(name == adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove ``adapter_name``'s factors; the active adapter and a merged one cannot be deleted."""
        self._name(adapter_name)
        if adapter_name == self.active_adapter or adapter_name in self.merged_adapters:
            state = "merged" if adapter_name in self.merged_adapters else "active"
            raise ValueError(f"Adapter {adapter_name!r} is {state} in this layer; set_adapter another one (and "
                             "unmerge) before deleting it.")
        for table in (self.lora_A, self.lora_B, self.lora_dropout):
            del table[adapter_name]
        for table in (self.r, self.lora_alpha, self.use_rslora, self.scaling, self.use_dora):
            del table[adapter_name]
        if adapter_name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[adapter_name]

    @property
    def active_adapters(self) -> list[str]:
        """PEFT's list form of `active_adapter` (the kit runs one adapter at a time)."""
        return [self.active_adapter]

    @property
    def adapter_on(self) -> bool:
        """True when the forward pass adds an update: not disabled, and the active adapter is on this layer.

        A second adapter may target fewer layers than the first (PEFT allows it); where the active one is
        absent the layer computes ``base_layer(x)`` alone.
        """
        return not self.disable_adapters and self.active_adapter in self.lora_A

    @property
    def merged(self) -> bool:
        """True while an adapter's ``B A`` is folded into ``base_layer.weight``."""
        return bool(self.merged_adapters)

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
        return weight if self.merged or not self.adapter_on else weight + self.get_delta_weight()

    @property
    def bias(self) -> torch.Tensor | None:
        """``base_layer.bias`` (LoRA adds no bias)."""
        return getattr(self.base_layer, "bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base_layer(x) + lora_B(lora_A(dropout(x))) * scaling`` for the active adapter; (..., in) -> (..., out)."""
        result = self.base_layer(x)  # (..., out)
        if self.merged or not self.adapter_on:
            return result  # merged: the update already lives in base_layer.weight; otherwise the base alone
        name = self.active_adapter
        lora_A, lora_B = self.lora_A[name], self.lora_B[name]
        x = x.to(lora_A.weight.dtype)
        if name in self.lora_magnitude_vector:  # DoRA: m / ||W0 + s B A||_c * (W0 x + s B A x) + bias
            out = dora.dora_forward(x, result, weight=dora.base_weight(self.base_layer, x.dtype), bias=self.bias,
                                    magnitude=self.lora_magnitude_vector[name].weight, lora_A=lora_A, lora_B=lora_B,
                                    dropout=self.lora_dropout[name], scaling=self.scaling[name],
                                    training=self.training)
            return out.to(result.dtype)
        # B (s A x) = s B A x: scaling the (..., r) tensor instead of the (..., out) one saves a full pass.
        update = lora_B(lora_A(self.lora_dropout[name](x)) * self.scaling[name])  # (..., r) -> (..., out)
        return result + update.to(result.dtype)

    def get_delta_weight(self, adapter: str | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The update ``scaling * B @ A`` (out, in), computed in float32 (PEFT's ``get_delta_weight(adapter)``).

        For a DoRA adapter it is the whole change DoRA makes, ``W' - W0 = m / ||W0 + s B A||_c (W0 + s B A) - W0``
        (PEFT's method returns ``s B A`` there too), so that ``W0 + get_delta_weight()`` is the weight the layer
        applies; it reads ``W0``, so it needs the layer unmerged.
        For a ``Conv1D`` base (``fan_in_fan_out``) the update is transposed to its weight's (in, out) layout.

        Args:
            adapter: The adapter's name; None means the active one.
            dtype: The result's dtype; None means the base weight's dtype, or float32 when the base weight is
                packed (a quantized layer).
        """
        name = self._name(adapter)
        if dtype is None:
            weight = getattr(self.base_layer, "weight", None)
            floating = isinstance(weight, torch.Tensor) and weight.is_floating_point()
            dtype = weight.dtype if floating else torch.float32
        delta = self._lora_delta(name)
        if name in self.lora_magnitude_vector:
            if self.merged:
                raise ValueError("DoRA's update depends on W0, which a merged layer no longer holds; unmerge first.")
            magnitude = self.lora_magnitude_vector[name].weight.float()
            delta = dora.delta_weight(dora.base_weight(self.base_layer, torch.float32), delta, magnitude)
        return delta.to(dtype)

    def _lora_delta(self, name: str) -> torch.Tensor:
        """``scaling * B @ A`` in float32, in the base weight's layout: (out, in), or (in, out) for a Conv1D."""
        lora_A, lora_B = self.factors(name)
        delta = (lora_B.float() @ lora_A.float()) * self.scaling[name]  # (out, r) @ (r, in), in fp32
        return delta.T if self.fan_in_fan_out else delta  # DoRA is refused on Conv1D, so it always sees (out, in)

    def factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapter's ``(A, B)``, A (r, in) and B (out, r), whatever the layer stores them in."""
        return self.lora_A[adapter].weight, self.lora_B[adapter].weight

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold the active adapter into the frozen weight: ``W0 <- W0 + scaling * B A`` (no cost at inference).

        A DoRA adapter folds in as ``W0 <- m / ||W0 + s B A||_c (W0 + s B A)`` (`merged_weight`); the norm is kept
        for `unmerge`, which cannot recompute it from the merged weight.

        Args:
            safe_merge: Compute the merged weight in a copy and refuse, leaving ``W0`` as it was, if it holds
                NaN or inf (PEFT's ``safe_merge``).
            adapter_names: PEFT's argument; only the active adapter (None or ``[active_adapter]``) can merge here.
        """
        if adapter_names not in (None, [self.active_adapter], (self.active_adapter,)):
            raise ValueError(f"Only the active adapter {self.active_adapter!r} can be merged; set_adapter first.")
        if self.merged:
            raise ValueError("This LoRALinear is already merged; call unmerge() first.")
        if self.active_adapter not in self.lora_A:
            return  # the active adapter does not target this layer: nothing to fold in
        weight = float_weight(self.base_layer)
        name = self.active_adapter
        with torch.no_grad():
            new = self.merged_weight(weight)
            if safe_merge and not torch.isfinite(new).all():
                raise ValueError(f"Merging adapter {name!r} would write NaN or inf into the base weight; the layer "
                                 "is unchanged.")
            if name in self.lora_magnitude_vector:
                self._dora_norms[name] = dora.weight_norm(weight, self._lora_delta(name).to(weight.dtype), 1)
            weight.copy_(new)
        self.merged_adapters.append(name)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The active adapter folded into ``weight`` (W0, (out, in)): ``W0 + scaling * B A``, or for DoRA
        ``m / ||W0 + s B A||_c * (W0 + s B A)`` (PEFT's merged weight); a new tensor in ``weight``'s dtype."""
        name = self.active_adapter
        delta = self._lora_delta(name).to(weight.dtype)
        if name not in self.lora_magnitude_vector:
            return weight + delta
        return dora.merged_weight(weight, delta, self.lora_magnitude_vector[name].weight)[0]

    def unmerge(self) -> None:
        """Take the update back out: ``W0 <- W0 - scaling * B A`` (exact up to rounding in W0's dtype).

        DoRA: ``W0 <- W' / (m / ||W0 + s B A||_c) - s B A`` with the norm `merge` kept, as PEFT unmerges.
        """
        if not self.merged:
            raise ValueError("This LoRALinear is not merged; call merge() first.")
        name = self.merged_adapters[-1]
        weight = float_weight(self.base_layer)
        with torch.no_grad():
            delta = self._lora_delta(name).to(weight.dtype)
            if name in self.lora_magnitude_vector:
                magnitude = self.lora_magnitude_vector[name].weight
                weight.copy_(dora.unmerged_weight(weight, delta, magnitude, self._dora_norms.pop(name)))
            else:
                weight.sub_(delta)
        self.merged_adapters.pop()

    def extra_repr(self) -> str:
        name = self.active_adapter
        return (f"adapters={list(self.lora_A)}, active={name!r}, r={self.r[name]}, "
                f"lora_alpha={self.lora_alpha[name]}, scaling={self.scaling[name]:g}, merged={self.merged}"
                + (", use_dora=True" if name in self.lora_magnitude_vector else ""))

    def _name(self, adapter: str | None) -> str:
        name = self.active_adapter if adapter is None else adapter
        if name not in self.lora_A:
            raise ValueError(f"This layer has no adapter named {name!r}; it has {list(self.lora_A)}.")
        return name


class LoRALayer(LoRALinear):
    """The blog post's ``LoRALayer(original_layer, rank)``, as a correct `LoRALinear`.

    The post's version has no ``alpha / r`` scaling, which is ``lora_alpha = r`` here (scaling 1). Unlike the
    post, ``A`` is stored as ``lora_A["default"].weight`` (r, in) and ``B`` as ``lora_B["default"].weight``
    (out, r), PEFT's layout.

    Args:
        original_layer: The linear layer to adapt (frozen in place).
        rank: The LoRA rank ``r``.
        alpha: ``lora_alpha``; ``None`` means ``alpha = rank``.
    """

    def __init__(self, original_layer: nn.Module, rank: int, alpha: float | None = None):
        super().__init__(original_layer, r=rank, lora_alpha=rank if alpha is None else alpha)

    @property
    def original_layer(self) -> nn.Module:
        """The post's name for ``base_layer``."""
        return self.base_layer

    @property
    def rank(self) -> int:
        """The post's name for the active adapter's ``r``."""
        return self.r[self.active_adapter]


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


# ------------------------- checks and helpers (inject.py, lora_embedding.py and the tests use the public ones)


def lora_scaling(lora_alpha: float, r: int, use_rslora: bool) -> float:
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def check_rank(r, in_features: int | None = None, out_features: int | None = None, where: str = "") -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"r must be a positive int, got {r!r}.")
    if in_features is not None and r > min(in_features, out_features):
        raise ValueError(f"r={r} is larger than min(in_features, out_features) = min({in_features}, "
                         f"{out_features}){where}; a rank above that adds parameters but no expressiveness.")


def check_adapter_name(name) -> None:
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ValueError(f"An adapter name is a non-empty string of letters, digits, '_' and '-' (it becomes a "
                         f"module and folder name), got {name!r}.")


def check_alpha(alpha) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < math.inf:
        raise ValueError(f"lora_alpha must be a positive, finite number (e.g. 16, or 2 * r), got {alpha!r}.")


def check_flag(value, name: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}; a string such as 'false' would count as on.")


def check_dropout(p) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
        raise ValueError(f"lora_dropout must be a number in [0, 1), got {p!r}.")


def is_linear_like(module) -> bool:
    if isinstance(module, LoRALinear):
        return False
    if isinstance(module, nn.Linear) or is_conv1d(module):
        return True
    dims = (getattr(module, "in_features", None), getattr(module, "out_features", None))
    return isinstance(module, nn.Module) and all(isinstance(d, int) and d > 0 for d in dims)


def is_conv1d(module) -> bool:
    """True for transformers' ``Conv1D`` (GPT-2's linear, weight (in, out)), without importing transformers."""
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    return pytorch_utils is not None and isinstance(module, pytorch_utils.Conv1D)


def linear_dims(module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear-like module; a ``Conv1D`` has them as its weight's shape."""
    if is_conv1d(module):
        return tuple(module.weight.shape)
    return module.in_features, module.out_features


def _check_base(base) -> None:
    if isinstance(base, LoRALinear):
        raise ValueError("This layer is already a LoRALinear; wrap its base_layer instead, or unload it first.")
    if not is_linear_like(base):
        raise TypeError(f"LoRA wraps an nn.Linear-like module (with in_features/out_features), got "
                        f"{type(base).__name__}.")


def float_weight(base: nn.Module) -> torch.Tensor:
    weight = getattr(base, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError(f"Cannot merge into a {type(base).__name__}: its weight is not a floating-point tensor "
                        "(a quantized layer has its own merge path).")
    return weight


def adapter_dtype(base: nn.Module) -> torch.dtype:
    """The base weight's dtype; for a packed (quantized) weight, the layer's ``compute_dtype`` or fp32."""
    weight = getattr(base, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return weight.dtype
    compute_dtype = getattr(base, "compute_dtype", None)
    return compute_dtype if isinstance(compute_dtype, torch.dtype) else torch.float32


def layer_device(base: nn.Module) -> torch.device:
    for tensor in list(base.parameters()) + list(base.buffers()):
        return tensor.device
    return torch.device("cpu")


