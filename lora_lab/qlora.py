"""QLoRA: LoRA on top of a frozen 4-bit NF4 base (Dettmers et al. 2023, arXiv 2305.14314, §3, Eq. 5).

    Y = X · doubleDequant(c1, c2, W_NF4)^T + s · X L1 L2

The base weight is stored only as NF4 (one storage type) and dequantized to ``compute_dtype`` for each
matmul (one compute type); the adapters ``lora_A``/``lora_B`` train in higher precision. "Wrap, don't
subclass": `NF4Linear` is the frozen 4-bit layer and `QLoRALinear` is `LoRALinear` wrapped around it.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ._io import DTYPE_CODES, check_finite, read_header, read_safetensors
from .inject import check_mergeable, forget_adapters, lora_layers, lora_targets, mark_trainable, output_head_names, \
    set_submodule, unload
from . import lora_init
from .lora import DEFAULT_ADAPTER, LoraConfig, LoRALinear, check_adapter_name
from .lora_init import changes_base
from .nf4 import FAST_MIN_NUMEL, FLOAT_DTYPES, QuantizedWeight, dequantize, quantize

BACKENDS = ("torch", "bitsandbytes")
_STATE_TENSORS = ("absmax", "code", "offset", "nested_absmax", "nested_code")


class _DequantizeMatmul(torch.autograd.Function):
    """``x @ dequantize(W)^T`` whose backward recomputes ``dequantize(W)``.

    # Note: why the dequantized weight is not saved for backward
    Autograd would keep ``W`` (out, in) in ``compute_dtype`` alive from forward to backward for every layer,
    i.e. 16-bit weights for the whole model: the memory QLoRA set out to save. The input gradient
    ``dL/dx = dL/dy · W`` needs ``W`` again, so backward dequantizes a second time (cheap next to the matmul).
    ``W`` is frozen, so no ``dL/dW`` is ever formed.
    """

    @staticmethod
    def forward(ctx, x, q: QuantizedWeight):
        ctx.q = q
        return x @ _dequantized(q, x.dtype).T  # (..., in) @ (in, out)

    @staticmethod
    def backward(ctx, grad_out):
        return grad_out @ _dequantized(ctx.q, grad_out.dtype), None  # (..., out) @ (out, in)


_scratch = threading.local()  # per thread: {(shape, dtype): one reused buffer}


def _dequantized(q: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """``dequantize(q, dtype)`` for one matmul; a large weight on CPU goes into a buffer reused by every call.

    # Note: the reused buffer on CPU
    A fresh tensor of a large weight (>= `nf4.FAST_MIN_NUMEL` values, e.g. 4096 x 4096) is memory the operating
    system maps and zeroes page by page on its first write: on CPU that costs more than the dequantization
    itself, twice per layer and step. So such weights are written into one buffer per shape and dtype (held
    for the thread's lifetime: one layer's 16-bit weight per distinct shape, not one per layer). Each use ends
    with its matmul, before the next layer writes the buffer. Smaller weights and GPUs gain nothing from it:
    the allocator already hands back memory it has used before.
    """
    if q.packed.device.type != "cpu" or q.numel < FAST_MIN_NUMEL:
        return dequantize(q, dtype, check=False)
    if not hasattr(_scratch, "buffers"):
        _scratch.buffers = {}
    buffers = _scratch.buffers
    key = (tuple(q.shape), dtype)
    if key not in buffers:
        buffers[key] = torch.empty(q.shape, dtype=dtype)
    return dequantize(q, dtype, check=False, out=buffers[key])


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight lives only as 4-bit codes (like ``bnb.nn.Linear4bit``).

    ``forward(x) = x @ dequantize(W)^T + bias`` in ``compute_dtype``; the output has ``x``'s dtype.
    The codes and scales are buffers (``weight`` holds the packed bytes), so ``state_dict`` saves them and
    no optimizer sees them.

    Args:
        in_features, out_features: the logical shape of ``W`` is (out_features, in_features).
        bias: an optional (out_features,) tensor, kept as a frozen Parameter in ``compute_dtype``.
        quant_state: the `QuantizedWeight` of ``W``.
        compute_dtype: matmul dtype; default bfloat16 on GPU, float32 on CPU.
        backend: "torch" (readable, `lora_lab.nf4`) or "bitsandbytes" (``bnb.matmul_4bit``), same numbers.
    """

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None, quant_state: QuantizedWeight,
                 compute_dtype: torch.dtype | None = None, backend: str = "torch"):
        super().__init__()
        _check_compute_dtype(compute_dtype)
        if not isinstance(quant_state, QuantizedWeight) or tuple(quant_state.shape) != (out_features, in_features):
            raise ValueError(f"quant_state must be a QuantizedWeight of shape ({out_features}, {in_features}).")
        if backend not in BACKENDS or (backend == "bitsandbytes" and quant_state.quant_type == "int4"):
            raise ValueError(f"backend must be one of {BACKENDS} (bitsandbytes has no int4 kernel), got {backend!r}.")
        if backend == "bitsandbytes" and in_features % 2 == 0 and in_features % quant_state.blocksize:
            # bitsandbytes' CPU dequantize kernel reads the scale of element (row, col) at
            # row * (cols // blocksize) + col // blocksize, which is only right when rows are whole blocks.
            raise ValueError(f"backend='bitsandbytes' needs in_features ({in_features}) to be a multiple of "
                             f"blocksize ({quant_state.blocksize}); use backend='torch' or another blocksize.")
        self.in_features, self.out_features, self.backend = in_features, out_features, backend
        device = quant_state.packed.device
        self.compute_dtype = compute_dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        self.weight_dtype, self.blocksize = quant_state.dtype, quant_state.blocksize
        self.quant_type = quant_state.quant_type
        self.register_buffer("weight", quant_state.packed)
        for name in _STATE_TENSORS:
            self.register_buffer(name, getattr(quant_state, name))
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(self.compute_dtype), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True, quant_type: str = "nf4",
                    compute_dtype: torch.dtype | None = None, backend: str = "torch") -> NF4Linear:
        """Quantize an ``nn.Linear``'s weight; the result no longer refers to the original weight."""
        _check_compute_dtype(compute_dtype)
        with torch.no_grad():
            q = quantize(linear.weight.detach(), quant_type, blocksize, double_quant)
        return cls(linear.in_features, linear.out_features, linear.bias, q, compute_dtype, backend)

    @property
    def quant_state(self) -> QuantizedWeight:
        """The `QuantizedWeight` built from this layer's buffers (they are shared, not copied)."""
        tensors = {name: getattr(self, name) for name in _STATE_TENSORS}
        return QuantizedWeight(packed=self.weight, shape=(self.out_features, self.in_features),
                               dtype=self.weight_dtype, blocksize=self.blocksize, quant_type=self.quant_type,
                               **tensors)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``W`` (out, in) dequantized, in ``dtype`` (default: the original weight's dtype)."""
        return self.quant_state.dequantize(dtype)

    def logical_numel(self) -> int:
        """Weights this layer stands for: ``out * in`` (+ bias), not the packed byte count (PEFT #1020)."""
        return self.out_features * self.in_features + (0 if self.bias is None else self.bias.numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out)."""
        x_c = x.to(self.compute_dtype)
        if self.backend == "torch":
            out = _DequantizeMatmul.apply(x_c, self.quant_state)
        else:
            import bitsandbytes as bnb
            out = bnb.matmul_4bit(x_c, self.weight.reshape(-1, 1).t(), quant_state=_bnb_state(self.quant_state))
        if self.bias is not None:
            out = out + self.bias
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        q = self.quant_state
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self.quant_type}, blocksize={self.blocksize}, double_quant={q.nested}, "
                f"compute_dtype={self.compute_dtype}, backend={self.backend!r}")


class QLoRALinear(LoRALinear):
    """`LoRALinear` around an `NF4Linear`: ``h = dequant(W_NF4) x + scaling · B A dropout(x)`` (QLoRA Eq. 5).

    Args:
        base_layer: an ``nn.Linear`` (quantized here) or an `NF4Linear`.
        r, lora_alpha, lora_dropout, use_rslora, use_dora: as in `LoRALinear` (DoRA's norm reads the dequantized
            ``W0``).
        blocksize, double_quant, quant_type, compute_dtype, backend: as in `NF4Linear.from_linear`.
    """

    def __init__(self, base_layer: nn.Module, r: int = LoraConfig.r, lora_alpha: float = LoraConfig.lora_alpha,
                 lora_dropout: float = 0.0, use_rslora: bool = False, *, blocksize: int = 64, double_quant: bool = True,
                 quant_type: str = "nf4", compute_dtype: torch.dtype | None = None, backend: str = "torch",
                 adapter_name: str = DEFAULT_ADAPTER, use_dora: bool = False, init_lora_weights: bool | str = True):
        if changes_base(init_lora_weights):
            raise ValueError(f"init_lora_weights={init_lora_weights!r} decomposes the full-precision weight, which a "
                             "4-bit layer no longer has; use apply_qlora(model, config), which decomposes before "
                             "quantizing.")
        if isinstance(base_layer, nn.Linear):
            base_layer = NF4Linear.from_linear(base_layer, blocksize, double_quant, quant_type, compute_dtype, backend)
        if not isinstance(base_layer, NF4Linear):
            raise TypeError(f"QLoRALinear wraps an nn.Linear or an NF4Linear, got {type(base_layer).__name__}.")
        super().__init__(base_layer, r, lora_alpha, lora_dropout, use_rslora, adapter_name, use_dora,
                         init_lora_weights=init_lora_weights)


def apply_qlora(model: nn.Module, config: LoraConfig, *, blocksize: int = 64, double_quant: bool = True,
                compute_dtype: torch.dtype | None = None, backend: str = "torch", quant_type: str = "nf4",
                adapter_name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Quantize every ``nn.Linear`` except the output head to 4 bits and put adapters on ``config``'s targets.

    Everything is checked (targets, weights finite, options) and every layer quantized before the model is
    touched, so a failure leaves it unchanged. Only ``lora_A``/``lora_B`` (and biases per ``config.bias``) train.

    Returns:
        The same model object.
    """
    check_adapter_name(adapter_name)
    if config.modules_to_save:
        raise ValueError("apply_qlora does not implement modules_to_save; train those modules with apply_lora, or "
                         "leave modules_to_save out.")
    targets = set(lora_targets(model, config))
    linears = [n for n, m in model.named_modules() if n and type(m) is nn.Linear]
    heads = output_head_names(model, linears)
    not_linear = sorted(t for t in targets if type(model.get_submodule(t)) is not nn.Linear or t in heads)
    if not_linear:
        raise TypeError(f"apply_qlora quantizes plain nn.Linear layers other than the output head; {not_linear} "
                        "are not. Narrow target_modules.")
    options = dict(blocksize=blocksize, double_quant=double_quant, quant_type=quant_type,
                   compute_dtype=compute_dtype, backend=backend)
    new = {}
    for name in linears:
        if name in heads:
            continue
        if name in targets and changes_base(config.init_lora_weights):
            new[name] = _decomposed_qlora_layer(model.get_submodule(name), config, adapter_name, options)
            continue
        nf4_layer = NF4Linear.from_linear(model.get_submodule(name), **options)
        new[name] = (QLoRALinear(nf4_layer, config.r, config.lora_alpha, config.lora_dropout, config.use_rslora,
                                 adapter_name=adapter_name, use_dora=config.use_dora,
                                 init_lora_weights=config.init_lora_weights)
                     if name in targets else nf4_layer)
    for name, module in new.items():
        set_submodule(model, name, module)
    mark_trainable(model, config.bias)
    model.peft_config, model.active_adapter = {adapter_name: config}, adapter_name
    return model


def _decomposed_qlora_layer(linear: nn.Linear, config: LoraConfig, adapter_name: str, options: dict) -> QLoRALinear:
    """PiSSA/OLoRA/LoftQ on the full-precision weight, then 4 bits for what the base keeps (`lora_lab.lora_init`).

    PiSSA and OLoRA quantize the residual ``W0 - s B A`` (QPiSSA, Meng et al. 2024 §4.3; PEFT refuses PiSSA on a
    4-bit model and runs OLoRA on the dequantized weight, since there the full-precision weight is gone); LoftQ
    alternates quantizing and fitting (`lora_init.loftq_init`) in the layer's own 4-bit format.
    """
    fmt = dict(blocksize=options["blocksize"], double_quant=options["double_quant"], quant_type=options["quant_type"])
    init, r, s = config.init_lora_weights, config.r, config.scaling
    if init == "loftq":
        A, B, q = lora_init.loftq_init(linear.weight, r, s, config.loftq_config["loftq_iter"], **fmt)
    else:
        A, B, residual = (lora_init.olora_init(linear.weight, r, s) if init == "olora" else
                          lora_init.pissa_init(linear.weight, r, s, lora_init.pissa_niter(init)))
        q = quantize(residual, fmt["quant_type"], fmt["blocksize"], fmt["double_quant"])
    base = NF4Linear(linear.in_features, linear.out_features, linear.bias, q, options["compute_dtype"],
                     options["backend"])
    layer = QLoRALinear(base, r, config.lora_alpha, config.lora_dropout, config.use_rslora, adapter_name=adapter_name)
    with torch.no_grad():
        layer.lora_A[adapter_name].weight.copy_(A)
        layer.lora_B[adapter_name].weight.copy_(B)
    return layer


@dataclass(frozen=True)
class RequantizationReport:
    """Per-layer effect of requantizing ``dequant(W) + ΔW`` to NF4 (PEFT #2321, unsloth-zoo #810).

    ``max_abs_error``/``mean_abs_error``: |requantized - merged| per weight; ``mean_abs_delta``: mean |ΔW|.
    When the error is as large as the delta, requantization has mostly erased the fine-tune.
    """

    max_abs_error: dict[str, float]
    mean_abs_error: dict[str, float]
    mean_abs_delta: dict[str, float]


def merge_and_unload(model: nn.Module, *, requantize: bool = False):
    """Fold each adapter into its base and remove the wrappers (PEFT's ``merge_and_unload``), LoRA or QLoRA.

    A LoRA model (full-precision bases): ``W0 <- W0 + scaling · B A`` in place, then `unload`; returns the model.
    A QLoRA model: ``W' = dequant(W_NF4) + scaling · B A``. With ``requantize=False`` every 4-bit layer becomes
    an ``nn.Linear`` in its original dtype; returns the model. With ``requantize=True`` the merged weights are
    quantized again (same settings) and ``(model, RequantizationReport)`` is returned; a LoRA model has nothing
    to requantize, so ``requantize=True`` is refused there. Every check (and every QLoRA merge) runs before the
    first layer changes, so a merge that would hold NaN or inf raises and leaves the model as it was.
    """
    all_layers = lora_layers(model)
    if not all_layers:
        raise ValueError("The model has no LoRA layers; call apply_lora or apply_qlora(model, config) first.")
    layers = {n: m for n, m in all_layers.items() if isinstance(m.base_layer, NF4Linear)}
    if not layers:
        if requantize:
            raise ValueError("requantize=True is for QLoRA models (4-bit bases); this model's LoRA layers have "
                             "full-precision bases. Call merge_and_unload(model) without it.")
        return _merge_lora_and_unload(model, all_layers)
    full = sorted(set(all_layers) - set(layers))
    if full:
        raise ValueError(f"The model mixes 4-bit LoRA layers with full-precision ones such as {full[0]!r}; "
                         "merge_and_unload merges one kind at a time: quantize all targets (apply_qlora) or none.")
    return _merge_quantized_and_unload(model, layers, requantize)


def _merge_quantized_and_unload(model: nn.Module, layers: dict[str, LoRALinear], requantize: bool):
    """Merge every layer (and requantize) into new modules first; only then swap them in."""
    errors = ({}, {}, {})
    new = {}
    with torch.no_grad():
        for name, layer in layers.items():
            base = layer.base_layer
            weight = base.dequantized_weight(torch.float32)
            on = layer.active_adapter in layer.lora_A  # a layer the active adapter skips keeps its W0
            delta = layer.get_delta_weight(dtype=torch.float32) if on else torch.zeros_like(weight)
            merged = (layer.merged_weight(weight) if on else weight).to(base.weight_dtype)  # W0 + dW, or DoRA's W'
            if not torch.isfinite(merged).all():
                raise ValueError(f"Merging QLoRA layer {name!r} gives NaN or inf (its adapter holds non-finite "
                                 f"values, or the update overflows {base.weight_dtype}); nothing was changed. "
                                 "Load a finite adapter first.")
            if requantize:
                q = quantize(merged, base.quant_type, base.blocksize, base.quant_state.nested)
                new[name] = NF4Linear(base.in_features, base.out_features, base.bias, q, base.compute_dtype,
                                      base.backend)
                error = (q.dequantize(torch.float32) - merged.float()).abs()
                for table, value in zip(errors, (error.max(), error.mean(), delta.abs().mean())):
                    table[name] = float(value)
            else:
                new[name] = _to_linear(base, merged)
        if not requantize:
            inside = tuple(f"{name}." for name in layers)
            for name, module in model.named_modules():
                if isinstance(module, NF4Linear) and not name.startswith(inside):
                    new[name] = _to_linear(module, module.dequantized_weight())
    for name, module in new.items():
        set_submodule(model, name, module)
    forget_adapters(model)
    return (model, RequantizationReport(*errors)) if requantize else model


def _merge_lora_and_unload(model: nn.Module, layers: dict[str, LoRALinear]) -> nn.Module:
    """Merge the layers not merged yet (all checks first), then remove every wrapper."""
    unmerged = {name: layer for name, layer in layers.items() if not layer.merged}
    check_mergeable(model, unmerged)
    for layer in unmerged.values():
        layer.merge()
    return unload(model)


def quantized_memory_report(model: nn.Module) -> dict[str, int]:
    """Bytes each module stores in its own parameters and buffers (packed 4-bit codes count as bytes).

    Returns:
        ``{module name: bytes}`` for every module that holds tensors, plus ``"total"``.
    """
    report = {}
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if own:
            report[name or "(root)"] = sum(t.numel() * t.element_size() for t in own)
    report["total"] = sum(report.values())
    return report


def save_quantized(model: nn.Module, path: str) -> None:
    """Save a (Q)LoRA-quantized model's state_dict with safetensors, plus each 4-bit layer's settings.

    A tensor the state_dict holds under several names (tied embeddings) is stored once; the metadata says which
    names share it, and `load_quantized` gives it to each of them.
    """
    from safetensors.torch import save_file
    state, tied, seen = {}, {}, {}
    for key, value in model.state_dict().items():
        where = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.stride())
        if where in seen:
            tied[key] = seen[where]
        else:
            seen[where] = key
            state[key] = value.detach().contiguous()
    save_file(state, str(path), metadata={"lora_lab.nf4_layers": json.dumps(_layer_settings(model)),
                                          "lora_lab.tied": json.dumps(tied)})


