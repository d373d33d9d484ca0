"""`sdstack generate`, `sdstack demo`, `sdstack info` in-process on the tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from sdstack.cli import main
from sdstack.generate import read_infotext

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def model_args(tiny_checkpoint) -> list[str]:
    checkpoint, config = tiny_checkpoint
    return ["--model", str(checkpoint), "--config-dir", str(config)]


def test_generate_then_reproduce_from_infotext(tiny_checkpoint, tmp_path, capsys):
    from sdstack.models.hashes import short_hash

    out = tmp_path / "out"
    code, stdout, _ = cli(
        capsys,
        "generate",
        *model_args(tiny_checkpoint),
        "a (red:1.2) [cat:dog:0.5], sky",
        "--negative",
        "blurry",
        "--steps",
        "3",
        "--size",
        "64x64",
        "--seed",
        "77",
        "--sampler",
        "DPM++ 2M Karras",
        "--clip-skip",
        "2",
        "--out",
        str(out),
    )
    assert code == 0
    first = out / "00000-77.png"
    assert stdout.splitlines() == [str(first)]
    info = read_infotext(first)
    assert info == (
        "a (red:1.2) [cat:dog:0.5], sky\nNegative prompt: blurry\nSteps: 3, Sampler: DPM++ 2M, "
        "Schedule type: Karras, CFG scale: 7, Seed: 77, Size: 64x64, Model hash: "
        f"{short_hash(tiny_checkpoint[0])}, Model: tiny-model, Clip skip: 2, RNG: CPU, "
        "Version: sdstack 0.1.0"
    )
    code, stdout, _ = cli(
        capsys,
        "generate",
        *model_args(tiny_checkpoint),
        "--from-infotext",
        str(first),
        "--out",
        str(out),
    )
    second = out / "00001-77.png"
    assert code == 0 and stdout.splitlines() == [str(second)]
    assert read_infotext(second) == info
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(second)))
    # explicit options override the infotext
    code, stdout, _ = cli(
        capsys,
        "generate",
        *model_args(tiny_checkpoint),
        "--from-infotext",
        str(first),
        "--seed",
        "78",
        "--steps",
        "2",
        "--out",
        str(out),
    )
    assert "Steps: 2, " in read_infotext(out / "00002-78.png")


def test_generate_user_errors(tiny_checkpoint, tmp_path, capsys):
    base = ["generate", *model_args(tiny_checkpoint), "a cat", "--out", str(tmp_path)]
    code, _, err = cli(capsys, *base, "--size", "100x64")
    assert code == 2 and "width must be a multiple of 8, got 100" in err
    code, _, err = cli(capsys, *base, "--size", "big")
    assert code == 2 and "--size must look like 512x512" in err
    code, _, err = cli(capsys, *base, "--sampler", "Euler A2")
    assert code == 2 and "unknown sampler 'Euler A2'; did you mean 'Euler a'" in err
    code, _, err = cli(capsys, "generate", *model_args(tiny_checkpoint), "--out", str(tmp_path))
    assert code == 2 and "give a PROMPT (or - to read it from standard input)" in err
    assert list(tmp_path.iterdir()) == []


def test_demo_and_info(tmp_path, capsys):
    code, stdout, err = cli(
        capsys, "demo", "--out", str(tmp_path), "--steps", "3", "--size", "64x64"
    )
    assert code == 0
    path, *infotext = stdout.splitlines()
    assert path == str(tmp_path / "00000-1.png")
    assert "\n".join(infotext) == read_infotext(path)
    assert "Steps: 3, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 64x64" in infotext[-1]
    assert "3/3" in err  # the progress bar
    code, stdout, _ = cli(capsys, "info", path, "--json")
    parsed = json.loads(stdout)
    assert parsed["Prompt"].startswith("a (red:1.3) [cat:fox:0.5]")
    assert parsed["Size-1"] == "64" and parsed["Model"] == "tiny-random"
    code, stdout, _ = cli(capsys, "info", path)
    assert "Sampler: Euler a" in stdout.splitlines()


def test_info_without_infotext(tmp_path, capsys):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    code, _, err = cli(capsys, "info", str(plain))
    assert code == 2 and "holds no infotext" in err


@pytest.mark.parametrize("command", ["generate", "demo", "info"])
def test_help(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert "usage: sdstack " + command in capsys.readouterr().out


def test_generate_with_embeddings_folder_and_jpeg(tiny_checkpoint, tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "embeddings"
    folder.mkdir()
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    save_file({"emb_params": vectors}, folder / "shiny.safetensors")
    code, stdout, _ = cli(
        capsys,
        "generate",
        *model_args(tiny_checkpoint),
        "a shiny cat",
        "--steps",
        "2",
        "--size",
        "64x64",
        "--seed",
        "5",
        "--embeddings",
        str(folder),
        "--format",
        "jpg",
        "--out",
        str(tmp_path / "out"),
    )
    assert code == 0
    path = stdout.strip()
    assert path.endswith("00000-5.jpg")
    code, stdout, _ = cli(capsys, "info", path, "--json")
    assert json.loads(stdout)["TI hashes"].startswith("shiny: ")


def test_from_infotext_notes_another_model(tiny_checkpoint, tmp_path, capsys):
    from sdstack.generate import save_image

    source = save_image(
        Image.new("RGB", (64, 64)),
        "a cat\nSteps: 2, Sampler: Euler, Seed: 3, Size: 64x64, "
        "Model hash: 0123456789, Model: other-model",
        tmp_path,
        seed=3,
    )
    code, stdout, err = cli(
        capsys,
        "generate",
        *model_args(tiny_checkpoint),
        "--from-infotext",
        str(source),
        "--out",
        str(tmp_path / "out"),
    )
    assert code == 0 and stdout.strip().endswith("00000-3.png")
    assert "the infotext names model other-model (0123456789); generating with tiny-model" in err
    assert "RNG: GPU (sdstack draws noise on the CPU (RNG: CPU), so the picture will differ)" in err


def test_pad_conds_flag_lands_in_infotext_and_reproduces(tiny_checkpoint, tmp_path, capsys):
    """Prompt longer than 75 tokens, short negative: --pad-conds pads (reference option
    "Pad prompt/negative prompt"), writes ``Pad conds: True``, and --from-infotext keeps it."""
    out = tmp_path / "out"
    prompt = ", ".join(["a red cat"] * 30)
    base = ["generate", *model_args(tiny_checkpoint), "--out", str(out)]
    opts = ["--negative", "blurry", "--steps", "2", "--size", "64x64", "--seed", "9"]
    code, stdout, _ = cli(capsys, *base, prompt, *opts, "--pad-conds")
    assert code == 0
    first = stdout.strip()
    info = read_infotext(first)
    assert info.endswith("RNG: CPU, Pad conds: True, Version: sdstack 0.1.0")
    code, stdout, _ = cli(capsys, *base, "--from-infotext", first)
    assert code == 0 and read_infotext(stdout.strip()) == info
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(stdout.strip())))
    code, stdout, _ = cli(capsys, *base, "--from-infotext", first, "--no-pad-conds")
    assert code == 0 and "Pad conds" not in read_infotext(stdout.strip())
