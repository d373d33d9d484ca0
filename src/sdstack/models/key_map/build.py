"""The key map generated from the architecture: every parameter-holding module, all names.

The UNet, VAE and CLIP text model are built on the meta device from their configs (no
storage), then every module that owns parameters directly becomes one :class:`Layer`: its
module path, its LDM path (from the module tables of ``key_map.ldm``, applied to its
parameter names), parameter shapes, kind and merge block. ``sd1_key_map()`` is the packaged
SD1.5 architecture; ``key_map_of(components)`` the architecture of a loaded model (built
from the loaded networks), cached by a fingerprint of its three configs (so the tiny test
models get their own map).
"""

from __future__ import annotations

import functools
import json
from typing import Any

from sdstack.models.key_map.blocks import KeyMapError, block_of_module
from sdstack.models.key_map.layer import KeyMap, Layer
from sdstack.models.key_map.ldm import (
    TEXT_MODEL,
    TEXT_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    KeyRow,
    expand_key_map,
    unet_module_table,
    vae_module_table,
)

_VOLATILE_CONFIG_KEYS = frozenset(
    {"transformers_version", "dtype", "torch_dtype", "architectures", "output_hidden_states"}
)
"""Config entries that do not change the module tree (left out of the fingerprint)."""


def _kind(module: Any) -> str:
    import torch

    if isinstance(module, torch.nn.Linear):
        return "linear"
    if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
        return "conv"
    if isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm)):
        return "norm"
    if isinstance(module, torch.nn.Embedding):
        return "embedding"
    return "other"


def _owners(model: Any) -> list[tuple[str, Any, tuple[tuple[str, tuple[int, ...]], ...]]]:
    """``(path, module, params)`` of every module that holds parameters itself."""
    found = []
    for path, module in model.named_modules():
        params = tuple(
            (leaf, tuple(param.shape)) for leaf, param in module.named_parameters(recurse=False)
        )
        if params:
            found.append((path, module, params))
    return found


def _table_layers(model: Any, component: str, prefix: str, table: list) -> list[Layer]:
    """Layers of a UNet or VAE: each module's LDM path from the rows of its parameters."""
    try:
        rows: dict[str, KeyRow] = {
            row.diffusers: row for row in expand_key_map(model.state_dict().keys(), table)
        }
    except ValueError as error:
        raise KeyMapError(f"{component}: {error}; expected an SD1.x-family model") from error
    layers_per_block = model.config.get("layers_per_block", 2) if component == "unet" else 2
    layers = []
    for path, module, params in _owners(model):
        own = [rows[f"{path}.{leaf}"] for leaf, _ in params]
        ldm = {row.ldm.rpartition(".")[0] for row in own}
        if len(ldm) != 1:
            raise KeyMapError(f"{component} module {path!r}: parameters in LDM modules {ldm}")
        layers.append(
            Layer(
                component=component,
                module=path,
                ldm=prefix + ldm.pop(),
                params=params,
                kind=_kind(module),
                block=block_of_module(component, path, layers_per_block=layers_per_block),
                conv1x1=any(row.conv1x1 for row in own),
            )
        )
    return layers


def unet_layers(unet: Any) -> list[Layer]:
    """Layers of a ``UNet2DConditionModel`` (meta-built is enough)."""
    return _table_layers(unet, "unet", UNET_PREFIX, unet_module_table(unet.config))


def vae_layers(vae: Any) -> list[Layer]:
    """Layers of an ``AutoencoderKL`` (meta-built is enough)."""
    return _table_layers(vae, "vae", VAE_PREFIX, vae_module_table(vae.config))


def text_encoder_layers(text_encoder: Any) -> list[Layer]:
    """Layers of a ``CLIPTextModel``: module paths spelled with ``text_model.`` (as in
    checkpoints and transformers 4) whether or not the installed transformers has that level;
    LDM path ``cond_stage_model.transformer.<module>``."""
    layers = []
    for path, module, params in _owners(text_encoder):
        name = path if path.startswith(TEXT_MODEL) else TEXT_MODEL + path
        layers.append(
            Layer("text_encoder", name, TEXT_PREFIX + name, params, _kind(module), "BASE")
        )
    return layers


def build_key_map(unet: Any, vae: Any, text_encoder: Any) -> KeyMap:
    """The :class:`KeyMap` of three (meta-built or loaded) networks, UNet first.

    Raises:
        KeyMapError: a network whose modules the SD1.x tables do not cover.
    """
    return KeyMap([*unet_layers(unet), *text_encoder_layers(text_encoder), *vae_layers(vae)])


