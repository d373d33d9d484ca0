"""Resize modes, HWC3 and the reference's high-quality resize, against the spec's rules.

Truths: the spec's formulas worked by hand on small arrays (target floored to multiples
of 8, crop/fill offsets, the border median, ``round(k * min(H, W))``), the interpolation
each rule names run directly with cv2, and the reference's integer resize-mode table.
"""

from __future__ import annotations

import warnings

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdstack.control.resize import (
    MAX_WORK_PIXELS,
    RESIZE_MODES,
    ControlMapError,
    UnknownResizeModeError,
    high_quality_resize,
    hwc3,
    pixel_perfect_resolution,
    resize_control_map,
    resize_mode_name,
    target_size,
)
from sdstack.errors import SdstackWarning


def random_map(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# -- resize modes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "name"),
    [
        (0, "Just Resize"),
        (1, "Crop and Resize"),
        (2, "Resize and Fill"),
        (3, "Just Resize"),  # "Just Resize (Latent upscale)"
        ("1", "Crop and Resize"),
        ("Just Resize", "Just Resize"),
        ("crop and resize", "Crop and Resize"),
        ("Inner Fit (Scale to Fit)", "Crop and Resize"),
        ("Scale to Fit (Inner Fit)", "Crop and Resize"),
        ("Outer Fit (Shrink to Fit)", "Resize and Fill"),
        ("Envelope (Outer Fit)", "Resize and Fill"),
        ("ResizeMode.INNER_FIT", "Crop and Resize"),
        ("ResizeMode.OUTER_FIT", "Resize and Fill"),
        ("RESIZE", "Just Resize"),
        ("fill", "Resize and Fill"),
    ],
)
def test_resize_mode_names_and_ints(value, name):
    assert resize_mode_name(value) == name


def test_registry_holds_the_reference_ints():
    assert RESIZE_MODES.items() == [
        ("Just Resize", 0),
        ("Crop and Resize", 1),
        ("Resize and Fill", 2),
    ]


@pytest.mark.parametrize("value", [4, 9])
def test_resize_mode_int_of_four_or_more_warns_and_falls_back(value):
    with pytest.warns(SdstackWarning, match=f"resize mode {value} is not one of 0, 1, 2"):
        assert resize_mode_name(value) == "Just Resize"


def test_resize_mode_ints_below_four_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [resize_mode_name(i) for i in range(4)] == [
            "Just Resize", "Crop and Resize", "Resize and Fill", "Just Resize",
        ]  # fmt: skip


def test_unknown_resize_mode_suggests():
    with pytest.raises(UnknownResizeModeError) as error:
        resize_mode_name("Crop and Resise")
    assert str(error.value).startswith(
        "unknown resize mode 'Crop and Resise'; did you mean 'Crop and Resize'?"
    )


@pytest.mark.parametrize("value", [-1, True, 1.0, None])
def test_bad_resize_mode_values(value):
    with pytest.raises(ControlMapError, match="resize mode"):
        resize_mode_name(value)


# -- HWC3 -----------------------------------------------------------------------------


def test_hwc3_gray_and_one_channel_repeat():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    for x in (gray, gray[:, :, None]):
        y = hwc3(x)
        assert y.shape == (3, 4, 3)
        assert all(np.array_equal(y[:, :, c], gray) for c in range(3))


def test_hwc3_rgb_is_returned_as_is():
    x = random_map(5, 7)
    assert hwc3(x) is x


def test_hwc3_rgba_composites_on_white():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (6, 6, 4), dtype=np.uint8)
    x[0, :, 3], x[1, :, 3] = 0, 255
    y = hwc3(x)
    assert (y[0] == 255).all()  # fully transparent -> white
    assert np.array_equal(y[1], x[1, :, :3])  # opaque -> the colour
    a = x[..., 3:4].astype(np.float64) / 255
    truth = x[..., :3] * a + 255 * (1 - a)  # float64; the reference truncates float32
    assert np.abs(y.astype(np.float64) - np.floor(truth)).max() <= 1


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((4, 4, 3), dtype=np.float32), "dtype float32; expected uint8"),
        (np.zeros((4, 4, 2), dtype=np.uint8), "shape (4, 4, 2); expected H x W"),
        (np.zeros((2, 4, 4, 3), dtype=np.uint8), "shape (2, 4, 4, 3)"),
        (np.zeros((0, 4, 3), dtype=np.uint8), "it is empty"),
    ],
)
def test_hwc3_refuses_bad_arrays(array, message):
    with pytest.raises(ControlMapError, match=message.replace("(", r"\(").replace(")", r"\)")):
        hwc3(array)


# -- high_quality_resize --------------------------------------------------------------


def test_same_size_is_unchanged():
    x = random_map(8, 16)
    assert np.array_equal(high_quality_resize(x, (16, 8)), x)


def test_many_colours_enlarged_use_cubic_and_shrunk_use_area():
    x = random_map(20, 30)
    assert np.array_equal(
        high_quality_resize(x, (60, 40)), cv2.resize(x, (60, 40), interpolation=cv2.INTER_CUBIC)
    )
    assert np.array_equal(
        high_quality_resize(x, (15, 10)), cv2.resize(x, (15, 10), interpolation=cv2.INTER_AREA)
    )


def test_segmentation_like_maps_use_nearest():
    # 5 colours (2 < n < 200): NEAREST, so no new colour appears either way.
    palette = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [9, 9, 9]], np.uint8)
    x = palette[np.random.default_rng(2).integers(0, 5, (10, 12))]
    for size in ((24, 20), (6, 5)):
        y = high_quality_resize(x, size)
        assert np.array_equal(y, cv2.resize(x, size, interpolation=cv2.INTER_NEAREST))


