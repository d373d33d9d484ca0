"""Property tests: the prompt parsers accept any text and fail only where the reference crashes."""

from __future__ import annotations

import itertools
import math
import re

from hypothesis import example, given, settings
from hypothesis import strategies as st

from sdstack.prompt.attention import parse_attention
from sdstack.prompt.composable import split_and
from sdstack.prompt.errors import PromptSyntaxError
from sdstack.prompt.limits import MAX_EMPHASIS_DEPTH, MAX_WEIGHT
from sdstack.prompt.networks import extract_networks
from sdstack.prompt.schedule import prompt_schedule

BRACKETY = "()[]:|\\ abAND BREAK0123456789.<>=e+-\n"
TEXT = st.one_of(st.text(), st.text(alphabet=BRACKETY), st.text(alphabet="()[]:|\\ a1.5"))
FAST = settings(max_examples=300, deadline=None)
BREAK = re.compile(r"\s*\bBREAK\b\s*")


@FAST
@given(TEXT)
@example("(a:1.2.3)")
@example("x ((b: -. ) c)")
@example("((a:1000):1.5)")
@example("(a:1001)")
@example("[" * 101)
def test_parse_attention_total(text):
    try:
        fragments = parse_attention(text)
    except PromptSyntaxError as e:
        # a ':w)' closing an open '(' whose w float() refuses (the reference crashes), or
        # a documented limit (sdstack.prompt.limits) the reference does not have
        assert e.text == text
        if e.reason.startswith("emphasis brackets nested"):
            assert text[e.position] in "([" and e.position >= MAX_EMPHASIS_DEPTH
            return
        if "nested brackets multiply" in e.reason:
            return  # a product of in-range weights beyond MAX_WEIGHT
        token = re.match(r"[+-]?[.\d]+", text[e.position :]).group()
        if "is out of range" in e.reason:
            assert not abs(float(token)) <= MAX_WEIGHT
            return
        assert str(e).startswith(f"emphasis weight {token!r} is not a number")
        assert re.search(r":\s*$", text[: e.position])
        assert "(" in text[: e.position]
        try:
            float(token)
        except ValueError:
            return
        raise AssertionError(f"{token!r} is a number") from None
    assert fragments
    for (_, left), (_, right) in itertools.pairwise(fragments):
        assert left != right  # equal neighbours are always merged


@FAST
@given(st.text(alphabet=st.characters(blacklist_characters="()[]\\")))
def test_parse_attention_plain_text_round_trips(text):
    fragments = parse_attention(text)
    assert "".join(t for t, w in fragments if w == 1.0) == BREAK.sub("", text)
    assert sum(1 for _, w in fragments if w == -1.0) == len(BREAK.findall(text))


ESCAPY = st.lists(
    st.sampled_from(["a", " ", "\\a", "\\(", "\\)", "\\[", "\\]", "\\\\", "(", "["])
).map("".join)


@FAST
@given(ESCAPY)
def test_parse_attention_escapes_resolve(text):
    # openers only (no closers, ':' or BREAK): brackets disappear and escapes resolve
    fragments = parse_attention(text)
    expected = re.sub(r"\\([()\[\]\\])|\\|[()\[\]]", lambda m: m.group(1) or "", text)
    assert "".join(t for t, _ in fragments) == expected


@FAST
@given(TEXT, st.integers(min_value=1, max_value=40))
@example("[a:1e999]", 5)
@example("[a:b:1.0e308]", 2)
def test_prompt_schedule_total(text, steps):
    try:
        schedule = prompt_schedule(text, steps)
    except PromptSyntaxError as e:
        # only a step number whose int() overflows (the reference crashes)
        assert "is too large" in str(e)
        token = re.match(r"[+-]?[0-9.eE+-]+", text[e.position :]).group()
        assert math.isinf(float(token) * (steps if "." in token else 1))
        return
    ends = [end for end, _ in schedule]
    assert ends == sorted(set(ends))
    assert ends[-1] == steps
    assert ends[0] >= 1


@FAST
@given(st.text(alphabet=st.characters(blacklist_characters="[")), st.integers(1, 40))
def test_prompt_schedule_without_square_brackets_is_the_text(text, steps):
    assert prompt_schedule(text, steps) == [(steps, text)]


@FAST
@given(TEXT)
@example("a :1001")
def test_split_and_total(text):
    try:
        pieces = split_and(text)
    except PromptSyntaxError as e:  # only a weight beyond MAX_WEIGHT (a documented limit)
        assert e.reason.startswith("AND weight") and "is out of range" in e.reason
        assert not abs(float(re.match(r"[+-]?[.\d]+", text[e.position :]).group())) <= MAX_WEIGHT
        return
    assert len(pieces) == len(re.findall(r"\bAND\b", text)) + 1
    for piece, weight in pieces:
        assert not piece or not piece[-1].isspace()
        assert isinstance(weight, float)


@FAST
@given(TEXT)
@example("<lora:x:y>")
@example("<lyco:dyn=1>")
def test_extract_networks_total(text):
    try:
        stripped, tags = extract_networks(text)
    except PromptSyntaxError as e:
        assert str(e).startswith("LoRA tag '<l")
        assert e.text == text
        return
    rebuilt, end = [], 0
    for tag in tags:
        start, stop = tag.span
        assert start >= end
        assert text[start] == "<" and text[stop - 1] == ">"
        rebuilt.append(text[end:start])
        end = stop
    rebuilt.append(text[end:])
    assert "".join(rebuilt) == stripped
