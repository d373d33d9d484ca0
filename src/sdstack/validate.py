"""One set of validators for settings, shared by the text side, generation and the CLI.

Each check names the setting as the caller calls it (``name``: ``"clip_skip"`` in the
library, ``"--clip-skip"`` on the command line), the value received and the range
expected, and raises :class:`SettingError`. Nothing here imports torch.

Emphasis modes live here as a :class:`~sdstack.registry.Registry` so that the encoder,
``GenerationParams`` and ``sdstack encode`` accept the same spellings (``original``,
``No norm``, ``no_norm`` ...).
"""

from __future__ import annotations

import math
from typing import Any

from sdstack.errors import SdstackError, UnknownNameError
from sdstack.registry import Registry

SD1_CLIP_LAYERS = 12
"""Transformer layers of the SD1.x text encoder (CLIP ViT-L/14): clip skip 1..12."""


class SettingError(SdstackError):
    """A setting of the wrong type or out of range: names the setting, value and range."""


class UnknownEmphasisError(UnknownNameError, SettingError):
    """An emphasis mode that is not registered."""


EMPHASIS = Registry[str]("emphasis mode", UnknownEmphasisError)
for _mode, _aliases in (
    ("original", ()),
    ("no-norm", ("nonorm",)),
    ("ignore", ()),
    ("comfy", ("comfyui",)),
):
    EMPHASIS.register(_mode, _mode, aliases=_aliases)
EMPHASIS_MODES = EMPHASIS.names()
"""Canonical emphasis modes; reference spellings ("No norm") are accepted by lookup."""


def check_emphasis(mode: Any, name: str = "emphasis") -> str:
    """The canonical emphasis mode for ``mode`` (case, spaces, ``_``/``-`` ignored).

    Raises:
        UnknownEmphasisError: unknown mode; the message lists the modes and the nearest.
    """
    if name == "emphasis" and isinstance(mode, str):
        return EMPHASIS.canonical(mode)  # the message names the emphasis mode already
    return EMPHASIS.checked(mode, name)


def check_int(name: str, value: Any, low: int, high: int, *, hint: str = "") -> int:
    """``value`` if it is an integer (bools refused) in ``[low, high]``.

    ``hint`` is appended to the range message, e.g. ``" (-1 = a random seed)"``.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise SettingError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise SettingError(f"{name} must be between {low} and {high}{hint}, got {value}")
    return value


def check_number(name: str, value: Any, low: float, high: float, *, hint: str = "") -> float:
    """``float(value)`` if it is a finite real number (bools refused) in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SettingError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except OverflowError:  # an int past the float range
        number = math.inf
    if not math.isfinite(number):
        raise SettingError(f"{name} must be a finite number, got {_shown(value)}")
    if not low <= number <= high:
        raise SettingError(
            f"{name} must be between {low:g} and {high:g}{hint}, got {_shown(value)}"
        )
    return number


def _shown(value: Any) -> str:
    """``repr(value)``, cut short for a huge number."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} digits)"


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise SettingError(f"{name} must be True or False, got {value!r}")
    return value


def check_clip_skip(value: Any, layers: int = SD1_CLIP_LAYERS, name: str = "clip_skip") -> float:
    """Reference "Clip skip": a number in ``[1, layers]`` (1 = last layer; fractions blend).

    Raises:
        SettingError: not a finite number, or outside ``[1, layers]``.
    """
    hint = f" (SD1 has {layers} CLIP layers; 1 = last layer, 2 = penultimate)"
    if layers != SD1_CLIP_LAYERS:
        hint = f" (this text encoder has {layers} layers; 1 = last layer)"
    return check_number(name, value, 1, layers, hint=hint)
