"""SD1.x ControlNet key names: the original (ldm, ``cldm.py``) layout <-> diffusers', as data.

A ControlNet is the UNet's encoder half (``time_embed``, ``input_blocks``,
``middle_block``) plus a hint encoder and one 1x1 "zero convolution" per skip
connection. The reference extension (scripts/cldm.py, controlnet_diffusers.py) names:

========================================  ==============================================
diffusers (``ControlNetModel``)           ldm (``control_model.`` prefix optional)
========================================  ==============================================
``controlnet_cond_embedding.conv_in``     ``input_hint_block.0``
``controlnet_cond_embedding.blocks.{j}``  ``input_hint_block.{2j+2}`` (SiLU between)
``controlnet_cond_embedding.conv_out``    ``input_hint_block.{2(n-1)}`` (14 for 8 convs)
``controlnet_down_blocks.{k}``            ``zero_convs.{k}.0``
``controlnet_mid_block``                  ``middle_block_out.0``
``conv_in``                               ``input_blocks.0.0``
``time_embedding.linear_{1,2}``           ``time_embed.{0,2}``
``down_blocks.{i}.resnets.{j}``           ``input_blocks.{i(L+1)+j+1}.0`` (L layers)
``down_blocks.{i}.attentions.{j}``        ``input_blocks.{i(L+1)+j+1}.1``
``down_blocks.{i}.downsamplers.0.conv``   ``input_blocks.{(i+1)(L+1)}.0.op``
``mid_block.resnets.{j}``                 ``middle_block.{2j}``
``mid_block.attentions.0``                ``middle_block.1``
========================================  ==============================================

Inside a ResBlock, norm1/conv1/time_emb_proj/norm2/conv2/conv_shortcut are
in_layers.0/in_layers.2/emb_layers.1/out_layers.0/out_layers.3/skip_connection (the
UNet's table, ``sdstack.models.key_map.ldm``); transformer names are equal. The table is
generated from the layout the keys themselves show (levels, layers per level, hint convs),
so the tiny test ControlNet maps with the same code as SD1.5.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sdstack.errors import SdstackError
from sdstack.models.key_map.ldm import UNET_RESNET_LEAVES, ModuleRow

CONTROL_PREFIX = "control_model."
LDM_HINT_KEY = "input_hint_block.0.weight"
DIFFUSERS_HINT_KEY = "controlnet_cond_embedding.conv_in.weight"
PACKAGED_CONFIG = "controlnet-sd15/config.json"
SD1_CONTEXT = 768
_PROJ = re.compile(r"(^|\.)proj_(in|out)\.weight$")


class ControlNetKeyError(SdstackError):
    """Keys that do not form an SD1.x-style ControlNet (the message lists a few)."""


@dataclass(frozen=True)
class ControlLayout:
    """The numbering a ControlNet's keys follow: down levels, ResBlocks per level, hint convs.

    SD1.5: 4 levels, 2 layers, 8 hint convs (12 zero convs = levels * (layers + 1)).
    """

    levels: int
    layers: int
    hint_convs: int

    @property
    def zero_convs(self) -> int:
        """Skip connections, one zero conv each: conv_in, ``levels * layers`` ResBlocks,
        ``levels - 1`` downsamplers."""
        return self.levels * (self.layers + 1)


def _indices(keys: Iterable[str], pattern: str) -> list[int]:
    """Sorted distinct integers captured by ``pattern`` (one group) over ``keys``."""
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for key in keys if (m := regex.match(key))})


def _few(keys: Iterable[str], limit: int = 5) -> str:
    keys = sorted(keys)
    shown = ", ".join(key[:100] for key in keys[:limit])
    return f"{shown} and {len(keys) - limit} more" if len(keys) > limit else shown


def _check_hint(hint: list[int], where: str) -> int:
    """The hint conv count; the convs must be numbered 0..n-1 (even n >= 2)."""
    if len(hint) < 2 or len(hint) % 2 or hint != list(range(len(hint))):
        raise ControlNetKeyError(
            f"ControlNet hint encoder ({where}) has convs {hint[:12]}; expected an even number "
            "of consecutive convs (SD1.5: 8)"
        )
    return len(hint)


def ldm_layout(keys: Iterable[str]) -> ControlLayout:
    """The layout of ldm-named keys (``control_model.`` already removed).

    ``zero_convs.{k}``: k < levels*(layers+1); the downsample ``op`` convs sit at
    ``input_blocks.{(i+1)(layers+1)}`` (SD1.5: 3, 6, 9), so the first one gives ``layers``.

    Raises:
        ControlNetKeyError: no zero convs, irregular numbering, a hint encoder whose convs
            are not ``input_hint_block.0, 2, 4...``.
    """
    keys = list(keys)
    zero = _indices(keys, r"zero_convs\.(\d+)\.")
    if not zero or zero != list(range(len(zero))):
        raise ControlNetKeyError(
            f"ControlNet zero convs {zero[:13]}: expected zero_convs.0 .. zero_convs.N-1"
        )
    ops = _indices(keys, r"input_blocks\.(\d+)\.0\.op\.")
    layers = ops[0] - 1 if ops else len(zero) - 1
    levels = len(zero) // (layers + 1) if layers >= 1 else 0
    expected_ops = [(i + 1) * (layers + 1) for i in range(levels - 1)]
    if layers < 1 or levels * (layers + 1) != len(zero) or ops != expected_ops:
        raise ControlNetKeyError(
            f"ControlNet with {len(zero)} zero convs and downsamplers at input_blocks {ops}: "
            "not the SD1.x numbering (downsamplers every layers_per_block + 1 blocks)"
        )
    hint = [i // 2 for i in _indices(keys, r"input_hint_block\.(\d+)\.weight$") if i % 2 == 0]
    odd = _indices(keys, r"input_hint_block\.(\d*[13579])\.")
    if odd:
        raise ControlNetKeyError(
            f"ControlNet hint encoder has tensors at odd indices {odd[:6]} (input_hint_block."
            "1, 3... are SiLU activations without weights)"
        )
    return ControlLayout(levels, layers, _check_hint(hint, "input_hint_block"))


def diffusers_layout(keys: Iterable[str]) -> ControlLayout:
    """The layout of diffusers-named ``ControlNetModel`` keys.

    Raises:
        ControlNetKeyError: irregular numbering (down blocks, resnets or hint blocks).
    """
    keys = list(keys)
    levels = _indices(keys, r"down_blocks\.(\d+)\.")
    resnets = _indices(keys, r"down_blocks\.0\.resnets\.(\d+)\.")
    if not levels or levels != list(range(len(levels))) or not resnets:
        raise ControlNetKeyError(
            f"ControlNet down blocks {levels[:8]} with resnets {resnets[:8]}: expected "
            "down_blocks.0 .. down_blocks.N-1, each with resnets"
        )
    blocks = _indices(keys, r"controlnet_cond_embedding\.blocks\.(\d+)\.weight$")
    present = DIFFUSERS_HINT_KEY in keys and "controlnet_cond_embedding.conv_out.weight" in keys
    if not present or blocks != list(range(len(blocks))):
        raise ControlNetKeyError(
            f"ControlNet hint encoder: conv_in/conv_out {'present' if present else 'missing'}, "
            f"blocks {blocks[:8]}; expected conv_in, blocks.0 .. blocks.N-1, conv_out"
        )
    hint = _check_hint(list(range(len(blocks) + 2)), "controlnet_cond_embedding")
    return ControlLayout(len(levels), len(resnets), hint)


def controlnet_module_table(layout: ControlLayout) -> list[ModuleRow]:
    """ControlNet modules, diffusers -> ldm (the module docstring's table) for ``layout``."""
    last = 2 * (layout.hint_convs - 1)
    rows: list[ModuleRow] = [
        ("time_embedding.linear_1", "time_embed.0", None),
        ("time_embedding.linear_2", "time_embed.2", None),
        ("conv_in", "input_blocks.0.0", None),
        ("controlnet_cond_embedding.conv_in", "input_hint_block.0", None),
        ("controlnet_cond_embedding.conv_out", f"input_hint_block.{last}", None),
        ("controlnet_mid_block", "middle_block_out.0", None),
        ("mid_block.resnets.0", "middle_block.0", UNET_RESNET_LEAVES),
        ("mid_block.attentions.0", "middle_block.1", None),
        ("mid_block.resnets.1", "middle_block.2", UNET_RESNET_LEAVES),
    ]
    rows += [
        (f"controlnet_cond_embedding.blocks.{j}", f"input_hint_block.{2 * j + 2}", None)
        for j in range(layout.hint_convs - 2)
    ]
    rows += [
        (f"controlnet_down_blocks.{k}", f"zero_convs.{k}.0", None) for k in range(layout.zero_convs)
    ]
    for level in range(layout.levels):
        for layer in range(layout.layers):
            index = level * (layout.layers + 1) + layer + 1
            down = f"down_blocks.{level}"
            rows.append((f"{down}.resnets.{layer}", f"input_blocks.{index}.0", UNET_RESNET_LEAVES))
            rows.append((f"{down}.attentions.{layer}", f"input_blocks.{index}.1", None))
        if level < layout.levels - 1:
            index = (level + 1) * (layout.layers + 1)
            rows.append(
                (f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{index}.0.op", None)
            )
    return rows


def _rename_all(
    keys: Iterable[str], modules: Mapping[str, tuple[str, Mapping[str, str] | None]]
) -> dict[str, str]:
    """source key -> target key by the longest module prefix (dot-separated) in ``modules``.

    Raises:
        ControlNetKeyError: keys no module covers, or a ResBlock leaf not in its table.
    """
    renamed, unknown = {}, []
    for key in keys:
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:cut])
            if prefix in modules:
                target, leaves = modules[prefix]
                rest = ".".join(parts[cut:])
                if leaves is None:
                    renamed[key] = f"{target}.{rest}"
                else:
                    leaf, _, param = rest.rpartition(".")
                    if leaf not in leaves:
                        unknown.append(key)
                        break
                    renamed[key] = f"{target}.{leaves[leaf]}.{param}"
                break
        else:
            unknown.append(key)
    if unknown:
        raise ControlNetKeyError(
            f"{len(unknown)} keys are not part of an SD1.x ControlNet ({_few(unknown)})"
        )
    return renamed


