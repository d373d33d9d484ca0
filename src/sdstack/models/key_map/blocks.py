"""Which block of the SD1 UNet a layer belongs to: the 26 merge blocks and the 17 LoRA blocks.

Merge tools weight a merge per block: ``BASE`` (everything outside the UNet: text encoder and
VAE), ``IN00``..``IN11`` (the LDM ``input_blocks``), ``M00`` (``middle_block``) and
``OUT00``..``OUT11`` (``output_blocks``). SD1 layout (spec merge.md): IN00 conv_in; IN01,
IN02, IN04, IN05, IN07, IN08 ResBlock + transformer; IN03, IN06, IN09 downsample; IN10, IN11
ResBlock; M00 ResBlock + transformer + ResBlock; OUT00..OUT02 ResBlock; OUT03..OUT11
ResBlock + transformer; upsamplers in OUT02, OUT05, OUT08.

Two rules give the block, one per naming scheme, and they agree on every SD1 UNet layer:

- LDM key (:func:`merge_block_of_key`): ``.input_blocks.N.`` -> ``IN{N}``,
  ``.middle_block.`` -> ``M00``, ``.output_blocks.N.`` -> ``OUT{N}``, ``.out.`` (final norm
  and conv) -> ``OUT11``, anything outside ``model.diffusion_model.`` -> ``BASE``.
- diffusers module path (:func:`block_of_module`, spec lora.md), with ``L`` =
  ``layers_per_block`` (2 on SD1): ``down_blocks.i.(resnets|attentions).j`` ->
  ``IN(i(L+1)+j+1)``; ``down_blocks.i.downsamplers`` -> ``IN((i+1)(L+1))``;
  ``up_blocks.i.(resnets|attentions).j`` -> ``OUT(i(L+1)+j)``; ``up_blocks.i.upsamplers``
  -> ``OUT(i(L+1)+L)``; ``mid_block`` -> ``M00``; ``conv_in`` -> ``IN00``;
  ``conv_norm_out``/``conv_out`` -> ``OUT11``.

``time_embed`` (diffusers ``time_embedding``) has no block of its own and the tools disagree:
supermerger today and sd-meh put it in ``IN00``, sd-mecha in ``BASE``, older supermerger in
``OUT11``. sdstack follows the first two, the tools whose block-weight merges users share
most, so a recipe written for them reads the same here: ``time_embed`` -> ``IN00``, together
with ``conv_in`` (the other layer that sees the UNet input first).

The LoRA Block Weight convention (spec lora.md) weights 17 of these: ``BASE`` (for a LoRA,
the text encoder), the 16 blocks that hold a transformer (IN01, IN02, IN04, IN05, IN07,
IN08, M00, OUT03..OUT11). Layers of the other blocks have no LBW index (:func:`lbw_index`
gives ``None``); what they get is the caller's choice. VAE layers are ``BASE`` too, so they
share index 0 with the text encoder (SD1 LoRAs do not touch the VAE).
"""

from __future__ import annotations

from sdstack.errors import SdstackError
from sdstack.models.key_map.ldm import UNET_PREFIX

COMPONENTS: tuple[str, ...] = ("unet", "text_encoder", "vae")
"""The three networks of an SD1.x model, as ``ModelComponents`` names them."""

MERGE_BLOCKS: tuple[str, ...] = (
    "BASE",
    *(f"IN{i:02d}" for i in range(12)),
    "M00",
    *(f"OUT{i:02d}" for i in range(12)),
)
"""The 26 merge blocks of SD1, in the order block-weight lists give them."""

LBW_BLOCKS: tuple[str, ...] = (
    "BASE",
    "IN01",
    "IN02",
    "IN04",
    "IN05",
    "IN07",
    "IN08",
    "M00",
    *(f"OUT{i:02d}" for i in range(3, 12)),
)
"""The 17 LoRA Block Weight blocks of SD1, in the order of a 17-value ``lbw=`` list."""

SD1_LAYERS_PER_BLOCK = 2
_LAST = 11  # SD1 numbers at most 12 input and 12 output blocks


class KeyMapError(SdstackError):
    """A name, module or architecture the SD1.x key map does not cover."""


