"""Token merging and VAE tiling as job settings: checked, applied only while sampling /
decoding, recorded (token merging) in the infotext as the reference writes it."""

from __future__ import annotations

import numpy as np
import pytest

from sdstack.generate import GenerationJob, GenerationParams, generate
from sdstack.generate.infotext import parse_infotext
from sdstack.generate.params import check_inputs
from sdstack.generate.token_merging import token_merging_ratio
from sdstack.validate import SettingError


def params(**changes) -> GenerationParams:
    return GenerationParams("a cat", steps=2, width=64, height=64, seed=3, **changes)


def test_token_merging_is_on_during_every_unet_call_and_off_after(tiny_components):
    seen = []

    def record(call):
        seen.append(token_merging_ratio(tiny_components.unet))
        return call

    result = generate(tiny_components, params(token_merging=0.5), hooks=[record])[0]
    assert seen and set(seen) == {0.5}
    assert token_merging_ratio(tiny_components.unet) == 0.0
    assert parse_infotext(result.infotext)["Token merging ratio"] == "0.5"


def test_token_merging_round_trips_through_the_infotext(tiny_components):
    result = generate(tiny_components, params(token_merging=0.3))[0]
    again = GenerationJob.from_infotext(result.infotext)
    assert again.params.token_merging == 0.3
    assert not again.unhonoured
    plain = generate(tiny_components, params())[0]
    assert "Token merging ratio" not in parse_infotext(plain.infotext)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"token_merging": 1.5}, "token_merging must be between 0 and 0.9 (0 = off), got 1.5"),
        ({"token_merging": -0.1}, "token_merging must be between 0 and 0.9 (0 = off)"),
        ({"vae_tiling": "maybe"}, "vae_tiling: unknown VAE tiling mode 'maybe'"),
        ({"vae_tiling": 1}, "vae_tiling must be auto, on or off, got 1"),
    ],
)
def test_bad_speed_settings_are_named(changes, message):
    with pytest.raises(SettingError) as error:
        check_inputs(params(**changes))
    assert message in str(error.value)


@pytest.mark.parametrize(("mode", "tiled"), [("on", True), ("off", False), ("auto", False)])
def test_vae_tiling_mode_decides_the_decode(tiny_components, monkeypatch, mode, tiled):
    import sdstack.generate.vae_tiling as vae_tiling

    calls = []
    original = vae_tiling.tiled_decode

    def spy(*args, **kwargs):
        calls.append(args[1].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(vae_tiling, "tiled_decode", spy)
    untiled = generate(tiny_components, params(vae_tiling="off"))[0]
    calls.clear()
    result = generate(tiny_components, params(vae_tiling=mode))[0]
    assert bool(calls) is tiled
    # A 64x64 image is one tile (8x8 latents < the 64-latent tile): the same pixels.
    assert np.array_equal(np.asarray(result.image), np.asarray(untiled.image))
    assert "tiling" not in result.infotext.lower()


def test_cli_token_merging_and_tiling_options(capsys, tiny_checkpoint, tmp_path, monkeypatch):
    from sdstack.cli import main
    from sdstack.generate import read_infotext

    monkeypatch.setenv("SDSTACK_CACHE_DIR", str(tmp_path / "cache"))
    checkpoint, config = tiny_checkpoint
    base = ["generate", "--model", str(checkpoint), "--config-dir", str(config), "--quiet",
            "--steps", "2", "--size", "64x64", "--seed", "5"]  # fmt: skip
    assert main([*base, "a cat", "--token-merging", "0.3", "--vae-tiling", "on",
                 "--out", str(tmp_path / "a")]) == 0  # fmt: skip
    image = capsys.readouterr().out.strip()
    assert parse_infotext(read_infotext(image))["Token merging ratio"] == "0.3"
    assert main([*base, "--from-infotext", image, "--out", str(tmp_path / "b")]) == 0
    again = capsys.readouterr().out.strip()
    assert np.array_equal(np.asarray(_open(image)), np.asarray(_open(again)))
    assert main([*base, "a cat", "--token-merging", "2", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "sdstack: error: --token-merging must be between 0 and 0.9 (0 = off), got 2" in err
    assert main([*base, "a cat", "--vae-tiling", "of", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "--vae-tiling: unknown VAE tiling mode 'of'; did you mean 'off'" in err


def _open(path):
    from PIL import Image

    return Image.open(path).convert("RGB")
