"""The fast CPU paths behind `lora_lab.nf4.dequantize` and `quantize`: the same bits, fewer operations.

`lora_lab.nf4` holds the readable algorithm, step by step; this module holds what makes it quick enough to
run twice per layer and training step (`table_dequantize`, eager) or on large weights (`fused_codes`, and
`bf16_words` / `float32_words` / `fused_dequantize`, compiled with ``torch.compile``). Every function here
gives exactly the bits of the readable path (tests/test_nf4.py compares them, and both against bitsandbytes).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import TYPE_CHECKING

import torch
from torch.nn import functional as nn_functional

if TYPE_CHECKING:
    from .nf4 import QuantizedWeight


def fused_codes(blocks: torch.Tensor, bin_base: torch.Tensor, bin_threshold: torch.Tensor, order: torch.Tensor,
                bins_half: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Full blocks (m, blocksize) -> ((m*blocksize/2,) packed, (m,) absmax); same result as `nf4.quantize_blocks`.

    # Note: the binned nearest-code search
    ``bucketize`` is a binary search per value. Instead, ``bin = int(s * H + H)`` (monotone in ``s``) splits
    [-1, 1] into bins so narrow that each holds at most one threshold. Every threshold in a lower bin is
    below ``s``, so the index is ``bin_base[bin]`` (their count) plus one compare with the bin's own
    threshold. Ties still go down: ``s == threshold`` fails ``s > threshold``.
    """
    x = blocks.float()
    absmax = x.abs().amax(dim=1)
    scaled = (x * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1)
    bin_index = (scaled * bins_half + bins_half).long()
    sorted_index = bin_base[bin_index] + (scaled > bin_threshold[bin_index]).long()
    pairs = order[sorted_index].to(torch.uint8).reshape(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1], absmax


def fused_dequantize(packed: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype,
                     shifts: torch.Tensor) -> torch.Tensor:
    """(m, blocksize/2) packed bytes of full blocks, (m,) float32 absmax -> (m, blocksize) in ``dtype`` (fp32 products).

    Written for the compiler: every output element reads its byte, shifts out its nibble and picks its code
    value with `select_code`, with no table lookup, so the generated loop vectorizes (a lookup, even of the
    double-quantized scales, makes it a scalar loop: two to three times slower). ``shifts`` is (blocksize,)
    int32 ``4, 0, 4, 0, ...`` (high nibble first); as an input rather than a constant it keeps the loop vectorized.
    """
    index = (packed.int().repeat_interleave(2, dim=1) >> shifts) & 0x0F  # (m, blocksize) codes
    return (select_code(index, code) * absmax[:, None]).to(dtype)


