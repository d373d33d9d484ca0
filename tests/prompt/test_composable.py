"""split_and against the spec ("AND") and the reference's weight regex, applied by hand."""

from __future__ import annotations

import pytest

from sdstack.prompt.composable import split_and


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # spec worked examples
        ("masterpiece, 1girl :2", [("masterpiece, 1girl", 2.0)]),
        ("cat AND", [("cat", 1.0), ("", 1.0)]),
        # leading whitespace kept, trailing whitespace dropped
        ("a cat AND a dog", [("a cat", 1.0), (" a dog", 1.0)]),
        ("a cat :1.5 AND a dog : 0.5 ", [("a cat", 1.5), (" a dog", 0.5)]),
        ("  spaced  ", [("  spaced", 1.0)]),
        ("", [("", 1.0)]),
        ("AND", [("", 1.0), ("", 1.0)]),
    ],
)
def test_examples(text, expected):
    assert split_and(text) == expected


@pytest.mark.parametrize(
    ("piece", "expected"),
    [
        ("x:1.", ("x", 1.0)),
        ("x:.5", ("x", 0.5)),
        ("x:-1", ("x", -1.0)),
        ("x:+2", ("x", 2.0)),
        ("x :\t3\n", ("x", 3.0)),
        ("x:1e3", ("x:1e3", 1.0)),  # no exponent in the weight regex: all text
        ("x:abc", ("x:abc", 1.0)),
        ("x:1.2.3", ("x:1.2.3", 1.0)),
        ("x:1:2", ("x:1", 2.0)),  # only the last ':number' is the weight
        ("(cat:1.2)", ("(cat:1.2)", 1.0)),
        ("cat:2)", ("cat:2)", 1.0)),
    ],
)
def test_weight_forms(piece, expected):
    assert split_and(piece) == [expected]


def test_split_is_textual_and_case_sensitive():
    assert split_and("(a AND b)") == [("(a", 1.0), (" b)", 1.0)]
    assert split_and("ANDROID and BRAND") == [("ANDROID and BRAND", 1.0)]
    assert split_and("a_AND_b") == [("a_AND_b", 1.0)]  # '_' is a word character
    assert split_and("a,AND,b") == [("a,", 1.0), (",b", 1.0)]
