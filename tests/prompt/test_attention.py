"""parse_attention against the spec's worked examples and the reference's documented cases."""

from __future__ import annotations

import re

import pytest

from sdstack.prompt.attention import parse_attention
from sdstack.prompt.errors import PromptSyntaxError

# Spec (prompt-language.md, "Emphasis"): exact outputs of the reference parser.
SPEC_EXAMPLES = [
    (
        r"a (red:1.3) [cat] \(x\)",
        [("a ", 1.0), ("red", 1.3), (" ", 1.0), ("cat", 0.9090909090909091), (" (x)", 1.0)],
    ),
    (
        "((masterpiece)), [[blurry]], (cat:0.5)",
        [
            ("masterpiece", 1.2100000000000002),
            (", ", 1.0),
            ("blurry", 0.8264462809917354),
            (", ", 1.0),
            ("cat", 0.5),
        ],
    ),
    ("((a:1.2) b", [("a", 1.32), (" b", 1.1)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("a) b]", [("a) b]", 1.0)]),
    ("(a : 1.5 )", [("a ", 1.5)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
    ("[[a]:1.5]", [("a", 0.8264462809917354), (":1.5", 0.9090909090909091)]),
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),
    ("", [("", 1.0)]),
]


@pytest.mark.parametrize(("text", "expected"), SPEC_EXAMPLES)
def test_spec_worked_examples(text, expected):
    result = parse_attention(text)
    assert result == expected
    # == on floats above is exact; also check the printed form (bit-identical floats)
    assert [repr(w) for _, w in result] == [repr(w) for _, w in expected]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        (r"\(literal\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ],
)
def test_reference_docstring_examples(text, expected):
    assert parse_attention(text) == expected


def test_escapes_give_literal_characters():
    assert parse_attention(r"\\ \[ \] \( \)") == [("\\ [ ] ( )", 1.0)]
    # an escaped bracket inside brackets takes the surrounding weight
    assert parse_attention(r"(a\)b)") == [("a)b", 1.1)]


def test_lone_backslash_is_dropped():
    assert parse_attention(r"a\b") == [("ab", 1.0)]
    assert parse_attention("end\\") == [("end", 1.0)]
    # it leaves an empty weight-1.0 fragment behind, as in the reference, which keeps
    # two equal weights around it apart
    assert parse_attention(r"(a)\q(b)") == [("a", 1.1), ("q", 1.0), ("b", 1.1)]
    assert parse_attention("(a)\\(b)") == [("a", 1.1), ("(b)", 1.0)]
    assert parse_attention("(a)\\") == [("a", 1.1), ("", 1.0)]


def test_unmatched_closers_and_weights_stay_literal():
    assert parse_attention("a:1.5) b") == [("a:1.5) b", 1.0)]
    assert parse_attention("[a:1.5)") == [("a:1.5)", 0.9090909090909091)]
    assert parse_attention("(a]") == [("a]", 1.1)]
    assert parse_attention("a : b") == [("a : b", 1.0)]


def test_open_brackets_apply_to_the_end():
    # all open '(' first (outermost first), then all open '['
    assert parse_attention("[(a") == [("a", 1.1 * (1 / 1.1))]
    assert parse_attention("((a") == [("a", 1.2100000000000002)]
    assert parse_attention("[a (b") == [("a ", 0.9090909090909091), ("b", 1.1 * (1 / 1.1))]


def test_nesting_multiplies_in_closing_order():
    assert parse_attention("((a:1.2):1.3)") == [("a", 1.2 * 1.3)]
    assert parse_attention("[(a:2)]") == [("a", 2 * (1 / 1.1))]
    assert parse_attention("(((a)))") == [("a", 1.1 * 1.1 * 1.1)]
    assert parse_attention("(a:+1.5)") == [("a", 1.5)]
    assert parse_attention("(a:-1)") == [("a", -1.0)]
    assert parse_attention("(a:1.)") == [("a", 1.0)]
    assert parse_attention("(a:.5)") == [("a", 0.5)]


def test_break_in_plain_text():
    assert parse_attention("a BREAK b") == [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]
    assert parse_attention("BREAK") == [("", 1.0), ("BREAK", -1.0), ("", 1.0)]
    assert parse_attention("aBREAK b, BREAKING") == [("aBREAK b, BREAKING", 1.0)]
    assert parse_attention("a break b") == [("a break b", 1.0)]
    assert parse_attention("[x BREAK y]") == [
        ("x", 1 / 1.1),
        ("BREAK", -1 / 1.1),
        ("y", 1 / 1.1),
    ]


def test_equal_neighbours_are_merged():
    assert parse_attention("(a)(b)") == [("ab", 1.1)]
    assert parse_attention("(a:1.1)(b)") == [("ab", 1.1)]
    assert parse_attention("[(a)]b") == [("ab", 1.0)]
    assert parse_attention("()") == [("", 1.0)]


def test_unicode_digits_are_accepted_as_the_reference_float_does():
    assert parse_attention("(a:\u0663)") == [("a", 3.0)]  # ARABIC-INDIC DIGIT THREE


@pytest.mark.parametrize(
    ("text", "token", "position"),
    [
        ("(a:1.2.3)", "1.2.3", 3),
        ("(a:.)", ".", 3),
        ("(a:1..2)", "1..2", 3),
        ("(a:+.)", "+.", 3),
        ("x ((b: -. ) c)", "-.", 7),
    ],
)
def test_weight_that_is_not_a_number_is_an_error(text, token, position):
    message = (
        f"emphasis weight {token!r} is not a number (expected e.g. '(text:1.2)') "
        f"at position {position}: {text!r}"
    )
    with pytest.raises(PromptSyntaxError, match=re.escape(message)) as info:
        parse_attention(text)
    assert info.value.text == text
    assert info.value.position == position
    assert isinstance(info.value, ValueError)
    assert str(info.value).splitlines()[1:] == ["    " + text, "    " + " " * position + "^"]


def test_bad_weight_without_open_bracket_is_literal():
    # the reference only converts the weight when a '(' is open
    assert parse_attention("a:1.2.3)") == [("a:1.2.3)", 1.0)]
    assert parse_attention("[a:.)]") == [("a:.)", 0.9090909090909091)]
