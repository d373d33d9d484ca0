"""ControlNet units: the --control form, checks, and the reference's infotext value."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sdstack.control.unit import (
    ControlUnit,
    ControlUnitError,
    parse_control_option,
    parse_unit_infotext,
    serialize_unit,
    units_from_infotext,
)
from sdstack.errors import SdstackError, UnknownNameError

# A real infotext value as the reference extension writes it (older versions add Low Vram
# and Save Detected Map, which sdstack reads past).
REFERENCE_VALUE = (
    "Module: canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 1, Resize Mode: "
    "Crop and Resize, Low Vram: False, Processor Res: 512, Threshold A: 100, Threshold B: "
    "200, Guidance Start: 0, Guidance End: 1, Pixel Perfect: False, Control Mode: Balanced, "
    "Save Detected Map: True"
)


def test_option_fields_and_trailing_numbers():
    unit = parse_control_option("canny:control_v11p_sd15_canny:edges.png")
    assert (unit.module, unit.model, unit.image, unit.weight) == (
        "canny",
        "control_v11p_sd15_canny",
        "edges.png",
        1.0,
    )
    unit = parse_control_option("none:cn:C:/maps/pose.png:0.8:0.1:0.6")
    assert unit.image == "C:/maps/pose.png"
    assert (unit.weight, unit.guidance_start, unit.guidance_end) == (0.8, 0.1, 0.6)
    assert parse_control_option("none:cn:x.png:1.5").weight == 1.5
    assert parse_control_option("none:cn:").image is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("canny", "expected MODULE:MODEL:IMAGE"),
        (":cn:x.png", "expected MODULE:MODEL:IMAGE"),
        ("canny:cn:x.png:0.5:0.2", "not two numbers"),
    ],
)
def test_bad_options_are_named(text, message):
    with pytest.raises(ControlUnitError, match=message):
        parse_control_option(text)


@given(st.text(max_size=60))
def test_any_option_text_parses_or_gives_the_clear_error(text):
    try:
        unit = parse_control_option(text)
    except ControlUnitError as error:
        assert "--control" in str(error)
    else:
        assert isinstance(unit, ControlUnit)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"weight": 2.5}, "weight must be between 0 and 2"),
        ({"weight": float("nan")}, "weight must be a finite number"),
        ({"guidance_start": 0.6, "guidance_end": 0.4}, "guidance start 0.6 is after"),
        ({"guidance_end": 1.2}, "guidance end must be between 0 and 1"),
        ({"model": " "}, "no ControlNet model"),
        ({"processor_res": 10_000}, "processor res must be between 64 and 2048"),
    ],
)
def test_checked_names_the_bad_setting(changes, message):
    unit = dataclasses.replace(ControlUnit("canny", "cn", "x.png"), **changes)
    with pytest.raises(ControlUnitError, match=message):
        unit.checked("--control 1")


def test_checked_makes_names_canonical_and_refuses_unknown_ones():
    unit = ControlUnit("Canny", "cn", "x.png", resize_mode=2, control_mode="controlnet").checked()
    assert (unit.module, unit.resize_mode, unit.control_mode) == (
        "canny",
        "Resize and Fill",
        "ControlNet is more important",
    )
    with pytest.raises(UnknownNameError, match="did you mean 'Balanced'"):
        ControlUnit("canny", "cn", "x.png", control_mode="Balancd").checked()


def test_reference_value_reads_back():
    unit = parse_unit_infotext(REFERENCE_VALUE)
    assert unit.module == "canny" and unit.model == "control_v11p_sd15_canny [d14c016b]"
    assert (unit.weight, unit.processor_res, unit.threshold_a, unit.threshold_b) == (
        1,
        512,
        100,
        200,
    )
    assert (unit.guidance_start, unit.guidance_end, unit.pixel_perfect) == (0, 1, False)
    assert unit.control_mode == "Balanced" and unit.resize_mode == "Crop and Resize"
    assert unit.image is None


def test_serialised_in_the_reference_order_and_spelling():
    unit = ControlUnit(
        "canny", "cn", "x.png", 0.75, 0.0, 0.5, processor_res=512, threshold_a=100,
        threshold_b=200,
    )  # fmt: skip
    assert serialize_unit(unit, "control_v11p_sd15_canny [d14c016b]") == (
        "Module: canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 0.75, Resize "
        "Mode: Crop and Resize, Processor Res: 512, Threshold A: 100, Threshold B: 200, "
        "Guidance Start: 0, Guidance End: 0.5, Pixel Perfect: False, Control Mode: Balanced"
    )
    back = parse_unit_infotext(serialize_unit(unit, "cn [00000000]"))
    assert dataclasses.replace(back, model="cn", image="x.png") == unit


def test_values_the_infotext_cannot_hold_are_refused():
    with pytest.raises(ControlUnitError, match="holds ',' or ':'"):
        serialize_unit(ControlUnit("canny", "a,b"), "a,b [00000000]")


def test_units_come_in_index_order_and_a_bad_item_is_named():
    info = {"ControlNet 1": "Module: none, Model: b", "ControlNet 0": "Module: canny, Model: a"}
    assert [u.model for u in units_from_infotext(info)] == ["a", "b"]
    with pytest.raises(SdstackError, match="ControlNet 3: item 'Weight' is not"):
        units_from_infotext({"ControlNet 3": "Model: a, Weight"})
    with pytest.raises(SdstackError, match="no Model"):
        units_from_infotext({"ControlNet 0": "Module: canny"})
