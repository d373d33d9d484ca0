"""Build diffusers modules on the meta device and give them checkpoint tensors.

No module is ever randomly initialised: ``from_config`` runs under ``torch.device("meta")``
(parameters without storage), then ``load_state_dict(strict=True, assign=True)`` makes the
checkpoint's own tensors the parameters. A tensor already in the wanted dtype and device is
used as it is (for safetensors, a view of the memory-mapped file); otherwise it is converted
one tensor at a time, so a full-precision copy of the whole model never exists twice.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from sdstack.models.detect import CheckpointError, missing_keys_error
from sdstack.models.ldm_keys import KeyRow
from sdstack.models.single_file import TensorFile

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
DEVICES = ("cpu", "cuda", "mps")


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"fp32"``/``"fp16"``/``"bf16"`` or a floating ``torch.dtype`` -> ``torch.dtype``."""
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(
        f"dtype: got {dtype!r}, expected one of {', '.join(DTYPES)} or a floating torch.dtype"
    )


def resolve_device(device: str | torch.device) -> torch.device:
    """``"cpu"``/``"cuda[:N]"``/``"mps"`` (or a ``torch.device``), checked to be available."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device: got {device!r}, expected one of {', '.join(DEVICES)}") from error
    if resolved.type not in DEVICES:
        raise ValueError(f"device: got {device!r}, expected one of {', '.join(DEVICES)}")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device: got {device!r} but CUDA is not available to this torch "
            f"({torch.__version__}); use device='cpu'"
        )
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise ValueError(
            f"device: got {device!r} but only {torch.cuda.device_count()} CUDA device(s) exist"
        )
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(
            f"device: got {device!r} but MPS is not available on this machine; use device='cpu'"
        )
    return resolved


def packaged_config(relative: str) -> dict[str, Any]:
    """A JSON file under ``sdstack/models/configs/sd15/`` (e.g. ``"unet/config.json"``)."""
    path = resources.files("sdstack.models") / "configs" / "sd15" / relative
    return json.loads(path.read_text(encoding="utf-8"))


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file; ``CheckpointError`` naming the file when it is not one."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: unreadable config file: {error}") from error
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: config must be a JSON object, got {type(value).__name__}")
    return value


def build_meta(cls: Any, config: Mapping[str, Any]) -> Any:
    """``cls.from_config(config)`` with every parameter on the meta device (no storage)."""
    with torch.device("meta"):
        return cls.from_config(dict(config))


def prepare_tensor(tensor: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Cast floating tensors to ``dtype`` and move to ``device``; no copy when both match."""
    wanted = dtype if tensor.is_floating_point() else tensor.dtype
    if tensor.dtype == wanted and tensor.device == device:
        return tensor
    return tensor.to(device=device, dtype=wanted)


def read_mapped(
    source: TensorFile,
    prefix: str,
    rows: list[KeyRow],
    dtype: torch.dtype,
    device: torch.device,
    part: str,
) -> dict[str, torch.Tensor]:
    """Diffusers-named tensors for ``rows`` from LDM keys ``prefix + row.ldm`` in ``source``.

    1x1-conv attention weights (``row.conv1x1``) are squeezed to linear ``[C, C]``.

    Raises:
        CheckpointError: some LDM keys are absent (a few are named).
    """
    missing = [prefix + row.ldm for row in rows if prefix + row.ldm not in source]
    if missing:
        raise missing_keys_error(source.path, part, missing)
    tensors = {}
    for row in rows:
        tensor = source.tensor(prefix + row.ldm)
        if row.conv1x1 and tensor.ndim == 4:
            tensor = tensor[:, :, 0, 0]
        tensors[row.diffusers] = prepare_tensor(tensor, dtype, device)
    return tensors


def assign_tensors(module: Any, tensors: dict[str, torch.Tensor], path: Path, part: str) -> Any:
    """``module.load_state_dict(tensors, strict=True, assign=True)``; returns it in eval mode.

    Raises:
        CheckpointError: missing/unexpected keys or shapes that differ from the config.
    """
    try:
        module.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as error:
        detail = " ".join(str(error).split())[:400]
        raise CheckpointError(
            f"{path}: the {part} tensors do not fit the SD1.x {part} config: {detail}"
        ) from error
    left = [name for name, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{path}: {part} left without tensors for {', '.join(left[:3])}")
    return module.eval()
