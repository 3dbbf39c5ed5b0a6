"""4-bit blockwise quantization: NF4, FP4 and int4 (QLoRA, Dettmers et al. 2023, arXiv 2305.14314, §3).

A weight is flattened and cut into blocks of ``blocksize`` values. Each block is divided by its absolute
maximum, so it lies in [-1, 1]; each value is replaced by the index of the nearest of 16 code values; two
4-bit indices are packed into one byte. Dequantization is the lookup ``code[index] * absmax``.

Double quantization (§3) stores the per-block absmax values themselves in 8 bits: subtract their mean, then
quantize them in blocks of 256 with bitsandbytes' signed 8-bit dynamic map. That takes the cost of the
constants from 32/64 = 0.5 to 8/64 + 32/(64*256) = 0.127 bits per weight.

Every byte matches ``bitsandbytes.functional.quantize_4bit`` and every dequantized value matches
``dequantize_4bit`` (tests/test_nf4.py checks both), so the names here are bitsandbytes': ``blocksize``,
``absmax``, ``offset``, ``nested_absmax``, ``code``.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from functools import lru_cache

import torch

from . import nf4_fast

NF4_OFFSET = 0.9677083  # bitsandbytes' create_normal_map default; ~ ((1 - 1/32) + (1 - 1/30)) / 2
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes.functional.quantize_4bit accepts
NESTED_BLOCKSIZE = 256  # blocksize of the second (8-bit) quantization, as in the paper and bitsandbytes
QUANT_TYPES = ("nf4", "fp4", "int4")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FAST_MIN_NUMEL = 2**20  # from this size on, `fast=None` uses the compiled kernels (compiling costs seconds once)


# ------------------------------------------------------------------------------------------- codebooks


def nf4_codebook(offset: float = NF4_OFFSET) -> torch.Tensor:
    """The 16 NormalFloat-4 values: quantiles of N(0, 1) scaled to [-1, 1] (QLoRA §3, Eq. 4).

    The paper's recipe, as bitsandbytes' ``create_normal_map`` runs it: 8 equally spaced probabilities from
    ``offset`` down to 0.5 give 8 positive quantiles, 7 give 7 negative ones, zero is added once, and all are
    divided by the largest. The result is asymmetric: 7 negative values, an exact zero, 8 positive values.
    ``offset`` < 1 keeps the outermost quantile finite (Eq. 4 read literally has Q(0) = -inf).

    Args:
        offset: Probability of the outermost quantile, in (0.5, 1); ``norm.ppf(0.9677083)`` = 1.848 sigma.

    Returns:
        (16,) float32, sorted; equal to bitsandbytes' NF4 table for the default offset.
    """
    if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not 0.5 < offset < 1:
        raise ValueError(f"offset must be a probability in (0.5, 1), got {offset!r}.")
    # float32 probabilities, float64 inverse CDF, float32 division: bitsandbytes' exact arithmetic.
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double()).float()  # 8 values
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double()).float()  # 7 values
    values = torch.cat([negative, torch.zeros(1), positive]).sort().values
    return values / values.max()


def fp4_codebook() -> torch.Tensor:
    """bitsandbytes' FP4 values in code order (16,): bit 3 is the sign, bits 2-1 the exponent, bit 0 the mantissa.

    The exponent field counts *down* (field 1 is the largest binade) and field 0 is subnormal:
    ``|v| = (1 + m/2) * 2**(4 - e)`` for ``e > 0``, ``m / 16`` for ``e = 0``; then everything is divided by 12.
    """
    raw = []
    for bits in range(16):
        exponent, mantissa = (bits >> 1) & 0b11, bits & 1
        magnitude = (1 + mantissa / 2) * 2.0 ** (4 - exponent) if exponent else mantissa / 16
        raw.append(-magnitude if bits & 0b1000 else magnitude)
    raw = torch.tensor(raw)
    return raw / raw.abs().max()


def int4_codebook() -> torch.Tensor:
    """Symmetric absmax int4 in code order (16,): code ``c`` is the two's-complement integer ``k``, value ``k/7``.

    The scale is ``absmax / 7``, so ``k = -8`` (value -8/7) is never chosen: 15 levels are used.
    """
    return torch.tensor([(c - 16 if c >= 8 else c) / 7 for c in range(16)])


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map()``), used for double quantization. (256,)

    For exponent i = 0..6 the decade ``10**(i-6)`` gets ``2**i`` linearly spaced values in (0.1, 1), both
    signs; plus 0 and 1. Small magnitudes keep relative precision, like a float with a variable exponent.
    """
    values = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1)
        means = (edges[:-1] + edges[1:]) / 2.0
        decade = 10 ** (i - 6)
        values += (decade * means).tolist() + (-decade * means).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


