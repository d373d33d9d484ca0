"""Grid value syntax against the reference X/Y/Z plot (spec grid.md "Parsing values"): csv
fields with the reference's quoting, int and float ranges, and errors naming the value."""

from __future__ import annotations

import csv
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdstack.generate.grid_values import (
    MAX_AXIS_VALUES,
    GridAxisError,
    parse_values,
    split_values,
    typed_value,
    values_text,
)

# --- comma lists: csv.reader without skipinitialspace, fields stripped ------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("dog,cat", ["dog", "cat"]),
        (" dog , cat ", ["dog", "cat"]),
        ('a,"b, c"', ["a", "b, c"]),  # spec: a quoted field right after the comma
        ('a, "b, c"', ["a", '"b', 'c"']),  # spec: a space before the quote: no quoting
        ('"a ""quoted"" word",b', ['a "quoted" word', "b"]),
        ("a\nb,c", ["a", "b", "c"]),  # rows are flattened
        ("dog,,cat", ["dog", "", "cat"]),
        ("", []),
    ],
)
def test_comma_lists_split_as_the_reference(text, expected):
    assert split_values(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("dog,cat", ["dog", "cat"]), ('a,"b, c"', ["a", "b, c"]), ("x,,y", ["x", "", "y"])],
)
def test_str_axes_keep_each_field_even_an_empty_one(text, expected):
    assert parse_values(text, str) == expected


def test_values_text_writes_a_row_that_splits_back():
    values = ["dog", "a, b", 'say "hi"']
    assert values_text(values) == 'dog,"a, b","say ""hi"""'
    assert split_values(values_text(values)) == values


# --- int ranges: the spec's worked examples ---------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1-5", [1, 2, 3, 4, 5]),
        ("1-10 (+2)", [1, 3, 5, 7, 9]),
        ("10-1 (-3)", [10, 7, 4]),  # range(10, 2, -3)
        ("1-10 [5]", [1, 3, 5, 7, 10]),  # int() of linspace 1, 3.25, 5.5, 7.75, 10
        ("1 - 5", [1, 2, 3, 4, 5]),
        ("  1-3  ", [1, 2, 3]),
        ("1 -3 (+1)", [1, 2, 3]),
        ("2-4 [3]", [2, 3, 4]),
        ("5-5", [5]),
        ("1-10 [1]", [1]),
        ("-3--1", [-3, -2, -1]),
        ("1,2,7", [1, 2, 7]),
        ("1-3,10,20-22", [1, 2, 3, 10, 20, 21, 22]),
        ("-1", [-1]),
        ("+4", [4]),
    ],
)
def test_int_forms(text, expected):
    assert parse_values(text, int) == expected


# --- float ranges -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0-1 [5]", [0.0, 0.25, 0.5, 0.75, 1.0]),
        ("0-1 (+0.25)", [0.0, 0.25, 0.5, 0.75, 1.0]),
        ("1-0 (-0.5)", [1.0, 0.5, 0.0]),
        ("0-3", [0.0, 1.0, 2.0, 3.0]),  # step defaults to 1
        ("0.5 - 1.5 [3]", [0.5, 1.0, 1.5]),
        ("7,7.5, 8", [7.0, 7.5, 8.0]),
        ("2-2 [3]", [2.0, 2.0, 2.0]),
    ],
)
def test_float_forms(text, expected):
    values = parse_values(text, float)
    assert all(type(v) is float for v in values)
    assert values == pytest.approx(expected, abs=1e-12)


def test_float_regex_keeps_the_reference_unescaped_dot():
    # The reference's "\d+(?:.\d*)?" lets any character stand for the point: "1e1" is
    # read as a number there, so "1e1-20 (+5)" is 10, 15, 20 in both.
    assert parse_values("1e1-20 (+5)", float) == [10.0, 15.0, 20.0]


