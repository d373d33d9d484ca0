"""LoRA Block Weight (``lbw=``): one multiplier per UNet block, the extension's convention.

SD1 takes 17 values, in the order of :data:`LBW_BLOCKS`: ``BASE`` (the text encoder), then
the 16 blocks that hold a transformer: IN01 IN02 IN04 IN05 IN07 IN08 M00 OUT03..OUT11.
A layer in a block that the 17 do not list (IN00 conv_in and the time embedding, the
IN03/IN06/IN09 downsamplers, IN10 IN11, OUT00..OUT02 ResBlocks and the upsampler in
OUT02, the final norm and conv) gets **0**, as the LoRA Block Weight extension does
(kohya's svd merge script uses 1 there); only LoCon/LyCORIS files have such layers.
26 values name every merge block (BASE, IN00..IN11, M00, OUT00..OUT11) explicitly.

A layer's strength is ``multiplier * lbw[block]`` (``te`` multiplier for the text
encoder, ``unet`` for the UNet). Presets are the extension's (spec lora.md). This module
does not import torch: prompts are checked before anything loads. The block names
are the key map's (``sdstack.models.key_map.blocks``).
"""

from __future__ import annotations

import math

from sdstack.errors import SdstackError
from sdstack.models.key_map.blocks import LBW_BLOCKS, MERGE_BLOCKS


def _preset(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


LBW_PRESETS: dict[str, tuple[float, ...]] = {
    "NONE": (0.0,) * 17,
    "ALL": (1.0,) * 17,
    "INS": _preset("1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0"),
    "IND": _preset("1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0"),
    "INALL": _preset("1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0"),
    "MIDD": _preset("1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0"),
    "OUTD": _preset("1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0"),
    "OUTS": _preset("1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1"),
    "OUTALL": _preset("1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1"),
    "ALL0.5": (0.5,) * 17,
}
"""The extension's SD1 presets (17 values each)."""

MAX_LBW_VALUE = 1000.0


class BlockWeightError(SdstackError):
    """An ``lbw=`` value that is neither a preset nor a list of 17 or 26 numbers."""


def parse_block_weights(text: str) -> tuple[float, ...]:
    """``MIDD`` (a preset, any case) or ``1,0,0.5,...`` (17 or 26 numbers) -> the values.

    Raises:
        BlockWeightError: unknown preset (with the presets listed), a value that is not a
            finite number within +-1000, or a count other than 17 or 26.
    """
    cleaned = text.strip()
    preset = LBW_PRESETS.get(cleaned.upper())
    if preset is not None:
        return preset
    items = [item.strip() for item in cleaned.split(",")]
    if len(items) == 1:
        raise BlockWeightError(
            f"lbw={text!r}: not a preset; expected one of {', '.join(LBW_PRESETS)} or "
            "17 comma-separated numbers (BASE, IN01, IN02, IN04, IN05, IN07, IN08, M00, "
            "OUT03..OUT11)"
        )
    values = []
    for item in items:
        try:
            value = float(item)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or abs(value) > MAX_LBW_VALUE:
            raise BlockWeightError(
                f"lbw={text!r}: {item!r} is not a number within +-{MAX_LBW_VALUE:g}"
            )
        values.append(value)
    if len(values) not in (len(LBW_BLOCKS), len(MERGE_BLOCKS)):
        raise BlockWeightError(
            f"lbw={text!r}: {len(values)} values; expected 17 (BASE, IN01, IN02, IN04, "
            "IN05, IN07, IN08, M00, OUT03..OUT11) or 26 (BASE, IN00..IN11, M00, OUT00..OUT11)"
        )
    return tuple(values)


def block_factor(values: tuple[float, ...] | None, block: str) -> float:
    """The lbw factor of a layer in merge block ``block`` (1 without ``lbw=``).

    17 values: :data:`LBW_BLOCKS` order, 0 for blocks not listed; 26 values:
    :data:`MERGE_BLOCKS` order.
    """
    if values is None:
        return 1.0
    names = LBW_BLOCKS if len(values) == len(LBW_BLOCKS) else MERGE_BLOCKS
    return values[names.index(block)] if block in names else 0.0