def scaled_nibbles(packed: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor,
                   constants: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(m, blocksize/2) packed bytes, (m,) absmax -> the bit patterns (int32) of ``code[high] * absmax`` and
    ``code[low] * absmax`` for every byte: float32 products, as bitsandbytes computes them."""
    b, scale = packed.int(), absmax[:, None]
    first = (select_code(b >> constants[0], code) * scale).view(torch.int32)
    second = (select_code(b & constants[1], code) * scale).view(torch.int32)
    return first, second


def bf16_words(packed: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor, constants: torch.Tensor) -> torch.Tensor:
    """(m, blocksize/2) packed bytes of full blocks -> (m, blocksize/2) int32 words; viewed as bfloat16, the rows.

    # Note: one word per byte
    Spelling the output out element by element (`fused_dequantize`) makes element ``i`` read byte ``i // 2``:
    a strided load that the compiler performs one element at a time. Here the loop runs over the bytes
    instead, every load and store contiguous: each byte yields its two values, and the word holding both
    (the first in the low half: little-endian memory order) is its part of the output row.
    float32 -> bfloat16 rounds to nearest even on the bit pattern, ``(bits + 0x7FFF + ((bits >> 16) & 1)) >> 16``,
    which is torch's own rule for finite values (`quantize` only stores finite ones). ``constants`` is
    `WORD_CONSTANTS`: shift amounts read from a tensor, not written as literals, keep the loop vectorized.
    """
    first, second = scaled_nibbles(packed, code, absmax, constants)
    first = (first + constants[3] + ((first >> constants[2]) & constants[4])) >> constants[2]
    second = (second + constants[3] + ((second >> constants[2]) & constants[4])) & constants[5]
    return second | (first & 0xFFFF)


def float32_words(packed: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor,
                  constants: torch.Tensor) -> torch.Tensor:
    """As `bf16_words`, for float32: (m, blocksize/2) int64 words, each the two float32 values of one byte."""
    first, second = scaled_nibbles(packed, code, absmax, constants)
    return (second.long() << constants[6].long()) | (first.long() & 0xFFFFFFFF)


WORD_CONSTANTS = (4, 15, 16, 0x7FFF, 1, -65536, 32)
WORD_KERNELS = {torch.bfloat16: ("bf16_words", torch.int32), torch.float32: ("float32_words", torch.int64)}


def bf16_words_into(out: torch.Tensor, packed, code, absmax, constants) -> None:
    """`bf16_words` written straight into ``out`` (m, blocksize/2) int32: no new output, no page faults."""
    out.copy_(bf16_words(packed, code, absmax, constants))


def float32_words_into(out: torch.Tensor, packed, code, absmax, constants) -> None:
    """`float32_words` written straight into ``out`` (m, blocksize/2) int64."""
    out.copy_(float32_words(packed, code, absmax, constants))


def select_code(index: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """``code[index]`` as a tree of 15 ``where``s on the index's 4 bits (a compiled gather does not vectorize)."""
    level = [code[k] for k in range(16)]
    for bit in (1, 2, 4, 8):  # each round halves the candidates: pairs that differ in this bit
        chosen = (index & bit) != 0
        level = [torch.where(chosen, level[i + 1], level[i]) for i in range(0, len(level), 2)]
    return level[0]


@lru_cache(maxsize=None)
def compiled(name: str):
    function = {"codes": fused_codes, "dequantize": fused_dequantize, "bf16_words_into": bf16_words_into,
                "float32_words_into": float32_words_into}[name]
    try:
        return torch.compile(function)  # the block count becomes dynamic after a second shape; blocksize stays fixed
    except Exception:  # no compiler available: the same function, eagerly
        return function


def bin_tables(code: torch.Tensor, bins_half: float = 1024.0):
    order = torch.argsort(code)
    sorted_code = code[order]
    thresholds = (sorted_code[:-1] + sorted_code[1:]) / 2
    threshold_bins = (thresholds * bins_half + bins_half).long()
    inside = threshold_bins[threshold_bins >= 0]
    assert inside.unique().numel() == inside.numel(), "bins must hold one threshold at most"
    n_bins = int(2 * bins_half) + 1
    bin_base = torch.zeros(n_bins, dtype=torch.long, device=code.device)
    bin_threshold = torch.full((n_bins,), math.inf, device=code.device)
    for t, b in zip(thresholds, threshold_bins.tolist()):
        bin_base[max(b + 1, 0):] += 1  # int4's -15/14 lies below -1: every scaled value is above it
        if b < 0:
            continue
        bin_threshold[b] = t
    return bin_base, bin_threshold, order, bins_half


BYTE_CODES = torch.stack([torch.arange(256) >> 4, torch.arange(256) & 0x0F], dim=1).reshape(-1)  # (512,)


@lru_cache(maxsize=None)
def byte_codes_on(device: torch.device) -> torch.Tensor:
    return BYTE_CODES.to(device)


def byte_table(code: torch.Tensor) -> torch.Tensor:
    """(512,) float32: for every byte value b, ``code[b >> 4], code[b & 15]`` (the values of its two nibbles)."""
    return code.index_select(0, BYTE_CODES if code.is_cpu else byte_codes_on(code.device))


def block_scales(q: QuantizedWeight) -> torch.Tensor:
    """`QuantizedWeight.block_absmax` in few operations: one lookup, one multiply, one add (same bits). (n_blocks,)"""
    if not q.nested:
        return q.absmax
    n_blocks, size = q.absmax.numel(), q.nested_blocksize
    if n_blocks <= size:  # a single nested block, one scale
        return q.nested_code.index_select(0, q.absmax.int()).mul_(q.nested_absmax).add_(q.offset)
    codes = pad(q.absmax.int(), -n_blocks % size)  # whole nested blocks; the padding is cut off below
    scales = q.nested_code.index_select(0, codes).view(-1, size).mul_(q.nested_absmax.unsqueeze(1))
    return scales.view(-1)[:n_blocks].add_(q.offset)


def pad(x: torch.Tensor, count: int) -> torch.Tensor:
    return nn_functional.pad(x, (0, count)) if count else x  # zeros at the end of a 1-d tensor


def table_dequantize(q: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """The eager fast path, (n,) in ``dtype``: one lookup per *byte* instead of two shifts and two nibble lookups.

    # Note: the byte table
    A byte holds two codes, so there are only 256 possible value pairs. Viewed as one 8-byte integer each,
    the pairs of `byte_table` are fetched with a single ``index_select`` per byte; the result, viewed back as
    float32, is the unpacked row ``code[i0], code[i1], ...``. Each block is then scaled in place by its absmax:
    the same float32 products as `nf4.dequantize_blocks`, hence the same bits. The weights of a small model are
    dequantized twice per layer and step, so every operation saved here counts (each costs microseconds).
    """
    n_blocks, blocksize, n = q.absmax.numel(), q.blocksize, q.numel
    index = pad(q.packed.int(), n_blocks * blocksize // 2 - q.packed.numel())  # a partial last block
    pairs = byte_table(q.code).view(torch.int64)  # (256,): each entry two float32 values
    values = pairs.index_select(0, index).view(torch.float32).view(n_blocks, blocksize)
    values.mul_(block_scales(q).unsqueeze(1))
    if n != n_blocks * blocksize:
        values = values.view(-1)[:n]
    return values if dtype == torch.float32 else values.to(dtype)
