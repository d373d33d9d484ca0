"""What a checkpoint file holds, from its key names and shapes only (no tensor is read).

Telltales (reference-UI / ComfyUI conventions for single-file checkpoints):

- SDXL: ``conditioner.embedders.*`` keys.
- SD 2.x: ``cond_stage_model.model.*`` (OpenCLIP) keys, or a UNet context width of 1024.
- SD 1.x: ``model.diffusion_model.*`` with a 4-channel ``conv_in`` and context width 768;
  9 input channels is an inpainting model, 8 an instruct-pix2pix model.
- Files that are not whole models: LoRA / LyCORIS (``lora_down``, ``lora_A``, ``hada_w1_a``,
  ``lokr_w1``...), textual-inversion embeddings (``string_to_param``, ``emb_params``),
  VAE-only files (``encoder.*``/``decoder.*``), diffusers component files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from sdstack.errors import SdstackError
from sdstack.models.key_map.ldm import TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX

SD1 = "SD1.x checkpoint"
CONV_IN_KEY = UNET_PREFIX + "input_blocks.0.0.weight"
SD1_CONTEXT_WIDTH = 768

LORA_MARKERS = (
    "lora_down",
    "lora_up",
    "lora_A",
    "lora_B",
    "lora.down",
    "lora.up",
    "hada_w1",
    "lokr_w1",
    ".oft_",
    "lora_mid",
)


CONFIG_DIR_HINT = (
    "if this is an SD1.x-family model with non-standard sizes, give its diffusers configs "
    "with config_dir= (--config-dir on the command line)"
)
"""Said when a single file does not fit the packaged SD1.5 configs."""


class CheckpointError(SdstackError):
    """A model file that sdstack cannot load as SD1.x: what it is and what was expected."""


def name_list(names: Sequence[str], limit: int = 10, width: int | None = 80) -> str:
    """At most ``limit`` names (each cut to ``width`` characters), then ``and N more``."""
    shown = ", ".join(name[:width] for name in names[:limit])
    return f"{shown} and {len(names) - limit} more" if len(names) > limit else shown


def _context_width(shapes: Mapping[str, Sequence[int]]) -> int | None:
    for key, shape in shapes.items():
        if key.startswith(UNET_PREFIX) and key.endswith("attn2.to_k.weight") and len(shape) == 2:
            return int(shape[1])
    return None


def _not_a_model(keys: Sequence[str]) -> str:
    """Describe a file without UNet keys: LoRA, embedding, VAE, component file, unknown."""
    if any(marker in key for key in keys for marker in LORA_MARKERS):
        return "a LoRA/LyCORIS network (lora_down/lora_up-style keys)"
    if any(
        key in ("string_to_param", "emb_params", "clip_l", "clip_g")
        or key.startswith("string_to_param.")
        for key in keys
    ):
        return "a textual-inversion embedding"
    bare = [key.removeprefix(VAE_PREFIX) for key in keys]
    if bare and all(
        key.startswith(
            ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "loss.", "model_ema.")
        )
        for key in bare
    ):
        return "a VAE-only file (encoder./decoder. keys); pass it as vae="
    if any(key.startswith((TEXT_PREFIX, VAE_PREFIX)) for key in keys):
        return f"an LDM checkpoint without a UNet (no {UNET_PREFIX}* keys)"
    if any(key.startswith("down_blocks.") for key in keys) and "conv_in.weight" in keys:
        return "a diffusers-format UNet file; load the whole diffusers folder instead"
    if any(key.startswith("text_model.") for key in keys):
        return "a CLIP text-encoder-only file"
    shown = name_list(sorted(keys), 4) or "no tensors at all"
    return f"not a recognised model (first keys: {shown})"


def detect_kind(shapes: Mapping[str, Sequence[int]], context_width: int = SD1_CONTEXT_WIDTH) -> str:
    """A short description of what the file holds; ``SD1`` for a loadable SD1.x model.

    ``context_width`` is the UNet cross-attention width the config expects (768 on SD1.x;
    smaller for the tiny test models).
    """
    keys = list(shapes)
    if any(key.startswith("conditioner.embedders.") for key in keys):
        return "an SDXL checkpoint (conditioner.embedders.* keys)"
    if any(key.startswith("cond_stage_model.model.") for key in keys):
        return "an SD 2.x checkpoint (OpenCLIP cond_stage_model.model.* keys)"
    if CONV_IN_KEY not in shapes:
        if any(key.startswith(UNET_PREFIX) for key in keys):
            return f"a checkpoint without its UNet input conv ({CONV_IN_KEY} missing)"
        return _not_a_model(keys)
    width = _context_width(shapes)
    if width is not None and width != context_width:
        if width == 1024:
            return "an SD 2.x checkpoint (UNet context width 1024)"
        return f"an unknown UNet (context width {width}, the config has {context_width})"
    shape = shapes[CONV_IN_KEY]
    channels = int(shape[1]) if len(shape) == 4 else None
    if channels == 9:
        return "an SD1.x inpainting checkpoint (conv_in has 9 input channels)"
    if channels == 8:
        return "an instruct-pix2pix checkpoint (conv_in has 8 input channels)"
    if channels != 4:
        return f"an unknown UNet (conv_in weight shape {list(shape)}, SD1.x has 4 inputs)"
    return SD1


def check_sd1(
    path: object,
    shapes: Mapping[str, Sequence[int]],
    context_width: int = SD1_CONTEXT_WIDTH,
    hint: str | None = None,
) -> None:
    """Raise ``CheckpointError`` unless ``shapes`` look like an SD1.x text-to-image model.

    ``hint`` is added when the file is a UNet of other sizes (context width or input
    channels the config does not have), e.g. ``CONFIG_DIR_HINT``.
    """
    kind = detect_kind(shapes, context_width)
    if kind != SD1:
        extra = f"; {hint}" if hint and kind.startswith("an unknown UNet") else ""
        raise CheckpointError(
            f"{path}: cannot load as an SD1.x model: this looks like {kind}; "
            f"expected an SD1.x text-to-image checkpoint{extra}"
        )


def missing_keys_error(
    path: object, part: str, missing: Sequence[str], hint: str | None = None, found: int = 1
) -> CheckpointError:
    """The error for an SD1.x checkpoint whose ``part`` lacks tensors (names up to 10).

    ``found``: how many of the part's tensors the file does have. A VAE with none of them
    suggests a separate VAE file; otherwise ``hint`` (e.g. ``CONFIG_DIR_HINT``) is added.
    """
    if part == "VAE" and found == 0:
        hint = "give a separate VAE file with vae= (--vae on the command line)"
    return CheckpointError(
        f"{path}: SD1.x checkpoint with an incomplete {part}: {len(missing)} tensors "
        f"missing ({name_list(missing)}){f'; {hint}' if hint else ''}"
    )
