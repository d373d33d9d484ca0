"""Read tensors from one checkpoint file: ``.safetensors`` (lazy, memory-mapped) or a
weights-only pickle (``.ckpt``/``.pt``/``.pth``/``.bin``).

``.safetensors``: the header is read and checked first (8-byte little-endian length N, N
bytes of JSON, data whose declared extent must fit in the file), then tensors come from
``safetensors.safe_open``, which maps the file: a tensor is a view of the mapping until
something converts it, so loading in the file's own dtype copies nothing.

Pickles are loaded with ``torch.load(weights_only=True)`` (memory-mapped when the file is in
the zip format): only tensors and plain containers can come out, and a pickle that asks for
anything else (a class, a function) is refused before any of it runs. The ``state_dict``
wrapper of Lightning ``.ckpt`` files is unwrapped.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from sdstack.models.detect import CheckpointError
from sdstack.models.safetensors_header import SafetensorsHeaderError, read_safetensors_header

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
WRAPPER_KEYS = ("state_dict", "model", "module")


class TensorFile(Mapping[str, tuple[int, ...]]):
    """A checkpoint file's tensors: a mapping key -> shape, plus ``get(key)`` for the tensor.

    Use as a context manager (closes the memory map), or call ``close()``.
    """

    def __init__(self, path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
        self.path = path
        self.shapes = shapes

    def __getitem__(self, key: str) -> tuple[int, ...]:
        return self.shapes[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def tensor(self, key: str) -> torch.Tensor:
        """The tensor stored under ``key`` (a view of the file where possible)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the file."""

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SafetensorsFile(TensorFile):
    """Tensors of a ``.safetensors`` file through ``safe_open`` (memory-mapped)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, check_safetensors(path))
        from safetensors import safe_open

        self._handle = safe_open(str(path), framework="pt", device="cpu")

    def tensor(self, key: str) -> torch.Tensor:
        return self._handle.get_tensor(key)

    def close(self) -> None:
        self._handle = None


class PickleFile(TensorFile):
    """Tensors of a weights-only pickle (``torch.load(weights_only=True)``)."""

    def __init__(self, path: Path) -> None:
        self._state = load_weights_only(path)
        super().__init__(path, {key: tuple(t.shape) for key, t in self._state.items()})

    def tensor(self, key: str) -> torch.Tensor:
        return self._state[key]

    def close(self) -> None:
        self._state = {}


def open_tensor_file(path: str | Path) -> TensorFile:
    """Open a checkpoint file by its suffix.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: unknown suffix, corrupt/truncated file, refused pickle.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return SafetensorsFile(path)
    if suffix in PICKLE_SUFFIXES:
        return PickleFile(path)
    raise CheckpointError(
        f"{path}: unknown checkpoint file type {suffix!r}; expected one of "
        f"{', '.join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)} or a diffusers folder"
    )


def check_safetensors(path: Path) -> dict[str, tuple[int, ...]]:
    """Shapes from a safetensors header, after checking the file holds all declared data.

    Raises ``CheckpointError`` naming the file for a truncated file (header length or
    declared data beyond the file's size) or a corrupt header (not JSON, bad entries).
    """
    try:
        header, data_start = read_safetensors_header(path)
    except SafetensorsHeaderError as error:
        raise CheckpointError(f"safetensors file: {error}") from error
    size = path.stat().st_size
    shapes: dict[str, tuple[int, ...]] = {}
    data_end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in entry["data_offsets"])
            shapes[key] = tuple(int(n) for n in entry["shape"])
            if not isinstance(entry["dtype"], str):
                raise TypeError("dtype is not a string")
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(
                f"{path}: corrupt safetensors header: entry {key!r} is {entry!r:.120}, expected "
                "{'dtype': str, 'shape': [int...], 'data_offsets': [begin, end]}"
            ) from error
        data_end = max(data_end, begin, end)
    if data_start + data_end > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file: the header declares "
            f"{data_start + data_end} bytes but the file has {size} "
            f"({data_start + data_end - size} missing); download it again"
        )
    return shapes


def _weights_only_refusal(path: Path, error: Exception) -> CheckpointError:
    lines = [line.strip() for line in str(error).splitlines()]
    reason = next(
        (
            line
            for line in lines
            if "Unsupported global" in line or "WeightsUnpickler error" in line
        ),
        lines[-1] if lines else "",
    )
    reason = reason.split("WeightsUnpickler error:")[-1].split(" was not an allowed global")[0]
    reason = reason.strip()
    return CheckpointError(
        f"{path}: refused to load this pickle checkpoint: it needs more than tensors to "
        f"unpickle ({reason}). A weights-only load never runs code from the file; "
        "use a .safetensors version of the model (or convert this file with a tool you trust)"
    )


def load_weights_only(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a pickle checkpoint via ``torch.load(weights_only=True)``.

    Memory-maps zip-format files; unwraps ``state_dict``/``model``/``module`` wrappers;
    keeps only tensor values (``global_step`` and such are dropped).
    """
    mmap = zipfile.is_zipfile(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        raise _weights_only_refusal(path, error) from error
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        raise CheckpointError(
            f"{path}: corrupt or truncated pickle checkpoint: {error}".splitlines()[0]
        ) from error
    return _unwrap(path, loaded)


def _unwrap(path: Path, loaded: Any) -> dict[str, torch.Tensor]:
    for _ in range(3):
        if not isinstance(loaded, dict):
            break
        wrapper = next((key for key in WRAPPER_KEYS if isinstance(loaded.get(key), dict)), None)
        if wrapper is None or any(
            isinstance(v, torch.Tensor) and "." in k for k, v in loaded.items()
        ):
            break
        loaded = loaded[wrapper]
    if not isinstance(loaded, dict):
        raise CheckpointError(
            f"{path}: pickle checkpoint holds a {type(loaded).__name__}, expected a dict of "
            "tensors (optionally under 'state_dict')"
        )
    return {str(k): v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
