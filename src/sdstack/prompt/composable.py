"""Composable diffusion: splitting a prompt on ``AND`` (A1111 v1.10 behaviour)."""

from __future__ import annotations

import re

from sdstack.prompt.errors import PromptSyntaxError

_AND = re.compile(r"\bAND\b")
# Lazy text, then an optional ':number' weight, then trailing whitespace.
_PIECE_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


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
        PromptSyntaxError: never for ASCII digits; only if a Unicode digit matched by
            ``\\d`` were refused by ``float()``.
    """
    pieces: list[tuple[str, float]] = []
    offset = 0
    for piece in _AND.split(text):
        match = _PIECE_WEIGHT.match(piece)
        body, weight = match.group(1), match.group(2)
        pieces.append((body, _to_float(weight, text, offset + match.start(2) if weight else 0)))
        offset += len(piece) + len("AND")
    return pieces


def _to_float(weight: str | None, text: str, position: int) -> float:
    """``float(weight)``, 1.0 for no weight, a PromptSyntaxError if ``float`` refuses it."""
    if weight is None:
        return 1.0
    try:
        return float(weight)
    except ValueError as e:  # pragma: no cover - \d and float() agree on Unicode digits
        raise PromptSyntaxError(f"AND weight {weight!r} is not a number", text, position) from e
