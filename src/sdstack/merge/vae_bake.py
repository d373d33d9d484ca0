"""A separate VAE file seen as the ``first_stage_model.*`` tensors of a checkpoint (VAE bake).

The reference UI's "Bake in VAE" writes ``first_stage_model.<key>`` for each key of the VAE
file (its ``loss.*`` and ``model_ema.*`` entries left out). Here a VAE file may use any of
the layouts ``sdstack.models.vae_file`` reads: LDM names with or without the
``first_stage_model.`` prefix, or diffusers names (old ``query/key/value/proj_attn``
attention names included), which are renamed to LDM through the key map's VAE module
table for the levels and layers the file has. Diffusers stores the mid-block attention
projections as ``[C, C]`` and LDM as ``[C, C, 1, 1]``: :func:`same_vae_shape` treats the
two as one, and the merge reshapes to the checkpoint's shape.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch

from sdstack.merge.reader import ROWS_ALL, TensorSource, open_source
from sdstack.models.detect import CheckpointError, detect_kind
from sdstack.models.key_map.ldm import (
    OLD_DIFFUSERS_VAE_ATTENTION,
    VAE_PREFIX,
    expand_key_map,
    vae_module_table,
)
from sdstack.models.vae_file import vae_layout

IGNORED_PREFIXES = ("loss.", "model_ema.")
"""Entries of VAE training checkpoints that are not VAE weights (the reference skips them)."""
_VAE_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
_LEVEL = re.compile(r"^encoder\.down_blocks\.(\d+)\.")
_LAYER = re.compile(r"^encoder\.down_blocks\.0\.resnets\.(\d+)\.")


def same_vae_shape(mine: Sequence[int], theirs: Sequence[int]) -> bool:
    """Equal shapes, or ``[C, C, 1, 1]`` against ``[C, C]`` (a 1x1 conv as a linear)."""
    mine, theirs = tuple(mine), tuple(theirs)
    return mine == theirs or mine == (*theirs, 1, 1) or theirs == (*mine, 1, 1)


class VaeSource(TensorSource):
    """The tensors of a VAE file under their checkpoint names (``first_stage_model.<LDM>``)."""

    def __init__(
        self, source: TensorSource, names: dict[str, str], conv1x1: frozenset[str] = frozenset()
    ) -> None:
        shapes = {
            key: (*source[name], 1, 1)
            if key in conv1x1 and len(source[name]) == 2
            else tuple(source[name])
            for key, name in names.items()
        }
        super().__init__(source.name, shapes)
        self.path, self.source, self.names = source.path, source, names

    def dtype(self, key: str) -> torch.dtype:
        return self.source.dtype(self.names[key])

    def read(self, key: str, rows: slice | None = ROWS_ALL) -> torch.Tensor:
        """The tensor in its LDM shape (a diffusers ``[C, C]`` projection as ``[C, C, 1, 1]``);
        VAE tensors are small, so ``rows`` is not supported (the whole tensor is read)."""
        if rows is not None:
            raise ValueError("VaeSource.read: rows are not supported")
        return self.source.read(self.names[key]).reshape(self.shapes[key])

    def close(self) -> None:
        self.source.close()


def _diffusers_names(path: Path, keys: list[str]) -> tuple[dict[str, str], frozenset[str]]:
    """LDM checkpoint name -> diffusers file key, for the levels and layers the file has,
    and the LDM names stored as 1x1 convolutions."""
    levels = {int(m.group(1)) for key in keys if (m := _LEVEL.match(key))}
    layers = {int(m.group(1)) for key in keys if (m := _LAYER.match(key))}
    if not levels or not layers:
        raise CheckpointError(
            f"{path}: a diffusers VAE without encoder.down_blocks.0.resnets.*; expected a "
            "complete AutoencoderKL"
        )
    config = {"block_out_channels": [0] * (max(levels) + 1), "layers_per_block": max(layers) + 1}
    renamed = {}
    for key in keys:
        new = key
        for old, current in OLD_DIFFUSERS_VAE_ATTENTION.items():
            new = new.replace(f".attentions.0.{old}.", f".attentions.0.{current}.")
        renamed[new] = key
    try:
        rows = expand_key_map(list(renamed), vae_module_table(config))
    except ValueError as error:
        raise CheckpointError(
            f"{path}: not an SD1.x-style VAE: {str(error).removeprefix('key map: ')}"
        ) from error
    names = {VAE_PREFIX + row.ldm: renamed[row.diffusers] for row in rows}
    return names, frozenset(VAE_PREFIX + row.ldm for row in rows if row.conv1x1)


def open_vae(path: str | Path) -> VaeSource:
    """The VAE file at ``path`` as ``first_stage_model.*`` tensors.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: not a VAE (or checkpoint with one), an unreadable file, diffusers
            names outside the SD1.x VAE layout.
    """
    source = open_source(path)
    try:
        keys = [key for key in source if not key.startswith(IGNORED_PREFIXES)]
        layout = vae_layout(keys)
        if layout is None:
            raise CheckpointError(
                f"{source.name}: not a VAE file: this looks like {detect_kind(source)}; "
                "expected encoder./decoder. tensors (LDM or diffusers names, optionally under "
                f"{VAE_PREFIX!r})"
            )
        kind, prefix = layout
        conv1x1: frozenset[str] = frozenset()
        if kind == "diffusers":
            names, conv1x1 = _diffusers_names(Path(source.name), keys)
        else:
            names = {
                VAE_PREFIX + key[len(prefix) :]: key
                for key in keys
                if key.startswith(prefix) and key[len(prefix) :].startswith(_VAE_PARTS)
            }
    except BaseException:
        source.close()
        raise
    return VaeSource(source, names, conv1x1)
