"""Embedding arithmetic: the ``{...}`` expression language of the deprojected encoding.

A prompt without braces is one plain text. A prompt with a brace is one expression in
braces (whitespace around it allowed), read by this grammar (whitespace between tokens
is ignored)::

    expression := sum ( "~" number "~" sum )*        interpolation, left to right
    sum        := ["+" | "-"] term ( ("+" | "-") term )*
    term       := ( number "*" )* unit ( ("*" | "/") number )*
    unit       := text | "(" expression ")" | "pooled" "(" text ( "," option )* ")"
    text       := '"' ... '"' | "'" ... "'"          escapes: \\"  \\'  \\\\
    number     := 0.5, 2, .5, 1e-3 ...               (no sign: signs are operators)

``pooled`` (aliases ``split``, ``commas``) takes the option ``renorm``. The meaning
(evaluated by ``sdstack.text.deprojector.arithmetic``) is relative to the empty prompt's
embedding ``null``: a weighted sum is ``null + sum_i w_i (e_i - null)``; ``a ~t~ b``
slerps ``a - null`` towards ``b - null``; ``pooled("a, b, c")`` is ``"a" + "b" + "c"``
over the comma-separated pieces, optionally renormalised. The texts are encoded as they
are: emphasis, ``AND``, schedules and network tags are not read inside an expression.

The tree's node types and ``format_expression`` live in
:mod:`sdstack.prompt.expression_tree` (importable from here too); this module reads text
into them. Pure text (no torch). ``parse_embedding_expression`` is linear in its input,
which the limits below bound; ``format_expression`` writes the canonical form, and
``parse_embedding_expression(format_expression(e)) == e`` for every parsed ``e``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sdstack.errors import UnknownNameError
from sdstack.prompt.errors import PromptEncodingError, PromptSyntaxError, check_text, shorten
from sdstack.prompt.expression_tree import (
    Expression,
    Interpolation,
    PooledSum,
    Sum,
    Term,
    Text,
    split_pieces,
)
from sdstack.prompt.expression_tree import expression_texts as expression_texts
from sdstack.prompt.expression_tree import format_expression as format_expression
from sdstack.registry import Registry

MAX_EXPRESSION_LENGTH = 100_000
"""Characters of a prompt holding an expression (plain texts have no limit here)."""
MAX_EXPRESSION_TEXT = 50_000
"""Characters of all the quoted texts of one expression together."""
MAX_EXPRESSION_TERMS = 256
"""Texts one expression uses, counted with repeats (each ``pooled`` piece counts one)."""
MAX_EXPRESSION_DEPTH = 32
"""Nesting of the expression: parentheses, and operators inside operators."""
MAX_EXPRESSION_WEIGHT = 1000.0
"""Largest magnitude of a term's weight (the product of its numbers)."""


class EmbeddingExpressionError(PromptSyntaxError):
    """An embedding expression that cannot be read, e.g. ``{"a cat" + }``.

    The message names the problem and what was expected, the position (0-based index
    into ``text``) and shows the prompt with a caret there. Going past one of the limits
    of this module raises it too, at the position where the limit was passed.
    """


_FUNCTIONS = Registry[str]("embedding expression function")
_FUNCTIONS.register("pooled", "pooled", aliases=("split", "commas"))
_OPTIONS = Registry[str]("pooled() option")
_OPTIONS.register("renorm", "renorm", aliases=("renormalise", "renormalize"))

_TOKEN = re.compile(
    r"""
      (?P<space>\s+)
    | (?P<number>(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)
    | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
    | (?P<text>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
    | (?P<symbol>[-+*/(),~{}])
    """,
    re.VERBOSE | re.DOTALL,
)
_ESCAPE = re.compile(r"\\(.)", re.DOTALL)
_ESCAPABLE = "\"'\\"
_END = "end"


@dataclass(frozen=True)
class _Token:
    kind: str  # "number" | "name" | "text" | "symbol" | "end"
    value: str  # the source characters; for "text", the decoded text
    position: int

    @property
    def number(self) -> float:
        return float(self.value)


def parse_embedding_expression(text: str) -> Expression:
    """Read a prompt of the deprojected encoding (the grammar of this module).

    Args:
        text: the prompt. Without ``{`` or ``}`` it is one plain text, unchanged.

    Returns:
        The expression: a :class:`Text`, :class:`Sum`, :class:`Interpolation` or
        :class:`PooledSum` tree.

    Raises:
        EmbeddingExpressionError: text outside the grammar or past a limit of this
            module, or text that is not valid UTF-8; with the position and what was
            expected there.
    """
    try:
        check_text(text)
    except PromptEncodingError as error:
        raise EmbeddingExpressionError(error.reason, text, error.position) from None
    if "{" not in text and "}" not in text:
        return Text(text)
    if len(text) > MAX_EXPRESSION_LENGTH:
        raise EmbeddingExpressionError(
            f"embedding expression longer than {MAX_EXPRESSION_LENGTH} characters "
            f"(MAX_EXPRESSION_LENGTH): it has {len(text)}",
            text,
            MAX_EXPRESSION_LENGTH,
        )
    return _Parser(text).prompt()


