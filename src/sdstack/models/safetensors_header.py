"""Read and check a safetensors file's header without loading any tensor.

Layout (safetensors format): 8 bytes little-endian unsigned N, then N bytes of UTF-8
JSON (an object: tensor name -> {dtype, shape, data_offsets}, plus an optional
``__metadata__`` object of string -> string), then the tensor data. Tensor data
therefore starts at byte ``8 + N``.

``check_safetensors_layout`` applies the safetensors library's own rules before the file
is handed to it, so a bad file gets an error naming the file and the problem instead of
a ``SafetensorError``: every entry has a known dtype, a shape of ints >= 0 and
``data_offsets [begin, end]`` with ``end - begin = prod(shape) * bits(dtype) / 8``; the
entries, sorted by offset, tile the data exactly (no gap, no overlap, starting at 0); and
the last one ends exactly at the end of the file.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from sdstack.errors import SdstackError

# The safetensors library refuses headers above 100 MB; a larger N means a corrupt file.
MAX_HEADER_BYTES = 100_000_000
# Bits per element of every dtype the safetensors format defines.
DTYPE_BITS = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}


class SafetensorsHeaderError(SdstackError):
    """A file that is not a readable safetensors file (truncated or corrupt header)."""


def read_safetensors_header(path: str | os.PathLike[str]) -> tuple[dict, int]:
    """The parsed JSON header of a safetensors file and the byte offset of its data.

    Reads 8 + N bytes only. Returns ``(header, 8 + N)`` where ``header`` is the JSON
    object (tensor entries and ``__metadata__``, if any).

    Raises:
        FileNotFoundError: the file does not exist.
        SafetensorsHeaderError: shorter than 8 bytes, N larger than the file or than
            100 MB, header not UTF-8 JSON (or nested too deeply), or not a JSON object.
    """
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise SafetensorsHeaderError(
                f"{path}: not a safetensors file: {size} bytes, expected at least 8 "
                "(an 8-byte header length then a JSON header)"
            )
        length = int.from_bytes(prefix, "little")
        if length > MAX_HEADER_BYTES or 8 + length > size:
            raise SafetensorsHeaderError(
                f"{path}: corrupt or truncated safetensors header: header length {length} "
                f"bytes, but the file has {size} bytes (at most {min(size - 8, MAX_HEADER_BYTES)} "
                "possible)"
            )
        raw = file.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SafetensorsHeaderError(
            f"{path}: corrupt safetensors header: the {length} header bytes are not "
            f"UTF-8 JSON ({error})"
        ) from error
    except RecursionError as error:
        raise SafetensorsHeaderError(
            f"{path}: corrupt safetensors header: the JSON is nested too deeply to be a "
            "safetensors header (which is one object of tensor entries)"
        ) from error
    if not isinstance(header, dict):
        raise SafetensorsHeaderError(
            f"{path}: corrupt safetensors header: expected a JSON object, got "
            f"{type(header).__name__}"
        )
    return header, 8 + length


def safetensors_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (string -> string), ``{}`` if absent.

    Only the header is read. Raises ``SafetensorsHeaderError`` for a truncated or corrupt
    header, or when ``__metadata__`` is not an object of strings (the safetensors library
    refuses such files too).
    """
    header, _ = read_safetensors_header(path)
    return _checked_metadata(path, header)


