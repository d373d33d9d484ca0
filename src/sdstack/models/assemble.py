"""Build diffusers modules on the meta device and give them checkpoint tensors.

No module is ever randomly initialised: ``from_config`` runs under ``torch.device("meta")``
(parameters without storage), then ``load_state_dict(strict=True, assign=True)`` makes the
checkpoint's own tensors the parameters. A tensor already in the wanted dtype and device is
used as it is (for safetensors, a view of the memory-mapped file); otherwise it is converted
one tensor at a time (``streaming.ConvertingReader``: read into a buffer of its own, never
through the mapping), so neither a second copy of the model nor the file's pages stay
resident.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import torch

from sdstack.models.detect import CheckpointError, missing_keys_error, name_list
from sdstack.models.key_map.ldm import KeyRow
from sdstack.models.single_file import TensorFile
from sdstack.models.streaming import ConvertingReader
from sdstack.validate import SettingError

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
    raise SettingError(
        f"dtype: got {dtype!r}, expected one of {', '.join(DTYPES)} or a floating torch.dtype"
    )


def _device_message(device: Any) -> str:
    return f"device: got {device!r}, expected one of {', '.join(DEVICES)}"


def resolve_device(device: str | torch.device) -> torch.device:
    """``"cpu"``/``"cuda[:N]"``/``"mps"`` (or a ``torch.device``), checked to be available."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise SettingError(_device_message(device)) from error
    if resolved.type not in DEVICES:
        raise SettingError(_device_message(device))
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise SettingError(
            f"device: got {device!r} but CUDA is not available to this torch "
            f"({torch.__version__}); use device='cpu'"
        )
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise SettingError(
            f"device: got {device!r} but only {torch.cuda.device_count()} CUDA device(s) exist"
        )
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise SettingError(
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
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise CheckpointError(f"{path}: unreadable config file: {error!s:.200}") from error
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: config must be a JSON object, got {type(value).__name__}")
    return value


MAX_CONFIG_COUNT = 64
"""Largest layer count or list length a config may hold (SD1.x has 2 and 4): a bigger
one would build thousands of modules before any weight is checked."""
COUNT_KEYS = ("layers_per_block", "transformer_layers_per_block", "num_hidden_layers")


def check_config_counts(config: Mapping[str, Any], source: object) -> None:
    """Refuse a config whose layer counts or lists exceed ``MAX_CONFIG_COUNT``."""
    for key, value in config.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        too_long = isinstance(value, (list, tuple)) and len(value) > MAX_CONFIG_COUNT
        counts = [v for v in values if key in COUNT_KEYS and isinstance(v, int)]
        if too_long or any(v > MAX_CONFIG_COUNT for v in counts):
            shown = f"a list of {len(value)}" if too_long else f"{max(counts)}"
            raise CheckpointError(
                f"{source}: config {key!r:.60} is {shown}; at most {MAX_CONFIG_COUNT} is "
                "accepted (SD1.x models have 2 to 12)"
            )


def build_meta(cls: Any, config: Mapping[str, Any], source: object = "config") -> Any:
    """``cls.from_config(config)`` with every parameter on the meta device (no storage).

    Raises:
        CheckpointError: naming ``source``, for counts beyond ``MAX_CONFIG_COUNT`` or
            values diffusers cannot build from.
    """
    check_config_counts(config, source)
    try:
        with torch.device("meta"):
            return cls.from_config(dict(config))
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, RuntimeError) as error:
        raise CheckpointError(
            f"{source}: not a valid {cls.__name__} config: {error!s:.200}"
        ) from error


