"""Emphasis modes against the spec formulas computed directly on the same tiny CLIP."""

from __future__ import annotations

import pytest
import torch

from sdstack.text import EMPHASIS_MODES, check_emphasis
from sdstack.text.emphasis import apply_emphasis, emphasis_original
from tests.text import (
    MEAN_ULPS,
    U32,
    Expected,
    assert_matches,
    direct_layer,
    original_tolerance,
    original_truth,
)

WEIGHTED = "a (red:1.5) [cat] (dog:0.7), ((sky))"


@pytest.fixture(scope="module")
def chunk(encoder):
    (only,) = encoder.tokenize(WEIGHTED).chunks
    assert len(set(only.weights)) > 3  # the prompt really carries several weights
    return only


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_original_restores_the_chunk_mean(encoder, chunk, clip_skip):
    # Float64 truth; the float32 means are reduced in another shape than any truth would
    # use, and dividing by them amplifies rounding: original_tolerance bounds it.
    (want,) = original_truth(encoder.text_model, [[chunk]], clip_skip)
    got = encoder.encode(WEIGHTED, clip_skip=clip_skip).tensor[0]
    assert_matches(got, want)
    # want's mean is mean0 exactly; got's differs by at most the mean elementwise bound
    # plus the rounding of the float32 mean itself.
    atol = float(want.tol.mean()) + MEAN_ULPS * U32 * float(got.abs().mean())
    torch.testing.assert_close(got.mean().double(), want.value.mean(), rtol=0, atol=atol)


def test_no_norm_multiplies_only(encoder, chunk):
    z = direct_layer(encoder.text_model, chunk.ids, 2)
    want = z * torch.tensor(chunk.weights)[:, None]
    got = encoder.encode(WEIGHTED, clip_skip=2, emphasis="no-norm").tensor[0]
    # Identical computation (the same batch-1 forward, one multiply): equal up to the
    # default float32 tolerance, which is never needed here.
    torch.testing.assert_close(got, want)


def test_ignore_strips_brackets_and_applies_no_weight(encoder, chunk):
    z = direct_layer(encoder.text_model, chunk.ids, 2)
    got = encoder.encode(WEIGHTED, clip_skip=2, emphasis="ignore").tensor[0]
    torch.testing.assert_close(got, z)  # identical batch-1 forwards (as below)
    plain = encoder.encode("a red cat dog, sky", clip_skip=2).tensor
    torch.testing.assert_close(got[None], plain)


def test_comfy_interpolates_from_the_empty_prompt(encoder, chunk):
    model = encoder.text_model
    z = direct_layer(model, chunk.ids, 2)
    z_empty = direct_layer(model, encoder.tokenize("").chunks[0].ids, 2)
    want = z_empty + (z - z_empty) * torch.tensor(chunk.weights)[:, None]
    got = encoder.encode(WEIGHTED, clip_skip=2, emphasis="comfy").tensor[0]
    # z and z_empty come from batch-1 forwards on both sides (identical computations); the
    # blend's rounding order may differ: 3 roundings of values below 5, far below 1e-5.
    torch.testing.assert_close(got, want)


def test_comfy_without_weights_is_the_plain_encoding(encoder):
    plain = encoder.encode("a red cat", emphasis="ignore").tensor
    assert torch.equal(encoder.encode("a red cat", emphasis="comfy").tensor, plain)


def test_original_mean_is_per_chunk(encoder):
    prompt = "(red:1.4) cat BREAK [blue] dog, (tree:0.6)"
    chunks = encoder.tokenize(prompt).chunks
    assert len(chunks) == 2
    got = encoder.encode(prompt).tensor[0]
    # Float64 truth, chunk by chunk (one mean per chunk), with the derived bound.
    (want,) = original_truth(encoder.text_model, [chunks])
    for index in range(len(chunks)):
        rows = (77 * index, 77 * (index + 1))
        assert_matches(got[rows[0] : rows[1]], want.rows(*rows))


def test_original_on_hand_made_tensors():
    z = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[-1.0, 5.0], [2.0, 2.0]]])
    m = torch.tensor([[2.0, 1.0], [1.0, 0.5]])
    weighted0 = torch.tensor([[2.0, 4.0], [3.0, 4.0]])
    weighted1 = torch.tensor([[-1.0, 5.0], [1.0, 1.0]])
    # Two calls of one text: text 0 mean0 = 2.5, weighted mean 3.25; text 1 2.0 and 1.5.
    alone = [emphasis_original(z[i][None, None], m[i][None, None])[0, 0] for i in (0, 1)]
    # Exact inputs: both sides round a few times at values up to 5 (< 2e-6), default tol.
    torch.testing.assert_close(alone[0], weighted0 * (2.5 / 3.25))
    torch.testing.assert_close(alone[1], weighted1 * (2.0 / 1.5))
    # One call of both texts (texts=2, chunks=1): one mean over the whole batch,
    # mean0 = 18 / 8, weighted mean = 19 / 8, so both texts get the scale 18 / 19.
    together = emphasis_original(z[:, None], m[:, None])[:, 0]
    torch.testing.assert_close(together, torch.stack([weighted0, weighted1]) * (18 / 19))


def test_original_means_are_per_chunk_index_within_a_call():
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(3, 2, 77, 4, generator=generator) + 0.5
    m = torch.rand(3, 2, 77, generator=generator) + 0.5
    got = emphasis_original(z, m)
    for index in (0, 1):
        # Truth in float64 from the exact float32 inputs: no forward error, only the float32
        # rounding of the means, products and division (original_tolerance, forward 0).
        zi, mi = z[:, index].double(), m[:, index].double()[..., None]
        weighted = zi * mi
        want = weighted * (zi.mean() / weighted.mean())
        assert_matches(got[:, index], Expected(want, original_tolerance(zi, mi, forward_ulps=0)))


def test_apply_emphasis_checks_shapes():
    message = (
        r"apply_emphasis: expected z \(texts, chunks, 77, width\) and multipliers "
        r"\(texts, chunks, 77\), got \(1, 77, 8\) and \(1, 77\)"
    )
    with pytest.raises(ValueError, match=message):
        apply_emphasis(torch.zeros(1, 77, 8), torch.ones(1, 77), "original")


def test_emphasis_keeps_dtype():
    z = torch.randn(1, 1, 77, 8, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    m = torch.full((1, 1, 77), 1.2)
    for mode in EMPHASIS_MODES:
        assert apply_emphasis(z, m, mode, z[0, 0]).dtype == torch.bfloat16


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
        r"unknown emphasis mode 'orignal'; did you mean 'original'\? "
        r"Expected one of: original, no-norm, ignore, comfy"
    )
    with pytest.raises(ValueError, match=message):
        encoder.encode("a cat", emphasis="orignal")
    with pytest.raises(ValueError, match=r"unknown emphasis mode 'xyz'; expected one of: .*comfy$"):
        check_emphasis("xyz")