def load_quantized(model: nn.Module, path: str) -> nn.Module:
    """Load `save_quantized` output into a model of the same structure.

    Names, shapes, dtypes and 4-bit settings are checked from the file's header, then every floating-point
    tensor is checked to be finite, before the model changes.
    """
    file, fix = Path(path), "Save the model again with save_quantized."
    header, metadata = read_header(file, fix)
    try:
        settings = json.loads(metadata.get("lora_lab.nf4_layers", "{}"))
        tied = json.loads(metadata.get("lora_lab.tied", "{}"))
    except json.JSONDecodeError:
        raise ValueError(f"{file.name}'s lora_lab metadata is not valid JSON; the file is damaged. {fix}") from None
    if not isinstance(tied, dict) or not all(isinstance(v, str) and v in header for v in tied.values()):
        raise ValueError(f"{file.name}'s lora_lab.tied metadata names tensors the file lacks. {fix}")
    shapes = {k: (tuple(v["shape"]), v["dtype"]) for k, v in header.items()}
    shapes.update({k: shapes[v] for k, v in tied.items()})
    expected = model.state_dict()
    problems = sorted(set(shapes) ^ set(expected))
    problems += [f"{k}: saved {shapes[k][0]} {shapes[k][1]}, model {tuple(v.shape)} {v.dtype}" for k, v in
                 expected.items() if k in shapes and shapes[k] != (tuple(v.shape), DTYPE_CODES.get(v.dtype))]
    if settings != _layer_settings(model):
        problems.append("4-bit layer settings (blocksize, quant_type, dtype) differ")
    if problems:
        raise ValueError("The file does not fit this model (apply_qlora with the same config first): "
                         + "; ".join(map(str, problems[:10])))
    saved, _ = read_safetensors(file, fix)
    check_finite(saved, file.name, fix)
    model.load_state_dict({**saved, **{k: saved[v] for k, v in tied.items()}})
    return model