def _checked_metadata(path: str | os.PathLike[str], header: dict) -> dict[str, str]:
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict):
        raise SafetensorsHeaderError(
            f"{path}: corrupt safetensors header: __metadata__ must be an object of "
            f"strings, got {type(metadata).__name__}"
        )
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise SafetensorsHeaderError(
                f"{path}: corrupt safetensors header: __metadata__[{key!r:.80}] must be a "
                f"string, got {type(value).__name__} {value!r:.60}"
            )
    return dict(metadata)


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header: data bytes ``[begin, end)`` after the header."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _entry(path: Path, key: str, value: object) -> TensorEntry:
    """A header entry, checked: known dtype, shape of ints >= 0, size matching offsets."""
    try:
        dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]  # type: ignore[index]
        if not (isinstance(shape, list) and isinstance(offsets, list) and len(offsets) == 2):
            raise TypeError("shape or data_offsets is not a list")
        if not isinstance(dtype, str):
            raise TypeError("dtype is not a string")
        if not all(type(n) is int and n >= 0 for n in [*shape, *offsets]):
            raise ValueError("shape and data_offsets must be ints >= 0")
    except (KeyError, TypeError, ValueError) as error:
        raise SafetensorsHeaderError(
            f"{path}: corrupt safetensors header: entry {key!r:.80} is {value!r:.120}, expected "
            "{'dtype': str, 'shape': [int...], 'data_offsets': [begin, end]}"
        ) from error
    if dtype not in DTYPE_BITS:
        raise SafetensorsHeaderError(
            f"{path}: corrupt safetensors header: tensor {key!r:.80} has unknown dtype "
            f"{dtype!r:.40}; expected one of {', '.join(DTYPE_BITS)}"
        )
    begin, end = offsets
    if begin > end:
        raise SafetensorsHeaderError(
            f"{path}: corrupt safetensors header: tensor {key!r:.80} has data_offsets "
            f"[{begin}, {end}], which run backwards"
        )
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits != 8 * (end - begin):
        need = bits // 8 if bits % 8 == 0 else bits / 8
        raise SafetensorsHeaderError(
            f"{path}: corrupt safetensors header: tensor {key!r:.80} ({dtype} {shape!s:.80}) "
            f"needs {need} bytes but its data_offsets [{begin}, {end}] span {end - begin}"
        )
    return TensorEntry(dtype, tuple(shape), begin, end)


def _check_tiling(path: Path, entries: dict[str, TensorEntry]) -> int:
    """The data length the entries cover; they must tile ``[0, length)`` exactly."""
    cursor, previous = 0, None
    for key, entry in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.begin < cursor:
            raise SafetensorsHeaderError(
                f"{path}: corrupt safetensors header: tensors {previous!r:.80} and "
                f"{key!r:.80} overlap (data bytes {entry.begin}-{cursor})"
            )
        if entry.begin > cursor:
            where = f"after tensor {previous!r:.80}" if previous else "before the first tensor"
            raise SafetensorsHeaderError(
                f"{path}: corrupt safetensors header: data bytes {cursor}-{entry.begin} "
                f"{where} belong to no tensor"
            )
        cursor, previous = entry.end, key
    return cursor


def check_safetensors_layout(path: str | os.PathLike[str]) -> tuple[dict[str, TensorEntry], int]:
    """The tensor entries of a safetensors file and its data offset, checked as the module
    docstring says (the safetensors library's own rules). Nothing but the header is read.

    Raises:
        FileNotFoundError: the file does not exist.
        SafetensorsHeaderError: as ``read_safetensors_header``; a bad entry (unknown
            dtype, bad shape, size disagreeing with the offsets), overlapping tensors or
            bytes that belong to none, declared data past the end of the file (truncated),
            or bytes after the last tensor.
    """
    path = Path(path)
    header, data_start = read_safetensors_header(path)
    _checked_metadata(path, header)
    entries = {k: _entry(path, k, v) for k, v in header.items() if k != "__metadata__"}
    size = path.stat().st_size
    declared = data_start + max((e.end for e in entries.values()), default=0)
    if declared > size:
        raise SafetensorsHeaderError(
            f"{path}: truncated safetensors file: the header declares {declared} bytes but "
            f"the file has {size} ({declared - size} missing); download it again"
        )
    covered = data_start + _check_tiling(path, entries)
    if covered < size:
        raise SafetensorsHeaderError(
            f"{path}: corrupt safetensors file: {size - covered} bytes after the last tensor "
            f"(the header accounts for {covered} of the file's {size} bytes; the format "
            "allows no trailing data)"
        )
    return entries, data_start
