"""The value syntax of grid axes, as the reference X/Y/Z plot reads it (``process_axis``).

1. The text is split with ``csv.reader`` (rows flattened, each field ``str.strip``-ped).
   There is no ``skipinitialspace``, so a quoted field must follow its comma directly:
   ``a,"b, c"`` -> ``a``, ``b, c``; ``a, "b, c"`` -> ``a``, ``"b``, ``c"``.
2. On int axes a field is a range when the reference's regexes match it whole, the plain
   form tried first: ``A-B`` -> ``range(A, B + 1)``; ``A-B (+S)`` -> ``range(A, B + 1, S)``
   (the step needs its sign: ``10-1 (-3)`` -> 10, 7, 4); ``A-B [N]`` -> ``int()`` of each
   of ``numpy.linspace(A, B, N)`` (truncation: ``1-10 [5]`` -> 1, 3, 5, 7, 10). Spaces may
   stand around the numbers and the ``-``.
3. On float axes: ``A-B (+S)`` -> ``numpy.arange(A, B + S, S)`` (S defaults to 1) and
   ``A-B [N]`` -> ``numpy.linspace(A, B, N)``. The reference's float regex leaves its
   ``.`` unescaped (any character); it is kept so that the same texts are ranges.
4. Every other field is converted with the axis type (``int``, ``float``, ``str``).

Where the reference crashes (``int("1.5")``, a zero step, ``[2.5]``) or would build an
empty or enormous axis, :class:`GridAxisError` names the field and the forms expected.
numpy is imported only when a range needs it.

Then each value is checked for the setting it goes to (``check_*``: the ranges of
``GenerationParams``; a LoRA axis's weight is written by ``sdstack.lora.job_weights``).
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Callable, Iterator
from typing import Any

from sdstack.errors import SdstackError
from sdstack.generate.params import MAX_CFG, MAX_PIXELS, MAX_SEED, MAX_SIZE, MIN_SIZE
from sdstack.generate.samplers import SCHEDULES, resolve_sampler
from sdstack.lora.spec import check_multiplier
from sdstack.prompt.errors import shorten
from sdstack.prompt.limits import MAX_STEPS
from sdstack.validate import check_clip_skip, check_emphasis, check_int, check_number

MAX_AXIS_VALUES = 10_000
"""Values one axis may have (every cell is one image: a grid this wide is a mistake)."""
MAX_RANGE_TEXT = 200
"""A field longer than this is never read as a range (keeps the regexes linear)."""

# The reference's regexes (xyz_grid.py), matched with fullmatch.
_INT_RANGE = re.compile(r"\s*([+-]?\s*\d+)\s*-\s*([+-]?\s*\d+)(?:\s*\(([+-]\d+)\s*\))?\s*")
_INT_COUNT = re.compile(r"\s*([+-]?\s*\d+)\s*-\s*([+-]?\s*\d+)(?:\s*\[(\d+)\s*])?\s*")
_FLOAT_NUMBER = r"[+-]?\s*\d+(?:.\d*)?"
_FLOAT_RANGE = re.compile(
    rf"\s*({_FLOAT_NUMBER})\s*-\s*({_FLOAT_NUMBER})(?:\s*\(([+-]\d+(?:.\d*)?)\s*\))?\s*"
)
_FLOAT_COUNT = re.compile(
    rf"\s*({_FLOAT_NUMBER})\s*-\s*({_FLOAT_NUMBER})(?:\s*\[(\d+(?:.\d*)?)\s*])?\s*"
)

_INT_FORMS = "a whole number or a range; expected e.g. 3, 1-5, 1-10 (+2), 10-1 (-3), 1-10 [5]"
_FLOAT_FORMS = "a number or a range; expected e.g. 0.5, 0-1 (+0.25), 0-1 [5]"
_UNSIGNED_STEP = re.compile(r"[^()]*\d\s*-[^()]*\(\s*\d[^()]*\)\s*")


class GridAxisError(SdstackError):
    """A grid axis that cannot be used: unknown name, bad value syntax, a value out of
    range for its setting. The message names the axis text, the value and what was
    expected."""


def split_values(text: str) -> list[str]:
    """Reference ``csv_string_to_list_strip``: ``csv.reader`` fields, rows flattened, each
    stripped (no ``skipinitialspace``: ``a, "b, c"`` gives ``a``, ``"b``, ``c"``).

    Raises:
        GridAxisError: text ``csv`` cannot read (a field over its size limit).
    """
    return list(_fields(text))


def _fields(text: str) -> Iterator[str]:
    try:
        for row in csv.reader(io.StringIO(text)):
            yield from (field.strip() for field in row)
    except csv.Error as error:
        raise GridAxisError(f"cannot split {shorten(text)!r} into values: {error}") from None


def parse_values(text: str, value_type: type, *, whole_as_int: bool = False) -> list[Any]:
    """The values of one axis: ``text`` split as :func:`split_values`, ranges expanded
    (module docstring), every field converted with ``value_type`` (int, float or str).

    Args:
        text: the values as written, e.g. ``"1-10 (+2)"`` or ``'dog,"a, b"'``.
        value_type: ``int``, ``float`` or ``str``.
        whole_as_int: for float axes whose reference type is int (clip skip): a field is
            first read as the reference's int forms, then as float forms, and a value
            that is a whole number becomes an ``int`` (so it prints as ``2``).

    Returns:
        The values, in order; never empty.

    Raises:
        GridAxisError: no values, a field that is neither a value nor a range of the type,
            a zero step, a range with no values or more than :data:`MAX_AXIS_VALUES`.
    """
    if not isinstance(text, str):
        raise GridAxisError(f"grid values must be text, got {type(text).__name__}")
    if value_type not in (int, float, str):
        raise GridAxisError(f"grid value type must be int, float or str, got {value_type!r}")
    values: list[Any] = []
    for field in _fields(text):
        values.extend(_expand(field, value_type, whole_as_int))
        _check_count(len(values), f"{shorten(text)!r}")
    if not values:
        raise GridAxisError(
            f"{shorten(text)!r} gives no values; expected a comma-separated list, "
            "e.g. 1,2,3, 1-5 or 0-1 [5]"
        )
    return values


def _expand(field: str, value_type: type, whole_as_int: bool) -> list[Any]:
    """One csv field -> its values (a range, or the field converted)."""
    if value_type is str:
        return [field]
    if len(field) <= MAX_RANGE_TEXT and _UNSIGNED_STEP.fullmatch(field):
        raise GridAxisError(f"{field!r}: the step needs its sign, as in 1-10 (+2) or 10-1 (-3)")
    if value_type is int:
        found = _int_range(field)
        return found if found is not None else [_to_int(field)]
    if whole_as_int:
        found = _int_range(field)
        if found is None:
            found = _float_range(field)
        if found is None:
            found = [_to_int(field) if _is_int_text(field) else _to_float(field)]
        return [int(v) if isinstance(v, float) and v.is_integer() else v for v in found]
    found = _float_range(field)
    return found if found is not None else [_to_float(field)]


def _int_range(field: str) -> list[int] | None:
    """``A-B``, ``A-B (+S)``, ``A-B [N]`` on an int axis, or None if ``field`` is none."""
    if len(field) > MAX_RANGE_TEXT:
        return None
    match = _INT_RANGE.fullmatch(field)
    if match is not None:
        start, end = _to_int(match[1], field), _to_int(match[2], field)
        step = _to_int(match[3], field) if match[3] is not None else 1
        if step == 0:
            raise GridAxisError(f"{field!r}: the step cannot be 0; expected e.g. 1-10 (+2)")
        _check_count(_range_length(start, end + 1, step), repr(field))
        return _nonempty(list(range(start, end + 1, step)), field)
    match = _INT_COUNT.fullmatch(field)
    if match is None:
        return None
    start, end = _to_int(match[1], field), _to_int(match[2], field)
    count = _to_int(match[3], field) if match[3] is not None else 1
    return [int(v) for v in _linspace(start, end, count, field)]


def _float_range(field: str) -> list[float] | None:
    """``A-B``, ``A-B (+S)``, ``A-B [N]`` on a float axis, or None if ``field`` is none."""
    if len(field) > MAX_RANGE_TEXT:
        return None
    match = _FLOAT_RANGE.fullmatch(field)
    if match is not None:
        start, end = _to_float(match[1], field), _to_float(match[2], field)
        step = _to_float(match[3], field) if match[3] is not None else 1.0
        return _arange(start, end, step, field)
    match = _FLOAT_COUNT.fullmatch(field)
    if match is None:
        return None
    start, end = _to_float(match[1], field), _to_float(match[2], field)
    if match[3] is not None and not _is_int_text(match[3]):
        raise GridAxisError(
            f"{field!r}: the count in [{match[3]}] must be a whole number; expected e.g. 0-1 [5]"
        )
    count = _to_int(match[3], field) if match[3] is not None else 1
    return _linspace(start, end, count, field)


def _arange(start: float, end: float, step: float, field: str) -> list[float]:
    """``numpy.arange(start, end + step, step).tolist()``, its length checked first."""
    if step == 0:
        raise GridAxisError(f"{field!r}: the step cannot be 0; expected e.g. 0-1 (+0.25)")
    estimate = (end + step - start) / step
    if not math.isfinite(estimate):
        raise GridAxisError(f"{field!r}: the range is too large to expand")
    _check_count(math.ceil(estimate), repr(field))
    import numpy as np

    try:
        values = np.arange(start, end + step, step).tolist() if estimate > 0 else []
    except (OverflowError, ValueError):
        raise GridAxisError(f"{field!r}: the range is too large to expand") from None
    _check_count(len(values), repr(field))
    return _nonempty(values, field)


def _linspace(start: float, end: float, count: int, field: str) -> list[float]:
    """``numpy.linspace(start, end, count).tolist()`` with ``count`` checked."""
    _check_count(count, repr(field))
    import numpy as np

    try:
        values = np.linspace(start=start, stop=end, num=count).tolist()
    except (OverflowError, ValueError):
        raise GridAxisError(f"{field!r}: the range is too large to expand") from None
    if not all(math.isfinite(v) for v in values):
        raise GridAxisError(f"{field!r}: the range is too large to expand")
    return _nonempty(values, field)


def _range_length(start: int, stop: int, step: int) -> int:
    """``len(range(start, stop, step))`` without building it (exact for any ints)."""
    if step > 0:
        return max(0, (stop - start + step - 1) // step)
    return max(0, (start - stop - step - 1) // -step)


def _check_count(count: int, what: str) -> None:
    if count > MAX_AXIS_VALUES:
        raise GridAxisError(
            f"{what} gives {count:,} values; an axis may have at most {MAX_AXIS_VALUES:,}"
        )


def _nonempty(values: list[Any], field: str) -> list[Any]:
    if not values:
        raise GridAxisError(
            f"{field!r} gives no values: the step goes away from the end, or the count is 0; "
            "expected e.g. 1-10 (+2), 10-1 (-3) or 1-10 [5]"
        )
    return values


def _is_int_text(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _to_int(text: str, field: str | None = None) -> int:
    """``int(text)``; else a GridAxisError naming the field and the int forms."""
    if not _is_int_text(text):
        raise GridAxisError(
            f"{shorten(field if field is not None else text)!r} is not {_INT_FORMS}"
        )
    return int(text)


def _to_float(text: str, field: str | None = None) -> float:
    """``float(text)`` (finite for range ends); else a GridAxisError naming the field."""
    try:
        number = float(text)
    except ValueError:
        number = math.nan if field is not None else None
    if number is None or (field is not None and not math.isfinite(number)):
        raise GridAxisError(f"{shorten(field or text)!r} is not {_FLOAT_FORMS}")
    return number


def values_text(values: list[Any]) -> str:
    """Reference ``list_to_csv_string``: the values as one csv row (for ``X Values``)."""
    out = io.StringIO()
    csv.writer(out).writerow(values)
    return out.getvalue().strip()


def typed_value(value: Any, value_type: type, whole_as_int: bool = False) -> Any:
    """A value given in a list (Python, a spec file) as ``value_type``: text for str axes;
    ints (or text of one) for int axes; numbers (or text of one) for float axes.

    Raises:
        GridAxisError: a value of another type (bools are not numbers).
    """
    if value_type is str:
        if not isinstance(value, str):
            raise GridAxisError(f"{value!r} is not text; expected a string")
        return value
    if isinstance(value, str):
        value = value.strip()
        if value_type is int or (whole_as_int and _is_int_text(value)):
            return _to_int(value)
        number = _to_float(value)
        return int(number) if whole_as_int and number.is_integer() else number
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise GridAxisError(f"{value!r} is not {_INT_FORMS if value_type is int else 'a number'}")
    if value_type is int:
        if isinstance(value, float) and not value.is_integer():
            raise GridAxisError(f"{value!r} is not a whole number")
        return int(value)
    if whole_as_int and float(value).is_integer() and math.isfinite(value):
        return int(value)
    return float(value)


# --- value checks, one per setting (each returns the value to use) --------------------


def _bounded(label: str, low: float, high: float, whole: bool) -> Callable[[Any], Any]:
    check = check_int if whole else check_number
    return lambda value: check(f"{label} value", value, low, high)


check_steps = _bounded("Steps", 1, MAX_STEPS, whole=True)
"""1..``MAX_STEPS`` (1000)."""
check_cfg = _bounded("CFG Scale", 0.0, MAX_CFG, whole=False)
"""0..``MAX_CFG`` (100)."""
check_denoising = _bounded("Denoising", 0.0, 1.0, whole=False)
"""0..1."""
check_token_merging = _bounded("Token merging ratio", 0.0, 0.9, whole=False)
"""0..0.9 (``sdstack.generate.token_merging.MAX_RATIO``)."""


def check_seed(value: int) -> int:
    """-1 (a random seed, drawn per grid or per cell) or 0..2**32-1."""
    if value == -1:
        return -1
    return check_int("Seed value", value, 0, MAX_SEED, hint=" (or -1 for a random seed)")


def check_clip_skip_value(value: float) -> float:
    """1..12 (fractions blend two layers); the value is kept as given (2 stays an int)."""
    try:
        check_clip_skip(value, name="Clip skip value")
    except OverflowError:  # an int past float range
        raise GridAxisError(
            f"Clip skip value must be between 1 and 12, got {shorten(str(value))}"
        ) from None
    return value


def check_sampler(value: str) -> str:
    """A sampler name ``resolve_sampler`` knows (old "<name> Karras" forms too)."""
    resolve_sampler(value)
    return value


def check_schedule(value: str) -> str:
    """A schedule type; returns its canonical spelling ("karras" -> "Karras")."""
    return SCHEDULES.canonical(value)


def check_emphasis_value(value: str) -> str:
    """An emphasis mode; returns its canonical spelling ("No norm" -> "no-norm")."""
    return check_emphasis(value, "Emphasis value")


_SIZE = re.compile(r"(\d+)\s*[xX×]\s*(\d+)", re.ASCII)


def check_size(value: str) -> str:
    """``WIDTHxHEIGHT``: multiples of 8 in 64..4096, at most 2048x2048 pixels; -> "WxH"."""
    match = _SIZE.fullmatch(value.strip())
    if match is None:
        raise GridAxisError(
            f"Size value {shorten(value)!r} is not WIDTHxHEIGHT; expected e.g. 512x768"
        )
    sides = [
        check_int(f"Size value {value!r} {side}", int(n), MIN_SIZE, MAX_SIZE)
        for side, n in zip(("width", "height"), match.groups(), strict=True)
    ]
    for side, n in zip(("width", "height"), sides, strict=True):
        if n % 8:
            raise GridAxisError(
                f"Size value {value!r}: {side} {n} is not a multiple of 8 "
                f"(nearest: {n // 8 * 8} or {n // 8 * 8 + 8})"
            )
    if sides[0] * sides[1] > MAX_PIXELS:
        raise GridAxisError(
            f"Size value {value!r} is {sides[0] * sides[1]:,} pixels; at most {MAX_PIXELS:,} "
            "(2048x2048) per image"
        )
    return f"{sides[0]}x{sides[1]}"


def check_file_name(what: str) -> Callable[[str], str]:
    """A check that the value names a file (not empty); the file is found when it loads."""

    def check(value: str) -> str:
        if not value.strip():
            raise GridAxisError(f"{what} value is empty; expected a file or a name")
        return value

    return check


def check_weight(value: float) -> float:
    """A LoRA multiplier: finite, within +-1000."""
    return check_multiplier(value, "LoRA weight value")
