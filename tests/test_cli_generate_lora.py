"""`sdstack generate` with LoRAs: prompt tags with lbw=, --lora, --lora-dir, --root,
--from-infotext by name and by hash, --clip-skip auto, errors before loading."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdstack.cli import main
from sdstack.generate import read_infotext
from sdstack.lora.tiny import write_tiny_lora

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

PROMPT = "a cat <lora:film:0.8>, <lora:detail:1:0.5:lbw=MIDD>"


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def webui(tmp_path, tiny_components, monkeypatch):
    """A web-UI root with two tiny LoRAs in models/Lora (detail trained at clip skip 2)."""
    monkeypatch.setenv("SDSTACK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("SDSTACK_ROOT", raising=False)
    root = tmp_path / "webui"
    write_tiny_lora(tiny_components, root / "models/Lora/film.safetensors", seed=1)
    write_tiny_lora(tiny_components, root / "models/Lora/detail.safetensors", seed=2, clip_skip=2)
    return root


def generate(capsys, tiny_checkpoint, out, *options: str) -> tuple[int, str, str]:
    checkpoint, config = tiny_checkpoint
    return cli(
        capsys, "generate", "--model", str(checkpoint), "--config-dir", str(config),
        "--steps", "3", "--size", "64x64", "--seed", "5", "--out", str(out), "--quiet",
        *options,
    )  # fmt: skip


def shared_image(folder, text: str, image) -> str:
    """``image`` saved with the infotext ``text``, as someone would share it."""
    from PIL.PngImagePlugin import PngInfo

    png = PngInfo()
    png.add_text("parameters", text)
    image.save(folder / "shared.png", pnginfo=png)
    return str(folder / "shared.png")


def from_infotext(capsys, tiny_checkpoint, out, image, root) -> tuple[int, str, str]:
    return generate(capsys, tiny_checkpoint, out, "--from-infotext", image, "--root", str(root))


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_tags_with_lbw_generate_and_the_infotext_reproduces_them(
    webui, tiny_checkpoint, tmp_path, capsys
):
    from sdstack.models.library import lora_sha256

    code, _stdout, stderr = generate(
        capsys, tiny_checkpoint, tmp_path / "a", PROMPT, "--root", str(webui)
    )
    assert code == 0, stderr
    first = tmp_path / "a" / "00000-5.png"
    info = read_infotext(first)
    film, detail = (
        lora_sha256(webui / f"models/Lora/{n}.safetensors")[:12] for n in ("film", "detail")
    )
    assert info.startswith(PROMPT + "\n")
    assert f'Lora hashes: "film: {film}, detail: {detail}"' in info
    # detail was trained at clip skip 2: said once, naming it.
    advice = "clip skip 1 is in use, but LoRA(s) were trained with another: detail at 2"
    assert f"sdstack: warning: {advice}" in stderr
    code, _, stderr = generate(
        capsys, tiny_checkpoint, tmp_path / "b", "--from-infotext", str(first), "--root", str(webui)
    )
    assert code == 0, stderr
    assert np.array_equal(pixels(first), pixels(tmp_path / "b" / "00000-5.png"))
    # Without the LoRAs the picture differs (they were applied).
    code, _, _ = generate(capsys, tiny_checkpoint, tmp_path / "c", "a cat, ")
    assert not np.array_equal(pixels(first), pixels(tmp_path / "c" / "00000-5.png"))


def test_a_name_no_file_has_is_found_by_its_hash(webui, tiny_checkpoint, tmp_path, capsys):
    code, _, _ = generate(capsys, tiny_checkpoint, tmp_path / "a", PROMPT, "--root", str(webui))
    first = tmp_path / "a" / "00000-5.png"
    # The image as shared by someone whose file is called film_old: tag and hash say so.
    text = read_infotext(first).replace("film", "film_old")
    shared = shared_image(tmp_path, text, Image.open(first))
    code, _, stderr = from_infotext(capsys, tiny_checkpoint, tmp_path / "b", shared, webui)
    assert code == 0, stderr  # the hash was computed when the first image was made
    assert np.array_equal(pixels(first), pixels(tmp_path / "b" / "00000-5.png"))


def test_names_found_neither_way_are_listed(webui, tiny_checkpoint, tmp_path, capsys):
    text = (
        "a <lora:gone:1> <lora:film:1> <lora:lost:1>\nSteps: 3, Seed: 5, Size: 64x64, "
        'Lora hashes: "gone: 0123456789ab, film: 111111111111"'
    )
    shared = shared_image(tmp_path, text, Image.new("RGB", (8, 8)))
    code, _, stderr = from_infotext(capsys, tiny_checkpoint, tmp_path / "b", shared, webui)
    assert code == 2
    warning, error = stderr.splitlines()
    # film is found by name, but it is not the file the infotext's hash names: said so.
    assert warning.startswith("sdstack: warning: LoRA film: the infotext's hash is 1111111")
    assert error.startswith(
        "sdstack: error: could not find 2 LoRA(s) by name or hash: gone (hash 0123456789ab), "
        "lost; searched in "
    )
    assert "run `sdstack models list --hashes` once" in stderr


def test_lora_option_is_written_as_a_tag(webui, tiny_checkpoint, tmp_path, capsys):
    folder = webui / "models/Lora"
    code, _, stderr = generate(
        capsys, tiny_checkpoint, tmp_path / "a", "a cat", "--lora-dir", str(folder),
        "--lora", "film:0.5", "--lora", f"{folder / 'detail.safetensors'}:1:0.25",
    )  # fmt: skip
    assert code == 0, stderr
    info = read_infotext(tmp_path / "a" / "00000-5.png")
    assert info.startswith("a cat <lora:film:0.5> <lora:detail:1:0.25>\n")
    # The written tags reproduce the image by themselves.
    code, _, stderr = generate(
        capsys, tiny_checkpoint, tmp_path / "b",
        "--from-infotext", str(tmp_path / "a" / "00000-5.png"), "--lora-dir", str(folder),
    )  # fmt: skip
    assert code == 0, stderr
    assert np.array_equal(pixels(tmp_path / "a/00000-5.png"), pixels(tmp_path / "b/00000-5.png"))


def test_clip_skip_auto_takes_the_trained_value(webui, tiny_checkpoint, tmp_path, capsys):
    code, _, stderr = generate(
        capsys, tiny_checkpoint, tmp_path / "a", "a cat <lora:detail:1>", "--root", str(webui),
        "--clip-skip", "auto",
    )  # fmt: skip
    assert code == 0, stderr
    assert "warning" not in stderr
    assert "Clip skip: 2" in read_infotext(tmp_path / "a" / "00000-5.png")


@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr("sdstack.models.load_model", refuse)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["a <lora:flim:1>"], "no LoRA named 'flim' in "),
        (["a", "--lora", "film:x"], "--lora 'film:x': 'x' is not a multiplier"),
        (["a", "--lora", "film:1e6"], "--lora film:1e6: multiplier: '1e6' is not a multiplier"),
        (["a <lora:film:1:lbw=1,2>"], "lbw='1,2': 2 values; expected 17"),
        (["a", "--lora-dir", "nowhere"], "--lora-dir 'nowhere': not a folder"),
    ],
)
def test_bad_loras_fail_before_loading(
    webui, tiny_checkpoint, tmp_path, capsys, no_loading, options, message
):
    code, _, stderr = generate(
        capsys, tiny_checkpoint, tmp_path / "a", *options, "--root", str(webui)
    )
    assert code == 2
    assert stderr.startswith("sdstack: error: ") and message in stderr, stderr