def _layer_settings(model: nn.Module) -> dict:
    return {n: [m.blocksize, m.quant_type, str(m.weight_dtype), m.in_features, m.out_features]
            for n, m in model.named_modules() if isinstance(m, NF4Linear)}


def _check_compute_dtype(compute_dtype) -> None:
    if compute_dtype is not None and (not isinstance(compute_dtype, torch.dtype) or compute_dtype not in FLOAT_DTYPES):
        raise TypeError(f"compute_dtype must be None or one of {FLOAT_DTYPES} (a torch.dtype such as "
                        f"torch.bfloat16, not a string), got {compute_dtype!r}.")


def _to_linear(layer: NF4Linear, weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                       device=weight.device, dtype=weight.dtype)
    linear.weight.data.copy_(weight)
    if layer.bias is not None:
        linear.bias.data.copy_(layer.bias)
    linear.requires_grad_(False)
    return linear


def _bnb_state(q: QuantizedWeight):
    """The same tensors as a ``bitsandbytes.functional.QuantState``."""
    from bitsandbytes.functional import QuantState
    nested = QuantState(absmax=q.nested_absmax, code=q.nested_code, blocksize=q.nested_blocksize,
                        dtype=torch.float32) if q.nested else None
    return QuantState(absmax=q.absmax, shape=q.shape, code=q.code, blocksize=q.blocksize, quant_type=q.quant_type,
                      dtype=q.dtype, offset=q.offset, state2=nested)