def test_whole_as_int_reads_int_forms_first_then_fractions():
    assert parse_values("1-10 [5]", float, whole_as_int=True) == [1, 3, 5, 7, 10]
    values = parse_values("1,1.5,2.0,1-2 (+0.5)", float, whole_as_int=True)
    assert values == [1, 1.5, 2, 1, 1.5, 2]
    assert [type(v) for v in values] == [int, float, int, int, float, int]


# --- bad forms: GridAxisError naming the value and the forms expected -------------------


@pytest.mark.parametrize(
    ("text", "value_type", "message"),
    [
        (
            "1.5",
            int,
            "'1.5' is not a whole number or a range; expected e.g. 3, 1-5, 1-10 (+2), "
            "10-1 (-3), 1-10 [5]",
        ),
        ("a", float, "'a' is not a number or a range; expected e.g. 0.5, 0-1 (+0.25), 0-1 [5]"),
        ("1,,2", int, "'' is not a whole number or a range"),
        ("1-10 (2)", int, "'1-10 (2)': the step needs its sign, as in 1-10 (+2) or 10-1 (-3)"),
        ("0-1 (0.25)", float, "'0-1 (0.25)': the step needs its sign"),
        ("1-10 (+0)", int, "'1-10 (+0)': the step cannot be 0; expected e.g. 1-10 (+2)"),
        ("0-1 (+0)", float, "'0-1 (+0)': the step cannot be 0; expected e.g. 0-1 (+0.25)"),
        (
            "10-1",
            int,
            "'10-1' gives no values: the step goes away from the end, or the count is 0; "
            "expected e.g. 1-10 (+2), 10-1 (-3) or 1-10 [5]",
        ),
        ("1-0 (+0.5)", float, "'1-0 (+0.5)' gives no values"),
        ("1-10 [0]", int, "'1-10 [0]' gives no values"),
        ("0-1 [2.5]", float, "'0-1 [2.5]': the count in [2.5] must be a whole number"),
        ("1-100000", int, "'1-100000' gives 100,000 values; an axis may have at most 10,000"),
        ("0-1 [20000]", float, "'0-1 [20000]' gives 20,000 values; an axis may have at most"),
        ("", int, "'' gives no values; expected a comma-separated list, e.g. 1,2,3, 1-5"),
        ("- 5-10", int, "'- 5-10' is not a whole number or a range"),
        ("1-10 [5.0]", int, "'1-10 [5.0]' is not a whole number or a range"),
    ],
)
def test_bad_forms_name_the_value(text, value_type, message):
    with pytest.raises(GridAxisError) as caught:
        parse_values(text, value_type)
    assert str(caught.value).startswith(message)


def test_many_fields_together_are_capped_too():
    with pytest.raises(GridAxisError, match="at most 10,000"):
        parse_values(",".join(["1-5000"] * 3), int)


def test_huge_numbers_are_errors_not_crashes():
    with pytest.raises(GridAxisError, match="too large to expand"):
        parse_values("-1e308-1e308", float)  # (the unescaped dot reads 1e308)
    with pytest.raises(GridAxisError, match="'1e999-2' is not a number"):
        parse_values("1e999-2", float)  # an infinite end
    with pytest.raises(GridAxisError, match="is not a number or a range"):
        parse_values("1" * 400 + "-2 (+1)", float)  # too long to be a range
    with pytest.raises(GridAxisError, match="is not a whole number"):
        parse_values("9" * 5000, int)  # past Python's int-from-text digit limit
    # Exact ints beyond 64 bits expand (the setting's own check refuses them later).
    assert parse_values(f"{2**70}-{2**70 + 2}", int) == [2**70, 2**70 + 1, 2**70 + 2]


def test_a_csv_field_past_the_csv_limit_is_an_error():
    with pytest.raises(GridAxisError, match="cannot split"):
        parse_values('"' + "a" * (csv.field_size_limit() + 10) + '"', str)


def test_typed_values_from_a_list():
    assert typed_value(" 3 ", int) == 3
    assert typed_value(3.0, int) == 3
    assert typed_value("2", float, whole_as_int=True) == 2
    assert type(typed_value(2.0, float, whole_as_int=True)) is int
    assert typed_value(1.5, float, whole_as_int=True) == 1.5
    assert type(typed_value(7, float)) is float
    for bad, value_type in ((True, int), (2.5, int), ("x", float), (None, float), (3, str)):
        with pytest.raises(GridAxisError):
            typed_value(bad, value_type)