def strip_control_prefix(keys: Iterable[str]) -> dict[str, str]:
    """bare ldm key -> key in the file: with ``control_model.`` keys present, only those
    count (the extension drops the rest: a full v1.0 file also holds the SD model)."""
    keys = list(keys)
    if any(key.startswith(CONTROL_PREFIX) for key in keys):
        return {k[len(CONTROL_PREFIX) :]: k for k in keys if k.startswith(CONTROL_PREFIX)}
    return {key: key for key in keys}


def ldm_names(keys: Iterable[str]) -> dict[str, str]:
    """bare ldm key -> diffusers key, for keys with or without ``control_model.``."""
    bare = list(strip_control_prefix(keys))
    layout = ldm_layout(bare)
    table = {
        ldm: (diffusers, None if leaves is None else {v: k for k, v in leaves.items()})
        for diffusers, ldm, leaves in controlnet_module_table(layout)
    }
    return _rename_all(bare, table)


def diffusers_names(keys: Iterable[str]) -> dict[str, str]:
    """diffusers key -> bare ldm key."""
    keys = list(keys)
    table = {
        diffusers: (ldm, leaves)
        for diffusers, ldm, leaves in controlnet_module_table(diffusers_layout(keys))
    }
    return _rename_all(keys, table)


def _as_conv(key: str, tensor: Any) -> Any:
    """A 2-D ``proj_in``/``proj_out`` weight (linear-projection files) as a 1x1 conv."""
    if _PROJ.search(key) and tensor.ndim == 2:
        return tensor[:, :, None, None]
    return tensor