def _block(prefix: str, index: int, component: str, module: str) -> str:
    if not 0 <= index <= _LAST:
        raise KeyMapError(
            f"{component} module {module!r}: falls in block {prefix}{index:02d}; "
            f"expected {prefix}00..{prefix}{_LAST} (an SD1-sized UNet)"
        )
    return f"{prefix}{index:02d}"


def _level_block(component: str, module: str, parts: list[str], per_level: int) -> str | None:
    """The block of a ``down_blocks.i.*`` / ``up_blocks.i.*`` path, None if it is neither."""
    if len(parts) < 3 or not parts[1].isdigit():
        return None
    down = parts[0] == "down_blocks"
    level, kind = int(parts[1]), parts[2]
    if kind in ("resnets", "attentions") and len(parts) >= 4 and parts[3].isdigit():
        inner = int(parts[3])
        if down:
            return _block("IN", level * per_level + inner + 1, component, module)
        return _block("OUT", level * per_level + inner, component, module)
    if kind == "downsamplers" and down:
        return _block("IN", (level + 1) * per_level, component, module)
    if kind == "upsamplers" and not down:
        return _block("OUT", level * per_level + per_level - 1, component, module)
    return None


def block_of_module(
    component: str, module: str, *, layers_per_block: int = SD1_LAYERS_PER_BLOCK
) -> str:
    """The merge block of a diffusers/transformers module path (the module docstring's rule).

    Args:
        component: ``"unet"``, ``"text_encoder"`` or ``"vae"``; the last two are ``BASE``.
        module: the module path inside the component (``"down_blocks.1.attentions.0.proj_in"``;
            a parameter name such as ``"conv_in.weight"`` gives the same block).
        layers_per_block: the UNet config's ``layers_per_block`` (2 on SD1).

    Raises:
        KeyMapError: an unknown component, or a UNet path outside the SD1 UNet layout
            (``add_embedding``, a block index beyond 11).
    """
    if component not in COMPONENTS:
        raise KeyMapError(f"component {component!r}: expected one of {', '.join(COMPONENTS)}")
    if component != "unet":
        return "BASE"
    parts = module.split(".")
    head = parts[0]
    if head in ("conv_in", "time_embedding"):
        return "IN00"
    if head in ("conv_norm_out", "conv_out"):
        return "OUT11"
    if head == "mid_block":
        return "M00"
    if head in ("down_blocks", "up_blocks"):
        found = _level_block(component, module, parts, layers_per_block + 1)
        if found is not None:
            return found
    raise KeyMapError(
        f"unet module {module!r}: no merge block; expected a module of the SD1 UNet "
        "(conv_in, time_embedding, down_blocks.*, mid_block.*, up_blocks.*, conv_norm_out, "
        "conv_out)"
    )


def merge_block_of_key(key: str) -> str:
    """The merge block of an LDM (single-file checkpoint) module or tensor name.

    ``model.diffusion_model.input_blocks.4.1.proj_in.weight`` -> ``IN04``;
    ``model.diffusion_model.time_embed.0.weight`` -> ``IN00``; ``...out.2.weight`` ->
    ``OUT11``; a name outside ``model.diffusion_model.`` (text encoder, VAE) -> ``BASE``.

    Raises:
        KeyMapError: a ``model.diffusion_model.`` name that is in no SD1 block.
    """
    if not key.startswith(UNET_PREFIX):
        return "BASE"
    parts = key[len(UNET_PREFIX) :].split(".")
    head = parts[0]
    if head in ("input_blocks", "output_blocks") and len(parts) > 1 and parts[1].isdigit():
        prefix = "IN" if head == "input_blocks" else "OUT"
        return _block(prefix, int(parts[1]), "unet", key)
    if head == "middle_block":
        return "M00"
    if head == "out":
        return "OUT11"
    if head == "time_embed":
        return "IN00"
    raise KeyMapError(
        f"checkpoint key {key!r}: no merge block; expected input_blocks.N, middle_block, "
        "output_blocks.N, out or time_embed under model.diffusion_model."
    )


def lbw_index(block: str) -> int | None:
    """The position of ``block`` in :data:`LBW_BLOCKS`, or None for a block LBW skips."""
    return LBW_BLOCKS.index(block) if block in LBW_BLOCKS else None
