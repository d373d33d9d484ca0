"""Checkpoint tensors read one at a time, for merging: nothing is kept but the header.

- ``.safetensors``: the header is checked by the safetensors library's own rules
  (``safetensors_header.check_safetensors_layout``), then each tensor (or a range of its
  rows) is read with a plain ``seek`` + ``readinto`` at its offsets into a fresh buffer.
  Nothing is memory-mapped, so the resident memory is the tensor being merged, whatever
  the file's size (the page cache is the kernel's, not the process's).
- ``.ckpt``/``.pt``/``.pth``/``.bin``: the weights-only reader
  (``single_file.load_weights_only``, ``torch_file.load_torch_file``); zip-format
  storages are slices of a private map of the file, so the pages a merge reads count in
  the process's resident size until the kernel reclaims them (convert big pickles to
  safetensors first when memory is tight).
- A state dict in memory (:class:`DictSource`), for ``merge_state_dicts`` and tests.

Every source is a mapping key -> shape with ``dtype(key)`` and ``read(key, rows)``.
The safetensors data is little-endian; this reader assumes a little-endian host (every
machine torch supports).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch

from sdstack.models.detect import CheckpointError
from sdstack.models.single_file import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES

# safetensors dtype code -> torch dtype, for every code this torch can hold.
TORCH_DTYPES: dict[str, torch.dtype] = {
    code: getattr(torch, name)
    for code, name in {
        "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
        "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
        "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool",
        "C64": "complex64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    }.items()
    if hasattr(torch, name)
}  # fmt: skip
ROWS_ALL = None
"""``read(key, rows=ROWS_ALL)``: the whole tensor."""


class TensorSource(Mapping[str, tuple[int, ...]]):
    """One input's tensors: key -> shape, ``dtype(key)``, ``read(key, rows)``, ``metadata``.

    ``name`` names the input in messages (its path, or what the caller called it).
    Use as a context manager, or call ``close()``.
    """

    def __init__(self, name: str, shapes: dict[str, tuple[int, ...]]) -> None:
        self.name = name
        self.shapes = shapes
        self.metadata: dict[str, str] = {}
        self.path: Path | None = None

    def __getitem__(self, key: str) -> tuple[int, ...]:
        return self.shapes[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def dtype(self, key: str) -> torch.dtype:
        """The stored dtype of ``key``."""
        raise NotImplementedError

    def read(self, key: str, rows: slice | None = ROWS_ALL) -> torch.Tensor:
        """The tensor under ``key`` in its stored dtype, or rows ``rows`` of its first
        dimension (``slice(start, stop)``, step 1). It may share memory with the source
        (a state dict's own tensor): read it, never modify it."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the file."""

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def row_slices(shape: tuple[int, ...], limit: int) -> list[slice | None]:
    """Row ranges of the first dimension holding at most ``limit`` elements each (at least
    one row): ``[None]`` (the whole tensor) when it holds at most ``limit``."""
    numel = math.prod(shape)
    if not shape or numel <= limit:
        return [None]
    step = max(1, limit // max(1, numel // max(1, shape[0])))
    return [slice(start, min(start + step, shape[0])) for start in range(0, shape[0], step)]


def _row_range(shape: tuple[int, ...], rows: slice | None) -> tuple[int, int]:
    if rows is None or not shape:
        return 0, shape[0] if shape else 1
    start, stop, _ = rows.indices(shape[0])
    return start, max(start, stop)


class SafetensorsReader(TensorSource):
    """A ``.safetensors`` file read tensor by tensor with plain file reads."""

    def __init__(self, path: Path) -> None:
        from sdstack.models.safetensors_header import (
            SafetensorsHeaderError,
            check_safetensors_layout,
            safetensors_metadata,
        )

        try:
            entries, self._data_start = check_safetensors_layout(path)
            metadata = safetensors_metadata(path)
        except SafetensorsHeaderError as error:
            raise CheckpointError(str(error)) from error
        for key, entry in entries.items():
            if entry.dtype not in TORCH_DTYPES:
                raise CheckpointError(
                    f"{path}: tensor {key!r:.100} is {entry.dtype}, which cannot be merged; "
                    f"expected one of {', '.join(TORCH_DTYPES)}"
                )
        super().__init__(str(path), {key: entry.shape for key, entry in entries.items()})
        self.path, self.metadata, self._entries = path, metadata, entries
        self._file: BinaryIO | None = path.open("rb", buffering=0)

    def dtype(self, key: str) -> torch.dtype:
        return TORCH_DTYPES[self._entries[key].dtype]

    def read(self, key: str, rows: slice | None = ROWS_ALL) -> torch.Tensor:
        entry, dtype = self._entries[key], self.dtype(key)
        start, stop = _row_range(entry.shape, rows)
        shape = (stop - start, *entry.shape[1:]) if entry.shape else ()
        row_bytes = math.prod(entry.shape[1:]) * dtype.itemsize
        nbytes = math.prod(shape) * dtype.itemsize
        if not nbytes:
            return torch.empty(shape, dtype=dtype)
        buffer = torch.empty(nbytes, dtype=torch.uint8)  # no zero fill: read over at once
        view = memoryview(buffer.numpy())
        self._read_into(view, self._data_start + entry.begin + start * row_bytes, key)
        return buffer.view(dtype).reshape(shape)

    def _read_into(self, view: memoryview, offset: int, key: str) -> None:
        if self._file is None:
            raise CheckpointError(f"{self.path}: read after close (internal error)")
        done = 0
        self._file.seek(offset)
        while done < len(view):
            count = self._file.readinto(view[done:])
            if not count:
                raise CheckpointError(
                    f"{self.path}: tensor {key!r:.100}: the file ended at byte {offset + done} "
                    "while reading it (truncated or changed during the merge)"
                )
            done += count

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class DictSource(TensorSource):
    """A state dict in memory (tensors are sliced, never copied until cast)."""

    def __init__(self, state: Mapping[str, torch.Tensor], name: str = "state dict") -> None:
        super().__init__(name, {key: tuple(t.shape) for key, t in state.items()})
        self._state = state

    def dtype(self, key: str) -> torch.dtype:
        return self._state[key].dtype

    def read(self, key: str, rows: slice | None = ROWS_ALL) -> torch.Tensor:
        tensor = self._state[key].detach()
        if rows is None or tensor.ndim == 0:
            return tensor
        return tensor[rows]

    def close(self) -> None:
        self._state = {}


class PickleSource(DictSource):
    """A weights-only pickle checkpoint (``.ckpt``...), storages mapped by the reader."""

    def __init__(self, path: Path) -> None:
        from sdstack.models.single_file import load_weights_only

        super().__init__(load_weights_only(path), str(path))
        self.path = path


def open_source(path: str | Path) -> TensorSource:
    """The checkpoint at ``path`` as a :class:`TensorSource`, by its suffix.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: a folder, an unknown suffix, a corrupt or truncated file, a
            refused pickle, a dtype torch cannot hold.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder; expected a single-file checkpoint")
    if not path.is_file():
        raise FileNotFoundError(2, "No such file or directory", str(path))
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return SafetensorsReader(path)
    if suffix in PICKLE_SUFFIXES:
        return PickleSource(path)
    raise CheckpointError(
        f"{path}: unknown checkpoint file type {suffix!r}; expected one of "
        f"{', '.join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)}"
    )


def as_source(value: Any, name: str) -> TensorSource:
    """A :class:`TensorSource` as it is, a state dict wrapped, or a path opened."""
    if isinstance(value, TensorSource):
        return value
    if isinstance(value, Mapping):
        return DictSource(value, name)
    return open_source(value)
