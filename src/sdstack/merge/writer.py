"""A ``.safetensors`` file written piece by piece, atomically (merges, repairs).

The layout and the header are the LoRA bake's (``sdstack.lora.bake``: an 8-byte
little-endian header length, the JSON header padded with spaces to a multiple of 8, then
each tensor's bytes in header order), but each tensor may arrive as several row ranges
of its first dimension, so a large tensor never has to be whole in memory. The file is
written under a temporary name beside its target and renamed into place at the end
(``bake.publish_output``); an exception or an interruption removes it.

Metadata known only at the end (the inputs' hashes, computed while the tensors stream):
the header is first written with provisional metadata and :data:`HEADER_SLACK` spaces of
room, then rewritten in place with the final metadata, padded with spaces to the same
length (the format allows spaces after the header's JSON), before the file is published.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from sdstack.errors import SdstackError

HEADER_SLACK = 256
"""Spare header bytes for final metadata longer than the provisional one."""
Entry = tuple[str, Any, tuple[int, ...]]
"""(key, torch dtype, shape) of one tensor of the file, in file order."""


class WriteCheckError(SdstackError):
    """A piece that disagrees with the header entry it is written under (a bug)."""


def write_pieces(
    path: Path,
    entries: Sequence[Entry],
    pieces: Iterable[Iterable[Any]],
    metadata: dict[str, str],
    *,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    final_metadata: Callable[[], dict[str, str]] | None = None,
) -> None:
    """Stream ``entries`` into a new ``.safetensors`` file at ``path``.

    ``pieces`` yields, for each entry in order, the tensors that make it up: row ranges
    of its first dimension, in order (one piece for a small tensor). ``progress(done,
    total)`` is called after each tensor. With ``final_metadata``, ``metadata`` is
    provisional: ``final_metadata()`` is called after the last tensor and its result
    written over it (module docstring).

    Raises:
        BakeError: ``path`` appeared meanwhile (without ``overwrite``).
        WriteCheckError: a piece of the wrong dtype or shape, final metadata longer than
            the room left for it (internal checks).
        OSError: the folder cannot be written (full disk...).
    """
    from sdstack.atomic_files import temporary_file
    from sdstack.lora.bake import _header_bytes, publish_output

    encoded = _header_bytes(entries, metadata)
    if final_metadata is not None:
        encoded += b" " * HEADER_SLACK
    with temporary_file(path.parent, suffix=".safetensors") as temporary:
        with temporary.open("wb") as file:
            file.write(len(encoded).to_bytes(8, "little") + encoded)
            for index, (entry, parts) in enumerate(zip(entries, pieces, strict=True)):
                _write_entry(file, path, entry, parts)
                if progress is not None:
                    progress(index + 1, len(entries))
            if final_metadata is not None:
                final = _header_bytes(entries, final_metadata())
                if len(final) > len(encoded):
                    raise WriteCheckError(
                        f"{path}: final header of {len(final)} bytes exceeds the "
                        f"{len(encoded)} reserved (internal check)"
                    )
                file.seek(8)
                file.write(final + b" " * (len(encoded) - len(final)))
        publish_output(temporary, path, overwrite=overwrite)


def _write_entry(file: BinaryIO, path: Path, entry: Entry, parts: Iterable[Any]) -> None:
    """Write the pieces of one tensor, checking each against the entry."""
    from sdstack.models.patcher import tensor_bytes

    key, dtype, shape = entry
    rows = 0
    for piece in parts:
        if (
            piece.dtype != dtype
            or tuple(piece.shape[1:]) != tuple(shape[1:])
            or (not shape and piece.ndim != 0)
        ):
            raise WriteCheckError(
                f"{path}: tensor {key}: piece {piece.dtype} {tuple(piece.shape)}; expected "
                f"{dtype} rows of {tuple(shape)} (internal check)"
            )
        file.write(tensor_bytes(piece))
        rows += piece.shape[0] if shape else 1
    if rows != (shape[0] if shape else 1) and math.prod(shape) != 0:
        raise WriteCheckError(
            f"{path}: tensor {key}: {rows} rows written; expected {tuple(shape)} (internal check)"
        )
