"""Read a .safetensors file's header (tensor shapes, dtypes, metadata) without touching tensor data."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from nanods.errors import NanodsError

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


def read_header(path: str | Path) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """(tensors {name: {dtype, shape, data_offsets}}, metadata) of a safetensors file, validated."""
    path = Path(path)
    if not path.is_file():
        raise NanodsError(f"'{path}' not found")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise NanodsError(f"'{path}' is not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100_000_000):
            raise NanodsError(f"'{path}' is not a safetensors file (or is truncated): bad header length")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise NanodsError(f"'{path}' is not a safetensors file: its header is not JSON") from None
    if not isinstance(header, dict):
        raise NanodsError(f"'{path}' is not a safetensors file: its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise NanodsError(f"'{path}' is not a valid safetensors file: its __metadata__ is not a map of strings")
    end = 0
    for name, info in header.items():
        if not isinstance(info, dict) or {"dtype", "shape", "data_offsets"} - info.keys():
            raise NanodsError(f"'{path}' is not a valid safetensors file: entry '{name}' is malformed")
        start, stop = info["data_offsets"]
        if stop - start != math.prod(info["shape"]) * _DTYPE_BYTES.get(info["dtype"], 0):
            raise NanodsError(f"'{path}' is not a valid safetensors file: tensor '{name}' has a wrong size")
        end = max(end, stop)
    if 8 + n + end > size:
        raise NanodsError(f"'{path}' is truncated: {size} bytes on disk, the header describes {8 + n + end}")
    return header, metadata
