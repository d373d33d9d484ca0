"""Merge block weights (``--alpha-blocks``): one multiplier per SD1 block, 26 values.

The values come in the order of :data:`~sdstack.models.key_map.MERGE_BLOCKS`: ``BASE``,
``IN00``..``IN11``, ``M00``, ``OUT00``..``OUT11`` (the order supermerger and sd-meh use).
A key's multiplier is the value of its block; without block values it is the plain alpha
(or beta). The key -> block rule is the key map's
(:func:`sdstack.models.key_map.blocks.merge_block_of_key`), for LDM checkpoint keys:

- ``model.diffusion_model.input_blocks.N.*`` -> ``IN{N}``; ``middle_block.*`` -> ``M00``;
  ``output_blocks.N.*`` -> ``OUT{N}``.
- ``model.diffusion_model.out.*`` (the final GroupNorm and conv) -> ``OUT11``, the block
  they follow, as every tool does.
- ``model.diffusion_model.time_embed.*`` -> ``IN00``, with ``conv_in``: the tools disagree
  (supermerger today and sd-meh: IN00; sd-mecha: BASE; older supermerger: OUT11); sdstack
  follows supermerger and sd-meh, whose block recipes users share most.
- ``model.diffusion_model.label_emb.*`` (the class embedding of SDXL and unCLIP UNets) is
  not part of an SD1 UNet: with block values it is refused (:class:`MergeBlockError`),
  because no SD1 block list says what it should get; an SD1 checkpoint never holds it.
- everything else (``cond_stage_model.*`` text encoder, ``first_stage_model.*`` VAE) ->
  ``BASE``. So ``BASE`` weights the text encoder (and a merged VAE).

Presets (:data:`MERGE_BLOCK_PRESETS`, any case): the Merge Block Weighted extension's
presets that supermerger and sd-meh ship with ``BASE`` prepended, those with a simple rule
(the published tables agree with these rules to their printed digits). With ``x = j/24``
for the j-th UNet block (IN00 = 0 .. OUT11 = 24) and ``BASE`` 0 unless named:

- ``ALL_A`` all 0 (BASE 0), ``ALL_B`` all 1 (BASE 1), ``FLAT_25`` / ``FLAT_75`` 0.25 / 0.75;
- ``GRAD_V`` ``|1 - 2x|``, ``GRAD_A`` ``1 - |1 - 2x|``; ``SMOOTHSTEP`` ``3x^2 - 2x^3`` and
  ``REVERSE_SMOOTHSTEP`` 1 minus it; ``COSINE`` ``(1 + cos(pi x)) / 2`` and
  ``REVERSE_COSINE`` ``(1 - cos(pi x)) / 2``;
- 0/1 patterns (1 on the blocks named, 0 elsewhere): ``WRAP08`` IN00-03 + OUT08-11,
  ``WRAP12`` IN00-05 + OUT06-11, ``WRAP14`` IN00-06 + OUT05-11, ``WRAP16`` IN00-07 +
  OUT04-11, ``MID12_50`` 0.5 on IN05-OUT05, ``OUT07`` OUT05-11, ``OUT12`` OUT00-11,
  ``OUT12_5`` OUT00-11 and 0.5 on M00, ``RING08_SOFT`` IN06-08 + OUT03-05 with 0.5 on IN05,
  IN09, OUT02, OUT06, ``RING08_5`` IN06-09 + OUT02-05, ``RING10_5`` IN05-09 + OUT02-06,
  ``RING10_3`` IN06-10 + OUT01-05.

This module does not import torch: block lists are checked before anything loads.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from numbers import Real

from sdstack.merge import MergeError
from sdstack.models.key_map.blocks import MERGE_BLOCKS, KeyMapError, merge_block_of_key
from sdstack.registry import normalise_name

_COUNT = len(MERGE_BLOCKS)
_INDEX = {name: i for i, name in enumerate(MERGE_BLOCKS)}
_UNET_BLOCKS = MERGE_BLOCKS[1:]
_ORDER = "BASE, IN00..IN11, M00, OUT00..OUT11"
_SHOWN = 80  # characters of a bad block list quoted in messages


class MergeBlockError(MergeError):
    """Merge block values that are neither a preset nor 26 finite numbers."""


def _curve(rule) -> tuple[float, ...]:
    last = len(_UNET_BLOCKS) - 1
    return (0.0, *(float(rule(j / last)) for j in range(len(_UNET_BLOCKS))))


def _pattern(spans: dict[str, float]) -> tuple[float, ...]:
    """26 values: 0 except ``{"IN06-IN09": 1.0, "M00": 0.5}`` (inclusive block ranges)."""
    values = [0.0] * _COUNT
    for span, value in spans.items():
        first, _, last = span.partition("-")
        for i in range(_INDEX[first], _INDEX[last or first] + 1):
            values[i] = value
    return tuple(values)


def _smoothstep(x: float) -> float:
    return 3 * x**2 - 2 * x**3


MERGE_BLOCK_PRESETS: dict[str, tuple[float, ...]] = {
    "ALL_A": (0.0,) * _COUNT,
    "ALL_B": (1.0,) * _COUNT,
    "FLAT_25": (0.0, *(0.25,) * (_COUNT - 1)),
    "FLAT_75": (0.0, *(0.75,) * (_COUNT - 1)),
    "GRAD_V": _curve(lambda x: abs(1 - 2 * x)),
    "GRAD_A": _curve(lambda x: 1 - abs(1 - 2 * x)),
    "SMOOTHSTEP": _curve(_smoothstep),
    "REVERSE_SMOOTHSTEP": _curve(lambda x: 1 - _smoothstep(x)),
    "COSINE": _curve(lambda x: (1 + math.cos(math.pi * x)) / 2),
    "REVERSE_COSINE": _curve(lambda x: (1 - math.cos(math.pi * x)) / 2),
    "WRAP08": _pattern({"IN00-IN03": 1.0, "OUT08-OUT11": 1.0}),
    "WRAP12": _pattern({"IN00-IN05": 1.0, "OUT06-OUT11": 1.0}),
    "WRAP14": _pattern({"IN00-IN06": 1.0, "OUT05-OUT11": 1.0}),
    "WRAP16": _pattern({"IN00-IN07": 1.0, "OUT04-OUT11": 1.0}),
    "MID12_50": _pattern({"IN05-OUT05": 0.5}),
    "OUT07": _pattern({"OUT05-OUT11": 1.0}),
    "OUT12": _pattern({"OUT00-OUT11": 1.0}),
    "OUT12_5": _pattern({"M00": 0.5, "OUT00-OUT11": 1.0}),
    "RING08_SOFT": _pattern(
        {"IN05": 0.5, "IN06-IN08": 1.0, "IN09": 0.5, "OUT02": 0.5, "OUT03-OUT05": 1.0, "OUT06": 0.5}
    ),
    "RING08_5": _pattern({"IN06-IN09": 1.0, "OUT02-OUT05": 1.0}),
    "RING10_5": _pattern({"IN05-IN09": 1.0, "OUT02-OUT06": 1.0}),
    "RING10_3": _pattern({"IN06-IN10": 1.0, "OUT01-OUT05": 1.0}),
}
"""Named lists of 26 block values (the module docstring gives each rule)."""

_PRESET_KEYS = {normalise_name(name): name for name in MERGE_BLOCK_PRESETS}


def _shown(text: str) -> str:
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."


def _preset(text: str) -> tuple[float, ...]:
    name = _PRESET_KEYS.get(normalise_name(text))
    if name is not None:
        return MERGE_BLOCK_PRESETS[name]
    near = difflib.get_close_matches(normalise_name(text), _PRESET_KEYS, n=3)
    hint = f"did you mean {', '.join(repr(_PRESET_KEYS[k]) for k in near)}? " if near else ""
    raise MergeBlockError(
        f"merge blocks {_shown(text)!r}: not a preset; {hint}expected a preset "
        f"({', '.join(MERGE_BLOCK_PRESETS)}) or {_COUNT} comma-separated numbers ({_ORDER})"
    )


def _count_error(text: str, count: int) -> MergeBlockError:
    hint = ""
    if count == _COUNT - 1:
        hint = "; a 25-value list (Merge Block Weighted) has no BASE: put the BASE value first"
    return MergeBlockError(
        f"merge blocks {_shown(text)!r}: {count} values; expected {_COUNT} ({_ORDER}){hint}"
    )


def _finite(item: object) -> float | None:
    if isinstance(item, bool):
        return None
    try:
        value = float(item)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def parse_merge_blocks(text: str) -> tuple[float, ...]:
    """``GRAD_V`` (a preset, any case) or ``0,1,0.5,...`` (26 numbers) -> 26 block values.

    The values are the per-block alpha (or beta) in the order BASE, IN00..IN11, M00,
    OUT00..OUT11; see the module docstring for the presets and the key -> block rule.

    Raises:
        MergeBlockError: an unknown preset (with the nearest names), a count other than 26
            (a 25-value list gets a hint to put BASE first), or a value that is not a
            finite number (named with its block).
    """
    if not isinstance(text, str):
        raise MergeBlockError(f"merge blocks {text!r}: expected text (a preset or numbers)")
    cleaned = text.strip()
    if "," not in cleaned:
        return _preset(cleaned)
    items = [item.strip() for item in cleaned.split(",")]
    if len(items) != _COUNT:
        raise _count_error(text, len(items))
    values = []
    for block, item in zip(MERGE_BLOCKS, items, strict=True):
        value = _finite(item)
        if value is None:
            raise MergeBlockError(
                f"merge blocks {_shown(text)!r}: {block} value {item!r} is not a finite number"
            )
        values.append(value)
    return tuple(values)


def check_merge_blocks(values: Sequence[float], what: str = "merge blocks") -> tuple[float, ...]:
    """26 block values given in code (``MergeSettings.alpha_blocks``) as a tuple of floats.

    Raises:
        MergeBlockError: not a sequence of 26 finite real numbers (``what`` names it).
    """
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise MergeBlockError(f"{what}: {values!r}; expected {_COUNT} numbers ({_ORDER})")
    if len(values) != _COUNT:
        raise MergeBlockError(f"{what}: {len(values)} values; expected {_COUNT} ({_ORDER})")
    checked = []
    for block, value in zip(MERGE_BLOCKS, values, strict=True):
        number = _finite(value) if isinstance(value, Real) else None
        if number is None:
            raise MergeBlockError(f"{what}: {block} value {value!r} is not a finite number")
        checked.append(number)
    return tuple(checked)


def alpha_of_key(ldm_key: str, alpha: float, blocks: tuple[float, ...] | None) -> float:
    """The multiplier of one LDM checkpoint key: its block's value, or ``alpha`` without blocks.

    ``alpha_of_key("model.diffusion_model.middle_block.1.proj_in.weight", 0.5, values)`` is
    ``values[13]`` (M00); a text encoder or VAE key gets ``values[0]`` (BASE).

    Raises:
        MergeBlockError: ``blocks`` is not 26 values long, or the key is a
            ``model.diffusion_model.`` key in no SD1 block (``label_emb``, a block index
            beyond 11).
    """
    if blocks is None:
        return alpha
    if len(blocks) != _COUNT:
        raise MergeBlockError(f"merge blocks: {len(blocks)} values; expected {_COUNT} ({_ORDER})")
    try:
        block = merge_block_of_key(ldm_key)
    except KeyMapError as error:
        raise MergeBlockError(
            f"checkpoint key {ldm_key!r}: in no SD1 merge block, so block values cannot weight "
            "it; expected an SD1 checkpoint (merge without block values to use one alpha)"
        ) from error
    return float(blocks[_INDEX[block]])


def check_merge_block_text(text: str) -> str:
    """``text`` if it is a preset or 26 values (a grid's merge-blocks value), else raise.

    Raises:
        MergeBlockError: as :func:`parse_merge_blocks`.
    """
    parse_merge_blocks(text)
    return text
