"""The one key map of SD1.x: every layer under every name, and the block it belongs to.

Each module of the UNet, VAE and CLIP text encoder that holds parameters is one
:class:`Layer`, generated from the architecture (the networks built on the meta device from
their configs) and named in every scheme in use: diffusers/transformers module path, LDM
single-file path, kohya, the reference UI's compvis and ``network_layer_mapping`` names, and
PEFT. :class:`KeyMap` finds a layer from any of those names; ``block`` is its merge block
(26 blocks) and ``lbw_index`` its place among the 17 LoRA-block-weight values.

- :func:`sd1_key_map`: the packaged SD1.5 architecture (cached).
- :func:`key_map_of`: the architecture of a loaded model (cached by its configs).
- :func:`live_module`: a layer's module object in a loaded model.

Importing this package is cheap (no torch); the builders import torch and diffusers when
called.
"""

from __future__ import annotations

from sdstack.models.key_map.blocks import (
    COMPONENTS,
    LBW_BLOCKS,
    MERGE_BLOCKS,
    KeyMapError,
    block_of_module,
    lbw_index,
    merge_block_of_key,
)
from sdstack.models.key_map.build import (
    build_key_map,
    config_fingerprint,
    key_map_of,
    key_map_of_configs,
    live_module,
    sd1_key_map,
)
from sdstack.models.key_map.layer import KeyMap, Layer, UnknownLayerError
from sdstack.models.key_map.ldm import (
    OLD_DIFFUSERS_VAE_ATTENTION,
    TEXT_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    KeyRow,
    expand_key_map,
    unet_key_map,
    unet_module_table,
    vae_key_map,
    vae_module_table,
)

__all__ = [
    "COMPONENTS",
    "LBW_BLOCKS",
    "MERGE_BLOCKS",
    "OLD_DIFFUSERS_VAE_ATTENTION",
    "TEXT_PREFIX",
    "UNET_PREFIX",
    "VAE_PREFIX",
    "KeyMap",
    "KeyMapError",
    "KeyRow",
    "Layer",
    "UnknownLayerError",
    "block_of_module",
    "build_key_map",
    "config_fingerprint",
    "expand_key_map",
    "key_map_of",
    "key_map_of_configs",
    "lbw_index",
    "live_module",
    "merge_block_of_key",
    "sd1_key_map",
    "unet_key_map",
    "unet_module_table",
    "vae_key_map",
    "vae_module_table",
]