@lru_cache(maxsize=None)
def _cached_code(quant_type: str) -> torch.Tensor:
    return {"nf4": nf4_codebook, "fp4": fp4_codebook, "int4": int4_codebook}[quant_type]()


def codebook(quant_type: str = "nf4") -> torch.Tensor:
    """The 16 values of ``quant_type`` ("nf4", "fp4" or "int4") in code order, float32."""
    _check_choice("quant_type", quant_type, QUANT_TYPES)
    return _cached_code(quant_type).clone()


# ------------------------------------------------------------------------------------- the state object


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """A 4-bit weight and what is needed to undo it (bitsandbytes' ``QuantState`` fields, plus the bytes).

    Attributes:
        packed: (ceil(n/2),) uint8; element ``2i`` in the high nibble, ``2i+1`` in the low one.
        absmax: (n_blocks,) float32 per-block scales, or their uint8 codes when double-quantized.
        shape, dtype: the original weight's shape and dtype (``dequantize()`` returns these).
        blocksize: values per block; a last partial block gets its own absmax.
        quant_type: "nf4", "fp4" or "int4"; ``code`` (16,) holds its values.
        offset: 0-d float32 mean of the absmax values (double quantization only).
        nested_absmax: (ceil(n_blocks/256),) float32 scales of the 8-bit absmax codes.
        nested_code: (256,) the 8-bit dynamic map the absmax codes index.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    code: torch.Tensor
    offset: torch.Tensor | None = None
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE

    def __post_init__(self):
        object.__setattr__(self, "shape", torch.Size(self.shape))
        _check_state(self)

    @property
    def nested(self) -> bool:
        """True when the absmax values are double-quantized."""
        return self.offset is not None

    @property
    def numel(self) -> int:
        """Logical number of weights (``packed.numel()`` is about half of it)."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes stored for this weight: codes + scales (+ mean and nested scales). Codebooks are shared constants."""
        tensors = [self.packed, self.absmax, self.offset, self.nested_absmax]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    @property
    def bits_per_param(self) -> float:
        """``8 * nbytes / numel``: 4.5 at blocksize 64, 4 + 8/64 + 32/(64*256) ~ 4.127 with double quantization."""
        return 8 * self.nbytes / self.numel

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as ``code[index] * absmax`` in ``dtype`` (default: the original dtype), original shape."""
        return dequantize(self, dtype)

    def block_absmax(self) -> torch.Tensor:
        """(n_blocks,) float32 scales actually used by dequantization (after undoing double quantization)."""
        if not self.nested:
            return self.absmax
        scales = _dequantize_8bit(self.absmax, self.nested_absmax, self.nested_code, self.nested_blocksize)
        return scales + self.offset

    def to(self, device) -> QuantizedWeight:
        """A copy with every tensor on ``device``."""
        moved = {f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        return dataclasses.replace(self, **moved)


# --------------------------------------------------------------------------------------- the functions


def quantize(w: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
             fast: bool | None = None) -> QuantizedWeight:
    """Blockwise 4-bit quantization, bit-exact with ``bitsandbytes.functional.quantize_4bit`` (nf4, fp4).

        absmax_b = max_{i in b} |w_i|,   index_i = argmin_j |w_i / absmax_b - code_j|   (QLoRA §2, Eq. 1)

    Args:
        w: float32/bfloat16/float16 tensor of any shape, finite, not empty.
        quant_type: "nf4" (the paper's type), "fp4" (bitsandbytes' other type) or "int4" (symmetric, absmax/7).
        blocksize: one of `BLOCKSIZES`; 64 in the paper.
        double_quant: also quantize the absmax values (bitsandbytes' ``compress_statistics``).
        fast: use the compiled kernel (`_fast_codes`) for the full blocks; ``None``: for >= `FAST_MIN_NUMEL` values.

    Returns:
        A `QuantizedWeight`.
    """
    _check_weight(w)
    _check_choice("quant_type", quant_type, QUANT_TYPES)
    _check_choice("blocksize", blocksize, BLOCKSIZES)
    code = _cached_code(quant_type).to(w.device, copy=True)  # each weight owns its codebook tensor
    if w.is_meta:  # `estimate`: shapes only, so no arithmetic
        return _meta_state(w, code, quant_type, blocksize, double_quant)
    use_fast = w.numel() >= FAST_MIN_NUMEL if fast is None else fast
    packed, absmax = (_fast_codes if use_fast else quantize_blocks)(w.reshape(-1), code, blocksize)
    fields = dict(packed=packed, shape=w.shape, dtype=w.dtype, blocksize=blocksize, quant_type=quant_type, code=code)
    if not double_quant:
        return QuantizedWeight(absmax=absmax, **fields)
    offset = absmax.mean()  # Note: the scales are positive; centring them uses the signed 8-bit map fully (§3)
    nested_code = dynamic_map().to(w.device)
    qabsmax, nested_absmax = _quantize_8bit(absmax - offset, nested_code, NESTED_BLOCKSIZE)
    return QuantizedWeight(absmax=qabsmax, offset=offset, nested_absmax=nested_absmax, nested_code=nested_code,
                           **fields)


def _meta_state(w: torch.Tensor, code: torch.Tensor, quant_type: str, blocksize: int,
                double_quant: bool) -> QuantizedWeight:
    """What `quantize` returns for a meta weight: the same shapes and dtypes, on the meta device, computed
    from the weight's shape alone (running the arithmetic on meta tensors costs ~10 ms a weight)."""
    n = w.numel()
    n_blocks = -(-n // blocksize)
    fields = dict(packed=torch.empty(-(-n // 2), dtype=torch.uint8, device="meta"), shape=w.shape, dtype=w.dtype,
                  blocksize=blocksize, quant_type=quant_type, code=code)
    if not double_quant:
        return QuantizedWeight(absmax=torch.empty(n_blocks, device="meta"), **fields)
    return QuantizedWeight(absmax=torch.empty(n_blocks, dtype=torch.uint8, device="meta"),
                           offset=torch.empty((), device="meta"),
                           nested_absmax=torch.empty(-(-n_blocks // NESTED_BLOCKSIZE), device="meta"),
                           nested_code=dynamic_map().to("meta"), **fields)


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> QuantizedWeight:
    """`quantize` with ``quant_type="nf4"``: ``bnb.functional.quantize_4bit(w, blocksize, quant_type="nf4")``."""
    return quantize(w, "nf4", blocksize, double_quant)


def quantize_fp4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> QuantizedWeight:
    """`quantize` with ``quant_type="fp4"`` (bitsandbytes' ``Linear4bit`` default type)."""
    return quantize(w, "fp4", blocksize, double_quant)


def quantize_int4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> QuantizedWeight:
    """`quantize` with ``quant_type="int4"``: round ``7 w / absmax`` to an integer in [-7, 7]."""
    return quantize(w, "int4", blocksize, double_quant)


def dequantize(q: QuantizedWeight, dtype: torch.dtype | None = None, fast: bool | None = None,
               check: bool = True, out: torch.Tensor | None = None) -> torch.Tensor:
    """``code[index] * absmax`` computed in float32, cast to ``dtype`` (default ``q.dtype``), shape ``q.shape``.

    Equals ``bitsandbytes.functional.dequantize_4bit`` for the same bytes and scales. Three paths give the
    same bits: ``fast=False`` the readable one (`dequantize_blocks`); ``fast=True`` the compiled kernel;
    ``fast=None`` the compiled kernel from `FAST_MIN_NUMEL` values on, else the eager byte-table lookup
    (`nf4_fast.table_dequantize`), which needs no compiling.

    ``check`` first verifies that the codebook and scales are finite (and plain absmax values not negative), so
    a tampered state raises instead of spreading NaN over its blocks. It reads one value per block; the
    QLoRA forward pass skips it (its layer's state came from `quantize` or a checked file).

    ``out`` (bitsandbytes' name): a contiguous tensor of shape ``q.shape`` on the state's device to write the
    result into, e.g. one buffer reused for every call. A fresh output of a large weight costs more than the
    arithmetic: the operating system maps and zeroes each new page on its first write. ``dtype`` defaults to
    ``out.dtype``. Returns ``out``.
    """
    if not isinstance(q, QuantizedWeight):
        raise TypeError(f"dequantize expects a QuantizedWeight (from quantize_nf4), got {type(q).__name__}.")
    if out is not None and not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}.")
    dtype = (q.dtype if out is None else out.dtype) if dtype is None else dtype
    _check_choice("dtype", dtype, FLOAT_DTYPES)
    if out is not None:
        _check_out(out, q, dtype)
    if check:
        _check_values(q)
    if q.packed.is_meta:  # `estimate`: shapes only
        return _written(torch.empty(q.shape, dtype=dtype, device="meta"), out)
    if fast is False or q.code.dtype != torch.float32:
        flat = dequantize_blocks(q.packed, q.block_absmax(), q.code, q.blocksize, q.numel)
        return _written(flat.to(dtype).reshape(q.shape), out)
    if fast or q.numel >= FAST_MIN_NUMEL:
        target = torch.empty(q.shape, dtype=dtype, device=q.packed.device) if out is None else out
        _fast_dequantize(q, target.view(-1))
        return target
    return _written(nf4_fast.table_dequantize(q, dtype).view(q.shape), out)


def _written(result: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    return result if out is None else out.copy_(result)


dequantize_nf4 = dequantize  # bitsandbytes' name for the NF4 case; the state already says which type


# ------------------------------------------------------------------ the readable path, step by step


def quantize_blocks(flat: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) weights -> ((ceil(n/2),) uint8 packed codes, (n_blocks,) float32 absmax). Readable reference."""
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].float().reshape(-1, blocksize)  # (n_full_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = [(blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).reshape(-1)]
    if full < n:  # the last partial block has its own absmax; bitsandbytes divides here instead of multiplying
        tail = flat[full:].float()
        tail_absmax = tail.abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax[None]])
        scaled.append(tail / tail_absmax)
    if n % 2:  # an odd count is padded with the *value* 0 (code 7 in NF4), as bitsandbytes does
        scaled.append(torch.zeros(1, device=flat.device))
    indices = nearest_code(torch.cat(scaled).clamp(-1, 1), code)
    return pack_4bit(indices), absmax


def nearest_code(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code value for each entry of ``scaled`` (in [-1, 1]); ties go to the lower value.

    The decision thresholds are the midpoints between neighbouring sorted code values (the constants in
    bitsandbytes' CUDA ``dQuantizeNF4`` tree). ``bucketize`` counts the thresholds strictly below each value.
    """
    order = torch.argsort(code)  # FP4 and int4 are stored in bit order, not value order
    sorted_code = code[order]
    thresholds = (sorted_code[:-1] + sorted_code[1:]) / 2  # (15,)
    return order[torch.bucketize(scaled, thresholds)].to(torch.uint8)


def pack_4bit(indices: torch.Tensor) -> torch.Tensor:
    """(n,) codes in 0..15, n even -> (n/2,) uint8 bytes ``(first << 4) | second`` (bitsandbytes' nibble order)."""
    assert indices.numel() % 2 == 0, "pad the values to an even count before choosing codes"
    pairs = indices.to(torch.uint8).reshape(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `pack_4bit`: (ceil(n/2),) uint8 -> (n,) int64 codes (high nibble first)."""
    return torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)[:n].long()


def dequantize_blocks(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                      n: int) -> torch.Tensor:
    """Packed codes and float32 absmax -> (n,) float32 values ``code[index] * absmax[block]``. Readable reference."""
    values = code[unpack_4bit(packed, n)]  # (n,) in [-1, 1]
    scale = absmax.float().repeat_interleave(blocksize)[:n]
    return values * scale


# ------------------------------------------------------------------------- double quantization (8 bit)


def _quantize_8bit(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantization of (n,) float32 ``x`` with a sorted (256,) ``code`` -> (codes, absmax).

    # Note: how the 8-bit absmax codes are rounded
    bitsandbytes' CUDA kernel picks the nearest code. Its CPU kernel first maps the scaled value to one of
    65,536 equal bins over [-1, 1] and looks the bin up in a precomputed table, which can pick a neighbour
    for values within ~1.5e-5 of a midpoint. To keep the bytes equal on each device, we follow the CPU
    table on CPU and the exact midpoints elsewhere.
    """
    n = x.numel()
    padded = torch.cat([x, x.new_zeros(-n % blocksize)]).reshape(-1, blocksize)  # zeros leave absmax alone
    absmax = padded.abs().amax(dim=1)
    scaled = (padded * (1.0 / absmax)[:, None]).nan_to_num(0.0).clamp(-1, 1).reshape(-1)[:n]  # 0/0 -> 0
    if x.device.type != "cpu":
        return nearest_code(scaled, code), absmax
    bins = 65536
    centres = -1.0 + (2.0 * torch.arange(bins, dtype=torch.float32, device=x.device)) / (bins - 1)
    table = torch.searchsorted((code[:-1] + code[1:]) * 0.5, centres)  # midpoints strictly below each centre
    indices = table[((scaled + 1.0) * 0.5 * (bins - 1) + 0.5).long()].to(torch.uint8)
    return indices.masked_fill((absmax == 0).repeat_interleave(blocksize)[:n], 0), absmax


def _dequantize_8bit(indices: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int) -> torch.Tensor:
    """``code[index] * absmax[block]`` in float32, (n,)."""
    return code[indices.long()] * absmax.repeat_interleave(blocksize)[: indices.numel()]


# ------------------------------------------------------------------ the fast paths (see nf4_fast)


def _fast_codes(flat: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    full = flat.numel() - flat.numel() % blocksize
    if full == 0:
        return quantize_blocks(flat, code, blocksize)
    packed, absmax = nf4_fast.compiled("codes")(flat[:full].reshape(-1, blocksize), *nf4_fast.bin_tables(code))
    if full == flat.numel():
        return packed, absmax
    tail_packed, tail_absmax = quantize_blocks(flat[full:], code, blocksize)
    return torch.cat([packed, tail_packed]), torch.cat([absmax, tail_absmax])


def _fast_dequantize(q: QuantizedWeight, target: torch.Tensor) -> None:
    """Writes the weight into ``target`` (n,): the compiled kernels on the full blocks, the readable path on a
    last partial block."""
    n, blocksize, dtype = q.numel, q.blocksize, target.dtype
    full = n - n % blocksize
    absmax = nf4_fast.block_scales(q)
    m = full // blocksize
    if m:
        blocks = q.packed[: full // 2].reshape(m, blocksize // 2)
        # a word holds two elements: the output must start at an even element to be viewed as words
        words = nf4_fast.WORD_KERNELS.get(dtype) if sys.byteorder == "little" and target.storage_offset() % 2 == 0 \
            else None
        if words is None:  # float16, an odd start (an `out` slice) or a big-endian machine: one element at a time
            shifts = torch.tensor([4, 0], dtype=torch.int32, device=blocks.device).repeat(blocksize // 2)
            target[:full].copy_(nf4_fast.compiled("dequantize")(blocks, q.code, absmax[:m], dtype, shifts).view(-1))
        else:  # one word holds a byte's two values (see nf4_fast.bf16_words)
            name, word_dtype = words
            constants = torch.tensor(nf4_fast.WORD_CONSTANTS, dtype=torch.int32, device=blocks.device)
            head = target[:full].view(word_dtype).view(m, blocksize // 2)
            nf4_fast.compiled(name + "_into")(head, blocks, q.code, absmax[:m], constants)
    if full < n:
        target[full:].copy_(dequantize_blocks(q.packed[full // 2:], absmax[m:], q.code, blocksize, n - full))


# --------------------------------------------------------------------------------------------- checks


def _check_choice(name: str, value, choices) -> None:
    if type(value) is not type(choices[0]) or value not in choices:  # also refuses 64.0 and True
        raise ValueError(f"{name} must be one of {choices}, got {value!r}.")


def _check_out(out: torch.Tensor, q: QuantizedWeight, dtype: torch.dtype) -> None:
    if (tuple(out.shape) != tuple(q.shape) or out.dtype != dtype or out.device != q.packed.device
            or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {tuple(q.shape)} on "
                         f"{q.packed.device}, got a{'' if out.is_contiguous() else ' non-contiguous'} {out.dtype} "
                         f"tensor of shape {tuple(out.shape)} on {out.device}.")
    if out.requires_grad:
        raise ValueError("out requires grad; dequantize into a plain buffer (e.g. torch.empty(q.shape)).")


def _check_weight(w) -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"Expected a torch.Tensor weight, got {type(w).__name__}.")
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"Weights must be float32, bfloat16 or float16, got {w.dtype}; convert with w.float().")
    if w.numel() == 0:
        raise ValueError(f"Cannot quantize an empty tensor (shape {tuple(w.shape)}).")
    if not w.is_meta and not torch.isfinite(w).all():  # meta (`estimate`): shapes only, no values to check
        raise ValueError("The weight contains NaN or Inf; absmax scaling would spread it over its whole block. "
                         "Find where the non-finite values come from (e.g. torch.isfinite(w).all()) first.")


def _check_state(q: QuantizedWeight) -> None:
    _check_choice("quant_type", q.quant_type, QUANT_TYPES)
    _check_choice("blocksize", q.blocksize, BLOCKSIZES)
    _check_choice("dtype", q.dtype, FLOAT_DTYPES)
    if isinstance(q.nested_blocksize, bool) or not isinstance(q.nested_blocksize, int) or q.nested_blocksize < 1:
        raise ValueError(f"nested_blocksize must be a positive int ({NESTED_BLOCKSIZE} as bitsandbytes uses), got "
                         f"{q.nested_blocksize!r}.")
    floats = {"code": q.code, "offset": q.offset, "nested_code": q.nested_code}
    for name, t in floats.items():
        if t is not None and (not isinstance(t, torch.Tensor) or not t.is_floating_point()):
            got = getattr(t, "dtype", type(t).__name__)
            raise ValueError(f"{name} must be a floating-point tensor, got {got}; the state is damaged. Quantize "
                             "the weight again.")
    n = math.prod(q.shape)
    n_blocks = -(-n // q.blocksize)
    if n == 0 or q.packed.dtype != torch.uint8 or q.packed.shape != (-(-n // 2),):
        raise ValueError(f"packed must be a 1-D uint8 tensor of ceil(n/2) = {-(-n // 2)} bytes for shape "
                         f"{tuple(q.shape)}, got {q.packed.dtype} {tuple(q.packed.shape)}.")
    if q.absmax.shape != (n_blocks,) or q.code.shape != (16,):
        raise ValueError(f"absmax must hold one scale per block ({n_blocks} for blocksize {q.blocksize}), got "
                         f"{tuple(q.absmax.shape)}; code must hold 16 values, got {tuple(q.code.shape)}.")
    if q.offset is None:
        if q.absmax.dtype != torch.float32 or q.nested_absmax is not None or q.nested_code is not None:
            raise ValueError("Without double quantization absmax is float32 and nested_* are None.")
    elif (q.absmax.dtype != torch.uint8 or q.nested_absmax is None or q.nested_code is None
          or q.nested_absmax.shape != (-(-n_blocks // q.nested_blocksize),) or q.nested_code.shape != (256,)):
        raise ValueError("With double quantization absmax holds uint8 codes, nested_absmax one float32 scale per "
                         f"{q.nested_blocksize} blocks and nested_code the 256-value 8-bit map.")


def _check_values(q: QuantizedWeight) -> None:
    """The codebooks and scales are finite, and plain absmax values are not negative (values, not shapes)."""
    if q.packed.is_meta:
        return
    scales = {"code": q.code, "offset": q.offset, "nested_absmax": q.nested_absmax, "nested_code": q.nested_code,
              "absmax": None if q.nested else q.absmax}
    for name, t in scales.items():
        if t is not None and not torch.isfinite(t).all():
            raise ValueError(f"The quantized state's {name} holds NaN or inf, so every weight of its blocks "
                             "would too; the state is damaged. Quantize the original weight again.")
    if not q.nested and (q.absmax < 0).any():
        raise ValueError("The quantized state's absmax holds negative scales (an absolute maximum is >= 0); the state "
                         "is damaged. Quantize the original weight again.")
