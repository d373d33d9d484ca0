"""Emphasis modes against the spec formulas computed directly on the same tiny CLIP."""

from __future__ import annotations

import pytest
import torch

from sdstack.text import EMPHASIS_MODES, PromptEncoder, check_emphasis
from sdstack.text.emphasis import apply_emphasis, emphasis_original
from tests.text import direct_layer, direct_original

WEIGHTED = "a (red:1.5) [cat] (dog:0.7), ((sky))"


@pytest.fixture(scope="module")
def encoder(tiny_text_encoder, tokenizer):
    return PromptEncoder(tiny_text_encoder, tokenizer)


@pytest.fixture(scope="module")
def chunk(encoder):
    (only,) = encoder.tokenize(WEIGHTED).chunks
    assert len(set(only.weights)) > 3  # the prompt really carries several weights
    return only


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_original_restores_the_chunk_mean(encoder, chunk, clip_skip):
    z = direct_layer(encoder.text_model, chunk.ids, clip_skip)
    got = encoder.encode(WEIGHTED, clip_skip=clip_skip).tensor[0]
    torch.testing.assert_close(got, direct_original(z, chunk.weights))
    torch.testing.assert_close(got.mean(), z.mean())


def test_no_norm_multiplies_only(encoder, chunk):
    z = direct_layer(encoder.text_model, chunk.ids, 2)
    want = z * torch.tensor(chunk.weights)[:, None]
    got = encoder.encode(WEIGHTED, clip_skip=2, emphasis="no-norm").tensor[0]
    torch.testing.assert_close(got, want)


def test_ignore_strips_brackets_and_applies_no_weight(encoder, chunk):
    z = direct_layer(encoder.text_model, chunk.ids, 2)
    got = encoder.encode(WEIGHTED, clip_skip=2, emphasis="ignore").tensor[0]
    torch.testing.assert_close(got, z)
    plain = encoder.encode("a red cat dog, sky", clip_skip=2).tensor
    torch.testing.assert_close(got[None], plain)


def test_comfy_interpolates_from_the_empty_prompt(encoder, chunk):
    model = encoder.text_model
    z = direct_layer(model, chunk.ids, 2)
    z_empty = direct_layer(model, encoder.tokenize("").chunks[0].ids, 2)
    want = z_empty + (z - z_empty) * torch.tensor(chunk.weights)[:, None]
    got = encoder.encode(WEIGHTED, clip_skip=2, emphasis="comfy").tensor[0]
    torch.testing.assert_close(got, want)


def test_comfy_without_weights_is_the_plain_encoding(encoder):
    plain = encoder.encode("a red cat", emphasis="ignore").tensor
    assert torch.equal(encoder.encode("a red cat", emphasis="comfy").tensor, plain)


def test_original_mean_is_per_chunk(encoder):
    prompt = "(red:1.4) cat BREAK [blue] dog, (tree:0.6)"
    chunks = encoder.tokenize(prompt).chunks
    assert len(chunks) == 2
    got = encoder.encode(prompt).tensor[0]
    for index, chunk in enumerate(chunks):
        z = direct_layer(encoder.text_model, chunk.ids, 1)
        want = direct_original(z, chunk.weights)
        torch.testing.assert_close(got[77 * index : 77 * (index + 1)], want)


def test_original_on_hand_made_tensors():
    z = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[-1.0, 5.0], [2.0, 2.0]]])
    m = torch.tensor([[2.0, 1.0], [1.0, 0.5]])
    # chunk 0: mean0 = 2.5; weighted [[2,4],[3,4]] mean 3.25 -> scale 2.5/3.25
    want0 = torch.tensor([[2.0, 4.0], [3.0, 4.0]]) * (2.5 / 3.25)
    # chunk 1: mean0 = 2.0; weighted [[-1,5],[1,1]] mean 1.5 -> scale 2/1.5
    want1 = torch.tensor([[-1.0, 5.0], [1.0, 1.0]]) * (2.0 / 1.5)
    torch.testing.assert_close(emphasis_original(z, m), torch.stack([want0, want1]))


def test_emphasis_keeps_dtype():
    z = torch.randn(1, 77, 8, dtype=torch.bfloat16)
    m = torch.full((1, 77), 1.2)
    for mode in EMPHASIS_MODES:
        assert apply_emphasis(z, m, mode, z[0]).dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        ("original", "original"),
        ("Original", "original"),
        ("No norm", "no-norm"),
        ("no_norm", "no-norm"),
        ("Ignore", "ignore"),
        ("comfy", "comfy"),
    ],
)
def test_mode_names(given, canonical):
    assert check_emphasis(given) == canonical


def test_unknown_mode_lists_modes_and_suggests(encoder):
    message = (
        r"unknown emphasis mode 'orignal': expected one of original, no-norm, ignore, comfy; "
        r"did you mean 'original'\?"
    )
    with pytest.raises(ValueError, match=message):
        encoder.encode("a cat", emphasis="orignal")
    with pytest.raises(ValueError, match=r"unknown emphasis mode 'xyz': expected one of .*comfy$"):
        check_emphasis("xyz")
