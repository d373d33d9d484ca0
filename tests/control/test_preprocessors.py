"""Weight-free preprocessors against the spec's steps and hand-made images.

Truths: the spec's canny recipe (short side to the resolution, CUBIC up / AREA down,
edge padding to multiples of 64, cv2.Canny, padding cut) computed step by step here;
``255 - x``; the threshold rule on a hand-made image; block-constant images for the tile
resample (AREA of equal 2x2 blocks is exact); lines drawn by hand for scribble/lineart.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdstack.control.detectors import UNAVAILABLE_PREPROCESSORS
from sdstack.control.preprocessors import (
    PREPROCESSORS,
    PreprocessorError,
    PreprocessorUnavailableError,
    UnknownPreprocessorError,
    check_resolution,
    find_preprocessor,
    preprocess,
    resize_image_with_pad,
)
from sdstack.control.resize import ControlMapError


def square_image(size: int = 64, fg: int = 0, bg: int = 255) -> np.ndarray:
    """A ``fg`` square (rows/cols size/4 .. 3size/4) on ``bg``."""
    x = np.full((size, size, 3), bg, np.uint8)
    x[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = fg
    return x


def noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_the_registered_modules_and_reference_names():
    assert PREPROCESSORS.names() == (
        "none", "invert", "canny", "scribble", "threshold", "lineart_standard", "tile",
    )  # fmt: skip
    for alias, name in [
        ("invert (from white bg & black line)", "invert"),
        ("scribble_xdog", "scribble"),
        ("lineart_standard (from white bg & black line)", "lineart_standard"),
        ("tile_resample", "tile"),
        ("Canny", "canny"),
    ]:
        assert find_preprocessor(alias).name == name


# -- resize_image_with_pad ------------------------------------------------------------


def test_resize_with_pad_worked_example():
    # H=60, W=100 at resolution 120: k = 2, CUBIC to 120x200, padded to 128x256.
    x = noise(60, 100)
    padded, remove_pad = resize_image_with_pad(x, 120)
    scaled = cv2.resize(x, (200, 120), interpolation=cv2.INTER_CUBIC)
    assert padded.shape == (128, 256, 3)
    assert np.array_equal(padded[:120, :200], scaled)
    assert np.array_equal(padded[120:, :200], np.repeat(scaled[-1:], 8, axis=0))  # edge pad
    assert np.array_equal(padded[:120, 200:], np.repeat(scaled[:, -1:], 56, axis=1))
    assert np.array_equal(remove_pad(padded), scaled)


def test_resize_with_pad_shrinks_with_area():
    x = noise(200, 300)
    padded, remove_pad = resize_image_with_pad(x, 100)  # k = 0.5 -> 100x150
    assert np.array_equal(
        remove_pad(padded), cv2.resize(x, (150, 100), interpolation=cv2.INTER_AREA)
    )


# -- canny ----------------------------------------------------------------------------


def test_canny_follows_the_spec_recipe():
    x = noise(60, 100, seed=1)
    scaled = cv2.resize(x, (200, 120), interpolation=cv2.INTER_CUBIC)
    padded = np.pad(scaled, [[0, 8], [0, 56], [0, 0]], mode="edge")
    edges = cv2.Canny(padded, 50, 150)[:120, :200]
    out = preprocess("canny", x, resolution=120, threshold_a=50, threshold_b=150)
    assert out.shape == (120, 200, 3)
    assert all(np.array_equal(out[:, :, c], edges) for c in range(3))


def test_canny_defaults_are_100_and_200():
    x = noise(64, 64, seed=2)
    expected = cv2.Canny(x, 100, 200)  # resolution 64: k = 1, no padding
    assert np.array_equal(preprocess("canny", x, resolution=64)[:, :, 0], expected)
    same = preprocess("canny", x, resolution=64, threshold_a=-1, threshold_b=-1)
    assert np.array_equal(same[:, :, 0], expected)  # -1: the reference's "default"


def test_canny_of_a_square_outlines_it():
    out = preprocess("canny", square_image(), resolution=64)[:, :, 0]
    ring = np.zeros((64, 64), bool)
    ring[14:51, 14:51] = True
    ring[18:47, 18:47] = False  # within 2 px of the square's border (rows/cols 16..47)
    assert set(np.unique(out)) == {0, 255}
    assert (out[~ring] == 0).all()
    assert (out[ring] == 255).sum() >= 4 * 30  # a closed outline


# -- invert, none, threshold ----------------------------------------------------------


def test_invert_is_255_minus_x_without_resizing():
    x = noise(30, 50, seed=3)
    assert np.array_equal(preprocess("invert", x, resolution=512), 255 - x)
    gray = x[:, :, 0]
    assert np.array_equal(preprocess("invert", gray)[:, :, 1], 255 - gray)


def test_none_returns_the_image():
    x = noise(30, 50, seed=4)
    assert np.array_equal(preprocess("none", x), x)
    rgba = np.dstack([x, np.zeros((30, 50), np.uint8)])
    assert (preprocess("none", rgba) == 255).all()  # transparent -> white (HWC3)


def test_threshold_uses_the_darkest_channel():
    x = np.zeros((64, 64, 3), np.uint8)
    x[:, :32] = (200, 200, 200)  # all channels > 127
    x[:32, 32:] = (200, 200, 100)  # darkest channel 100 <= 127
    x[32:, 32:] = (128, 250, 130)  # darkest channel 128 > 127
    out = preprocess("threshold", x, resolution=64)[:, :, 0]
    assert (out[:, :32] == 255).all() and (out[:32, 32:] == 0).all()
    assert (out[32:, 32:] == 255).all()
    assert (preprocess("threshold", x, resolution=64, threshold_a=128)[32:, 32:] == 0).all()


# -- scribble (xdog), lineart (standard) ----------------------------------------------


def test_scribble_marks_dark_lines_and_nothing_on_flat_images():
    assert (preprocess("scribble", np.full((64, 64, 3), 180, np.uint8), resolution=64) == 0).all()
    x = np.full((64, 64, 3), 255, np.uint8)
    x[30:33, 8:56] = 0  # a 3-pixel black line
    out = preprocess("scribble", x, resolution=64)[:, :, 0]
    assert set(np.unique(out)) == {0, 255}
    assert (out[31, 12:52] == 255).all()
    assert (out[:20] == 0).all() and (out[44:] == 0).all()


def test_scribble_matches_the_xdog_formula():
    x = noise(64, 64, seed=5)
    f = x.astype(np.float32)
    g1, g2 = cv2.GaussianBlur(f, (0, 0), 0.5), cv2.GaussianBlur(f, (0, 0), 5.0)
    dog = (255 - np.min(g2 - g1, axis=2)).clip(0, 255).astype(np.uint8)
    strength = (255 - dog.astype(np.int64)) * 2 % 256  # uint8 arithmetic, as the reference
    out = preprocess("scribble", x, resolution=64, threshold_a=20)[:, :, 0]
    assert np.array_equal(out == 255, strength > 20)


def test_lineart_is_bright_on_lines_and_dark_elsewhere():
    assert (
        preprocess("lineart_standard", np.full((64, 64, 3), 90, np.uint8), resolution=64) == 0
    ).all()
    x = np.full((64, 64, 3), 255, np.uint8)
    x[:, 31:33] = 0
    out = preprocess("lineart_standard", x, resolution=64)[:, :, 0]
    # Only line pixels are darker than their blur, all by about the same amount, so that
    # amount is the median and maps to 127.
    assert (np.abs(out[:, 31:33].astype(int) - 127) <= 1).all()
    assert (out[:, :20] == 0).all() and (out[:, 44:] == 0).all()


def test_lineart_matches_its_formula():
    x = noise(64, 64, seed=6)
    f = x.astype(np.float64)
    g = cv2.GaussianBlur(x.astype(np.float32), (0, 0), 6.0).astype(np.float64)
    intensity = np.min(g - f, axis=2).clip(0, 255)
    intensity = intensity / max(16, np.median(intensity[intensity > 8])) * 127
    out = preprocess("lineart_standard", x, resolution=64)[:, :, 0].astype(np.float64)
    assert np.abs(out - np.floor(intensity.clip(0, 255))).max() <= 1  # float32 vs float64


# -- tile -----------------------------------------------------------------------------


def test_tile_resample_shrinks_by_the_rate():
    blocks = noise(24, 32, seed=7)
    x = np.repeat(np.repeat(blocks, 2, axis=0), 2, axis=1)  # 48x64 of constant 2x2 blocks
    assert np.array_equal(preprocess("tile", x, threshold_a=2.0), blocks)
    assert np.array_equal(preprocess("tile", x), x)  # default rate 1.0: unchanged
    assert np.array_equal(preprocess("tile", x, threshold_a=1.05), x)  # < 1.1: unchanged
    assert preprocess("tile", x, threshold_a=3.0).shape == (16, 21, 3)  # int(48/3), int(64/3)


# -- settings -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "kwargs", "message"),
    [
        ("canny", {"threshold_a": 0}, "control module 'canny' threshold A (Low Threshold) 0: "
         "expected a whole number in 1..255 (default 100)"),
        ("canny", {"threshold_b": 300}, "control module 'canny' threshold B (High Threshold) "
         "300: expected a whole number in 1..255 (default 200)"),
        ("canny", {"threshold_a": 10.5}, "control module 'canny' threshold A (Low Threshold) "
         "10.5: expected a whole number in 1..255 (default 100)"),
        ("scribble", {"threshold_a": 65}, "control module 'scribble' threshold A (XDoG "
         "Threshold) 65: expected a whole number in 1..64 (default 32)"),
        ("tile", {"threshold_a": 9.0}, "control module 'tile' threshold A (Down Sampling "
         "Rate) 9.0: expected a number in 1..8 (default 1)"),
        ("canny", {"threshold_a": float("nan")}, "control module 'canny' threshold A (Low "
         "Threshold) nan: expected a number"),
        ("canny", {"resolution": 32}, "preprocessor resolution 32: expected a whole number "
         "in 64..2048 (default 512)"),
        ("canny", {"resolution": 4096}, "preprocessor resolution 4096: expected a whole "
         "number in 64..2048 (default 512)"),
    ],
)  # fmt: skip
def test_bad_settings_are_named(module, kwargs, message):
    with pytest.raises(PreprocessorError) as error:
        preprocess(module, noise(16, 16), **kwargs)
    assert str(error.value) == message


def test_unused_sliders_and_resolution_are_ignored():
    x = noise(20, 20, seed=8)
    # The reference's infotexts carry "Threshold A: 0.5" for modules without sliders.
    assert np.array_equal(preprocess("none", x, threshold_a=0.5, threshold_b=0.5), x)
    assert np.array_equal(preprocess("invert", x, resolution=5), 255 - x)
    assert check_resolution(-1) == 512 and check_resolution(None) == 512


def test_extreme_aspect_is_refused():
    with pytest.raises(ControlMapError, match="scaling a 20000x1 image to resolution 512"):
        preprocess("canny", np.zeros((1, 20000, 3), np.uint8))


# -- modules that need weights, unknown names -----------------------------------------


def test_weighted_detectors_name_the_weights_and_the_way_out():
    with pytest.raises(PreprocessorUnavailableError) as error:
        preprocess("openpose", noise(8, 8))
    assert str(error.value) == (
        "control module 'openpose' needs the annotator weights of OpenPose "
        "(body_pose_model.pth, hand_pose_model.pth, facenet.pth), which sdstack does not "
        "download; run this preprocessor elsewhere (e.g. the web UI's ControlNet preview, "
        "then save the map) and pass the map image with module 'none'"
    )


@pytest.mark.parametrize(
    ("module", "needs"),
    [
        ("depth", "MiDaS (dpt_hybrid-midas-501f0c75.pt)"),
        ("depth_midas", "MiDaS"),
        ("depth_zoe", "ZoeDepth"),
        ("hed", "HED (ControlNetHED.pth)"),
        ("softedge_pidinet", "PiDiNet"),
        ("mlsd", "M-LSD"),
        ("lineart_realistic", "the lineart network (sk_model.pth)"),
        ("normal_bae", "NormalBae"),
        ("seg_ofade20k", "OneFormer"),
        ("dw_openpose_full", "DWPose"),
    ],
)
def test_more_weighted_detectors(module, needs):
    with pytest.raises(PreprocessorUnavailableError) as error:
        find_preprocessor(module)
    assert f"needs the annotator weights of {needs}" in str(error.value)


def test_weight_free_but_missing_modules_say_why():
    with pytest.raises(PreprocessorUnavailableError) as error:
        find_preprocessor("reference_only")
    assert str(error.value) == (
        "control module 'reference_only' works inside the reference's UNet hook, not as a "
        "control map, and sdstack does not implement it"
    )
    assert all(
        u.message().startswith("control module ") for u in UNAVAILABLE_PREPROCESSORS.values()
    )


def test_unknown_module_suggests_and_lists_the_runnable_ones():
    with pytest.raises(UnknownPreprocessorError) as error:
        find_preprocessor("cany")
    assert str(error.value) == (
        "unknown control module 'cany'; did you mean 'canny'? expected one of: none, "
        "invert, canny, scribble, threshold, lineart_standard, tile (`sdstack control modules` "
        "lists them and the reference's detectors that need weights)"
    )
    with pytest.raises(UnknownPreprocessorError, match="did you mean 'openpose'"):
        find_preprocessor("openpos")


@settings(max_examples=25, deadline=None)
@given(st.text(max_size=30))
def test_any_module_name_is_found_or_refused_cleanly(name):
    try:
        find_preprocessor(name)
    except (UnknownPreprocessorError, PreprocessorUnavailableError) as error:
        assert "control module" in str(error)


@settings(max_examples=15, deadline=None)
@given(
    st.sampled_from(["canny", "scribble", "threshold", "lineart_standard"]),
    st.integers(1, 50),
    st.integers(1, 50),
    st.integers(64, 160),
)
def test_map_size_is_the_scaled_image(module, h, w, resolution):
    x = noise(h, w, seed=h * 64 + w)
    k = resolution / min(h, w)
    out = preprocess(module, x, resolution=resolution)
    assert out.shape == (round(h * k), round(w * k), 3) and out.dtype == np.uint8


def test_registry_lookup_refuses_weighted_modules_with_the_reason():
    with pytest.raises(PreprocessorUnavailableError, match="needs the annotator weights"):
        PREPROCESSORS["depth"]
    with pytest.raises(UnknownPreprocessorError, match="did you mean 'canny'"):
        PREPROCESSORS["cany"]
    with pytest.raises(UnknownPreprocessorError, match="control module 3: expected a name"):
        PREPROCESSORS.get(3)
    assert "depth" not in PREPROCESSORS and "scribble_xdog" in PREPROCESSORS
