"""Emphasis: the reference's ``parse_prompt_attention`` (A1111 v1.10), bit for bit."""

from __future__ import annotations

import re

from sdstack.prompt.errors import PromptSyntaxError

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
BREAK_WEIGHT = -1.0

# One token of the emphasis language per match; alternatives are tried in this order.
_TOKEN = re.compile(
    r"""
      \\(?P<escaped>[()\[\]\\])          # \( \) \[ \] \\ : the character itself
    | (?P<lone>\\)                       # any other backslash: dropped
    | (?P<open>[(\[])
    | :\s*(?P<weight>[+-]?[.\d]+)\s*\)   # ':w)' closes the innermost '(' with weight w
    | (?P<close>[)\]])
    | (?P<text>[^\\()\[\]:]+|:)
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def parse_attention(text: str) -> list[tuple[str, float]]:
    """The reference emphasis parser: ``(x)`` = x*1.1, ``[x]`` = x/1.1, ``(x:w)`` = x*w.

    Fragments are collected left to right with weight 1.0; when a bracket closes, every
    fragment since it opened is multiplied by its factor, so nested weights are products
    taken in the order the brackets close (``((a))`` -> 1.1*1.1 = 1.2100000000000002).
    Brackets still open at the end multiply to the end of the text: all open ``(`` from
    the outermost in, then all open ``[``. An unmatched ``)``/``]`` or ``:w)`` is literal.
    ``\\( \\) \\[ \\] \\\\`` give the character; any other backslash is dropped (it leaves an
    empty fragment of weight 1.0, as in the reference, which can keep two equal weights
    around it apart). In plain text ``\\s*BREAK\\s*`` (whole word) becomes the fragment
    ``("BREAK", -1.0)``, whose weight is multiplied like any other. Finally, neighbours
    with equal weights are merged; no fragments at all gives ``[("", 1.0)]``.

    Args:
        text: one prompt (one AND-part, schedule already resolved).

    Returns:
        ``[(fragment, weight), ...]``; concatenating the fragments (minus BREAK markers)
        gives the text without brackets, weights and escapes.

    Raises:
        PromptSyntaxError: a ``:w)`` closing an open ``(`` whose ``w`` matches
            ``[+-]?[.\\d]+`` but is not a number (``(a:1.2.3)``, ``(a:.)``); the
            reference crashes there.
    """
    fragments: list[list] = []  # [text, weight], mutated by closing brackets
    round_opens: list[int] = []  # index into fragments where each open '(' started
    square_opens: list[int] = []

    for match in _TOKEN.finditer(text):
        kind = match.lastgroup
        if kind == "escaped":
            fragments.append([match.group("escaped"), 1.0])
        elif kind == "lone":
            fragments.append(["", 1.0])
        elif kind == "open":
            (round_opens if match.group() == "(" else square_opens).append(len(fragments))
        elif kind == "weight" and round_opens:
            weight = _weight_value(match, text)
            _multiply_from(fragments, round_opens.pop(), weight)
        elif match.group() == ")" and round_opens:
            _multiply_from(fragments, round_opens.pop(), ROUND_MULTIPLIER)
        elif match.group() == "]" and square_opens:
            _multiply_from(fragments, square_opens.pop(), SQUARE_MULTIPLIER)
        else:
            _append_plain(fragments, match.group())

    for start in round_opens:
        _multiply_from(fragments, start, ROUND_MULTIPLIER)
    for start in square_opens:
        _multiply_from(fragments, start, SQUARE_MULTIPLIER)
    return _merge_equal_neighbours(fragments)


def _weight_value(match: re.Match, text: str) -> float:
    """``float()`` of the ``w`` in ``:w)``, or a PromptSyntaxError pointing at it."""
    token = match.group("weight")
    try:
        return float(token)
    except ValueError as e:
        raise PromptSyntaxError(
            f"emphasis weight {token!r} is not a number (expected e.g. '(text:1.2)')",
            text,
            match.start("weight"),
        ) from e


def _multiply_from(fragments: list[list], start: int, factor: float) -> None:
    """Multiply the weight of every fragment from ``start`` to the end by ``factor``."""
    for fragment in fragments[start:]:
        fragment[1] *= factor


def _append_plain(fragments: list[list], piece: str) -> None:
    """Append literal text, turning each whole-word ``BREAK`` into a BREAK fragment."""
    for i, part in enumerate(_BREAK.split(piece)):
        if i > 0:
            fragments.append(["BREAK", BREAK_WEIGHT])
        fragments.append([part, 1.0])


def _merge_equal_neighbours(fragments: list[list]) -> list[tuple[str, float]]:
    """Join runs of neighbours whose weights compare equal; empty input -> ``[("", 1.0)]``."""
    merged: list[list] = []
    for piece, weight in fragments:
        if merged and merged[-1][1] == weight:
            merged[-1][0] += piece
        else:
            merged.append([piece, weight])
    if not merged:
        return [("", 1.0)]
    return [(piece, float(weight)) for piece, weight in merged]
