"""Textual-inversion embeddings bundled in a LoRA file (``bundle_emb.*``).

The reference UI splits ``bundle_emb.<name>.<rest>`` at the first dot of the rest and
builds the embedding ``<name>`` from its tensors, as it reads embedding files:

- ``bundle_emb.<name>.string_to_param.<token>`` (its own ``.pt`` layout, usually ``*``);
- ``bundle_emb.<name>.<anything>`` when it is the only tensor of that name
  (``emb_params``, a diffusers ``{token: T}``);
- ``bundle_emb.<name>.clip_l`` + ``clip_g``: an SDXL embedding, refused on SD 1.x.

Each becomes float32 ``[n, width]`` (a ``(width,)`` vector is one row), checked before
conversion: floating point, the text encoder's token width, 1 <= n <= 75 (one prompt
chunk).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from sdstack.lora.network import ForeignLoraError, LoraFileError

MAX_VECTORS = 75
"""An embedding fills at most one prompt chunk (75 tokens)."""


def _chosen_key(path: Path, name: str, rests: Mapping[str, str]) -> str:
    """The file key holding embedding ``name``'s vectors (``rests``: rest -> file key)."""
    params = [rest for rest in rests if rest.startswith("string_to_param.")]
    if len(params) == 1:
        return rests[params[0]]
    if {"clip_l", "clip_g"} <= set(rests):
        raise ForeignLoraError(
            f"{path}: bundled embedding {name!r} is an SDXL embedding (clip_l + clip_g); "
            "this model is SD 1.x",
            "SDXL",
            "bundled clip_l + clip_g embedding",
        )
    if len(rests) == 1 and not params:
        return next(iter(rests.values()))
    raise LoraFileError(
        f"{path}: bundled embedding {name!r} has tensors {', '.join(sorted(rests))[:200]}; "
        "expected one 'string_to_param.*' tensor or exactly one tensor"
    )


def _vectors(path: Path, key: str, tensor: torch.Tensor, width: int | None) -> torch.Tensor:
    shape = tuple(tensor.shape)
    if not tensor.is_floating_point():
        raise LoraFileError(
            f"{path}: {key}: dtype {tensor.dtype}; expected a floating-point embedding"
        )
    if len(shape) not in (1, 2) or (len(shape) == 2 and not 1 <= shape[0] <= MAX_VECTORS):
        raise LoraFileError(
            f"{path}: {key}: shape {shape}; expected (vectors, width) with 1 to "
            f"{MAX_VECTORS} vectors, or (width,)"
        )
    if width is not None and shape[-1] != width:
        raise LoraFileError(
            f"{path}: {key}: embedding width {shape[-1]}; expected {width} (the text "
            "encoder's token width)"
        )
    vectors = tensor.reshape(-1, shape[-1]).to(dtype=torch.float32, copy=True)
    if not torch.isfinite(vectors).all():
        raise LoraFileError(f"{path}: {key}: the embedding holds NaN or infinite values")
    return vectors.contiguous()


def bundled_embeddings(
    path: Path,
    keys: Mapping[str, tuple[str, str]],
    tensor: Callable[[str], torch.Tensor],
    width: int | None,
) -> dict[str, torch.Tensor]:
    """The embeddings of a file by name.

    Args:
        path: the file (for messages).
        keys: file key -> (embedding name, rest of the key).
        tensor: reads one file key.
        width: the model's token-embedding width (None: not checked).
    """
    by_name: dict[str, dict[str, str]] = {}
    for key, (name, rest) in keys.items():
        by_name.setdefault(name, {})[rest] = key
    embeddings = {}
    for name, rests in by_name.items():
        key = _chosen_key(path, name, rests)
        embeddings[name] = _vectors(path, key, tensor(key), width)
    return embeddings


def token_width(key_map: object) -> int | None:
    """The text encoder's token-embedding width in a key map (None when it has none)."""
    for layer in getattr(key_map, "layers", ()):
        if layer.component == "text_encoder" and layer.module.endswith("token_embedding"):
            weight = dict(layer.params).get("weight")
            if weight is not None and len(weight) == 2:
                return int(weight[1])
    return None
