"""`sdstack generate --control`: canny on the tiny model, infotext, --from-infotext with
--control-image, two units, control modes, errors before loading."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from sdstack.cli import main
from sdstack.control.tiny import write_tiny_controlnet
from sdstack.generate import read_infotext
from sdstack.generate.infotext import parse_infotext

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def webui(tmp_path, monkeypatch):
    """A web-UI root with a tiny ControlNet under models/ControlNet, and a drawn photo."""
    monkeypatch.setenv("SDSTACK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("SDSTACK_ROOT", raising=False)
    root = tmp_path / "webui"
    write_tiny_controlnet(root / "models/ControlNet/control_v11p_sd15_canny.safetensors", seed=1)
    write_tiny_controlnet(root / "models/ControlNet/tiny_scribble.safetensors", seed=2)
    photo = Image.new("RGB", (96, 64), "white")
    draw = ImageDraw.Draw(photo)
    draw.ellipse((20, 10, 60, 50), fill="red")
    draw.rectangle((60, 30, 90, 60), fill="blue")
    photo.save(tmp_path / "photo.png")
    return root, tmp_path / "photo.png"


def generate(capsys, tiny_checkpoint, out, *options: str) -> tuple[int, str, str]:
    checkpoint, config = tiny_checkpoint
    return cli(
        capsys, "generate", "--model", str(checkpoint), "--config-dir", str(config),
        "--steps", "3", "--size", "64x64", "--seed", "5", "--out", str(out), "--quiet",
        *options,
    )  # fmt: skip


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_canny_unit_changes_the_image_and_is_recorded(capsys, tiny_checkpoint, webui, tmp_path):
    root, photo = webui
    code, out, err = generate(
        capsys, tiny_checkpoint, tmp_path / "a", "a cat", "--root", str(root),
        "--control", f"canny:control_v11p_sd15_canny:{photo}:0.8:0:0.5",
    )  # fmt: skip
    assert code == 0, err
    image = out.strip()
    info = parse_infotext(read_infotext(image))
    value = info["ControlNet 0"]
    assert value.startswith("Module: canny, Model: control_v11p_sd15_canny [")
    assert value.endswith(
        "], Weight: 0.8, Resize Mode: Crop and Resize, Processor Res: 512, Threshold A: 100, "
        "Threshold B: 200, Guidance Start: 0, Guidance End: 0.5, Pixel Perfect: False, "
        "Control Mode: Balanced"
    )
    code, plain, err = generate(capsys, tiny_checkpoint, tmp_path / "b", "a cat")
    assert code == 0, err
    assert not np.array_equal(pixels(image), pixels(plain.strip()))


def test_from_infotext_needs_and_takes_the_control_image(capsys, tiny_checkpoint, webui, tmp_path):
    root, photo = webui
    code, out, err = generate(
        capsys, tiny_checkpoint, tmp_path / "a", "a cat", "--root", str(root),
        "--control", f"canny:control_v11p_sd15_canny:{photo}",
        "--control", f"invert:tiny_scribble:{photo}:0.5",
        "--control-mode", "ControlNet is more important",
    )  # fmt: skip
    assert code == 0, err
    first = out.strip()
    info = parse_infotext(read_infotext(first))
    assert info["ControlNet 1"].startswith("Module: invert (from white bg & black line), ")
    assert info["ControlNet 1"].endswith("Control Mode: ControlNet is more important")
    code, _out, err = generate(
        capsys, tiny_checkpoint, tmp_path / "b", "--from-infotext", first, "--root", str(root)
    )
    assert code == 2
    assert "the control image is not part of an infotext: pass --control-image" in err
    code, out, err = generate(
        capsys, tiny_checkpoint, tmp_path / "c", "--from-infotext", first, "--root", str(root),
        "--control-image", str(photo), "--control-image", str(photo),
    )  # fmt: skip
    assert code == 0, err
    assert np.array_equal(pixels(first), pixels(out.strip()))
    assert read_infotext(first) == read_infotext(out.strip())


@pytest.mark.parametrize(
    ("control", "message"),
    [
        ("canny:nosuch_model:{photo}", "nosuch_model"),
        ("canny:control_v11p_sd15_canny:{missing}", "missing.png"),
        ("openpose:control_v11p_sd15_canny:{photo}", "needs the annotator weights"),
        ("cany:control_v11p_sd15_canny:{photo}", "did you mean 'canny'"),
        ("canny:control_v11p_sd15_canny:{photo}:3", "weight must be between 0 and 2"),
        ("canny:control_v11p_sd15_canny:{photo}:1:0.7:0.2", "guidance start 0.7 is after"),
        ("canny:control_v11p_sd15_canny:{text}", "not an image"),
    ],
)
def test_bad_units_fail_before_loading(capsys, tiny_checkpoint, webui, tmp_path, control, message):
    root, photo = webui
    (tmp_path / "notes.png").write_text("hello")
    control = control.format(
        photo=photo, missing=tmp_path / "missing.png", text=tmp_path / "notes.png"
    )
    code, _out, err = cli(
        capsys, "generate", "--model", str(tmp_path / "no-model.safetensors"), "a cat",
        "--root", str(root), "--control", control, "--out", str(tmp_path / "o"),
    )  # fmt: skip
    assert code == 2
    assert err.startswith("sdstack: error: ") and message in err
    assert "Traceback" not in err


def test_a_foreign_controlnet_file_is_named(capsys, tiny_checkpoint, webui, tmp_path):
    _root, photo = webui
    checkpoint, _config = tiny_checkpoint
    code, _out, err = generate(
        capsys, tiny_checkpoint, tmp_path / "o", "a cat",
        "--control", f"canny:{checkpoint}:{photo}",
    )  # fmt: skip
    assert code == 2 and err.startswith("sdstack: error: ")
    assert "ControlNet" in err
