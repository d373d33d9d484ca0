"""``sdstack encode``: file contents equal PromptEncoder, diffusers accepts them, no overwrite."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from sdstack.cli import main
from sdstack.text import EMPHASIS_MODES, PromptEncoder
from tests.text import assert_forward_close, assert_matches, original_truth

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
        # The command runs this same encode_pair on the same weights: identical computation.
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
    # The command encodes the prompt beside the empty negative (another batch): compare
    # with the float64 truth of the prompt alone, within the "original" emphasis bound.
    chunks = PromptEncoder(tiny_components.text_encoder, tiny_components.tokenizer).tokenize(
        "a (fox:1.3)"
    )
    (want,) = original_truth(tiny_components.text_encoder, [chunks.chunks], 3)
    assert_matches(_saved_prompt_embeds(out)[0], want)


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
    # All weights 1; the command batches the prompt with the empty negative.
    assert_forward_close(_saved_prompt_embeds(out), want.tensor)


# ``sdstack encode`` reads the prompt as ``sdstack generate`` does (schedules resolved over
# --steps, AND split, tags refused); what a single prompt_embeds file cannot hold is
# refused before any model is loaded.


def _refused(tmp_path, capsys, model_dir, *argv):
    out = tmp_path / "never.safetensors"
    code, stdout, err = _run(capsys, *argv, "--model", str(model_dir), "--out", str(out))
    assert (code, stdout) == (2, "")
    assert not out.exists()
    return err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["a [cat:dog:0.5]"],
            "prompt changes during sampling at --steps 20: 'a cat' up to step 10, 'a dog' up "
            "to step 20 (2 different texts); a prompt_embeds file holds one text: encode each "
            "text on its own, or use `sdstack generate`, which applies [from:to:when] and "
            "[a|b] (`sdstack prompt inspect` shows the texts per step)",
        ),
        (
            ["a fox", "--negative", "[blurry|noisy]", "--steps", "4"],
            "--negative changes during sampling at --steps 4: 'blurry' up to step 1, 'noisy' "
            "up to step 2, 'blurry' up to step 3, ... (2 different texts); a prompt_embeds "
            "file holds one text",
        ),
        (
            ["a cat AND a dog :0.5"],
            "prompt has 2 AND parts ('a cat', ' a dog'): AND weighs several conditionings at "
            "each sampling step and a prompt_embeds file holds one; encode each part on its "
            "own, or use `sdstack generate`, which applies AND",
        ),
        (
            ["masterpiece, a cat :2"],
            "prompt ends in the AND weight :2 (the reference reads 'text :2' as a weight on "
            "the guidance); a prompt_embeds file holds no weight: remove it, or use `sdstack "
            "generate`, which applies it",
        ),
        (
            ["<lora:film:0.6> a cat"],
            "prompt contains extra-network tag(s) <lora:film>: a prompt_embeds file is made "
            "without LoRAs; remove the tag(s), or use `sdstack generate`, which applies them",
        ),
        (["a", "--steps", "1000000000"], "--steps must be between 1 and 1000, got 1000000000"),
        (
            ["a \udcff"],
            "prompt is not valid UTF-8 (pass or save it as UTF-8): undecodable byte 0xff at "
            "position 2: 'a \\udcff'",
        ),
    ],
    ids=["schedule", "negative schedule", "AND", "AND weight", "lora tag", "steps", "utf-8"],
)
def test_what_one_prompt_embeds_cannot_hold_is_refused(tmp_path, capsys, model_dir, argv, message):
    err = _refused(tmp_path, capsys, model_dir, *argv)
    assert err.startswith(f"sdstack: error: {message}")


def _generate_conditioning(encoder, prompt, steps):
    """What generate encodes: the one AND part of ``encode_schedule``, at its first entry."""
    schedule = encoder.encode_schedule(prompt, steps)
    (_end, [(cond, weight)]), *_rest = schedule
    assert weight == 1.0
    return cond.tensor


@pytest.mark.parametrize(
    ("prompt", "steps", "text"),
    [
        ("a [fox:cat:0] in snow", 20, "a cat in snow"),  # edited at step 0: cat throughout
        ("a [fox|cat] in snow", 1, "a fox in snow"),  # one step: the first option only
        ("a [fox:cat:25] in snow", 20, "a fox in snow"),  # step 25 is past the last step
        ("a [fox|fox] in snow", 20, "a fox in snow"),  # every step gives the same text
    ],
)
def test_schedules_with_one_text_are_encoded_as_generate_does(
    tmp_path, capsys, model_dir, encoder, prompt, steps, text
):
    out = tmp_path / "cond.safetensors"
    argv = [prompt, "--model", str(model_dir), "--steps", str(steps), "--out", str(out)]
    code, _, err = _run(capsys, *argv)
    assert code == 0, err
    saved = _saved_prompt_embeds(out)
    # Unweighted texts: exactly the forward outputs, batched differently on each side.
    assert_forward_close(saved, _generate_conditioning(encoder, prompt, steps))
    assert_forward_close(saved, encoder.encode(text).tensor)


def test_negative_prompt_keeps_and_and_tags_as_text(tmp_path, capsys, model_dir, encoder):
    # generate's negative-prompt reading: no AND split, tags are literal text
    from safetensors.torch import load_file

    negative = "blurry AND <lora:x:1> :2"
    out = tmp_path / "cond.safetensors"
    argv = ["a fox", "--negative", negative, "--model", str(model_dir), "--out", str(out)]
    assert _run(capsys, *argv)[0] == 0
    cond, uncond = encoder.encode_pair("a fox", negative)
    saved = load_file(str(out))
    # The command runs this same encode_pair on the same weights: identical computation.
    torch.testing.assert_close(saved["negative_prompt_embeds"], uncond.tensor)
    torch.testing.assert_close(saved["prompt_embeds"], cond.tensor)


def test_prompt_from_stdin(tmp_path, capsys, model_dir, encoder, monkeypatch):
    import io
    import sys

    from safetensors import safe_open

    data = "a (red:1.2) fox, über\n".encode()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="latin-1"))
    out = tmp_path / "cond.safetensors"
    assert _run(capsys, "-", "--model", str(model_dir), "--out", str(out))[0] == 0
    with safe_open(str(out), framework="pt") as handle:
        assert handle.metadata()["prompt"] == "a (red:1.2) fox, über"
        assert handle.metadata()["steps"] == "20"
        # The command batches the prompt with the empty negative: float64 truth and bound.
        chunks = encoder.tokenize("a (red:1.2) fox, über").chunks
        (want,) = original_truth(encoder.text_model, [chunks])
        assert_matches(handle.get_tensor("prompt_embeds")[0], want)
