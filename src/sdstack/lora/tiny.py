"""Seeded random kohya LoRA files for any model: tests, examples, benchmarks.

:func:`write_tiny_lora` writes what kohya's ``networks.lora`` trainer writes for SD1.x
(``lora_unet_*`` / ``lora_te_*`` modules with ``lora_down.weight`` ``[r, in]``,
``lora_up.weight`` ``[out, r]`` and ``alpha``, the ``ss_*`` metadata) over every
attention projection of the UNet and every linear layer of the text encoder, with
random factors, so that applying it visibly changes a tiny model's image.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

ATTENTION_LEAVES = ("to_q", "to_k", "to_v", "to_out.0")


def lora_target_layers(components: Any) -> list[Any]:
    """The layers a plain kohya LoRA covers here: attention projections, text encoder
    linears (``key_map.Layer`` objects, in model order)."""
    from sdstack.models.key_map import key_map_of

    layers = []
    for layer in key_map_of(components).layers:
        if layer.kind != "linear":
            continue
        attention = layer.component == "unet" and layer.module.endswith(ATTENTION_LEAVES)
        if attention or (layer.component == "text_encoder" and ".encoder.layers." in layer.module):
            layers.append(layer)
    return layers


def write_tiny_lora(
    components: Any,
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    rank: int = 4,
    alpha: float = 4.0,
    scale: float = 0.5,
    clip_skip: int | None = None,
    dtype: Any = None,
) -> Path:
    """Write a random kohya LoRA for ``components`` to ``path`` (``.safetensors``).

    ``lora_down ~ N(0, 1/in)``, ``lora_up ~ N(0, scale^2/r)``: at multiplier 1 each
    delta is about ``scale`` times a unit-variance layer. ``clip_skip`` is recorded as
    ``ss_clip_skip`` (and ``modelspec.encoder_layer``), None as kohya writes it: "None".

    Returns:
        The path written.
    """
    import torch
    from safetensors.torch import save_file

    from sdstack.atomic_files import replace, temporary_file

    generator = torch.Generator().manual_seed(seed)
    dtype = dtype or torch.float32
    tensors = {}
    for layer in lora_target_layers(components):
        out_features, in_features = dict(layer.params)["weight"]
        down = torch.randn((rank, in_features), generator=generator) / in_features**0.5
        up = torch.randn((out_features, rank), generator=generator) * scale / rank**0.5
        tensors[f"{layer.kohya}.lora_down.weight"] = down.to(dtype)
        tensors[f"{layer.kohya}.lora_up.weight"] = up.to(dtype)
        tensors[f"{layer.kohya}.alpha"] = torch.tensor(float(alpha))
    path = Path(path)
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": f"{alpha:g}",
        "ss_output_name": path.stem,
        "ss_base_model_version": "sd_v1",
        "ss_clip_skip": "None" if clip_skip is None else str(clip_skip),
    }
    if clip_skip is not None:
        metadata["modelspec.encoder_layer"] = str(clip_skip)
    path.parent.mkdir(parents=True, exist_ok=True)
    with temporary_file(path.parent, suffix=".safetensors") as temporary:
        save_file(tensors, str(temporary), metadata=metadata)
        replace(temporary, path)
    return path
