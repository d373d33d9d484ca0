"""Emphasis: the reference's ``parse_prompt_attention`` (A1111 v1.10), bit for bit.

Linear in the text: at most ``MAX_EMPHASIS_DEPTH`` brackets are open at once, so each
fragment's weight is a product of at most that many factors.
"""

from __future__ import annotations

import re

from sdstack.prompt.errors import PromptSyntaxError, shorten
from sdstack.prompt.limits import MAX_EMPHASIS_DEPTH, MAX_WEIGHT

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
_BREAK_WORD = re.compile(r"\bBREAK\b")
_SPACES = re.compile(r"\s*")


class _Fragment:
    """Text pieces sharing one weight; ``position`` is where the first piece starts."""

    __slots__ = ("pieces", "position", "weight")

    def __init__(self, piece: str, weight: float, position: int) -> None:
        self.pieces = [piece]
        self.weight = weight
        self.position = position


class _State:
    """Fragments so far and the fragment index at which each open bracket started."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.fragments: list[_Fragment] = []
        self.round_opens: list[int] = []
        self.square_opens: list[int] = []

    def add(self, piece: str, weight: float, position: int) -> None:
        """Append a fragment, or extend the last one when nothing can ever part them.

        Two neighbours that have equal weights now and no open bracket between them get
        the same factors from here on, so the final merge would join them anyway.
        """
        fragments = self.fragments
        if fragments and fragments[-1].weight == weight and not self._opened_here():
            fragments[-1].pieces.append(piece)
        else:
            fragments.append(_Fragment(piece, weight, position))

    def _opened_here(self) -> bool:
        end = len(self.fragments)
        return bool(
            (self.round_opens and self.round_opens[-1] == end)
            or (self.square_opens and self.square_opens[-1] == end)
        )

    def open(self, bracket: str, position: int) -> None:
        if len(self.round_opens) + len(self.square_opens) >= MAX_EMPHASIS_DEPTH:
            raise PromptSyntaxError(
                f"emphasis brackets nested more than {MAX_EMPHASIS_DEPTH} deep (the limit); "
                "close some, or escape literal brackets as \\( \\[",
                self.text,
                position,
            )
        opens = self.round_opens if bracket == "(" else self.square_opens
        opens.append(len(self.fragments))

    def multiply_from(self, start: int, factor: float) -> None:
        """Multiply the weight of every fragment from ``start`` to the end by ``factor``."""
        fragments = self.fragments
        for index in range(start, len(fragments)):
            fragments[index].weight *= factor


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
            ``[+-]?[.\\d]+`` but is not a number (``(a:1.2.3)``, ``(a:.)``), where the
            reference crashes; past the limits of ``sdstack.prompt.limits`` (which the
            reference does not have): more than ``MAX_EMPHASIS_DEPTH`` brackets open at
            once, or a weight (written, or the product of nested brackets) that is not
            finite or beyond ``MAX_WEIGHT`` in magnitude.
    """
    state = _State(text)
    for match in _TOKEN.finditer(text):
        kind = match.lastgroup
        if kind == "escaped":
            state.add(match.group("escaped"), 1.0, match.start())
        elif kind == "lone":
            state.add("", 1.0, match.start())
        elif kind == "open":
            state.open(match.group(), match.start())
        elif kind == "weight" and state.round_opens:
            weight = _weight_value(match, text)
            state.multiply_from(state.round_opens.pop(), weight)
        elif match.group() == ")" and state.round_opens:
            state.multiply_from(state.round_opens.pop(), ROUND_MULTIPLIER)
        elif match.group() == "]" and state.square_opens:
            state.multiply_from(state.square_opens.pop(), SQUARE_MULTIPLIER)
        else:
            _append_plain(state, match.group(), match.start())

    for start in state.round_opens:
        state.multiply_from(start, ROUND_MULTIPLIER)
    for start in state.square_opens:
        state.multiply_from(start, SQUARE_MULTIPLIER)
    _check_weights(state)
    return _merge_equal_neighbours(state.fragments)


def _weight_value(match: re.Match, text: str) -> float:
    """``float()`` of the ``w`` in ``:w)``, or a PromptSyntaxError pointing at it."""
    token = match.group("weight")
    try:
        weight = float(token)
    except ValueError as e:
        raise PromptSyntaxError(
            f"emphasis weight {token!r} is not a number (expected e.g. '(text:1.2)')",
            text,
            match.start("weight"),
        ) from e
    if not -MAX_WEIGHT <= weight <= MAX_WEIGHT:
        raise PromptSyntaxError(
            f"emphasis weight {shorten(token)!r} is out of range: weights must be finite "
            f"numbers in [-{MAX_WEIGHT:g}, {MAX_WEIGHT:g}] (e.g. '(text:1.2)')",
            text,
            match.start("weight"),
        )
    return weight


def _check_weights(state: _State) -> None:
    """Every fragment's final weight (a product over nested brackets) within MAX_WEIGHT."""
    for fragment in state.fragments:
        if not -MAX_WEIGHT <= fragment.weight <= MAX_WEIGHT:
            raise PromptSyntaxError(
                f"emphasis weight {fragment.weight:g} of {shorten(''.join(fragment.pieces))!r} "
                f"is out of range: nested brackets multiply their weights, and the result "
                f"must be in [-{MAX_WEIGHT:g}, {MAX_WEIGHT:g}]; use fewer brackets",
                state.text,
                fragment.position,
            )


def _append_plain(state: _State, piece: str, position: int) -> None:
    """Append literal text, turning each whole-word ``BREAK`` into a BREAK fragment.

    This is ``re.split(r"\\s*\\bBREAK\\b\\s*", piece)`` in linear time: every whole-word
    ``BREAK`` is a separator, together with the whitespace around it (the regex would
    retry ``\\s*`` at every position of a long run of spaces).
    """
    start = 0
    for word in _BREAK_WORD.finditer(piece):
        end = word.start()
        while end > start and piece[end - 1].isspace():  # str.isspace() is regex \s
            end -= 1
        state.add(piece[start:end], 1.0, position + start)
        state.add("BREAK", BREAK_WEIGHT, position + word.start())
        start = _SPACES.match(piece, word.end()).end()
    state.add(piece[start:], 1.0, position + start)


def _merge_equal_neighbours(fragments: list[_Fragment]) -> list[tuple[str, float]]:
    """Join runs of neighbours whose weights compare equal; empty input -> ``[("", 1.0)]``."""
    merged: list[tuple[list[str], float]] = []
    for fragment in fragments:
        if merged and merged[-1][1] == fragment.weight:
            merged[-1][0].extend(fragment.pieces)
        else:
            merged.append((list(fragment.pieces), fragment.weight))
    if not merged:
        return [("", 1.0)]
    return [("".join(pieces), float(weight)) for pieces, weight in merged]
