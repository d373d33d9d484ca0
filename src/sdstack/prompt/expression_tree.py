"""Embedding expressions as data: the node types, the texts they use, their canonical text.

The tree :func:`~sdstack.prompt.arithmetic.parse_embedding_expression` returns (grammar
and meaning: :mod:`sdstack.prompt.arithmetic`): a :class:`Text` (one text's sentence
embedding ``e(text)``), a :class:`Sum` of weighted :class:`Term` s (``null + sum_i w_i
(e(x_i) - null)``), an :class:`Interpolation` (slerp about ``null``) or a
:class:`PooledSum` (the spec's pooled encoding of comma-separated pieces).
:func:`format_expression` writes the canonical text, which parses back to the same tree.

Pure text (no torch).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Text:
    """One text to encode: its sentence embedding ``e(text)``."""

    text: str


@dataclass(frozen=True)
class Term:
    """``weight * operand`` inside a :class:`Sum`."""

    weight: float
    operand: Expression


@dataclass(frozen=True)
class Sum:
    """``w_1 * x_1 + w_2 * x_2 + ...``, i.e. ``null + sum_i w_i (e(x_i) - null)``."""

    terms: tuple[Term, ...]


@dataclass(frozen=True)
class Interpolation:
    """``start ~t~ end``: slerp from ``start`` (t = 0) to ``end`` (t = 1) about null."""

    start: Expression
    end: Expression
    t: float


@dataclass(frozen=True)
class PooledSum:
    """``pooled("a, b, c")``: the spec's pooled encoding of the comma-separated pieces,
    ``null + sum_i (e(piece_i) - null)``, with ``renormalise`` rescaled so that its norm is
    the mean norm of the pieces' embeddings."""

    text: str
    renormalise: bool = False

    @property
    def pieces(self) -> tuple[str, ...]:
        """The text split on commas, each piece stripped, empty pieces dropped."""
        return split_pieces(self.text)


Expression = Text | Sum | Interpolation | PooledSum


def split_pieces(text: str) -> tuple[str, ...]:
    """``text`` split on ``,``, each piece stripped of whitespace, empty pieces dropped."""
    return tuple(piece for piece in (p.strip() for p in text.split(",")) if piece)


def expression_texts(expression: Expression) -> list[str]:
    """The different texts to encode for ``expression``, in order of first appearance."""
    texts: dict[str, None] = {}
    stack = [expression]
    while stack:
        node = stack.pop()
        if isinstance(node, Text):
            texts[node.text] = None
        elif isinstance(node, PooledSum):
            texts.update(dict.fromkeys(node.pieces))
        elif isinstance(node, Sum):
            stack.extend(term.operand for term in reversed(node.terms))
        else:
            stack.extend((node.end, node.start))
    return list(texts)


def format_expression(expression: Expression) -> str:
    """The canonical text of ``expression``: a plain text where it is one (and holds no
    brace), else ``{...}`` with ``"`` quotes, single spaces around ``+ - ~t~`` and weights
    written as ``repr(float)`` (``0.5*"a"``, ``- 2.0*"b"``)."""
    if isinstance(expression, Text) and not any(c in expression.text for c in "{}"):
        return expression.text
    return "{" + _format(expression) + "}"


def _format(node: Expression) -> str:
    if isinstance(node, Text):
        return _quote(node.text)
    if isinstance(node, PooledSum):
        option = ", renorm" if node.renormalise else ""
        return f"pooled({_quote(node.text)}{option})"
    if isinstance(node, Interpolation):
        end = _format(node.end)
        if isinstance(node.end, Interpolation):
            end = f"({end})"
        return f"{_format(node.start)} ~{node.t + 0.0!r}~ {end}"
    parts = []
    for index, term in enumerate(node.terms):
        operand = _format(term.operand)
        if isinstance(term.operand, (Sum, Interpolation)):
            operand = f"({operand})"
        weight = abs(term.weight)
        sign = "-" if term.weight < 0 else "+"
        factor = operand if weight == 1.0 else f"{weight!r}*{operand}"
        if index > 0:
            parts.append(f"{sign} {factor}")
        elif sign == "-" or (weight == 1.0 and len(node.terms) == 1):
            parts.append(f"{sign}{factor}")  # "+" keeps a one-term sum a sum
        else:
            parts.append(factor)
    return " ".join(parts)


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
