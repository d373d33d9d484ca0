"""Separate VAE files (``--vae`` in the reference UI) in the three key layouts seen in use.

================================  ==============================================
layout                            example key
================================  ==============================================
LDM, checkpoint prefix            ``first_stage_model.encoder.down.0.block.0.conv1.weight``
LDM, bare (``*.vae.pt`` files)    ``encoder.down.0.block.0.conv1.weight``
diffusers                         ``encoder.down_blocks.0.resnets.0.conv1.weight``
================================  ==============================================

Old diffusers VAE files (before 0.14) name the attention projections
``query/key/value/proj_attn``; they are read as ``to_q/to_k/to_v/to_out.0``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sdstack.models.assemble import (
    Fit,
    assign_tensors,
    check_fit,
    expected_shapes,
    prepare_weight,
    read_mapped,
)
from sdstack.models.detect import CheckpointError, detect_kind, missing_keys_error
from sdstack.models.key_map.ldm import OLD_DIFFUSERS_VAE_ATTENTION, VAE_PREFIX, vae_key_map
from sdstack.models.single_file import TensorFile, open_tensor_file


def vae_layout(keys: list[str]) -> tuple[str, str] | None:
    """``(layout, prefix)``: ``("ldm", "first_stage_model.")``, ``("ldm", "")``,
    ``("diffusers", "")``, or ``None`` when no VAE key is present."""
    if any(key.startswith(VAE_PREFIX + "encoder.") for key in keys):
        return "ldm", VAE_PREFIX
    if any(key.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for key in keys):
        return "diffusers", ""
    if any(key.startswith(("encoder.down.", "decoder.up.")) for key in keys):
        return "ldm", ""
    return None


def _old_name(key: str) -> str:
    for old, new in OLD_DIFFUSERS_VAE_ATTENTION.items():
        if f".attentions.0.{new}." in key:
            return key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
    return key


def _read_diffusers(
    source: TensorFile,
    vae: Any,
    dtype: torch.dtype,
    device: torch.device,
    fit: Fit,
    on_tensor: Callable[[], None] | None,
) -> dict[str, torch.Tensor]:
    expected = fit.expected
    names = {key: key if key in source else _old_name(key) for key in expected}
    missing = [key for key, name in names.items() if name not in source]
    if missing:
        raise missing_keys_error(source.path, "VAE", missing)
    found = {}
    for key, name in names.items():
        shape = tuple(source[name])
        attention = len(shape) == 4 and key.endswith(".weight") and ".attentions." in key
        found[key] = shape[:2] if attention and shape[2:] == (1, 1) else shape
    check_fit(source.path, "VAE", found, fit)
    tensors = {}
    for key, name in names.items():
        tensor = source.tensor(name)
        if tensor.ndim == 4 and key.endswith(".weight") and ".attentions." in key:
            tensor = tensor[:, :, 0, 0]
        tensors[key] = prepare_weight(tensor, dtype, device, source.path, name)
        if on_tensor is not None:
            on_tensor()
    return tensors


def fill_vae(
    source: TensorFile,
    vae: Any,
    dtype: torch.dtype,
    device: torch.device,
    *,
    config: str = "SD1.x",
    hint: str | None = None,
    on_tensor: Callable[[], None] | None = None,
) -> Any:
    """Give the meta-built ``AutoencoderKL`` ``vae`` the VAE tensors of an open file.

    Shapes are checked against the VAE's config (named ``config`` in messages, then
    ``hint``) before any tensor is read; ``on_tensor()`` is called after each tensor.

    Raises:
        CheckpointError: not a VAE file (says what it looks like), missing tensors,
            shapes that do not fit the VAE config.
    """
    layout = vae_layout(list(source))
    if layout is None:
        raise CheckpointError(
            f"{source.path}: not a VAE file: this looks like {detect_kind(source)}; expected "
            "encoder./decoder. tensors (LDM or diffusers names, optionally under "
            f"{VAE_PREFIX!r})"
        )
    fit = Fit(expected_shapes(vae), config, hint)
    if layout[0] == "ldm":
        rows = vae_key_map(vae)
        tensors = read_mapped(
            source, layout[1], rows, dtype, device, "VAE", fit=fit, on_tensor=on_tensor
        )
    else:
        tensors = _read_diffusers(source, vae, dtype, device, fit, on_tensor)
    return assign_tensors(vae, tensors, source.path, "VAE")


def load_vae_weights(
    path: str | Path,
    vae: Any,
    dtype: torch.dtype,
    device: torch.device,
    *,
    config: str = "SD1.x",
    hint: str | None = None,
    on_tensor: Callable[[], None] | None = None,
) -> Any:
    """``fill_vae`` from a separate VAE file (``.safetensors``/``.pt``/``.ckpt``).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: as ``fill_vae``, or a corrupt/truncated file or refused pickle.
    """
    with open_tensor_file(path) as source:
        return fill_vae(source, vae, dtype, device, config=config, hint=hint, on_tensor=on_tensor)