# --- properties -------------------------------------------------------------------------

_text = st.text(alphabet=st.sampled_from("0123456789+-.,()[] \"'xe\n\tab"), max_size=40)


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(_text, st.text(max_size=60)),
    st.sampled_from([(int, False), (float, False), (float, True), (str, False)]),
)
def test_parser_never_raises_anything_but_grid_axis_error(text, kinds):
    value_type, whole_as_int = kinds
    try:
        values = parse_values(text, value_type, whole_as_int=whole_as_int)
    except GridAxisError:
        return
    assert 1 <= len(values) <= MAX_AXIS_VALUES
    allowed = (int, float) if whole_as_int else (value_type,)
    assert all(type(v) in allowed for v in values)


def _spaced(draw, a: int, b: int, tail: str = "") -> str:
    space = st.sampled_from(["", " ", "  "])
    return f"{draw(space)}{a}{draw(space)}-{draw(space)}{b}{tail}{draw(space)}"


@settings(max_examples=200, deadline=None)
@given(st.data(), st.integers(-50, 50), st.integers(-50, 50))
def test_int_range_has_b_minus_a_plus_one_values(data, a, b):
    text = _spaced(data.draw, a, b)
    if b < a:
        with pytest.raises(GridAxisError, match="gives no values"):
            parse_values(text, int)
        return
    values = parse_values(text, int)
    assert len(values) == b - a + 1 and values[0] == a and values[-1] == b


@settings(max_examples=200, deadline=None)
@given(st.integers(-50, 50), st.integers(-50, 50), st.integers(-9, 9).filter(bool))
def test_int_step_range_counts_as_python_range(a, b, step):
    text = f"{a}-{b} ({step:+d})"
    expected = list(range(a, b + 1, step))  # the rule the spec states
    if not expected:
        with pytest.raises(GridAxisError, match="gives no values"):
            parse_values(text, int)
        return
    values = parse_values(text, int)
    assert values == expected
    assert len(values) == math.ceil((b + 1 - a) / step)


@settings(max_examples=200, deadline=None)
@given(st.integers(-1000, 1000), st.integers(-1000, 1000), st.integers(1, 60))
def test_int_count_range_gives_n_values_from_a_to_b(a, b, n):
    values = parse_values(f"{a}-{b} [{n}]", int)
    assert len(values) == n and values[0] == a
    if n > 1:
        assert values[-1] == b
        for i, v in enumerate(values):  # int() truncates the evenly spaced value
            exact = a + (b - a) * i / (n - 1)
            assert v == math.trunc(exact) or abs(v - exact) < 1 + 1e-9


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 400).map(lambda n: n / 4),
    st.integers(0, 400).map(lambda n: n / 4),
    st.integers(1, 60),
)
def test_float_count_range_is_evenly_spaced(a, b, n):
    values = parse_values(f"{a}-{b} [{n}]", float)
    assert len(values) == n and values[0] == a
    if n > 1:
        assert values[-1] == b
        step = (b - a) / (n - 1)
        assert all(abs(v - (a + i * step)) <= 1e-12 * (1 + abs(b)) for i, v in enumerate(values))


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 40).map(lambda n: n / 4),
    st.integers(0, 40).map(lambda n: n / 4),
    st.sampled_from([0.25, 0.5, 1.0, 2.0, -0.25, -1.0]),
)
def test_float_step_range_follows_arange_to_b_plus_step(a, b, step):
    text = f"{a}-{b} ({step:+})"
    count = math.ceil((b + step - a) / step)  # numpy.arange(a, b + s, s): exact on quarters
    if count <= 0:
        with pytest.raises(GridAxisError, match="gives no values"):
            parse_values(text, float)
        return
    values = parse_values(text, float)
    assert values == [a + i * step for i in range(count)]
