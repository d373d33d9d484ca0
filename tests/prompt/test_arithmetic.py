"""The embedding-arithmetic expression language (``sdstack.prompt.arithmetic``)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sdstack.errors import SdstackError
from sdstack.prompt.arithmetic import (
    MAX_EXPRESSION_DEPTH,
    MAX_EXPRESSION_LENGTH,
    MAX_EXPRESSION_TERMS,
    MAX_EXPRESSION_TEXT,
    EmbeddingExpressionError,
    Interpolation,
    PooledSum,
    Sum,
    Term,
    Text,
    expression_texts,
    format_expression,
    parse_embedding_expression,
    split_pieces,
)
from sdstack.prompt.errors import PromptSyntaxError

FAST = settings(max_examples=300, deadline=None)


def t(text):
    return Text(text)


WORKED = [
    ("a cat, red hat", t("a cat, red hat")),
    ("  (a:1.2) [b|c] AND d  ", t("  (a:1.2) [b|c] AND d  ")),
    ("", t("")),
    ('{"a cat"}', t("a cat")),
    (' { ( "a cat" ) } ', t("a cat")),
    ("{'it\\'s'}", t("it's")),
    ('{"say \\"hi\\" \\\\ {x}"}', t('say "hi" \\ {x}')),
    (
        '{"a cat" + 0.5*"a hat" - "blurry"}',
        Sum((Term(1.0, t("a cat")), Term(0.5, t("a hat")), Term(-1.0, t("blurry")))),
    ),
    ('{-"a"}', Sum((Term(-1.0, t("a")),))),
    ('{+"a"}', Sum((Term(1.0, t("a")),))),
    ('{"a"*2/4 - 3*.5*"b"}', Sum((Term(0.5, t("a")), Term(-1.5, t("b"))))),
    ('{2*("a" - "b")}', Sum((Term(2.0, Sum((Term(1.0, t("a")), Term(-1.0, t("b"))))),))),
    ('{"a cat" ~0.3~ "a dog"}', Interpolation(t("a cat"), t("a dog"), 0.3)),
    (
        '{"a" + "b" ~1e-1~ "c" - "d" ~ 1 ~ "e"}',
        Interpolation(
            Interpolation(
                Sum((Term(1.0, t("a")), Term(1.0, t("b")))),
                Sum((Term(1.0, t("c")), Term(-1.0, t("d")))),
                0.1,
            ),
            t("e"),
            1.0,
        ),
    ),
    ('{"a" ~0~ ("b" ~.5~ "c")}', Interpolation(t("a"), Interpolation(t("b"), t("c"), 0.5), 0.0)),
    ('{pooled("a cat, red hat, garden")}', PooledSum("a cat, red hat, garden")),
    ("{split('x,,y, ', renormalise)}", PooledSum("x,,y, ", True)),
    (
        '{"a" - 0.5*commas("b, c", renorm)}',
        Sum((Term(1.0, t("a")), Term(-0.5, PooledSum("b, c", True)))),
    ),
]


@pytest.mark.parametrize(("text", "expected"), WORKED)
def test_worked_examples(text, expected):
    parsed = parse_embedding_expression(text)
    assert parsed == expected
    assert parse_embedding_expression(format_expression(parsed)) == parsed


@pytest.mark.parametrize(
    ("expression", "canonical"),
    [
        (t("a cat"), "a cat"),
        (t("a {b}"), '{"a {b}"}'),
        (t('q"\\'), 'q"\\'),
        (t('{q"\\'), '{"{q\\"\\\\"}'),
        (Sum((Term(1.0, t("a")), Term(0.5, t("b")), Term(-1.0, t("c")))), '{"a" + 0.5*"b" - "c"}'),
        (Sum((Term(-0.25, t("a")), Term(-2.0, t("b")))), '{-0.25*"a" - 2.0*"b"}'),
        (Sum((Term(1.0, t("a")),)), '{+"a"}'),
        (Sum((Term(3.0, Sum((Term(1.0, t("a")),))),)), '{3.0*(+"a")}'),
        (Interpolation(t("a"), t("b"), 1e-05), '{"a" ~1e-05~ "b"}'),
        (PooledSum("a, b", True), '{pooled("a, b", renorm)}'),
        (
            Sum((Term(1.0, Interpolation(t("a"), t("b"), 0.5)), Term(1.0, PooledSum("c")))),
            '{("a" ~0.5~ "b") + pooled("c")}',
        ),
    ],
)
def test_format_is_canonical(expression, canonical):
    assert format_expression(expression) == canonical
    assert parse_embedding_expression(canonical) == expression


def test_expression_texts_are_unique_in_order():
    expression = parse_embedding_expression('{"b" + pooled("a, b , c,") ~0.5~ ("a" - "d") + "b"}')
    assert expression_texts(expression) == ["b", "a", "c", "d"]
    assert expression_texts(t("x")) == ["x"]
    assert split_pieces(" a,, b ,\n") == ("a", "b")


ERRORS = [
    ('{"a" + }', 7, "expected a quoted text, a number, '(' or pooled(...), found '}'"),
    ("{}", 1, "expected a quoted text, a number, '(' or pooled(...), found '}'"),
    ('{"a" "b"}', 5, "expected an operator + - * / ~ or the closing '}', found the text 'b'"),
    ('{"a"', 4, "expected an operator + - * / ~ or the closing '}', found the end of the prompt"),
    ('{("a"}', 5, "expected an operator + - * / ~ or the closing ')', found '}'"),
    ("{a cat}", 1, "expected a quoted text, found 'a' (quote texts"),
    ('a photo {"x"}', 0, "text outside the embedding expression"),
    ('  }"x"', 2, "text outside the embedding expression"),
    ('{"a"} b', 6, "text after the closing '}'"),
    ('{"a" * "b"}', 7, "expected a number after '*' (texts are weighted by numbers"),
    ('{2 "a"}', 3, "expected '*' after the weight"),
    ('{"a"/0.0}', 5, "division by zero"),
    ('{"abc}', 1, 'unterminated text: expected a closing "'),
    ('{"a\\n"}', 3, "unknown escape '\\n' in a text"),
    ('{"a" & "b"}', 5, "unexpected character '&'"),
    ('{"a" ~"b"}', 6, "expected the interpolation weight (a number from 0 to 1) after '~'"),
    ('{"a" ~0.5 "b"}', 10, "expected '~' after the interpolation weight"),
    ('{"a" ~1.5~ "b"}', 6, "interpolation weight '1.5' is out of range"),
    ('{1001*"a"}', 1, "weight 1001.0 (at '1001') is out of range"),
    ('{100*"a"*20}', 9, "weight 2000.0 (at '20') is out of range"),
    ('{"a"*1e999}', 5, "weight inf (at '1e999') is out of range"),
    ('{pooled("")}', 8, "pooled(...) needs a text with at least one comma-separated piece"),
    ("{pooled(2)}", 8, "expected a quoted text in pooled(...), found '2'"),
    ('{pooled "a"}', 8, "expected '(' after 'pooled', found the text 'a'"),
    ('{cat + "a"}', 1, "expected a quoted text, found 'cat' (quote texts"),
    ('{pooled("a", 1)}', 13, "expected an option of pooled(...) (renorm), found '1'"),
    ('{pooled("a" renorm)}', 12, "expected ',' and an option (renorm), or the closing ')'"),
    ('{pooled("a", renorm, renormalize)}', 21, "option 'renorm' given twice"),
    ('{pooldd("a")}', 1, "unknown embedding expression function 'pooldd'; did you mean 'pooled'"),
    ('{pooled("a", renrm)}', 13, "unknown pooled() option 'renrm'; did you mean 'renorm'"),
    (
        '{"a\udcff"}',
        3,
        "prompt is not valid UTF-8 (pass or save it as UTF-8): undecodable byte 0xff",
    ),
    ("a\udcff", 1, "prompt is not valid UTF-8"),
]


@pytest.mark.parametrize(("text", "position", "reason"), ERRORS)
def test_errors_name_the_position_and_what_was_expected(text, position, reason):
    with pytest.raises(EmbeddingExpressionError) as caught:
        parse_embedding_expression(text)
    error = caught.value
    assert isinstance(error, PromptSyntaxError) and isinstance(error, SdstackError)
    assert (error.text, error.position) == (text, position)
    assert error.reason.startswith(reason)
    assert str(error).startswith(f"{error.reason} at position {position}: ")


def test_error_message_shows_a_caret():
    with pytest.raises(EmbeddingExpressionError) as caught:
        parse_embedding_expression('{"a cat" + 0.5*}')
    assert str(caught.value) == (
        "expected a quoted text, a number, '(' or pooled(...), found '}' at position 15: "
        "'{\"a cat\" + 0.5*}'\n"
        '    {"a cat" + 0.5*}\n'
        "                   ^"
    )


def _limit_error(text):
    with pytest.raises(EmbeddingExpressionError) as caught:
        parse_embedding_expression(text)
    return caught.value


def test_limits():
    depth = MAX_EXPRESSION_DEPTH
    assert parse_embedding_expression("{" + "(" * depth + '"a"' + ")" * depth + "}") == t("a")
    error = _limit_error("{" + "(" * (depth + 1) + '"a"' + ")" * (depth + 1) + "}")
    assert "nested more than 32 deep" in error.reason and error.position == depth + 1

    chain = '"a"' + ' ~0.5~ "a"' * depth  # left-deep interpolations: depth == chain length
    assert isinstance(parse_embedding_expression("{" + chain + "}"), Interpolation)
    error = _limit_error("{" + chain + ' ~0.5~ "a"}')
    assert "nested more than 32 deep" in error.reason

    inner = '"a"' + ' ~0.5~ "a"' * 12  # 20 one-term sums around 12 interpolations: 32 deep
    assert parse_embedding_expression("{" + "+(" * 20 + inner + ")" * 20 + "}")
    error = _limit_error("{" + "+(" * 20 + inner + ' ~0.5~ "a"' + ")" * 20 + "}")
    assert "nested more than 32 deep" in error.reason and error.position == 1

    terms = '"a" + ' * (MAX_EXPRESSION_TERMS - 1)
    assert len(parse_embedding_expression("{" + terms + '"a"}').terms) == MAX_EXPRESSION_TERMS
    error = _limit_error("{" + terms + '"a" + "b"}')
    assert "more than 256 texts" in error.reason and error.text[error.position :] == '"b"}'
    pieces = ",".join(["x"] * (MAX_EXPRESSION_TERMS + 1))
    assert "more than 256 texts" in _limit_error('{pooled("' + pieces + '")}').reason

    long_text = "x" * (MAX_EXPRESSION_TEXT // 2)
    assert (
        "longer than 50000 characters together"
        in _limit_error('{"' + long_text + '" + "' + long_text + 'y"}').reason
    )
    error = _limit_error("{" + " " * MAX_EXPRESSION_LENGTH + '"a"}')
    assert error.position == MAX_EXPRESSION_LENGTH
    assert "longer than 100000 characters" in error.reason


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "text",
    [
        "{" + "(" * 99_000,
        '{"' + "a" * 99_000,
        '{"' + "\\a" * 40_000 + '"}',
        "{" + '"a"+' * 24_000 + '"a"}',
        "{" + "2*" * 40_000 + '"a"}',
        "{" + "9" * 90_000 + '*"a"}',
        "{" + '"a"~0.5~' * 11_000 + '"a"}',
        "{" + "-" * 90_000,
    ],
)
def test_hostile_inputs_fail_fast(text):
    with pytest.raises(EmbeddingExpressionError):
        parse_embedding_expression(text)


@pytest.mark.timeout(10)
def test_long_weight_chain_parses_in_linear_time():
    text = "{" + "1*" * 40_000 + '"a"' + "/1" * 5_000 + "}"
    assert parse_embedding_expression(text) == Sum((Term(1.0, t("a")),))


def test_plain_text_of_any_length_is_one_text():
    text = "a cat, " * 50_000
    assert parse_embedding_expression(text) == t(text)


GRAMMAR = "{}\"'\\()+-*/~,. 0123456789eE"
WORDS = st.sampled_from(
    ['"a"', "'b'", "pooled", "renorm", "(", ")", "~0.5~", " + ", "-", "*2", "/"]
)
OPERAND = st.sampled_from(
    ['"a"', "'b c'", '2*"x"', 'pooled("p, q")', '("a"+"b")', '"z"/4', "-'y'", "split('u',renorm)"]
)
OPERATOR = st.sampled_from([" + ", "-", " ~0.5~ ", "~1e-2~", "*", "", "("])
NEAR_VALID = st.lists(st.tuples(OPERATOR, OPERAND), min_size=1).map(
    lambda pairs: "{" + "".join(a + b for a, b in pairs)[1:] + "}"
)
TEXT = st.one_of(
    st.text(),
    st.text(alphabet=GRAMMAR + "ab\n"),
    st.lists(WORDS).map(lambda words: "{" + "".join(words) + "}"),
    NEAR_VALID,
)


@FAST
@given(TEXT)
@example('{"a" + 0.5*"b" - "c"}')
@example('{"a" ~0.3~ "b"}')
@example("{pooled('a, b', renorm)}")
@example('{"\\')
@example("{" + "(" * 200)
def test_any_text_parses_or_raises_the_clear_error(text):
    try:
        expression = parse_embedding_expression(text)
    except EmbeddingExpressionError as error:
        assert error.text == text
        assert 0 <= error.position <= len(text)
        assert f" at position {error.position}: " in str(error)
        return
    assert parse_embedding_expression(format_expression(expression)) == expression
    texts = expression_texts(expression)
    assert len(texts) == len(set(texts)) and 1 <= len(texts) <= MAX_EXPRESSION_TERMS
    if "{" not in text and "}" not in text:
        assert expression == t(text)


SAFE_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
WEIGHT = st.floats(min_value=-1000.0, max_value=1000.0, allow_nan=False)
UNIT = st.one_of(
    SAFE_TEXT.map(Text),
    st.builds(PooledSum, SAFE_TEXT.filter(lambda text: split_pieces(text)), st.booleans()),
)


def _extend(children):
    return st.one_of(
        st.lists(st.builds(Term, WEIGHT, children), min_size=1, max_size=4).map(
            lambda terms: Sum(tuple(terms))
        ),
        st.builds(Interpolation, children, children, st.floats(min_value=0.0, max_value=1.0)),
    )


@FAST
@given(st.recursive(UNIT, _extend, max_leaves=12))
@example(Sum((Term(-0.0, Text("a")),)))
@example(Sum((Term(1.0, Sum((Term(1.0, Text("a")), Term(1.0, Text("b"))))),)))
@example(Interpolation(Interpolation(Text("a"), Text("b"), 0.5), Text("c"), 1.0))
@example(Interpolation(Text("a"), Text("b"), -0.0))
@example(Sum((Term(5e-324, Text("")), Term(-1000.0, PooledSum(",x", True)))))
def test_round_trip_of_any_expression(expression):
    formatted = format_expression(expression)
    assert parse_embedding_expression(formatted) == expression
    assert format_expression(parse_embedding_expression(formatted)) == formatted


def test_importing_the_module_imports_neither_torch_nor_transformers():
    code = (
        "import sys, sdstack.prompt.arithmetic;"
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "False False"
