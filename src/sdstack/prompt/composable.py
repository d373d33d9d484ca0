"""Composable diffusion: splitting a prompt on ``AND`` (A1111 v1.10 behaviour)."""

from __future__ import annotations

import re

from sdstack.prompt.errors import PromptSyntaxError, shorten
from sdstack.prompt.limits import MAX_WEIGHT

_AND = re.compile(r"\bAND\b")
# The reference reads each piece with the regex
#   ^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$
# (lazy text, an optional ':number' weight, trailing whitespace). Its lazy text retries
# the rest at every position, which is quadratic on long runs of spaces; ``_piece_weight``
# gives the same groups in linear time. _WEIGHT is the ':number' after its colon.
_WEIGHT = re.compile(r"\s*([-+]?(?:\d+\.?|\d*\.\d+))")


def split_and(text: str) -> list[tuple[str, float]]:
    """The reference AND split: pieces of ``re.split(r"\\bAND\\b", text)``, each with a weight.

    A piece may end in ``:number`` (spaces allowed around the colon); that is its weight,
    default 1.0, even when the prompt has no AND at all. Each piece keeps its leading
    whitespace and loses its trailing whitespace (the reference's lazy match), so
    ``"cat AND dog :2"`` -> ``[("cat", 1.0), (" dog", 2.0)]``. The split is purely textual
    and case-sensitive: it also splits inside brackets, and ``cat AND`` gives a second,
    empty piece.

    Args:
        text: a positive prompt, extra-network tags already removed.

    Returns:
        ``[(piece_text, weight), ...]``, at least one entry.

    Raises:
        PromptSyntaxError: a weight beyond ``MAX_WEIGHT`` in magnitude or too large for a
            float (``cat :1000000``), which the reference accepts and then makes a NaN
            image with.
    """
    pieces: list[tuple[str, float]] = []
    offset = 0
    for piece in _AND.split(text):
        body, weight, at = _piece_weight(piece)
        pieces.append((body, _to_float(weight, text, offset + at)))
        offset += len(piece) + len("AND")
    return pieces


def _piece_weight(piece: str) -> tuple[str, str | None, int]:
    """``(text, weight or None, weight's index)``: the groups of the reference's regex.

    Its lazy text ends at the first index from which the rest is
    ``\\s*:\\s*NUMBER\\s*`` or ``\\s*``. A weight holds no ``:``, so it can only follow the
    last colon; the text then ends where the whitespace before that colon starts, and
    otherwise where the trailing whitespace starts. (``str.isspace`` is regex ``\\s``.)
    """
    stripped = piece.rstrip()
    colon = stripped.rfind(":")
    if colon >= 0:
        match = _WEIGHT.fullmatch(stripped, colon + 1)
        if match is not None:
            return piece[: len(stripped[:colon].rstrip())], match.group(1), match.start(1)
    return stripped, None, 0


def _to_float(weight: str | None, text: str, position: int) -> float:
    """``float(weight)``, 1.0 for no weight; a PromptSyntaxError if it is out of range."""
    if weight is None:
        return 1.0
    try:
        value = float(weight)
    except ValueError as e:  # pragma: no cover - \d and float() agree on Unicode digits
        raise PromptSyntaxError(f"AND weight {weight!r} is not a number", text, position) from e
    if not -MAX_WEIGHT <= value <= MAX_WEIGHT:
        raise PromptSyntaxError(
            f"AND weight {shorten(weight)!r} is out of range: weights must be finite "
            f"numbers in [-{MAX_WEIGHT:g}, {MAX_WEIGHT:g}] (e.g. 'cat AND dog :0.5')",
            text,
            position,
        )
    return value
