"""Read tensors from one checkpoint file: ``.safetensors`` (lazy, memory-mapped) or a
weights-only pickle (``.ckpt``/``.pt``/``.pth``/``.bin``).

``.safetensors``: the header is checked first, by the safetensors library's own rules
(``safetensors_header.check_safetensors_layout``: known dtypes, sizes that match the
offsets, tensors that tile the data exactly up to the end of the file), then tensors come
from ``safetensors.safe_open``, which maps the file: a tensor is a view of the mapping
until something converts it, so loading in the file's own dtype copies nothing.

Pickles are read by ``torch_file.load_torch_file``, never ``torch.load``: a weights-only
unpickler (only tensors and plain containers come out; a pickle that names any other
global is refused before any of it runs) whose storages are checked against the file
before anything is allocated, and mapped rather than read for the zip format. The
``state_dict`` wrapper of Lightning ``.ckpt`` files is unwrapped.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from sdstack.models.detect import CheckpointError
from sdstack.models.safetensors_header import SafetensorsHeaderError, check_safetensors_layout
from sdstack.models.torch_file import RefusedPickleError, TorchFileError, load_torch_file

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
    """Tensors of a ``.safetensors`` file through ``safe_open`` (memory-mapped).

    ``entries`` (key -> ``TensorEntry``: dtype, shape, byte offsets) and ``data_start``
    are the checked header, for readers that read the bytes themselves.
    """

    def __init__(self, path: Path) -> None:
        self.entries, self.data_start = checked_safetensors_layout(path)
        super().__init__(path, {key: entry.shape for key, entry in self.entries.items()})
        from safetensors import SafetensorError, safe_open

        try:
            self._handle = safe_open(str(path), framework="pt", device="cpu")
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"{path}: unreadable safetensors file: {error}") from error

    def tensor(self, key: str) -> torch.Tensor:
        from safetensors import SafetensorError

        try:
            return self._handle.get_tensor(key)
        except (SafetensorError, TypeError, ValueError) as error:
            raise CheckpointError(
                f"{self.path}: cannot read tensor {key!r:.100}: {error}"
            ) from error

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


def checked_safetensors_layout(path: Path) -> tuple[dict[str, Any], int]:
    """``check_safetensors_layout(path)``: the header's entries and data offset.

    Raises ``CheckpointError`` naming the file for a truncated file, a corrupt header (not
    JSON, bad entries, unknown dtypes, offsets that overlap, leave gaps or disagree with the
    shape) or bytes after the last tensor.
    """
    try:
        return check_safetensors_layout(path)
    except SafetensorsHeaderError as error:
        raise CheckpointError(str(error)) from error


def load_weights_only(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a pickle checkpoint via ``load_torch_file`` (zip storages mapped).

    Unwraps ``state_dict``/``model``/``module`` wrappers; keeps only tensor values
    (``global_step`` and such are dropped).

    Raises:
        CheckpointError: a refused pickle (naming the global it wanted), a corrupt or
            truncated file, storages larger than the file, not a dict of tensors.
    """
    try:
        loaded = load_torch_file(path, mapped=True)
    except RefusedPickleError as error:
        raise CheckpointError(
            f"{path}: refused to load this pickle checkpoint: {error.reason} (a weights-only "
            "load rebuilds only tensors and plain containers and never runs code from the "
            "file); use a .safetensors version of the model (or convert this file with a "
            "tool you trust)"
        ) from error
    except TorchFileError as error:
        raise CheckpointError(
            f"{path}: corrupt or truncated pickle checkpoint: {error.reason}"
        ) from error
    return _unwrap(path, loaded)


def _unwrap(path: Path, loaded: Any) -> dict[str, torch.Tensor]:
    for _ in range(3):
        if not isinstance(loaded, dict):
            break
        wrapper = next((key for key in WRAPPER_KEYS if isinstance(loaded.get(key), dict)), None)
        if wrapper is None or any(
            isinstance(v, torch.Tensor) and "." in str(k) for k, v in loaded.items()
        ):
            break
        loaded = loaded[wrapper]
    if not isinstance(loaded, dict):
        raise CheckpointError(
            f"{path}: pickle checkpoint holds a {type(loaded).__name__}, expected a dict of "
            "tensors (optionally under 'state_dict')"
        )
    return {str(k): v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