def prepare_tensor(tensor: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Cast floating tensors to ``dtype`` and move to ``device``; no copy when both match."""
    wanted = dtype if tensor.is_floating_point() else tensor.dtype
    if tensor.dtype == wanted and tensor.device == device:
        return tensor
    return tensor.to(device=device, dtype=wanted)


def prepare_weight(
    tensor: torch.Tensor, dtype: torch.dtype, device: torch.device, path: Path, key: str
) -> torch.Tensor:
    """``prepare_tensor`` for a network weight, which must be floating point (an integer,
    bool or complex tensor in its place would only fail later, inside the network).

    Raises:
        CheckpointError: naming the file, the key and the dtype found, or a dtype torch
            cannot convert (float4).
    """
    if not tensor.is_floating_point():
        raise CheckpointError(
            f"{path}: tensor {key!r:.100} is {tensor.dtype}, expected a floating-point weight"
        )
    try:
        return prepare_tensor(tensor, dtype, device)
    except (RuntimeError, NotImplementedError, TypeError) as error:  # float4: no conversion
        raise CheckpointError(
            f"{path}: tensor {key!r:.100} cannot be converted from {tensor.dtype} to {dtype}: "
            f"{error!s:.100}"
        ) from error


def expected_shapes(module: Any) -> dict[str, tuple[int, ...]]:
    """Each state-dict key of a (meta-built) module -> the shape its config gives it."""
    return {key: tuple(tensor.shape) for key, tensor in module.state_dict().items()}


class Fit(NamedTuple):
    """What a file's tensors must fit: ``expected_shapes`` of a meta-built module, the name
    of its config for messages (``"packaged SD1.5"``), and a hint saying what to do."""

    expected: Mapping[str, Sequence[int]]
    config: str = "SD1.x"
    hint: str | None = None


def check_fit(path: Path, part: str, found: Mapping[str, Sequence[int]], fit: Fit) -> None:
    """Refuse tensors whose shapes (read from the file's header, before any tensor is read
    or converted) differ from ``fit.expected``, keys it does not have, or keys missing;
    names up to 10 (5 shapes).

    Raises:
        CheckpointError: naming the file, the part, the differing keys, then ``fit.hint``.
    """
    expected, config, hint = fit
    unexpected = sorted(key for key in found if key not in expected)
    missing = sorted(key for key in expected if key not in found)
    differ = [
        f"{key[:80]} {list(shape)} vs {list(expected[key])}"
        for key, shape in found.items()
        if key in expected and tuple(shape) != tuple(expected[key])
    ]
    if differ:
        shown = name_list(differ, 5, None)
        what = f"{len(differ)} shapes differ (file vs config: {shown})"
    elif unexpected:
        what = f"{len(unexpected)} tensors the config does not have ({name_list(unexpected)})"
    elif missing:
        what = f"{len(missing)} tensors missing ({name_list(missing)})"
    else:
        return
    raise CheckpointError(
        f"{path}: the {part} tensors do not fit the {config} {part} config: {what}"
        f"{f'; {hint}' if hint else ''}"
    )


def _file_shape(shape: Sequence[int], conv1x1: bool) -> tuple[int, ...]:
    """A shape as the diffusers module holds it (1x1 conv ``[C, C, 1, 1]`` -> ``[C, C]``)."""
    if conv1x1 and len(shape) == 4 and tuple(shape[2:]) == (1, 1):
        return tuple(shape[:2])
    return tuple(shape)


def read_mapped(
    source: TensorFile,
    prefix: str,
    rows: list[KeyRow],
    dtype: torch.dtype,
    device: torch.device,
    part: str,
    *,
    fit: Fit | None = None,
    on_tensor: Callable[[], None] | None = None,
    channels_last: bool = False,
) -> dict[str, torch.Tensor]:
    """Diffusers-named tensors for ``rows`` from LDM keys ``prefix + row.ldm`` in ``source``.

    1x1-conv attention weights (``row.conv1x1``) are squeezed to linear ``[C, C]``. With
    ``fit``, every shape is checked (``check_fit``) before any tensor is read or
    converted. ``on_tensor()`` is called after each tensor. ``channels_last``: 4-D weights
    come out in channels-last order (``ConvertingReader``).

    Raises:
        CheckpointError: some LDM keys are absent, or shapes do not fit (a few are named,
            then ``fit.hint``).
    """
    missing = [prefix + row.ldm for row in rows if prefix + row.ldm not in source]
    if missing:
        hint = None if fit is None else fit.hint
        raise missing_keys_error(source.path, part, missing, hint, len(rows) - len(missing))
    if fit is not None:
        found = {row.diffusers: _file_shape(source[prefix + row.ldm], row.conv1x1) for row in rows}
        check_fit(source.path, part, found, fit)
    tensors = {}
    with ConvertingReader(source, channels_last=channels_last) as reader:
        for row in rows:
            tensor = reader.tensor(prefix + row.ldm, dtype, device)
            if row.conv1x1 and tensor.ndim == 4:
                tensor = tensor[:, :, 0, 0]
            tensors[row.diffusers] = prepare_weight(
                tensor, dtype, device, source.path, prefix + row.ldm
            )
            if on_tensor is not None:
                on_tensor()
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
