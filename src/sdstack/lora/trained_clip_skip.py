"""Clip skip advice: the clip skip a LoRA was trained with, from its metadata.

kohya's trainer records it as ``ss_clip_skip`` (``"None"`` when not set, i.e. the last
layer) and, in the SAI model spec, ``modelspec.encoder_layer``. Anime LoRAs are mostly
trained at clip skip 2 and look wrong at 1. :func:`clip_skip_advice` says so when the
clip skip in use differs from what the active LoRAs were trained with;
:func:`agreed_clip_skip` is what ``--clip-skip auto`` uses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sdstack.validate import SD1_CLIP_LAYERS

METADATA_KEYS = ("ss_clip_skip", "modelspec.encoder_layer")
_UNKNOWN = {"", "none", "null", "unknown"}


def trained_clip_skip(metadata: Mapping[str, str]) -> int | None:
    """``ss_clip_skip``, else ``modelspec.encoder_layer``, as an int in 1..12; None when
    missing, ``"None"`` or not a number in range (unknown)."""
    for key in METADATA_KEYS:
        value = str(metadata.get(key, "")).strip()
        if value.lower() in _UNKNOWN:
            continue
        try:
            number = float(value)
        except ValueError:
            continue
        if number.is_integer() and 1 <= number <= SD1_CLIP_LAYERS:
            return int(number)
    return None


def known_clip_skips(loras: Sequence[Any]) -> dict[str, int]:
    """LoRA name -> trained clip skip, for the active LoRAs whose files record one."""
    found = {}
    for lora in loras:
        value = trained_clip_skip(lora.file.metadata)
        if value is not None:
            found[lora.name] = value
    return found


def agreed_clip_skip(loras: Sequence[Any]) -> int:
    """``--clip-skip auto``: the trained clip skip every LoRA that records one agrees on,
    else 1 (none records one, or they disagree)."""
    values = set(known_clip_skips(loras).values())
    return values.pop() if len(values) == 1 else 1


def clip_skip_advice(loras: Sequence[Any], clip_skip: float) -> str | None:
    """A warning when ``clip_skip`` differs from what some active LoRA was trained with."""
    known = known_clip_skips(loras)
    differing = {name: value for name, value in known.items() if value != clip_skip}
    if not differing:
        return None
    listed = ", ".join(f"{name} at {value}" for name, value in differing.items())
    values = sorted(set(known.values()))
    fix = (
        f"--clip-skip {values[0]} (or --clip-skip auto)"
        if len(values) == 1
        else "the clip skip of the LoRA that matters most"
    )
    shown = int(clip_skip) if float(clip_skip).is_integer() else clip_skip
    return (
        f"clip skip {shown} is in use, but LoRA(s) were trained with another: {listed}; "
        f"they may look wrong; try {fix}"
    )
