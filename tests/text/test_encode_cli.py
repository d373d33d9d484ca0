"""``sdstack encode``: file contents equal PromptEncoder, diffusers accepts them, no overwrite."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from sdstack.cli import main
from sdstack.text import EMPHASIS_MODES, PromptEncoder

PROMPT = "a (red:1.2) fox, " + "tree, " * 40
NEGATIVE = "blurry"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_text_encoder):
    from sdstack.prompt.tokenizer import tokenizer_dir

    root = tmp_path_factory.mktemp("encode") / "tiny-model"
    tiny_text_encoder.save_pretrained(root / "text_encoder")
    shutil.copytree(tokenizer_dir(), root / "tokenizer")
    return root


def _run(capsys, *argv):
    code = main(["encode", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_encode_writes_prompt_embeds_equal_to_prompt_encoder(
    tmp_path, capsys, model_dir, tiny_text_encoder, tokenizer
):
    from safetensors import safe_open

    out = tmp_path / "cond.safetensors"
    argv = [PROMPT, "--model", str(model_dir), "--negative", NEGATIVE, "--clip-skip", "2"]
    code, stdout, _ = _run(capsys, *argv, "--emphasis", "comfy", "--out", str(out))
    assert code == 0
    assert "wrote" in stdout and "2 chunk(s)" in stdout
    cond, uncond = PromptEncoder(tiny_text_encoder, tokenizer).encode_pair(
        PROMPT, NEGATIVE, clip_skip=2, emphasis="comfy"
    )
    with safe_open(str(out), framework="pt") as handle:
        assert sorted(handle.keys()) == ["negative_prompt_embeds", "prompt_embeds"]
        torch.testing.assert_close(handle.get_tensor("prompt_embeds"), cond.tensor)
        torch.testing.assert_close(handle.get_tensor("negative_prompt_embeds"), uncond.tensor)
        metadata = handle.metadata()
    assert metadata["prompt"] == PROMPT
    assert metadata["negative_prompt"] == NEGATIVE
    assert (metadata["clip_skip"], metadata["emphasis"], metadata["chunks"]) == ("2", "comfy", "2")
    assert json.loads(metadata["embeddings_used"]) == []
    assert [p.name for p in tmp_path.iterdir()] == ["cond.safetensors"]  # no temp file left


def test_refuses_to_overwrite(tmp_path, capsys, model_dir):
    out = tmp_path / "taken.safetensors"
    out.write_bytes(b"keep me")
    code, _, err = _run(capsys, "a cat", "--model", str(model_dir), "--out", str(out))
    assert code == 2
    assert "already exists; choose a new file name" in err
    assert out.read_bytes() == b"keep me"


def test_bad_arguments_are_reported(tmp_path, capsys, model_dir):
    out = str(tmp_path / "x.safetensors")
    code, _, err = _run(capsys, "a", "--model", str(model_dir), "--emphasis", "comfi", "--out", out)
    assert code == 2 and "did you mean 'comfy'?" in err
    code, _, err = _run(capsys, "a", "--model", str(model_dir), "--clip-skip", "9", "--out", out)
    assert code == 2 and "clip_skip must be between 1 and 5 (this text encoder has 5 layers" in err
    code, _, err = _run(capsys, "a", "--model", str(tmp_path / "missing"), "--out", out)
    assert code == 2 and "does not exist" in err


def test_diffusers_pipeline_accepts_the_file(tmp_path, capsys, model_dir, tiny_components):
    from safetensors.torch import load_file

    out = tmp_path / "fox.safetensors"
    assert _run(capsys, PROMPT, "--model", str(model_dir), "--out", str(out))[0] == 0
    pipe = tiny_components.diffusers_pipeline()
    pipe.set_progress_bar_config(disable=True)
    result = pipe(
        **load_file(str(out)), num_inference_steps=1, height=64, width=64, output_type="latent"
    )
    assert result.images.shape == (1, 4, 8, 8)


def test_cli_emphasis_choices_match_the_library():
    from sdstack.commands.encode import EMPHASIS_CHOICES

    assert EMPHASIS_CHOICES == EMPHASIS_MODES


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory, tiny_components):
    root = tmp_path_factory.mktemp("configs")
    tiny_components.unet.save_config(root / "unet")
    tiny_components.vae.save_config(root / "vae")
    tiny_components.text_encoder.config.save_pretrained(root / "text_encoder")
    return root


def _saved_prompt_embeds(path):
    from safetensors.torch import load_file

    return load_file(str(path))["prompt_embeds"]


def test_full_single_file_checkpoint_goes_through_load_model(
    tmp_path, capsys, config_dir, tiny_components
):
    from sdstack.models import save_single_file

    checkpoint = tmp_path / "tiny.safetensors"
    save_single_file(tiny_components, checkpoint)
    out = tmp_path / "cond.safetensors"
    argv = ["a (fox:1.3)", "--model", str(checkpoint), "--config-dir", str(config_dir)]
    code, _, err = _run(capsys, *argv, "--clip-skip", "3", "--out", str(out))
    assert code == 0, err
    want = PromptEncoder(tiny_components.text_encoder, tiny_components.tokenizer).encode(
        "a (fox:1.3)", clip_skip=3
    )
    torch.testing.assert_close(_saved_prompt_embeds(out), want.tensor)


def test_text_encoder_only_file_with_config_dir(
    tmp_path, capsys, config_dir, tiny_text_encoder, tokenizer
):
    from safetensors.torch import save_file

    weights = tmp_path / "te.safetensors"
    items = tiny_text_encoder.state_dict().items()
    save_file({"text_model." + k.removeprefix("text_model."): v for k, v in items}, str(weights))
    out = tmp_path / "cond.safetensors"
    argv = ["a fox", "--model", str(weights), "--config-dir", str(config_dir), "--out", str(out)]
    assert _run(capsys, *argv)[0] == 0
    want = PromptEncoder(tiny_text_encoder, tokenizer).encode("a fox")
    torch.testing.assert_close(_saved_prompt_embeds(out), want.tensor)
