"""Saving a trained LoRA as kohya does (``networks.lora`` ``save_weights``), atomically.

Before writing, kohya's ``precalculate_safetensors_hashes``: the tensors (already in the
save dtype) are serialised in memory with ``safetensors.torch.save`` and only the metadata
keys that start with ``ss_``; then

- ``sshs_model_hash`` = sha256 hex of those bytes after the header (skip
  ``8 + u64_le(bytes[:8])``): the additional-networks hash, which the written file has too
  (the tensor bytes do not depend on the metadata);
- ``sshs_legacy_hash`` = sha256 of those bytes ``[0x100000, 0x110000)``, first 8 hex.

Both are added to the metadata and the file is written (a temporary file beside the
target, then a rename: a reader never sees half a file).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdstack.errors import SdstackError

LEGACY_OFFSET = 0x100000
LEGACY_LENGTH = 0x10000


class LoraSaveError(SdstackError):
    """A LoRA that cannot be saved: a bad path, tensors or metadata, a failed write."""


@dataclass(frozen=True)
class SavedLora:
    """A LoRA file written by :func:`save_lora`.

    Attributes:
        path: the file.
        metadata: the metadata written (with ``sshs_model_hash`` / ``sshs_legacy_hash``).
    """

    path: Path
    metadata: dict[str, str]


def safetensors_hashes(data: bytes) -> tuple[str, str]:
    """``(sshs_model_hash, sshs_legacy_hash)`` of serialised safetensors bytes: sha256 of the
    bytes after the header (64 hex) and sha256 of ``[0x100000, 0x110000)`` (8 hex).

    Raises:
        LoraSaveError: the bytes are shorter than their own header says.
    """
    if len(data) < 8:
        raise LoraSaveError(f"safetensors bytes: {len(data)} bytes; expected at least 8")
    offset = 8 + int.from_bytes(data[:8], "little")
    if offset > len(data):
        raise LoraSaveError(
            f"safetensors bytes: header of {offset - 8} bytes in {len(data)}; truncated"
        )
    model_hash = hashlib.sha256(data[offset:]).hexdigest()
    legacy = hashlib.sha256(data[LEGACY_OFFSET : LEGACY_OFFSET + LEGACY_LENGTH]).hexdigest()[:8]
    return model_hash, legacy


def _check(path: Path, tensors: Mapping[str, Any], metadata: Mapping[str, str]) -> None:
    import torch

    if path.suffix.lower() != ".safetensors":
        raise LoraSaveError(f"LoRA output {str(path)!r}: expected a .safetensors file")
    if not tensors:
        raise LoraSaveError(f"LoRA output {str(path)!r}: no tensors to save")
    for key, value in tensors.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise LoraSaveError(
                f"LoRA output {str(path)!r}: entry {key!r:.80} is {type(value).__name__}; "
                "expected str -> torch.Tensor"
            )
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise LoraSaveError(
                f"LoRA output {str(path)!r}: metadata {key!r:.80} is "
                f"{type(value).__name__}; expected str -> str (str() the value)"
            )


def save_lora(
    path: str | os.PathLike[str], tensors: Mapping[str, Any], metadata: Mapping[str, str]
) -> SavedLora:
    """Write a kohya LoRA ``.safetensors`` with ``sshs_model_hash`` and
    ``sshs_legacy_hash`` computed as kohya does (see the module docstring), atomically.

    Args:
        path: the output file (``.safetensors``; its folder is created).
        tensors: ``TrainableLora.state_dict_kohya(dtype)`` (saved as given).
        metadata: ``training_metadata`` / ``save_metadata`` output (str -> str); keys
            other than ``ss_*`` are written but not hashed.

    Returns:
        The path and the metadata written.

    Raises:
        LoraSaveError: not a .safetensors path, no tensors, a non-tensor or non-str
            entry, a write that failed (the target is left as it was).
    """
    from safetensors.torch import save

    from sdstack.atomic_files import replace, temporary_file

    # 1. check the inputs
    path = Path(path)
    _check(path, tensors, metadata)
    plain = {key: value.detach().to("cpu").contiguous() for key, value in tensors.items()}
    # 2. the hashes, on the bytes with only the ss_ metadata
    hashed = {key: value for key, value in metadata.items() if key.startswith("ss_")}
    model_hash, legacy_hash = safetensors_hashes(save(plain, metadata=hashed))
    written = {**metadata, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash}
    # 3. write beside the target, then rename
    data = save(plain, metadata=written)
    try:
        with temporary_file(path.parent, suffix=".safetensors") as temporary:
            with open(temporary, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            replace(temporary, path)
    except OSError as error:
        raise LoraSaveError(
            f"LoRA output {str(path)!r}: cannot write ({error.strerror or error}); "
            "expected a writable folder with free space"
        ) from error
    return SavedLora(path, written)