class _Parser:
    """Recursive descent over the tokens; recursion is bounded by MAX_EXPRESSION_DEPTH."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens: list[_Token] = []
        self.index = 0
        self.terms = 0
        self.text_length = 0

    def error(self, reason: str, position: int) -> EmbeddingExpressionError:
        return EmbeddingExpressionError(reason, self.text, position)

    def _tokenize(self) -> list[_Token]:
        tokens, position, text = [], 0, self.text
        while position < len(text):
            match = _TOKEN.match(text, position)
            if match is None:
                raise self.error(self._bad_character(position), position)
            kind = match.lastgroup
            if kind == "text":
                tokens.append(_Token(kind, self._decode(match), position))
            elif kind != "space":
                tokens.append(_Token(kind, match.group(), position))
            position = match.end()
        tokens.append(_Token(_END, "", len(text)))
        return tokens

    def _bad_character(self, position: int) -> str:
        char = self.text[position]
        if char in "\"'":
            return f"unterminated text: expected a closing {char}"
        return (
            f"unexpected character {char!r} (expected a quoted text, a number, "
            "an operator + - * / ~ or a parenthesis)"
        )

    def _decode(self, match: re.Match[str]) -> str:
        body = match.group()[1:-1]
        for escape in _ESCAPE.finditer(body):
            if escape.group(1) not in _ESCAPABLE:
                raise self.error(
                    f"unknown escape '\\{escape.group(1)}' in a text (expected \\\" \\' or \\\\)",
                    match.start() + 1 + escape.start(),
                )
        return _ESCAPE.sub(r"\1", body)

    def peek(self) -> _Token:
        return self.tokens[self.index]

    def take(self) -> _Token:
        token = self.tokens[self.index]
        self.index += 1
        return token

    def at(self, symbols: str) -> bool:
        """Whether the next token is one of the one-character ``symbols``."""
        token = self.tokens[self.index]
        return token.kind == "symbol" and token.value in symbols

    def expect(self, symbol: str, what: str) -> _Token:
        token = self.peek()
        if not self.at(symbol):
            raise self.error(f"expected {what}, found {_describe(token)}", token.position)
        return self.take()

    def prompt(self) -> Expression:
        start = len(self.text) - len(self.text.lstrip())
        if self.text[start] != "{":
            raise self.error(
                "text outside the embedding expression: a prompt with a brace must be one "
                '{...} expression (put texts in quotes inside it, e.g. {"a cat" + "a hat"})',
                start,
            )
        self.tokens = self._tokenize()
        self.take()
        node, _ = self.expression(0)
        self.expect("}", "an operator + - * / ~ or the closing '}'")
        end = self.peek()
        if end.kind != _END:
            raise self.error(
                "text after the closing '}' (the expression must be the whole prompt)",
                end.position,
            )
        return node

    def expression(self, depth: int) -> tuple[Expression, int]:
        """``sum (~t~ sum)*``; returns the node and its depth."""
        node, height = self.sum(depth)
        while self.at("~"):
            tilde = self.take()
            t = self.number("the interpolation weight (a number from 0 to 1) after '~'")
            if not 0.0 <= t.number <= 1.0:
                raise self.error(
                    f"interpolation weight {t.value!r} is out of range (expected a number "
                    "from 0 to 1)",
                    t.position,
                )
            self.expect("~", "'~' after the interpolation weight")
            end, end_height = self.sum(depth)
            node = Interpolation(node, end, t.number)
            height = max(height, end_height) + 1
            self.check_depth(height, tilde.position)
        return node, height

    def sum(self, depth: int) -> tuple[Expression, int]:
        terms: list[Term] = []
        heights = [0]
        bare = True  # a lone unit with no sign or weight is the unit itself
        sign = 1.0
        start = self.peek()
        if self.at("+-"):
            sign, bare = (1.0 if self.take().value == "+" else -1.0), False
        while True:
            weight, operand, height, weighted = self.term(depth, sign)
            terms.append(Term(weight, operand))
            heights.append(height)
            bare = bare and not weighted
            if not self.at("+-"):
                break
            sign = 1.0 if self.take().value == "+" else -1.0
        if bare and len(terms) == 1:
            return terms[0].operand, heights[1]
        height = max(heights) + 1
        self.check_depth(height, start.position)
        return Sum(tuple(terms)), height

    def term(self, depth: int, sign: float) -> tuple[float, Expression, int, bool]:
        weight, weighted = sign, False
        while self.peek().kind == "number":
            number = self.number("a number")
            self.expect("*", "'*' after the weight (a weight multiplies a text: 2*\"a\")")
            weight = self.scaled(weight * number.number, number)
            weighted = True
        operand, height = self.unit(depth)
        while self.at("*/"):
            operator = self.take().value
            number = self.number(
                f"a number after '{operator}' (texts are weighted by numbers, not by texts)"
            )
            if operator == "/" and number.number == 0.0:
                raise self.error("division by zero", number.position)
            product = weight * number.number if operator == "*" else weight / number.number
            weight = self.scaled(product, number)
            weighted = True
        return weight, operand, height, weighted

    def scaled(self, weight: float, token: _Token) -> float:
        if not abs(weight) <= MAX_EXPRESSION_WEIGHT:
            raise self.error(
                f"weight {weight!r} (at {token.value!r}) is out of range (expected at most "
                f"{MAX_EXPRESSION_WEIGHT:g} in magnitude, MAX_EXPRESSION_WEIGHT)",
                token.position,
            )
        return weight

    def unit(self, depth: int) -> tuple[Expression, int]:
        token = self.peek()
        if token.kind == "text":
            self.take()
            self.count(token, (token.value,))
            return Text(token.value), 0
        if token.kind == "name" and (
            token.value in _FUNCTIONS or self.tokens[self.index + 1].value == "("
        ):
            return self.function(), 1
        if token.kind == "name":
            raise self.error(
                f"expected a quoted text, found {_describe(token)} (quote texts: "
                '{"a cat" + "a hat"})',
                token.position,
            )
        if self.at("("):
            self.take()
            self.check_depth(depth + 1, token.position)
            node, height = self.expression(depth + 1)
            self.expect(")", "an operator + - * / ~ or the closing ')'")
            return node, height
        raise self.error(
            f"expected a quoted text, a number, '(' or pooled(...), found {_describe(token)}",
            token.position,
        )

    def function(self) -> PooledSum:
        name = self.take()
        self.lookup(_FUNCTIONS, name)
        self.expect("(", f"'(' after {name.value!r}")
        text = self.peek()
        if text.kind != "text":
            raise self.error(
                f"expected a quoted text in pooled(...), found {_describe(text)}", text.position
            )
        self.take()
        pieces = split_pieces(text.value)
        if not pieces:
            raise self.error(
                "pooled(...) needs a text with at least one comma-separated piece, e.g. "
                'pooled("a cat, red hat")',
                text.position,
            )
        self.count(text, pieces)
        options: set[str] = set()
        while self.at(","):
            self.take()
            option = self.peek()
            if option.kind != "name":
                raise self.error(
                    f"expected an option of pooled(...) (renorm), found {_describe(option)}",
                    option.position,
                )
            canonical = self.lookup(_OPTIONS, self.take())
            if canonical in options:
                raise self.error(f"option {canonical!r} given twice", option.position)
            options.add(canonical)
        self.expect(")", "',' and an option (renorm), or the closing ')' of pooled(...)")
        return PooledSum(text.value, "renorm" in options)

    def lookup(self, registry: Registry[str], token: _Token) -> str:
        try:
            return registry.canonical(token.value)
        except UnknownNameError as error:
            raise self.error(str(error), token.position) from None

    def number(self, what: str) -> _Token:
        token = self.peek()
        if token.kind != "number":
            raise self.error(f"expected {what}, found {_describe(token)}", token.position)
        return self.take()

    def count(self, token: _Token, texts: tuple[str, ...]) -> None:
        self.terms += len(texts)
        self.text_length += len(token.value)
        if self.terms > MAX_EXPRESSION_TERMS:
            raise self.error(
                f"expression uses more than {MAX_EXPRESSION_TERMS} texts "
                "(MAX_EXPRESSION_TERMS; pooled(...) pieces count one each)",
                token.position,
            )
        if self.text_length > MAX_EXPRESSION_TEXT:
            raise self.error(
                f"the texts of the expression are longer than {MAX_EXPRESSION_TEXT} "
                "characters together (MAX_EXPRESSION_TEXT)",
                token.position,
            )

    def check_depth(self, depth: int, position: int) -> None:
        if depth > MAX_EXPRESSION_DEPTH:
            raise self.error(
                f"expression nested more than {MAX_EXPRESSION_DEPTH} deep "
                "(MAX_EXPRESSION_DEPTH: parentheses and operators inside operators)",
                position,
            )


def _describe(token: _Token) -> str:
    if token.kind == _END:
        return "the end of the prompt"
    if token.kind == "text":
        return f"the text {shorten(token.value)!r}"
    return repr(shorten(token.value))
