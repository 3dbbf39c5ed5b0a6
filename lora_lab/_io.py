"""Reading the kit's files (safetensors, JSON) so that a damaged file is a ValueError that says what to do.

A safetensors file is an 8-byte little-endian header length, a JSON header (``{name: {"dtype", "shape",
"data_offsets"}}`` plus an optional ``"__metadata__"`` of strings), then the raw tensor bytes. `read_header`
checks all of it from the first bytes alone, so a damaged or foreign file is refused before its data is read.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header
ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
              "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "C64": 8}

DTYPE_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
               torch.bool: "BOOL"}

FLOAT_CODES = ("F64", "F32", "F16", "BF16")  # the floating-point dtypes, as a safetensors header names them


def read_json(file: Path, fix: str) -> dict:
    """The JSON object in ``file``; NaN/Infinity literals, bad JSON or a non-object raise ValueError."""
    file = Path(file)
    try:
        raw = json.loads(file.read_text(), parse_constant=lambda name: _refuse_constant(file, name, fix))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file.name} is not valid JSON ({err}); the file is damaged. {fix}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{file.name} holds a JSON {type(raw).__name__}, not an object; the file is damaged. {fix}")
    return raw


def read_header(file: Path, fix: str) -> tuple[dict[str, dict], dict[str, str]]:
    """``({name: {"dtype", "shape", "data_offsets"}}, metadata)`` from a safetensors header, every entry checked.

    Raises:
        ValueError: the length field, the JSON or an entry does not describe a file of this size.
    """
    file = Path(file)
    size = file.stat().st_size
    with open(file, "rb") as f:
        length = int.from_bytes(f.read(8), "little") if size >= 8 else -1
        if not 2 <= length <= min(size - 8, MAX_HEADER_BYTES):
            _damaged(file, f"its header length field says {length} bytes in a {size}-byte file", fix)
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            _damaged(file, "its header is not valid JSON", fix)
    if not isinstance(header, dict):
        _damaged(file, "its header is not a JSON object", fix)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        _damaged(file, "its __metadata__ is not a mapping of strings", fix)
    data_bytes = size - 8 - length
    for name, entry in header.items():
        if not _entry_fits(entry, data_bytes):
            _damaged(file, f"its header entry for {name!r} ({entry!r}) does not fit the file's {data_bytes} data bytes",
                     fix)
    return header, metadata


def read_safetensors(file: Path, fix: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file, after `read_header` has checked the header.

    Running out of memory is not damage: a MemoryError propagates as it is.
    """
    from safetensors.torch import load_file

    file = Path(file)
    header, metadata = read_header(file, fix)
    try:
        tensors = load_file(str(file))
    except MemoryError:
        raise
    except Exception as err:  # safetensors raises its own error type for bad layouts and truncation
        _damaged(file, f"safetensors could not read it ({err})", fix)
    if set(tensors) != set(header):
        _damaged(file, "its tensors differ from its header", fix)
    return tensors, metadata


def check_finite(tensors: dict[str, torch.Tensor], where: str, fix: str) -> None:
    """Raise ValueError naming the first floating-point tensor that holds NaN or inf."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"Tensor {name!r} in {where} holds NaN or inf; the file is damaged (or training "
                             f"diverged). {fix}")


def _entry_fits(entry, data_bytes: int) -> bool:
    if not isinstance(entry, dict) or entry.get("dtype") not in ITEM_BYTES:
        return False
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        return False
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets):
        return False
    start, end = offsets
    return 0 <= start <= end <= data_bytes and end - start == math.prod(shape) * ITEM_BYTES[entry["dtype"]]


def _damaged(file: Path, why: str, fix: str):
    raise ValueError(f"{file.name} could not be read as safetensors: {why}; the file is damaged or truncated. {fix}")


def _refuse_constant(file: Path, name: str, fix: str):
    raise ValueError(f"{file.name} holds {name}, which is not a number JSON allows; the file is damaged. {fix}")
