"""Infotext parsing is linear: ``find_params`` is the reference regex's ``findall``.

The reference regex (``PARAM_PATTERN``) backtracks quadratically on a long last line
without ``:`` (31 s for 80 KB); ``find_params`` must give the same pairs on every line,
and hostile 80 KB texts must parse under ``timeout(10)``.
"""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sdstack.generate.infotext import PARAM_PATTERN, find_params, parse_infotext


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet='ab -/:,"\\ \t\n_1é.'))
@example('Key: "a, b", Other: x')
@example('a: "x\\", b: "y"')
@example('k: "\\\n", j: 1')
@example('ab: ""')
@example('ab: "x"\n')
@example("-ab: 1, c d/e-f: 2,:3")
@example("a : b")
def test_find_params_is_the_reference_findall(line):
    assert find_params(line) == PARAM_PATTERN.findall(line)


@pytest.mark.parametrize(
    "line",
    [
        "word " * 400,  # no colon at all
        "a" * 2000,
        "Key: value, " * 150,
        'Key: "v, ' * 200,  # quotes never closed
        'a: "' + "\\x" * 500 + '", b: 2',
        "-a" * 1000 + ": x",
        "a" + " " * 2000 + "b: c",
    ],
)
def test_adversarial_shapes_match_the_reference_findall(line):
    # small enough for the quadratic regex to finish
    assert find_params(line) == PARAM_PATTERN.findall(line)


SIZE = 80_000


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "last_line",
    [
        "word " * (SIZE // 5),
        "a" * SIZE,
        "a" + " " * SIZE + "b",
        "-a" * (SIZE // 2),
        "k:" * (SIZE // 2),  # one-letter keys are not keys
        '"a, ' * (SIZE // 4),
    ],
    ids=["words", "one word", "spaces", "dashes", "colon storm", "quotes"],
)
def test_hostile_last_lines_without_three_params_are_prompt(last_line):
    info = parse_infotext("a cat\n" + last_line)
    assert info["Prompt"] == "a cat\n" + last_line.strip()
    assert "Steps" not in info


@pytest.mark.timeout(10)
def test_many_params_and_long_quoted_values():
    pairs = ", ".join(f"Key{i}: value{i}" for i in range(SIZE // 16))
    info = parse_infotext("a cat\nSteps: 20, " + pairs)
    assert info["Steps"] == "20" and info[f"Key{SIZE // 16 - 1}"] == f"value{SIZE // 16 - 1}"
    quoted = '"' + "x, " * (SIZE // 3) + '"'
    info = parse_infotext(f"a cat\nSteps: 2, Seed: 1, Long: {quoted}, Sampler: Euler")
    assert info["Long"] == "x, " * (SIZE // 3) and info["Sampler"] == "Euler"
    # a quote never closed: each value is the text up to the next comma
    info = parse_infotext("a cat\n" + 'Key: "v, ' * (SIZE // 9))
    assert info["Prompt"] == "a cat" and info["Key"] == '"v'
