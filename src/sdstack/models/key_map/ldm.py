"""The LDM (original CompVis / single-file) <-> diffusers module tables of SD1.x, as data.

A single-file SD1.x checkpoint stores the UNet under ``model.diffusion_model.``, the VAE
under ``first_stage_model.`` and the CLIP text model under ``cond_stage_model.transformer.``.
The UNet and VAE use the LDM module names (``input_blocks.N.M``, ``encoder.down.N.block.M``);
diffusers names the same modules ``down_blocks.L.resnets.J`` and so on.

The tables are generated from the architecture config, never written out by hand: a *module
table* pairs each diffusers module prefix with its LDM prefix and a *leaf table* (how the
parameter names inside that module differ). Expanding the table over the parameter names of
the diffusers model built on the meta device gives one row per tensor::

    KeyRow(diffusers="down_blocks.0.resnets.0.norm1.weight",
           ldm="input_blocks.1.0.in_layers.0.weight", conv1x1=False)

``conv1x1`` marks the VAE mid-block attention projections: LDM stores them as 1x1
convolutions (shape ``[C, C, 1, 1]``), diffusers as linear layers (``[C, C]``). The text
encoder needs no table: its checkpoint names are the transformers names under
``TEXT_PREFIX`` (with the ``text_model.`` level that transformers 5 no longer has).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
TEXT_MODEL = "text_model."
"""The level CLIP checkpoints (and transformers 4) put above ``embeddings``/``encoder``."""

# Parameter names inside one UNet ResBlock: diffusers -> LDM.
UNET_RESNET_LEAVES: dict[str, str] = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# Inside one VAE ResnetBlock only the shortcut is renamed.
VAE_RESNET_LEAVES: dict[str, str] = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
}
# The VAE mid-block self-attention (LDM AttnBlock); q/k/v/proj_out are 1x1 convs in LDM.
VAE_ATTENTION_LEAVES: dict[str, str] = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}
VAE_ATTENTION_CONV1X1 = frozenset({"to_q", "to_k", "to_v", "to_out.0"})
# Diffusers < 0.14 named the VAE attention projections differently (old diffusers VAE files).
OLD_DIFFUSERS_VAE_ATTENTION: dict[str, str] = {
    "query": "to_q",
    "key": "to_k",
    "value": "to_v",
    "proj_attn": "to_out.0",
}

# (diffusers module prefix, LDM module prefix, leaf table or None when names are equal)
ModuleRow = tuple[str, str, "dict[str, str] | None"]


@dataclass(frozen=True)
class KeyRow:
    """One tensor's name in both layouts (without the checkpoint-level prefix)."""

    diffusers: str
    ldm: str
    conv1x1: bool = False


def _layers_per_block(config: Mapping[str, Any]) -> int:
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise ValueError(
            f"layers_per_block: expected one int for an SD1.x-style model, got {layers!r}"
        )
    return layers


