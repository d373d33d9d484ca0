"""Control images: reading files (and refusing bad ones), the whole map path, the tensor.

Truths: pixels written to files here and read back; the composition of the steps the
spec lists (preprocess, then detectmap_proc) called one by one; ``map / 255`` in
float64 for the tensor.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sdstack.control.images import (
    ControlImageError,
    control_map,
    control_tensor,
    image_array,
    read_control_image,
)
from sdstack.control.preprocessors import PreprocessorUnavailableError, preprocess
from sdstack.control.resize import ControlMapError, UnknownResizeModeError, resize_control_map
from sdstack.generate.images import ImageFileError


def noise(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    shape = (height, width, channels) if channels > 1 else (height, width)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def write(path, array, **kwargs):
    Image.fromarray(array).save(path, **kwargs)
    return path


# -- reading --------------------------------------------------------------------------


def test_reads_rgb_gray_and_rgba(tmp_path):
    rgb, gray, rgba = noise(10, 12), noise(10, 12, 1, seed=1), noise(10, 12, 4, seed=2)
    read = read_control_image(write(tmp_path / "rgb.png", rgb))
    assert read.mode == "RGB" and np.array_equal(np.asarray(read), rgb)
    assert np.array_equal(np.asarray(read_control_image(write(tmp_path / "g.png", gray))), gray)
    got = read_control_image(write(tmp_path / "a.png", rgba))
    assert got.mode == "RGBA" and np.array_equal(np.asarray(got), rgba)


def test_sixteen_bit_gray_is_scaled_to_eight_bits(tmp_path):
    values = np.array([[0, 257, 32768], [65535, 1000, 128]], dtype=np.uint16)
    path = tmp_path / "depth16.png"
    Image.fromarray(values).save(path)
    read = read_control_image(path)
    assert read.mode == "L"
    assert np.array_equal(np.asarray(read), np.rint(values / 257).astype(np.uint8))


def test_palette_with_transparency_becomes_rgba(tmp_path):
    image = Image.new("P", (4, 4), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.putpixel((0, 0), 1)
    path = tmp_path / "p.png"
    image.save(path, transparency=0)
    read = read_control_image(path)
    assert read.mode == "RGBA"
    assert read.getpixel((0, 0)) == (0, 0, 255, 255) and read.getpixel((1, 1))[3] == 0
    # Composited on white: transparent pixels are white.
    assert tuple(image_array(read)[1, 1]) == (255, 255, 255)


def test_cmyk_becomes_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 0, 0, 0)).save(path)
    read = read_control_image(path)
    assert read.mode == "RGB" and (np.asarray(read) > 240).all()  # no ink: white


def test_animated_gif_gives_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    read = read_control_image(path)
    assert read.convert("RGB").getpixel((3, 3)) == (255, 0, 0)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: p, "no such file"),
        (lambda p: (p.mkdir(), p)[1], "is a folder, expected an image file"),
        (lambda p: (p.write_text("hello"), p)[1], "is not an image file Pillow can read"),
        (lambda p: (p.write_bytes(b""), p)[1], "is not an image file Pillow can read"),
    ],
)
def test_unreadable_files_are_named(tmp_path, make, reason):
    path = make(tmp_path / "in.png")
    with pytest.raises(ControlImageError) as error:
        read_control_image(path, option="--control-image")
    assert str(error.value) == f"--control-image {str(path)!r}: {reason}"
    assert isinstance(error.value, ImageFileError)


def test_truncated_png_fails_on_read(tmp_path):
    path = write(tmp_path / "t.png", noise(64, 64))
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ControlImageError, match="is truncated or corrupt"):
        read_control_image(path)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_is_refused_before_decoding(tmp_path, monkeypatch):
    path = write(tmp_path / "big.png", np.zeros((100, 100, 3), np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow raises over 2x
    for size in (100, 40):  # 10000 px: Pillow's own bomb error; 1600 px: our check
        path = write(tmp_path / f"big{size}.png", np.zeros((size, size, 3), np.uint8))
        with pytest.raises(ControlImageError, match="declares more than 1000 pixels"):
            read_control_image(path)


def test_absurd_sides_are_refused(tmp_path):
    path = write(tmp_path / "strip.png", np.zeros((1, 20000), np.uint8))
    with pytest.raises(ControlImageError) as error:
        read_control_image(path)
    assert str(error.value) == (
        f"control image {str(path)!r}: is 20000x1 pixels; expected sides of 1..16384 "
        "(crop or scale it first)"
    )


def test_float_images_are_refused(tmp_path):
    path = tmp_path / "f.tiff"
    Image.fromarray(np.full((4, 4), 0.5, np.float32)).save(path)
    with pytest.raises(
        ControlImageError, match=r"has mode F \(32-bit float\), which has no 8-bit RGB form"
    ):
        read_control_image(path)


# -- arrays ---------------------------------------------------------------------------


def test_image_array_from_path_pil_and_array(tmp_path):
    x = noise(6, 9, seed=3)
    path = write(tmp_path / "x.png", x)
    for source in (path, str(path), Image.open(path), x):
        assert np.array_equal(image_array(source), x)


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (np.zeros((4, 4, 3), np.float64), "dtype float64; expected uint8"),
        (np.zeros((4, 4, 5), np.uint8), "expected H x W"),
        ([[1, 2]], "control image of type list"),
    ],
)
def test_bad_arrays(value, error):
    with pytest.raises(ControlMapError, match=error):
        image_array(value)


# -- the whole path, the tensor -------------------------------------------------------


def test_control_map_is_preprocess_then_detectmap(tmp_path):
    x = noise(90, 120, seed=4)
    path = write(tmp_path / "x.png", x)
    expected = resize_control_map(
        preprocess("canny", x, resolution=128, threshold_a=80, threshold_b=160), 100, 70, 1
    )
    got = control_map(
        path, module="canny", width=100, height=70, resize_mode="Crop and Resize",
        resolution=128, threshold_a=80, threshold_b=160,
    )  # fmt: skip
    assert got.shape == (64, 96, 3) and np.array_equal(got, expected)


def test_control_map_checks_cheap_things_before_reading(tmp_path):
    missing = tmp_path / "missing.png"
    with pytest.raises(UnknownResizeModeError):
        control_map(missing, module="none", width=64, height=64, resize_mode="stretch")
    with pytest.raises(ControlMapError, match="width 4"):
        control_map(missing, module="none", width=4, height=64, resize_mode=0)
    with pytest.raises(PreprocessorUnavailableError):
        control_map(noise(8, 8), module="depth", width=64, height=64, resize_mode=0)


def test_transparent_control_image_is_white(tmp_path):
    rgba = np.zeros((16, 16, 4), np.uint8)  # fully transparent black
    path = write(tmp_path / "t.png", rgba)
    assert (control_map(path, module="none", width=16, height=16, resize_mode=0) == 255).all()


def test_control_tensor_is_map_over_255_in_nchw():
    x = noise(16, 24, seed=5)
    tensor = control_tensor(x)
    assert tensor.dtype == torch.float32 and tensor.shape == (1, 3, 16, 24)
    truth = torch.from_numpy(x.astype(np.float64) / 255).permute(2, 0, 1)[None]
    # float32(v) / 255 is the float32 nearest v / 255: within half an ulp of 1.
    assert torch.allclose(tensor.double(), truth, rtol=0, atol=2**-25)
    assert tensor[0, :, 3, 7].tolist() == [float(np.float32(v) / np.float32(255)) for v in x[3, 7]]


def test_control_tensor_of_gray_repeats_channels():
    gray = noise(8, 8, 1, seed=6)
    tensor = control_tensor(gray)
    assert torch.equal(tensor[0, 0], tensor[0, 2]) and tensor.shape == (1, 3, 8, 8)