def ldm_to_diffusers(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """An ldm-layout ControlNet state dict (``control_model.`` optional) in diffusers names.

    Keys outside ``control_model.`` are dropped when that prefix is present (the
    reference extension keeps only the control model). 2-D ``proj_in``/``proj_out``
    weights become ``[C, C, 1, 1]`` (``use_linear_projection=False``, as SD1.5). Tensors
    are not copied.

    Raises:
        ControlNetKeyError: keys that are not an SD1.x-style ControlNet.
    """
    files = strip_control_prefix(state_dict)
    names = ldm_names(files.values())
    return {names[bare]: _as_conv(names[bare], state_dict[key]) for bare, key in files.items()}


def diffusers_to_ldm(state_dict: Mapping[str, Any], *, prefix: str = "") -> dict[str, Any]:
    """A diffusers ``ControlNetModel`` state dict in ldm names (``prefix`` + bare key;
    ``prefix="control_model."`` for the original files). 2-D ``proj_in``/``proj_out``
    weights become 1x1 convs. Tensors are not copied.

    Raises:
        ControlNetKeyError: keys that are not an SD1.x-style ControlNet.
    """
    names = diffusers_names(state_dict)
    return {prefix + names[key]: _as_conv(key, value) for key, value in state_dict.items()}


def context_width(shapes: Mapping[str, Sequence[int]]) -> int | None:
    """The cross-attention width: ``attn2.to_k.weight``'s input size (None: no attention)."""
    for key, shape in shapes.items():
        if key.endswith("attn2.to_k.weight") and len(shape) == 2:
            return int(shape[1])
    return None


def packaged_control_config() -> dict[str, Any]:
    """The packaged SD1.5 ControlNet config (``models/configs/controlnet-sd15/config.json``,
    lllyasviel's diffusers config of the v1.1 models)."""
    import json
    from importlib import resources

    path = resources.files("sdstack.models") / "configs" / PACKAGED_CONFIG
    return json.loads(path.read_text(encoding="utf-8"))


def _shape(shapes: Mapping[str, Sequence[int]], key: str, dim: int, default: Any) -> Any:
    shape = shapes.get(key)
    return int(shape[dim]) if shape is not None and len(shape) > dim else default


def control_config(
    shapes: Mapping[str, Sequence[int]],
    *,
    base: Mapping[str, Any] | None = None,
    global_pool: bool = False,
) -> dict[str, Any]:
    """The ``ControlNetModel`` config for diffusers-named ``shapes``: ``base`` (default the
    packaged SD1.5 config) with the sizes the tensors show.

    Derived: ``in_channels`` (conv_in), ``conditioning_channels`` and
    ``conditioning_embedding_out_channels`` (the hint convs: conv_in, then every stride-2
    ``blocks.{2i+1}``), ``block_out_channels`` (each level's first ResBlock), ``layers_per_block``,
    ``down_block_types`` (CrossAttn where a level has attentions), ``cross_attention_dim``
    (attn2.to_k). Not visible in shapes, so from ``base``: head counts, norm groups.

    Raises:
        ControlNetKeyError: irregular down-block or hint-encoder numbering.
    """
    config = dict(base if base is not None else packaged_control_config())
    config.pop("_class_name", None)
    layout = diffusers_layout(shapes)
    levels = range(layout.levels)
    hint = [
        _shape(shapes, DIFFUSERS_HINT_KEY, 0, 16),
        *(
            _shape(shapes, f"controlnet_cond_embedding.blocks.{2 * i + 1}.weight", 0, 16)
            for i in range(layout.hint_convs // 2 - 1)
        ),
    ]
    attention = [any(k.startswith(f"down_blocks.{i}.attentions.") for k in shapes) for i in levels]
    config.update(
        in_channels=_shape(shapes, "conv_in.weight", 1, 4),
        conditioning_channels=_shape(shapes, DIFFUSERS_HINT_KEY, 1, 3),
        conditioning_embedding_out_channels=hint,
        block_out_channels=[
            _shape(shapes, f"down_blocks.{i}.resnets.0.conv1.weight", 0, 320) for i in levels
        ],
        layers_per_block=layout.layers,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        cross_attention_dim=context_width(shapes) or SD1_CONTEXT,
        global_pool_conditions=bool(global_pool or config.get("global_pool_conditions")),
    )
    return config