def unet_module_table(config: Mapping[str, Any]) -> list[ModuleRow]:
    """UNet modules, diffusers -> LDM, from ``UNet2DConditionModel`` config values.

    LDM numbers ``input_blocks`` consecutively: 0 is conv_in, then per level
    ``layers_per_block`` (ResBlock, SpatialTransformer?) entries and one Downsample
    (all levels but the last). ``output_blocks`` hold ``layers_per_block + 1`` entries per
    level: ResBlock, SpatialTransformer?, then Upsample on the last one (all levels but the
    last). ``middle_block`` is ResBlock, SpatialTransformer, ResBlock.
    """
    layers = _layers_per_block(config)
    levels = len(config["block_out_channels"])
    rows: list[ModuleRow] = [
        ("time_embedding.linear_1", "time_embed.0", None),
        ("time_embedding.linear_2", "time_embed.2", None),
        ("conv_in", "input_blocks.0.0", None),
    ]
    index = 1
    for level, block_type in enumerate(config["down_block_types"]):
        for layer in range(layers):
            rows.append(
                (
                    f"down_blocks.{level}.resnets.{layer}",
                    f"input_blocks.{index}.0",
                    UNET_RESNET_LEAVES,
                )
            )
            if block_type.startswith("CrossAttn"):
                rows.append(
                    (f"down_blocks.{level}.attentions.{layer}", f"input_blocks.{index}.1", None)
                )
            index += 1
        if level < levels - 1:
            rows.append(
                (f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{index}.0.op", None)
            )
            index += 1
    rows += [
        ("mid_block.resnets.0", "middle_block.0", UNET_RESNET_LEAVES),
        ("mid_block.attentions.0", "middle_block.1", None),
        ("mid_block.resnets.1", "middle_block.2", UNET_RESNET_LEAVES),
    ]
    index = 0
    for level, block_type in enumerate(config["up_block_types"]):
        for layer in range(layers + 1):
            rows.append(
                (
                    f"up_blocks.{level}.resnets.{layer}",
                    f"output_blocks.{index}.0",
                    UNET_RESNET_LEAVES,
                )
            )
            slot = 1
            if block_type.startswith("CrossAttn"):
                rows.append(
                    (f"up_blocks.{level}.attentions.{layer}", f"output_blocks.{index}.1", None)
                )
                slot = 2
            if layer == layers and level < levels - 1:
                rows.append(
                    (
                        f"up_blocks.{level}.upsamplers.0.conv",
                        f"output_blocks.{index}.{slot}.conv",
                        None,
                    )
                )
            index += 1
    rows += [("conv_norm_out", "out.0", None), ("conv_out", "out.2", None)]
    return rows


def vae_module_table(config: Mapping[str, Any]) -> list[ModuleRow]:
    """VAE modules, diffusers -> LDM, from ``AutoencoderKL`` config values.

    Encoder level ``i`` is ``encoder.down.i``; decoder ``up_blocks.i`` is LDM
    ``decoder.up.{n-1-i}`` (LDM numbers decoder levels from the lowest resolution up).
    """
    layers = _layers_per_block(config)
    levels = len(config["block_out_channels"])
    rows: list[ModuleRow] = []
    for part in ("encoder", "decoder"):
        rows += [
            (f"{part}.conv_in", f"{part}.conv_in", None),
            (f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", VAE_RESNET_LEAVES),
            (f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", VAE_ATTENTION_LEAVES),
            (f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", VAE_RESNET_LEAVES),
            (f"{part}.conv_norm_out", f"{part}.norm_out", None),
            (f"{part}.conv_out", f"{part}.conv_out", None),
        ]
    for level in range(levels):
        for layer in range(layers):
            rows.append(
                (
                    f"encoder.down_blocks.{level}.resnets.{layer}",
                    f"encoder.down.{level}.block.{layer}",
                    VAE_RESNET_LEAVES,
                )
            )
        if level < levels - 1:
            rows.append(
                (
                    f"encoder.down_blocks.{level}.downsamplers.0.conv",
                    f"encoder.down.{level}.downsample.conv",
                    None,
                )
            )
    for level in range(levels):
        ldm_level = levels - 1 - level
        for layer in range(layers + 1):
            rows.append(
                (
                    f"decoder.up_blocks.{level}.resnets.{layer}",
                    f"decoder.up.{ldm_level}.block.{layer}",
                    VAE_RESNET_LEAVES,
                )
            )
        if level < levels - 1:
            rows.append(
                (
                    f"decoder.up_blocks.{level}.upsamplers.0.conv",
                    f"decoder.up.{ldm_level}.upsample.conv",
                    None,
                )
            )
    rows += [("quant_conv", "quant_conv", None), ("post_quant_conv", "post_quant_conv", None)]
    return rows


def expand_key_map(diffusers_keys: Iterable[str], table: list[ModuleRow]) -> list[KeyRow]:
    """One ``KeyRow`` per diffusers tensor name, by the longest module prefix in ``table``.

    Raises:
        ValueError: a key that no module row covers, or a leaf missing from its leaf
            table (the architecture is not the SD1.x family the table describes).
    """
    modules = {diffusers: (ldm, leaves) for diffusers, ldm, leaves in table}
    rows = []
    for key in diffusers_keys:
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:cut])
            if prefix in modules:
                break
        else:
            raise ValueError(f"key map: no LDM module for diffusers key {key!r}")
        ldm_prefix, leaves = modules[prefix]
        rest = ".".join(parts[cut:])
        if leaves is None:
            rows.append(KeyRow(key, f"{ldm_prefix}.{rest}"))
            continue
        leaf, _, param = rest.rpartition(".")
        if leaf not in leaves:
            raise ValueError(f"key map: unexpected parameter {key!r} in module {prefix!r}")
        conv1x1 = leaves is VAE_ATTENTION_LEAVES and leaf in VAE_ATTENTION_CONV1X1
        conv1x1 = conv1x1 and param == "weight"
        rows.append(KeyRow(key, f"{ldm_prefix}.{leaves[leaf]}.{param}", conv1x1))
    return rows


def unet_key_map(unet: Any) -> list[KeyRow]:
    """Rows for every tensor of a ``UNet2DConditionModel`` (meta-built is enough)."""
    return expand_key_map(unet.state_dict().keys(), unet_module_table(unet.config))


def vae_key_map(vae: Any) -> list[KeyRow]:
    """Rows for every tensor of an ``AutoencoderKL`` (meta-built is enough)."""
    return expand_key_map(vae.state_dict().keys(), vae_module_table(vae.config))
