"""Hostile prompts: every parser is linear, and the limits of ``sdstack.prompt.limits``.

Two kinds of tests. The linear rewrites of the reference's regexes are checked against
those regexes (property tests, and adversarial shapes small enough for the regexes).
Then 100k-character hostile inputs, each under ``timeout(10)``: the reference's regexes
and the former parsers took from 20 s to hours on them (quadratic backtracking, list
copies per bracket); a linear parser takes well under a second.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sdstack.errors import SdstackError
from sdstack.prompt.attention import parse_attention
from sdstack.prompt.chunks import tokenize_prompt
from sdstack.prompt.composable import split_and
from sdstack.prompt.errors import PromptEncodingError, PromptLimitError, PromptSyntaxError
from sdstack.prompt.limits import (
    MAX_EMPHASIS_DEPTH,
    MAX_SCHEDULE_SIZE,
    MAX_SCHEDULE_STEPS,
    MAX_SCHEDULE_TEXTS,
    MAX_STEPS,
)
from sdstack.prompt.networks import extract_networks
from sdstack.prompt.plan import plan_prompt
from sdstack.prompt.schedule import prompt_schedule
from sdstack.validate import SettingError

# The reference's regexes, as in A1111 v1.10 (see the spec).
REF_BREAK = re.compile(r"\s*\bBREAK\b\s*")
REF_AND = re.compile(r"\bAND\b")
REF_AND_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")
REF_TAG = re.compile(r"<(\w+):([^>]+)>")
FAST = settings(max_examples=300, deadline=None)


def reference_split_and(text: str) -> list[tuple[str, float]]:
    pieces = []
    for piece in REF_AND.split(text):
        match = REF_AND_WEIGHT.match(piece)
        weight = match.group(2)
        pieces.append((match.group(1), float(weight) if weight else 1.0))
    return pieces


def reference_breaks(text: str) -> list[tuple[str, float]]:
    """parse_attention of text without brackets, ':' or backslashes, from the regex."""
    fragments: list[tuple[str, float]] = []
    for i, part in enumerate(REF_BREAK.split(text)):
        if i:
            fragments.append(("BREAK", -1.0))
        fragments.append((part, 1.0))
    return fragments


PLAIN = st.text(alphabet=" \t\n\u3000aB_BREAKANDx.1:-+")


@FAST
@given(PLAIN.map(lambda s: s.replace(":", "")))
@example("BREAK BREAK")
@example("  BREAK\tBREAK\n x BREAKS aBREAK BREAK_ BREAK")
def test_break_split_is_the_reference_regex(text):
    assert parse_attention(text) == reference_breaks(text)


@FAST
@given(PLAIN)
@example("a :1 :2")
@example("x : +1. \n")
@example("x:1\n\n")
@example("AND:5 AND :.5AND")
def test_split_and_is_the_reference_regex(text):
    assert split_and(text) == reference_split_and(text)


@FAST
@given(st.text(alphabet="<>:a_1 =é\n"))
@example("<a:<b:>c>")
@example("<a:>>")
def test_tag_spans_are_the_reference_regex(text):
    _stripped, tags = extract_networks(text)
    expected = [(m.span(), m.group(1), m.group(2)) for m in REF_TAG.finditer(text)]
    assert [(t.span, t.written_kind, ":".join(t.items)) for t in tags] == expected


@pytest.mark.parametrize(
    "text",
    [
        " " * 2000 + "x",
        "a" + " " * 2000 + "BREAK" + " " * 2000,
        "BREAK " * 400,
        "a :" + " " * 2000,
        "a" + " " * 2000 + ": 1" + " " * 2000,
        ": " * 1000,
        "<a:" * 700,
        "<a:" * 700 + ">",
    ],
)
def test_adversarial_shapes_match_the_reference_regexes(text):
    # small enough for the quadratic regexes to finish
    assert split_and(text) == reference_split_and(text)
    tags = extract_networks(text)[1]
    assert [t.span for t in tags] == [m.span() for m in REF_TAG.finditer(text)]
    if not set(text) & set("()[]\\:"):
        assert parse_attention(text) == reference_breaks(text)


def _depth_error(text: str, position: int) -> str:
    return (
        f"emphasis brackets nested more than {MAX_EMPHASIS_DEPTH} deep (the limit); close "
        f"some, or escape literal brackets as \\( \\[ at position {position}"
    )


N = 100_000
DEEP = "(" * (N // 2) + "a" + ")" * (N // 2)
AND_STORM = "a AND " * (N // 6)
BREAK_STORM = "BREAK " * (N // 6)

# (name, text, parse_attention result or error start, prompt_schedule at 20 steps)
HOSTILE = [
    ("deep nesting", DEEP, _depth_error(DEEP, 100), [(20, DEEP)]),
    ("nested chain", "(a" * (N // 4) + ")" * (N // 2), _depth_error("", 200), None),
    ("unclosed (((", "(" * N, _depth_error("", 100), [(20, "(" * N)]),
    ("unclosed [[[", "[" * N, _depth_error("", 100), [(20, "[" * N)]),
    ("unclosed [a:", "[a:" * (N // 3), _depth_error("", 300), [(20, "[a:" * (N // 3))]),
    ("spaces", " " * N, [(" " * N, 1.0)], [(20, " " * N)]),
    ("escaped (", "\\(" * (N // 2), [("(" * (N // 2), 1.0)], None),
    ("alternating \\( and (", "\\((" * (N // 3), _depth_error("", 302), None),
    ("colon storm", ":" * N, [(":" * N, 1.0)], [(20, ":" * N)]),
    ("colon-space storm", ": " * (N // 2), [(": " * (N // 2), 1.0)], None),
    ("weight never closed", "(a:" + " " * (N // 2) + "1" * (N // 2) + "x", None, None),
    ("pipe storm", "|" * N, [("|" * N, 1.0)], [(20, "|" * N)]),
    ("one huge alternation", "[" + "a|" * (N // 2) + "]", None, [(s, "a") for s in range(1, 21)]),
    ("AND storm", AND_STORM, [(AND_STORM, 1.0)], [(20, AND_STORM)]),
    ("BREAK storm", BREAK_STORM, [("", 1.0), ("BREAK", -1.0)] * (N // 6) + [("", 1.0)], None),
    ("<a: storm", "<a:" * (N // 3), None, None),
    ("< storm", "<" * N, [("<" * N, 1.0)], [(20, "<" * N)]),
    ("unbalanced quotes", '"a, ' * (N // 4), [('"a, ' * (N // 4), 1.0)], None),
]


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("name", "text", "emphasis", "schedule"), HOSTILE, ids=[case[0] for case in HOSTILE]
)
def test_hostile_prompts_are_parsed_in_linear_time(name, text, emphasis, schedule):
    if isinstance(emphasis, str):
        with pytest.raises(PromptSyntaxError) as info:
            parse_attention(text)
        assert str(info.value).startswith(emphasis)
    else:
        result = parse_attention(text)
        assert emphasis is None or result == emphasis
    result = prompt_schedule(text, 20)
    assert schedule is None or result == schedule
    assert result[-1][0] == 20
    extract_networks(text)
    split_and(text)


@pytest.mark.timeout(10)
def test_hostile_results_against_hand_computed_truth():
    # a weight ':   111...' never closed: literal text inside the open '(' (x1.1)
    tail = " " * (N // 2) + "1" * (N // 2)
    assert parse_attention("(a:" + tail) == [("a:" + tail, 1.1)]
    with pytest.raises(PromptSyntaxError, match=r"^AND weight '1{40}\.\.\.' is out of range"):
        split_and("(a:" + tail)  # for AND, ':   111...' at the end is a weight
    # 100k spaces then BREAK: one regex attempt per position made this quadratic
    text = "a" + " " * N + "BREAK"
    assert parse_attention(text) == [("a", 1.0), ("BREAK", -1.0), ("", 1.0)]
    assert split_and(text) == [(text, 1.0)]
    assert split_and("a :" + " " * N) == [("a :", 1.0)]
    assert split_and("a" + " " * N + ":" + " " * N + "2" + " " * N) == [("a", 2.0)]
    pieces = split_and(AND_STORM)
    assert len(pieces) == N // 6 + 1
    assert pieces[:2] == [("a", 1.0), (" a", 1.0)] and pieces[-1] == ("", 1.0)
    # '<a:' x 33k never closed: no tag; closed by one final '>': one tag over all of it
    assert extract_networks("<a:" * (N // 3)) == ("<a:" * (N // 3), [])
    stripped, (tag,) = extract_networks("<a:" * (N // 3) + ">")
    assert stripped == "" and tag.span == (0, N // 3 * 3 + 1)
    assert tag.items == ("<a",) * (N // 3 - 1) + ("",)
    # deep nesting inside a schedule stays linear
    nested = "[" * (N // 4) + "a:b:1" + "]" * (N // 4)
    inner = "[" * (N // 4 - 1), "]" * (N // 4 - 1)
    assert prompt_schedule(nested, 20) == [(1, "a".join(inner)), (20, "b".join(inner))]
    alternations = "[a|b]" * (N // 5)
    assert prompt_schedule(alternations, 4) == [
        (1, "a" * (N // 5)),
        (2, "b" * (N // 5)),
        (3, "a" * (N // 5)),
        (4, "b" * (N // 5)),
    ]


@pytest.mark.timeout(10)
def test_hostile_prompt_through_the_tokenizer(tokenizer):
    chunks = tokenize_prompt("a " * (N // 2), tokenizer)
    assert chunks.token_count == N // 2
    chunks = tokenize_prompt(BREAK_STORM, tokenizer)  # every BREAK closes a chunk
    assert len(chunks.chunks) == N // 6 and chunks.token_count == 75 * (N // 6)


def test_nesting_limit_is_exact():
    # 100 brackets open at once are fine: the reference's weight, all '(' then all '['
    weight = 1.0
    for factor in [1.1] * 50 + [1 / 1.1] * 50:
        weight *= factor
    assert parse_attention("([" * 50 + "a") == [("a", weight)]
    with pytest.raises(PromptSyntaxError) as info:
        parse_attention("a (" + "[" * MAX_EMPHASIS_DEPTH + "b")
    assert info.value.position == 2 + MAX_EMPHASIS_DEPTH
    assert info.value.reason == _depth_error("", 0).rsplit(" at position", 1)[0]


@pytest.mark.parametrize(
    ("text", "position", "message"),
    [
        (
            "(a:1" + "0" * 400 + ")",
            3,
            "emphasis weight '1000000000000000000000000000000000000000...' is out of range: "
            "weights must be finite numbers in [-1000, 1000] (e.g. '(text:1.2)')",
        ),
        (
            "x (a:1000.5)",
            5,
            "emphasis weight '1000.5' is out of range: weights must be finite numbers in "
            "[-1000, 1000] (e.g. '(text:1.2)')",
        ),
        (
            "x ((cat:1000):1.1)",
            4,
            "emphasis weight 1100 of 'cat' is out of range: nested brackets multiply their "
            "weights, and the result must be in [-1000, 1000]; use fewer brackets",
        ),
        (
            "(" * 80 + "x",
            80,
            "emphasis weight 2048.4 of 'x' is out of range: nested brackets multiply their "
            "weights, and the result must be in [-1000, 1000]; use fewer brackets",
        ),
    ],
)
def test_emphasis_weights_must_be_finite_and_in_range(text, position, message):
    with pytest.raises(PromptSyntaxError) as info:
        parse_attention(text)
    assert info.value.reason == message
    assert info.value.position == position


def test_weights_at_the_limit_are_accepted():
    assert parse_attention("(a:1000) (b:-1000)") == [("a", 1000.0), (" ", 1.0), ("b", -1000.0)]
    assert split_and("a :1000 AND b :-1000") == [("a", 1000.0), (" b", -1000.0)]


@pytest.mark.parametrize(
    ("text", "position", "token"),
    [("cat :1001", 5, "1001"), ("x AND y :" + "9" * 400, 9, "9" * 40 + "...")],
)
def test_and_weights_must_be_finite_and_in_range(text, position, token):
    with pytest.raises(PromptSyntaxError) as info:
        split_and(text)
    assert info.value.reason == (
        f"AND weight {token!r} is out of range: weights must be finite numbers in "
        "[-1000, 1000] (e.g. 'cat AND dog :0.5')"
    )
    assert info.value.position == position


@pytest.mark.timeout(10)
@pytest.mark.parametrize("steps", [0, MAX_SCHEDULE_STEPS + 1, 10**9])
def test_schedule_steps_are_bounded_before_expanding(steps):
    message = f"steps must be between 1 and {MAX_SCHEDULE_STEPS}, got {steps}"
    with pytest.raises(SettingError, match=re.escape(message)):
        prompt_schedule("[a|b]", steps)
    with pytest.raises(SettingError, match=re.escape(message)):
        plan_prompt("[a|b]", steps)


def _alternation(options: int) -> str:
    return "[" + "|".join(f"w{i}" for i in range(options)) + "]"


def test_schedule_text_limit_is_exact():
    steps = MAX_SCHEDULE_TEXTS
    schedule = prompt_schedule(_alternation(steps), steps)
    assert [text for _, text in schedule] == [f"w{i}" for i in range(steps)]
    message = (
        f"prompt resolves to up to {steps + 1} different texts over {steps + 1} steps; at "
        f"most {MAX_SCHEDULE_TEXTS} are allowed (MAX_SCHEDULE_TEXTS): use fewer steps, "
        "[a|b] alternations, [a:b:when] edits or AND parts"
    )
    with pytest.raises(PromptLimitError, match=re.escape(message)):
        prompt_schedule(_alternation(steps + 1), steps + 1)


def test_schedule_texts_count_combinations_not_entries():
    # [a|b] makes every step an entry but only 2 texts; lcm(2, 3) = 6 combinations
    assert len(prompt_schedule("[a|b]", MAX_SCHEDULE_STEPS)) == MAX_SCHEDULE_STEPS
    texts = {text for _, text in prompt_schedule("[a|b][c|d|e] [x:y:500]", MAX_STEPS)}
    assert len(texts) == 12


def test_schedule_limits_count_every_and_part():
    prompt = " AND ".join(f"[a{i}|b{i}]" for i in range(MAX_SCHEDULE_TEXTS // 2))
    assert len(plan_prompt(prompt, 20).texts()) == MAX_SCHEDULE_TEXTS
    with pytest.raises(PromptLimitError, match=r"^prompt resolves to up to 258 different texts"):
        plan_prompt(prompt + " AND [c|d]", 20)
    with pytest.raises(PromptLimitError) as info:
        plan_prompt(AND_STORM, 20)
    assert str(info.value) == (
        f"prompt has {N // 6 + 1} AND parts; at most {MAX_SCHEDULE_TEXTS} texts are allowed "
        "(MAX_SCHEDULE_TEXTS), and each part is one"
    )


@pytest.mark.timeout(10)
def test_schedule_size_limit():
    long_text = "x" * (MAX_SCHEDULE_SIZE // 2)
    assert len(prompt_schedule("[a|b] " + long_text[6:], 4)) == 4
    with pytest.raises(PromptLimitError) as info:
        prompt_schedule("[a|b] " + long_text, 4)
    message = (
        r"prompt too large: it resolves to 2 different texts of up to (\d+) characters, "
        rf"(\d+) in all; at most {MAX_SCHEDULE_SIZE} are allowed \(MAX_SCHEDULE_SIZE\): "
        r"shorten the prompt or use fewer scheduled texts"
    )
    longest, total = map(int, re.fullmatch(message, str(info.value)).groups())
    assert total == 2 * longest and longest > len(long_text)
    with pytest.raises(PromptLimitError, match=r"^prompt too large: it resolves to a text of"):
        plan_prompt("x" * (MAX_SCHEDULE_SIZE + 1), 20)


UTF8_MESSAGE = (
    "prompt is not valid UTF-8 (pass or save it as UTF-8): undecodable byte 0xff at "
    "position 2: 'a \\udcff b'\n    a   b\n      ^"
)


def test_invalid_utf8_is_refused_before_the_tokenizer(tokenizer):
    with pytest.raises(PromptEncodingError) as info:
        tokenize_prompt("a \udcff b", tokenizer)
    assert str(info.value) == UTF8_MESSAGE
    with pytest.raises(PromptEncodingError) as info:
        tokenize_prompt("a \udcff b", tokenizer, parse_emphasis=False)
    assert str(info.value) == UTF8_MESSAGE
    with pytest.raises(PromptEncodingError, match=r"embedding name is not valid UTF-8"):
        tokenize_prompt("a", tokenizer, {"bad\udcc3": 1})


def test_invalid_utf8_in_a_whole_prompt():
    with pytest.raises(PromptEncodingError) as info:
        plan_prompt("a \udcff b", 20)
    assert str(info.value) == UTF8_MESSAGE
    with pytest.raises(PromptEncodingError) as info:
        plan_prompt("ok", 20) and plan_prompt("\ud800", 20, negative=True)
    assert info.value.reason == (
        "negative prompt is not valid UTF-8 (pass or save it as UTF-8): lone surrogate "
        "U+D800, which is not a character"
    )
    assert isinstance(info.value, SdstackError)


def test_max_steps_is_generates():
    from sdstack.generate.params import MAX_STEPS as GENERATE_MAX_STEPS

    assert MAX_STEPS == GENERATE_MAX_STEPS