def _clip_meta(config: dict[str, Any]) -> Any:
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdstack.models.assemble import check_config_counts

    check_config_counts(config, "text-encoder config")
    with torch.device("meta"):
        return CLIPTextModel(CLIPTextConfig.from_dict(config))


def _meta_key_map(unet_config: dict, vae_config: dict, text_config: dict) -> KeyMap:
    """The key map of the architecture three configs describe (built on the meta device)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from sdstack.models.assemble import build_meta

    unet = build_meta(UNet2DConditionModel, unet_config, "UNet config")
    vae = build_meta(AutoencoderKL, vae_config, "VAE config")
    return build_key_map(unet, vae, _clip_meta(text_config))


@functools.cache
def sd1_key_map() -> KeyMap:
    """The key map of the packaged SD1.5 architecture (614 layers; built once, then cached)."""
    from sdstack.models.assemble import packaged_config
    from sdstack.models.text_encoder import sd15_text_config

    return _meta_key_map(
        packaged_config("unet/config.json"), packaged_config("vae/config.json"), sd15_text_config()
    )


def _plain_config(config: Any) -> dict[str, Any]:
    """A config (diffusers FrozenDict, transformers PretrainedConfig) as a plain dict."""
    values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: v for k, v in values.items() if k not in _VOLATILE_CONFIG_KEYS}


def config_fingerprint(components: Any) -> str:
    """The three configs of ``components`` as one canonical JSON string (the cache key)."""
    return _fingerprint(
        components.unet.config, components.vae.config, components.text_encoder.config
    )


def _fingerprint(unet_config: Any, vae_config: Any, text_config: Any) -> str:
    configs = {
        "unet": _plain_config(unet_config),
        "vae": _plain_config(vae_config),
        "text_encoder": _plain_config(text_config),
    }
    return json.dumps(configs, sort_keys=True, default=str)


_MAPS: dict[str, KeyMap] = {}
_KEPT_MAPS = 8


def _cached_key_map(fingerprint: str, build: Any) -> KeyMap:
    """The map of ``fingerprint``, made by ``build()`` the first time (a few are kept)."""
    found = _MAPS.get(fingerprint)
    if found is None:
        found = build()
        if len(_MAPS) >= _KEPT_MAPS:
            _MAPS.pop(next(iter(_MAPS)))
        _MAPS[fingerprint] = found
    return found


def key_map_of(components: Any) -> KeyMap:
    """The key map of a loaded ``ModelComponents`` (any SD1.x-family sizes, e.g. the tiny
    test models), cached by the fingerprint of its configs. The first time it is built
    from the loaded networks themselves (their module tree is the architecture's: nothing
    is read from the weights), which costs no meta-device build.

    Raises:
        KeyMapError: the networks are not of the SD1.x family.
    """
    return _cached_key_map(
        config_fingerprint(components),
        lambda: build_key_map(components.unet, components.vae, components.text_encoder),
    )


def key_map_of_configs(unet_config: Any, vae_config: Any, text_config: Any) -> KeyMap:
    """The key map of the architecture three configs describe (a checkpoint's, before any
    model is loaded), cached like :func:`key_map_of`.

    Raises:
        KeyMapError: the configs are not of the SD1.x family.
    """
    return _cached_key_map(
        _fingerprint(unet_config, vae_config, text_config),
        lambda: _meta_key_map(_plain_config(unet_config), _plain_config(vae_config), text_config),
    )


def live_module(components: Any, layer: Layer) -> Any:
    """The module object of ``layer`` in a loaded model (``components.<component>``).

    The text encoder's ``text_model.`` level is followed when the installed transformers
    has it (4.x) and skipped when it does not (5.x).

    Raises:
        KeyMapError: the model has no such module (another architecture than the map's).
    """
    root = getattr(components, layer.component, None)
    if root is None:
        raise KeyMapError(f"layer {layer.key!r}: the model has no {layer.component}")
    path = layer.module
    if layer.component == "text_encoder" and not hasattr(root, TEXT_MODEL[:-1]):
        path = path.removeprefix(TEXT_MODEL)
    try:
        return root.get_submodule(path)
    except AttributeError as error:
        raise KeyMapError(
            f"layer {layer.key!r}: no module {path!r} in this model's {layer.component} "
            f"({type(root).__name__}); the key map was built for another architecture"
        ) from error
