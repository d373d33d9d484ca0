"""Read a safetensors file's header without loading any tensor.

Layout (safetensors format): 8 bytes little-endian unsigned N, then N bytes of UTF-8
JSON (an object: tensor name -> {dtype, shape, data_offsets}, plus an optional
``__metadata__`` object of string -> string), then the tensor data. Tensor data
therefore starts at byte ``8 + N``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from sdstack.errors import SdstackError

# The safetensors library refuses headers above 100 MB; a larger N means a corrupt file.
MAX_HEADER_BYTES = 100_000_000


class SafetensorsHeaderError(SdstackError):
    """A file that is not a readable safetensors file (truncated or corrupt header)."""


def read_safetensors_header(path: str | os.PathLike[str]) -> tuple[dict, int]:
    """The parsed JSON header of a safetensors file and the byte offset of its data.

    Reads 8 + N bytes only. Returns ``(header, 8 + N)`` where ``header`` is the JSON
    object (tensor entries and ``__metadata__``, if any).

    Raises:
        FileNotFoundError: the file does not exist.
        SafetensorsHeaderError: shorter than 8 bytes, N larger than the file or than
            100 MB, header not UTF-8 JSON, or not a JSON object.
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
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict):
        raise SafetensorsHeaderError(
            f"{path}: corrupt safetensors header: __metadata__ must be an object of "
            f"strings, got {type(metadata).__name__}"
        )
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise SafetensorsHeaderError(
                f"{path}: corrupt safetensors header: __metadata__[{key!r}] must be a "
                f"string, got {type(value).__name__} {value!r:.60}"
            )
    return dict(metadata)
