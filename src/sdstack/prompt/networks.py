"""Extra-network tags ``<kind:args>`` such as ``<lora:name:0.8>`` (A1111 v1.10 behaviour)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from sdstack.prompt.errors import PromptSyntaxError, shorten

# The reference's tag regex is <(\w+):([^>]+)>; ``_find_tags`` gives its matches in linear
# time (the regex rescans to the end of the text from every '<' when no '>' follows).
_TAG_HEAD = re.compile(r"<(\w+):")
LORA_KINDS = ("lora", "lyco")  # "lyco" is the reference's alias of "lora"
_LORA_FORM = "<lora:name[:te[:unet[:dyn]]]>"


@dataclass(frozen=True)
class NetworkTag:
    """One ``<kind:args>`` tag, as the reference's extra-network code reads it.

    Attributes:
        kind: the network kind, ``"lyco"`` normalised to ``"lora"``.
        items: the arguments, ``args.split(":")``, exactly as written.
        name: the network name: the first positional item for LoRA, ``items[0]`` otherwise.
        te: text-encoder multiplier (LoRA: positional 2 or ``te=``, default 1.0).
        unet: UNet multiplier (LoRA: positional 3 or ``unet=``, default ``te``).
        named: items with exactly one ``=``, e.g. ``{"te": "0.5", "lbw": "MIDD"}``.
        written_kind: the kind as written (``"lyco"`` stays visible here).
        dyn: LoRA ``dyn`` dimension (positional 4 or ``dyn=``), None if not given.
        span: ``(start, end)`` of the whole tag in the text it was extracted from.
    """

    kind: str
    items: tuple[str, ...]
    name: str
    te: float = 1.0
    unet: float = 1.0
    named: dict[str, str] = field(default_factory=dict)
    written_kind: str = ""
    dyn: int | None = None
    span: tuple[int, int] = (0, 0)


def extract_networks(text: str) -> tuple[str, list[NetworkTag]]:
    """The reference tag extraction: every ``<(\\w+):([^>]+)>`` is removed from the text.

    The match is replaced by "" (no whitespace clean-up). Arguments are the part after
    the first ``:``, split on ``:``; an item with exactly one ``=`` is named, the others
    are positional. LoRA (``lora``/``lyco``): ``name[:te[:unet[:dyn]]]``, te default 1.0,
    unet default te, then ``te=``/``unet=``/``dyn=`` override; numbers are read with
    Python's ``float``/``int`` as in the reference. Other kinds (``hypernet``, tags of
    extensions): name ``items[0]``; te from ``items[1]`` and ``te=``/``unet=`` when they
    are numbers, else the defaults; they never raise.

    Args:
        text: a positive prompt (negative prompts keep their tags as text).

    Returns:
        ``(text_without_tags, tags_in_order)``.

    Raises:
        PromptSyntaxError: a LoRA tag without a name, or whose te/unet is not a finite
            number or dyn not an integer (the reference crashes on these).
    """
    tags: list[NetworkTag] = []
    kept: list[str] = []
    end = 0
    for match in _find_tags(text):
        kept.append(text[end : match.start])
        end = match.end
        tags.append(_read_tag(match, text))
    kept.append(text[end:])
    return "".join(kept), tags


@dataclass(frozen=True)
class _TagMatch:
    """One match of ``<(\\w+):([^>]+)>``: its span, the kind and the arguments."""

    start: int
    end: int
    kind: str
    args_start: int

    def group(self, text: str) -> str:
        return text[self.start : self.end]


def _find_tags(text: str) -> list[_TagMatch]:
    """``re.finditer(r"<(\\w+):([^>]+)>", text)``, in linear time.

    At a ``<`` the regex matches exactly when the word characters after it are followed
    by ``:`` and the next ``>`` after that colon is at least one character further on;
    the search then goes on after that ``>``, or at the next ``<``.
    """
    matches: list[_TagMatch] = []
    position, close = 0, -1
    while (start := text.find("<", position)) >= 0:
        head = _TAG_HEAD.match(text, start)
        if head is None:
            position = start + 1
            continue
        if close < head.end():  # else: close is still the first '>' after this colon
            close = text.find(">", head.end())
            if close < 0:
                break  # no '>' left: no tag can follow
        if close == head.end():
            position = start + 1
            continue
        matches.append(_TagMatch(start, close + 1, head.group(1), head.end()))
        position = close + 1
    return matches


def _read_tag(match: _TagMatch, text: str) -> NetworkTag:
    """Build the NetworkTag of one tag match."""
    written_kind, args = match.kind, text[match.args_start : match.end - 1]
    items = tuple(args.split(":"))
    offsets = _item_offsets(items, match.args_start)
    named: dict[str, str] = {}
    named_offsets: dict[str, int] = {}
    positional: list[tuple[str, int]] = []
    for item, offset in zip(items, offsets, strict=True):
        parts = item.split("=")
        if len(parts) == 2:
            named[parts[0]] = parts[1]
            named_offsets[parts[0]] = offset
        else:
            positional.append((item, offset))
    common = {
        "items": items,
        "named": named,
        "written_kind": written_kind,
        "span": (match.start, match.end),
    }
    if written_kind in LORA_KINDS:
        return _lora_tag(match, text, positional, named_offsets, common)
    te = _lenient_float(items[1], 1.0) if len(items) > 1 else 1.0
    te = _lenient_float(named.get("te"), te)
    unet = _lenient_float(named.get("unet"), te)
    return NetworkTag(kind=written_kind, name=items[0], te=te, unet=unet, **common)


def _lora_tag(
    match: _TagMatch,
    text: str,
    positional: list[tuple[str, int]],
    named_offsets: dict[str, int],
    common: dict,
) -> NetworkTag:
    """LoRA arguments: positional name, te, unet, dyn; named te=, unet=, dyn= win."""
    tag = shorten(match.group(text))
    if not positional:
        raise PromptSyntaxError(
            f"LoRA tag {tag!r} has no name (expected {_LORA_FORM})", text, match.start
        )
    named = common["named"]

    def number(key: str, index: int, default: float) -> float:
        # As in the reference: the positional value is read (and must be valid) first.
        if len(positional) > index:
            value, offset = positional[index]
            default = _strict_float(value, f"{key} multiplier", tag, text, offset)
        if key in named:
            return _strict_float(named[key], f"{key}=", tag, text, named_offsets[key])
        return default

    te = number("te", 1, 1.0)
    unet = number("unet", 2, te)
    dyn = _strict_int(*positional[3], tag, text) if len(positional) > 3 else None
    if "dyn" in named:
        dyn = _strict_int(named["dyn"], named_offsets["dyn"], tag, text)
    return NetworkTag(kind="lora", name=positional[0][0], te=te, unet=unet, dyn=dyn, **common)


def _item_offsets(items: tuple[str, ...], start: int) -> list[int]:
    """Start index in the text of each ``:``-separated item."""
    offsets = []
    for item in items:
        offsets.append(start)
        start += len(item) + 1
    return offsets


def _strict_float(value: str, what: str, tag: str, text: str, position: int) -> float:
    """``float(value)`` that must be finite, else a PromptSyntaxError naming the tag."""
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise PromptSyntaxError(
            f"LoRA tag {tag!r}: {what} {shorten(value)!r} is not a finite number "
            f"(expected {_LORA_FORM}, e.g. <lora:name:0.8>)",
            text,
            position,
        )
    return number


def _strict_int(value: str, position: int, tag: str, text: str) -> int:
    """``int(value)`` for the LoRA dyn dimension, else a PromptSyntaxError."""
    try:
        return int(value)
    except ValueError as e:
        raise PromptSyntaxError(
            f"LoRA tag {tag!r}: dyn {shorten(value)!r} is not an integer (expected {_LORA_FORM})",
            text,
            position,
        ) from e


def _lenient_float(value: str | None, default: float) -> float:
    """``float(value)`` if it is a finite number, else ``default``."""
    if value is None:
        return default
    try:
        number = float(value)
    except ValueError:
        return default
    return number if math.isfinite(number) else default
