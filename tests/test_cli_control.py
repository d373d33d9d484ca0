"""``sdstack control preview|modules`` in-process: help, the written map, pinned errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from sdstack.cli import main
from sdstack.control.images import control_map
from sdstack.control.preprocessors import preprocess


def error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture
def image(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    pixels[20:70, 30:90] = 255 - pixels[20:70, 30:90] // 4  # a bright block: real edges
    path = tmp_path / "in.png"
    Image.fromarray(pixels).save(path)
    return path


@pytest.mark.parametrize("command", [[], ["preview"], ["modules"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as done:
        main(["control", *command, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: sdstack control {' '.join(command)}".rstrip())
    if not command:
        assert "preview" in out and "modules" in out


def test_control_without_a_command_prints_help(capsys):
    assert main(["control"]) == 2
    assert capsys.readouterr().out.startswith("usage: sdstack control")


def test_preview_writes_the_preprocessor_map(image, tmp_path, capsys):
    out = tmp_path / "edges.png"
    assert main(["control", "preview", str(image), "--module", "canny", "-o", str(out)]) == 0
    assert capsys.readouterr().out == f"{out}\n"
    written = np.asarray(Image.open(out))
    pixels = np.asarray(Image.open(image))
    assert np.array_equal(written, preprocess("canny", pixels, resolution=512))
    assert written.shape == (512, 683, 3)  # short side 90 -> 512


def test_preview_with_size_is_the_generation_map(image, tmp_path, capsys):
    out = tmp_path / "edges.png"
    args = ["control", "preview", str(image), "-m", "canny", "--low", "50", "--high", "120"]
    args += ["--resolution", "128", "--size", "100x70", "--resize-mode", "Resize and Fill"]
    assert main([*args, "-o", str(out)]) == 0
    expected = control_map(
        image, module="canny", width=100, height=70, resize_mode=2, resolution=128,
        threshold_a=50, threshold_b=120,
    )  # fmt: skip
    assert np.array_equal(np.asarray(Image.open(out)), expected)
    assert expected.shape == (64, 96, 3)


def test_preview_threshold_options(image, tmp_path):
    out = tmp_path / "tile.png"
    args = ["control", "preview", str(image), "-m", "tile_resample", "--threshold-a", "2"]
    assert main([*args, "-o", str(out)]) == 0
    assert Image.open(out).size == (60, 45)


def test_existing_output_needs_overwrite(image, tmp_path, capsys):
    out = tmp_path / "edges.png"
    out.write_bytes(b"old")
    args = ["control", "preview", str(image), "-m", "invert", "-o", str(out)]
    assert main(args) == 2
    assert error_line(capsys) == (
        f"sdstack: error: -o {out}: file exists; choose a new name (or --overwrite)"
    )
    assert out.read_bytes() == b"old"
    assert main([*args, "--overwrite"]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), 255 - np.asarray(Image.open(image)))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


def test_the_input_is_never_overwritten(image, capsys):
    before = image.read_bytes()
    args = ["control", "preview", str(image), "-m", "invert", "-o", str(image), "--overwrite"]
    assert main(args) == 2
    assert error_line(capsys) == (
        f"sdstack: error: -o {image}: is the input image; write the map to a new file"
    )
    assert image.read_bytes() == before


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["-m", "openpose"], "control module 'openpose' needs the annotator weights of "
         "OpenPose (body_pose_model.pth, hand_pose_model.pth, facenet.pth), which sdstack "
         "does not download; run this preprocessor elsewhere (e.g. the web UI's ControlNet "
         "preview, then save the map) and pass the map image with module 'none'"),
        (["-m", "scribble", "--low", "3"], "--low/--high are canny's thresholds; for module "
         "'scribble' use --threshold-a/--threshold-b (its sliders: A = XDoG Threshold)"),
        (["-m", "canny", "--low", "3", "--threshold-a", "4"], "give --low/--high or "
         "--threshold-a/--threshold-b, not both"),
        (["-m", "tile", "--threshold-b", "3"], "--threshold-b: module 'tile' has no such "
         "slider (its sliders: A = Down Sampling Rate)"),
        (["-m", "none", "--threshold-a", "3"], "--threshold-a: module 'none' has no such "
         "slider (it has no sliders)"),
        (["-m", "canny", "--resize-mode", "fill"], "--resize-mode needs --size WxH (the "
         "job size to resize to)"),
        (["-m", "canny", "--size", "100"], "--size must look like 512x512 (WIDTHxHEIGHT), "
         "got '100'"),
        (["-m", "canny", "--size", "64x64", "--resize-mode", "stretch"], "unknown resize "
         "mode 'stretch'; expected one of: Just Resize, Crop and Resize, Resize and Fill"),
        (["-m", "canny", "--high", "256"], "control module 'canny' threshold B (High "
         "Threshold) 256.0: expected a whole number in 1..255 (default 200)"),
        (["-m", "canny", "--resolution", "16"], "preprocessor resolution 16: expected a "
         "whole number in 64..2048 (default 512)"),
        (["-m", "cany"], "unknown control module 'cany'; did you mean 'canny'? expected "
         "one of: none, invert, canny, scribble, threshold, lineart_standard, tile "
         "(`sdstack control modules` lists them and the reference's detectors that need weights)"),
    ],
)  # fmt: skip
def test_preview_errors(image, tmp_path, capsys, extra, message):
    out = tmp_path / "map.png"
    assert main(["control", "preview", str(image), *extra, "-o", str(out)]) == 2
    assert error_line(capsys) == f"sdstack: error: {message}"
    assert not out.exists()


def test_preview_output_name_and_input_errors(image, tmp_path, capsys):
    out = str(tmp_path / "x.png")
    gif = tmp_path / "x.gif"
    assert main(["control", "preview", str(image), "-m", "canny", "-o", str(gif)]) == 2
    assert error_line(capsys) == (
        f"sdstack: error: -o {gif}: expected a .png, .webp or .jpg file name"
    )
    missing = tmp_path / "none.png"
    assert main(["control", "preview", str(missing), "-m", "canny", "-o", out]) == 2
    assert error_line(capsys) == f"sdstack: error: IMAGE {str(missing)!r}: no such file"
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    assert main(["control", "preview", str(text), "-m", "canny", "-o", out]) == 2
    assert error_line(capsys) == (
        f"sdstack: error: IMAGE {str(text)!r}: is not an image file Pillow can read"
    )


def test_preview_into_a_missing_folder_creates_it(image, tmp_path):
    out = tmp_path / "new" / "edges.webp"
    assert main(["control", "preview", str(image), "-m", "threshold", "-o", str(out)]) == 0
    assert Image.open(out).format == "WEBP"


def test_modules_lists_runnable_and_weighted(capsys):
    assert main(["control", "modules"]) == 0
    out = capsys.readouterr().out
    assert "  canny: cv2.Canny edges; A: Low Threshold 1..255 (default 100); B: High " in out
    assert "  scribble [scribble_xdog]: " in out
    assert "  depth_midas: MiDaS (dpt_hybrid-midas-501f0c75.pt)\n" in out
    assert "Reference modules not implemented:\n" in out and "  reference_only\n" in out


def test_modules_json(capsys):
    assert main(["control", "modules", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    names = [m["name"] for m in listing["modules"]]
    assert names == ["none", "invert", "canny", "scribble", "threshold", "lineart_standard", "tile"]
    canny = listing["modules"][2]
    assert canny["threshold_a"] == {
        "label": "Low Threshold", "default": 100, "minimum": 1, "maximum": 255,
    }  # fmt: skip
    openpose = next(u for u in listing["unavailable"] if u["name"] == "openpose")
    assert "body_pose_model.pth" in openpose["needs_weights"]
