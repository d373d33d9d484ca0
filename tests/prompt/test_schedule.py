"""prompt_schedule against the spec's worked examples and the reference's documented cases."""

from __future__ import annotations

import re

import pytest

from sdstack.prompt.errors import PromptSyntaxError
from sdstack.prompt.schedule import prompt_schedule, schedule_for_step
from sdstack.validate import SettingError


@pytest.mark.parametrize(
    ("text", "expected"),
    [  # spec, "Scheduling and alternation", steps=20
        ("a [cat:dog:0.5] x", [(10, "a cat x"), (20, "a dog x")]),
        ("[cat::0.25]", [(5, "cat"), (20, "")]),
        ("[cat:0.25]", [(5, ""), (20, "cat")]),
        ("a [b:c:0]", [(20, "a c")]),
        ("a [b:c:1.0]", [(20, "a b")]),
        ("[a:b:3.0]", [(20, "a")]),
    ],
)
def test_spec_worked_examples(text, expected):
    assert prompt_schedule(text, 20) == expected


FEMALE_MALE = [(s, "female" if s % 2 else "male") for s in range(1, 11)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [  # the reference's own documented cases, steps=10
        ("test", [(10, "test")]),
        ("a [b:3]", [(3, "a "), (10, "a b")]),
        ("a [b: 3]", [(3, "a "), (10, "a b")]),
        ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
        ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
        ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
        ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
        ("a [unbalanced", [(10, "a [unbalanced")]),
        ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
        ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
        ("[a|(b:1.1)]", [(s, "a" if s % 2 else "(b:1.1)") for s in range(1, 11)]),
        ("[fe|]male", FEMALE_MALE),
        ("[fe|||]male", [(s, "female" if s % 4 == 1 else "male") for s in range(1, 11)]),
    ],
)
def test_reference_documented_cases(text, expected):
    assert prompt_schedule(text, 10) == expected


def test_text_outside_the_grammar_is_unscheduled():
    for text in ["a|b [c:1]", "[a:1] trailing\\", "x\\\n[a:1]", "[a|b:1]", "(a|b)", "[a|b"]:
        assert prompt_schedule(text, 10) == [(10, text)]
    # ... but an escaped '|' or backslash is plain text
    assert prompt_schedule(r"a\|b [c:1]", 10) == [(1, r"a\|b "), (10, r"a\|b c")]


def test_emphasis_and_non_constructs_pass_through_verbatim():
    for text in ["(a:1.2)", "[a]", "[a:b]", "(a:b:c)", "[[a:b]:1]", "[a:b:c:1]", "[a:1 1]", ""]:
        assert prompt_schedule(text, 10) == [(10, text)]


def test_escapes_are_kept_for_the_emphasis_parser():
    assert prompt_schedule(r"\[a:b:5\] [\(x\):y:5]", 10) == [
        (5, r"\[a:b:5\] \(x\)"),
        (10, r"\[a:b:5\] y"),
    ]


@pytest.mark.parametrize(
    ("when", "end_step"),
    [
        ("5", 5),
        (" 5 ", 5),
        ("  0.5\t", 10),  # fraction: int(0.5 * 20)
        (".25", 5),
        ("1.", 20),  # '.' -> fraction 1.0 * 20
        ("+3", 3),
        ("1e1", 10),  # no '.': absolute step int(10.0)
        ("1.5e-1", 3),  # '.': fraction int(0.15 * 20)
        ("99", 20),  # capped at steps
        ("0.99", 19),  # int() truncates
    ],
)
def test_when_numbers(when, end_step):
    expected = [(20, "b")] if end_step == 20 else [(end_step, "a"), (20, "b")]
    if end_step == 20:  # the boundary is the last step itself: "a" up to and including it
        expected = [(20, "a")]
    assert prompt_schedule(f"[a:b:{when}]", 20) == expected


def test_when_boundaries_below_one_are_dropped():
    assert prompt_schedule("[a:b:-1]", 20) == [(20, "b")]
    assert prompt_schedule("[a:b:0.01]", 20) == [(20, "b")]  # int(0.2) = 0
    assert prompt_schedule("[a:b:1]", 20) == [(1, "a"), (20, "b")]


def test_when_not_a_number_means_no_schedule():
    for text in ["[a:b:1e]", "[a:b:.]", "[a:b:1.2.3]", "[a:b:\u0663]", "[a:b:x]"]:
        assert prompt_schedule(text, 20) == [(20, text)]


def test_several_schedules_merge_boundaries():
    text = "x [a:b:5] [c:d:0.5] [e::15]"
    assert prompt_schedule(text, 20) == [
        (5, "x a c e"),
        (10, "x b c e"),
        (15, "x b d e"),
        (20, "x b d "),
    ]


def test_nested_constructs_inside_emphasis_and_alternation():
    assert prompt_schedule("(([a:b:2]))", 4) == [(2, "((a))"), (4, "((b))")]
    assert prompt_schedule("((a:b:2))", 4) == [(4, "((a:b:2))")]  # '(' takes one ':' only
    assert prompt_schedule("[x|[a:b:2]]", 4) == [(1, "x"), (2, "a"), (3, "x"), (4, "b")]


def test_unused_schedule_inside_alternation_still_adds_its_boundary():
    # every scheduled construct counts, whether or not it is active at that step
    assert prompt_schedule("[[a:b:7]|c]", 10)[6] == (7, "a")


def test_ambiguous_raw_brackets_after_a_construct_take_the_structured_reading():
    # the reference resolves these by Python's hash seed; we always take the construct
    assert prompt_schedule("[a:1]]", 10) == [(1, "]"), (10, "a]")]
    assert prompt_schedule("[[a:1]", 10) == [(1, "["), (10, "[a")]


def test_deep_nesting_does_not_hit_the_recursion_limit():
    text = "(" * 3000 + "[a:b:5]" + ")" * 3000
    result = prompt_schedule(text, 20)
    assert result == [(5, "(" * 3000 + "a" + ")" * 3000), (20, "(" * 3000 + "b" + ")" * 3000)]


def test_steps_must_be_an_integer_in_range():
    # 2000: second-order samplers resolve schedules over 2 x generate's 1000 steps
    for steps, message in [
        (0, "steps must be between 1 and 2000, got 0"),
        (-1, "steps must be between 1 and 2000, got -1"),
        (2001, "steps must be between 1 and 2000, got 2001"),
        (2.5, "steps must be an integer, got 2.5"),
        (True, "steps must be an integer, got True"),
    ]:
        with pytest.raises(SettingError, match=re.escape(message)):
            prompt_schedule("a", steps)
    assert prompt_schedule("[a:b:0.5]", 2000) == [(1000, "a"), (2000, "b")]


def test_step_too_large_for_an_integer_is_an_error():
    message = (
        "scheduling step '1e999' is too large (expected a step number or a fraction like "
        "0.5) at position 7: 'x [a:b:1e999]'"
    )
    with pytest.raises(PromptSyntaxError, match=re.escape(message)) as info:
        prompt_schedule("x [a:b:1e999]", 20)
    assert info.value.position == 7


def test_schedule_for_step_picks_first_entry_not_ended():
    schedule = prompt_schedule("[a:b:10]", 20)
    assert [schedule_for_step(schedule, s) for s in (0, 9, 10, 11, 19)] == ["a", "a", "a", "b", "b"]
    # like the reference, a step past the last end step falls back to the first entry
    assert schedule_for_step(schedule, 21) == "a"
