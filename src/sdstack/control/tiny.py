"""A tiny random SD1-style ControlNet for the tiny UNet of ``sdstack.models.tiny``.

Same encoder sizes as ``TINY_UNET_CONFIG`` (levels 32 and 64 channels, 2 layers, cross
attention 32 wide on the second level and the middle), a hint encoder of 8 convs that
downsamples by 8 like SD1.5's (16/32/96/256 channels shrunk to 8/16/16/32). Every weight
is drawn from a seeded generator, and the zero convolutions (``controlnet_down_blocks``,
``controlnet_mid_block`` and the hint encoder's ``conv_out``), which a fresh ControlNet
starts at exactly zero, are random too, so residuals are non-zero in tests.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from sdstack.errors import SdstackError
from sdstack.models.tiny import TINY_UNET_CONFIG, _global_seed, randomize_norms

TINY_CONTROLNET_CONFIG: dict[str, Any] = {
    "in_channels": TINY_UNET_CONFIG["in_channels"],
    "conditioning_channels": 3,
    "block_out_channels": TINY_UNET_CONFIG["block_out_channels"],
    "layers_per_block": TINY_UNET_CONFIG["layers_per_block"],
    "down_block_types": TINY_UNET_CONFIG["down_block_types"],
    "cross_attention_dim": TINY_UNET_CONFIG["cross_attention_dim"],
    "attention_head_dim": TINY_UNET_CONFIG["attention_head_dim"],
    "norm_num_groups": TINY_UNET_CONFIG["norm_num_groups"],
    "conditioning_embedding_out_channels": (8, 16, 16, 32),
}
LAYOUTS = ("ldm", "ldm-bare", "diffusers", "diffusers-folder")
"""``write_tiny_controlnet`` layouts: ldm keys with ``control_model.``, ldm keys without
it, diffusers keys in one file, a diffusers folder (config.json + weights)."""


def _zero_modules(model: Any) -> list[Any]:
    """The convs a fresh ``ControlNetModel`` initialises to zero."""
    return [
        *model.controlnet_down_blocks,
        model.controlnet_mid_block,
        model.controlnet_cond_embedding.conv_out,
    ]


def tiny_controlnet(seed: int = 0) -> Any:
    """A seeded random ``ControlNetModel`` matching ``tiny_unet`` (eval mode).

    Zero convs get weights ``N(0, 1) / sqrt(fan_in)`` and biases ``0.1 N(0, 1)`` from
    ``torch.Generator().manual_seed(seed + 2)``; norms are randomised as in the tiny UNet.
    """
    import torch
    from diffusers import ControlNetModel

    with _global_seed(seed):  # default init draws from the global RNG; restored after
        model = ControlNetModel(**TINY_CONTROLNET_CONFIG).eval()
    randomize_norms(model, torch.Generator().manual_seed(seed + 1))
    generator = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for conv in _zero_modules(model):
            fan_in = math.prod(conv.weight.shape[1:])
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) / fan_in**0.5)
            conv.bias.copy_(0.1 * torch.randn(conv.bias.shape, generator=generator))
    return model


def _state(model: Any, layout: str) -> dict[str, Any]:
    from sdstack.control.keys import CONTROL_PREFIX, diffusers_to_ldm

    state = {key: tensor.detach().contiguous() for key, tensor in model.state_dict().items()}
    if layout == "diffusers":
        return state
    return diffusers_to_ldm(state, prefix=CONTROL_PREFIX if layout == "ldm" else "")


def _write_file(state: dict[str, Any], path: Path) -> None:
    """``state`` as ``.safetensors`` or, for ``.pth``/``.pt``/``.ckpt``, ``torch.save``."""
    import torch
    from safetensors.torch import save_file

    from sdstack.atomic_files import replace, temporary_file

    with temporary_file(path.parent, suffix=path.suffix) as temporary:
        if path.suffix.lower() == ".safetensors":
            save_file(state, str(temporary), metadata={"format": "pt"})
        else:
            torch.save(state, temporary)
        replace(temporary, path)


def write_tiny_controlnet(
    path: str | os.PathLike[str], *, layout: str = "ldm", seed: int = 0
) -> Path:
    """Write ``tiny_controlnet(seed)`` to ``path`` (atomically) and return the path.

    Layouts (``LAYOUTS``): ``"ldm"`` (``control_model.`` + ldm keys, as the original
    files), ``"ldm-bare"`` (ldm keys without the prefix), ``"diffusers"`` (diffusers keys,
    one file): ``.safetensors``, or ``torch.save`` for a ``.pth``/``.pt``/``.ckpt`` path;
    ``"diffusers-folder"``: ``path`` is a folder that gets ``config.json`` and
    ``diffusion_pytorch_model.safetensors``.

    Raises:
        SdstackError: an unknown layout, or a suffix that is not a weights file.
    """
    path = Path(path)
    if layout not in LAYOUTS:
        raise SdstackError(f"layout: got {layout!r}, expected one of {', '.join(LAYOUTS)}")
    model = tiny_controlnet(seed)
    if layout == "diffusers-folder":
        path.mkdir(parents=True, exist_ok=True)
        _write_file(_state(model, "diffusers"), path / "diffusion_pytorch_model.safetensors")
        config = {k: v for k, v in model.config.items() if not k.startswith("_")}
        config["_class_name"] = "ControlNetModel"
        text = json.dumps(config, indent=2, sort_keys=True, default=list)
        from sdstack.atomic_files import replace, temporary_file

        with temporary_file(path, suffix=".json") as temporary:
            temporary.write_text(text + "\n", encoding="utf-8")
            replace(temporary, path / "config.json")
        return path
    if path.suffix.lower() not in (".safetensors", ".pth", ".pt", ".ckpt"):
        raise SdstackError(
            f"{path}: expected a .safetensors, .pth, .pt or .ckpt file name for layout {layout!r}"
        )
    _write_file(_state(model, layout), path)
    return path