def test_binary_blob_is_rebinarised():
    x = np.zeros((16, 16, 3), np.uint8)
    x[4:12, 4:12] = 255  # a filled square: binary, not a one-pixel edge
    y = high_quality_resize(x, (40, 40))
    assert set(np.unique(y)) == {0, 255}
    assert (y[:, :, 0] == y[:, :, 1]).all() and (y[:, :, 1] == y[:, :, 2]).all()
    assert (y[12:28, 12:28] == 255).all() and (y[:6] == 0).all()  # the square, scaled 2.5x


def test_one_pixel_edges_stay_one_pixel_wide_when_enlarged():
    x = np.zeros((32, 32, 3), np.uint8)
    x[16, 4:28] = 255  # a one-pixel line (the 3x3 opening removes all of it)
    y = high_quality_resize(x, (128, 128))[:, :, 0]
    assert set(np.unique(y)) <= {0, 255}
    columns = (y[:, 24:104] == 255).sum(axis=0)  # away from the ends
    assert (columns == 1).all()
    assert abs(int(np.argmax(y[:, 64])) - 65) <= 2  # the line at row 16 * 4 (+ centring)


def test_size_checks():
    with pytest.raises(ControlMapError, match="resize target 0x5"):
        high_quality_resize(random_map(4, 4), (0, 5))


# -- resize_control_map (detectmap_proc) ----------------------------------------------


def test_target_floors_to_multiples_of_eight():
    assert target_size(100, 70) == (96, 64)
    for mode in (0, 1, 2):
        assert resize_control_map(random_map(30, 50), 100, 70, mode).shape == (64, 96, 3)
    with pytest.raises(ControlMapError, match="control map width 7: expected a whole number >= 8"):
        target_size(7, 64)


def test_crop_and_resize_worked_example():
    # W=100, H=50 -> 64x64: k = max(64/50, 64/100) = 1.28, scaled to 128x64 (W x H),
    # centre crop columns 32..96.
    x = random_map(50, 100, seed=3)
    scaled = cv2.resize(x, (128, 64), interpolation=cv2.INTER_CUBIC)
    assert np.array_equal(resize_control_map(x, 64, 64, "Crop and Resize"), scaled[:, 32:96])


def test_resize_and_fill_worked_example():
    # W=100, H=50 -> 64x64: k = min(1.28, 0.64) = 0.64, scaled to 64x32 (W x H), pasted at
    # row (64-32)//2 = 16 on a canvas of the border median.
    x = random_map(50, 100, seed=4)
    border = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]])
    fill = np.floor(np.median(border.astype(np.float64), axis=0))
    y = resize_control_map(x, 64, 64, "Resize and Fill")
    scaled = cv2.resize(x, (64, 32), interpolation=cv2.INTER_AREA)
    assert np.array_equal(y[16:48], scaled)
    assert (y[:16] == fill).all() and (y[48:] == fill).all()


def test_just_resize_does_not_keep_aspect():
    x = random_map(50, 100, seed=5)
    y = resize_control_map(x, 64, 64, 0)
    assert np.array_equal(y, cv2.resize(x, (64, 64), interpolation=cv2.INTER_AREA))


def test_gray_map_goes_through_hwc3():
    gray = np.full((16, 16), 77, np.uint8)
    assert (resize_control_map(gray, 32, 32, 0) == 77).all()


def test_extreme_aspect_crop_is_refused_before_allocating():
    strip = np.zeros((1, 20000, 3), np.uint8)  # 512x512 crop: scale 512 -> 10,240,000 x 512
    with pytest.raises(ControlMapError) as error:
        resize_control_map(strip, 512, 512, "Crop and Resize")
    assert f"more than {MAX_WORK_PIXELS} pixels" in str(error.value)
    assert "Crop and Resize of a 20000x1 map to 512x512" in str(error.value)


def test_extreme_aspect_fill_keeps_one_row():
    strip = np.full((1, 2000, 3), 200, np.uint8)
    y = resize_control_map(strip, 64, 64, "Resize and Fill")
    assert y.shape == (64, 64, 3) and (y == 200).all()


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 40),
    st.integers(1, 40),
    st.integers(8, 80),
    st.integers(8, 80),
    st.sampled_from([0, 1, 2]),
    st.integers(0, 3),
)
def test_output_is_always_the_floored_job_size(h, w, width, height, mode, seed):
    y = resize_control_map(random_map(h, w, seed), width, height, mode)
    assert y.shape == (height // 8 * 8, width // 8 * 8, 3) and y.dtype == np.uint8


# -- pixel perfect --------------------------------------------------------------------


def test_pixel_perfect_resolution_worked_examples():
    # A 1024x768 image for a 512x512 job: k0 = 512/768, k1 = 512/1024.
    assert pixel_perfect_resolution((1024, 768), 512, 512, "Crop and Resize") == 512
    assert pixel_perfect_resolution((1024, 768), 512, 512, "Resize and Fill") == 384
    assert pixel_perfect_resolution((1024, 768), 512, 512, "Just Resize") == 512
    # Job floored to 512x768: k0 = 768/200 = 3.84, k1 = 512/300; 3.84 * 200 = 768.
    assert pixel_perfect_resolution((300, 200), 515, 770, 1) == 768


@settings(max_examples=60, deadline=None)
@given(st.one_of(st.text(max_size=30), st.integers(0, 3)))
def test_any_resize_mode_value_is_a_name_or_a_clear_error(value):
    try:
        assert resize_mode_name(value) in RESIZE_MODES.names()
    except UnknownResizeModeError as error:
        assert str(error).startswith(f"unknown resize mode {value.strip()!r}")
