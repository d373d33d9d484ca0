"""CLIP skip: every layer against hidden_states[-N] + final LN computed directly."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from sdstack.text.clip_skip import final_layer_norm, token_embedding
from tests.text import direct_layer, direct_output

PROMPT = "a photo of a cat"


@pytest.fixture(scope="module")
def ids(encoder):
    return encoder.tokenize(PROMPT).chunks[0].ids


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_integer_clip_skip_is_hidden_state_minus_n_then_final_ln(encoder, ids, n):
    got = encoder.encode(PROMPT, clip_skip=n).tensor[0]
    # Identical computation: one chunk, batch 1 on both sides, all weights 1 ("original" is
    # exactly the identity). Default float32 tolerance; the results are in fact equal.
    torch.testing.assert_close(got, direct_layer(encoder.text_model, ids, n))


def test_clip_skip_1_is_last_hidden_state_and_differs_from_2(encoder, ids):
    last = direct_output(encoder.text_model, ids).last_hidden_state[0]
    assert torch.equal(encoder.encode(PROMPT, clip_skip=1).tensor[0], last)  # identical run
    # Layers -1 and -2 differ by about 2 at some values: 1e7 times allclose's tolerance.
    assert not torch.allclose(encoder.encode(PROMPT, clip_skip=2).tensor[0], last)


@pytest.mark.parametrize("value", [1.5, 2.25, 4.75])
def test_fractional_clip_skip_blends_neighbouring_layers(encoder, ids, value):
    low, f = math.floor(value), value - math.floor(value)
    model = encoder.text_model
    want = (1 - f) * direct_layer(model, ids, low) + f * direct_layer(model, ids, low + 1)
    # Same batch-1 forward and the same blend on both sides: default float32 tolerance.
    torch.testing.assert_close(encoder.encode(PROMPT, clip_skip=value).tensor[0], want)


def test_pooled_is_last_layer_at_first_eos_for_every_clip_skip(encoder, ids):
    last = direct_output(encoder.text_model, ids).last_hidden_state[0]
    eos = ids.index(49407)
    for n in (1, 2, 3.5):  # the same batch-1 forward: identical values
        torch.testing.assert_close(encoder.encode(PROMPT, clip_skip=n).pooled[0], last[eos])


@pytest.mark.parametrize("bad", [0, 0.99, 6, 5.5, float("nan"), float("inf")])
def test_clip_skip_outside_range_names_the_range(encoder, bad):
    with pytest.raises(ValueError, match=r"clip_skip must be (between 1 and 5 |a finite)"):
        encoder.encode(PROMPT, clip_skip=bad)


@pytest.mark.parametrize("bad", [True, "2", None])
def test_clip_skip_not_a_number(encoder, bad):
    with pytest.raises(ValueError, match=r"clip_skip must be a number, got"):
        encoder.encode(PROMPT, clip_skip=bad)


def test_module_lookup_works_for_both_transformers_layouts():
    norm, embedding = object(), object()
    inner = SimpleNamespace(
        final_layer_norm=norm, embeddings=SimpleNamespace(token_embedding=embedding)
    )
    v4 = SimpleNamespace(text_model=inner)  # transformers 4.x: modules under .text_model
    for model in (inner, v4):  # 5.x: modules on the CLIPTextModel itself
        assert final_layer_norm(model) is norm
        assert token_embedding(model) is embedding
