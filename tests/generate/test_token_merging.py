"""Token merging through tomesd on the tiny UNet: exact restore, ratio 0 is off, the
patched block is diffusers' block when nothing merges, and merging tokens that are
exact duplicates changes nothing (attention over a set of keys each repeated k times
equals attention over the distinct keys)."""

from __future__ import annotations

import sys

import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock

from sdstack.generate.token_merging import (
    TokenMergingError,
    apply_token_merging,
    remove_token_merging,
    token_merging,
    token_merging_ratio,
)
from sdstack.validate import SettingError

# The tiny UNet's only transformer blocks sit at downsample 2 (CrossAttnDownBlock2D at
# the second level), so the tests merge with max_downsample=2; SD1's default is 1.
DOWN = 2


@pytest.fixture
def unet():
    from sdstack.models.tiny import tiny_unet

    return tiny_unet(seed=0)


def inputs(size: int = 8, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, 4, size, size, generator=generator)
    context = torch.randn(2, 77, 32, generator=generator)
    return sample, torch.tensor(500), context


@torch.no_grad()
def run(unet, size: int = 8, seed: int = 0) -> torch.Tensor:
    sample, timestep, context = inputs(size, seed)
    return unet(sample, timestep, encoder_hidden_states=context).sample


def blocks(unet) -> list:
    return [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_ratio_zero_is_off(unet):
    before = run(unet)
    apply_token_merging(unet, 0, max_downsample=DOWN)
    assert not hasattr(unet, "_tome_info")
    assert all(type(block) is BasicTransformerBlock for block in blocks(unet))
    assert torch.equal(run(unet), before)


def test_remove_restores_exactly(unet):
    before = run(unet)
    apply_token_merging(unet, 0.5, max_downsample=DOWN)
    assert token_merging_ratio(unet) == 0.5
    assert not torch.equal(run(unet), before)
    remove_token_merging(unet)
    assert torch.equal(run(unet), before)
    assert all(type(block) is BasicTransformerBlock for block in blocks(unet))
    assert not any("_tome_info" in m.__dict__ for m in unet.modules())
    assert not unet._forward_pre_hooks and token_merging_ratio(unet) == 0.0


def test_patched_block_is_diffusers_block_when_nothing_merges(unet):
    """16 tokens at ratio 0.05: r = int(0.8) = 0, so only tomesd's copy of diffusers'
    ``BasicTransformerBlock.forward`` runs; it must give the same bits."""
    before = run(unet)
    apply_token_merging(unet, 0.05, max_downsample=DOWN)
    assert type(blocks(unet)[0]) is not BasicTransformerBlock
    assert torch.equal(run(unet), before)


@torch.no_grad()
def test_merging_duplicate_tokens_changes_nothing(unet):
    """A 4x4 token grid whose 2x2 cells hold four copies of one token: at ratio 0.75
    every source merges into its cell's destination (cosine 1), the mean of copies is
    the token, attention over the 4 distinct tokens equals attention over 16 with each
    repeated 4 times, and unmerging copies each output back. So the merged block gives
    the unmerged block's output up to float rounding."""
    block = blocks(unet)[0]
    generator = torch.Generator().manual_seed(3)
    cells = torch.randn(2, 2, 2, block.norm1.normalized_shape[0], generator=generator)
    grid = cells.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    tokens, context = grid.reshape(2, 16, -1), torch.randn(2, 77, 32, generator=generator)
    expected = block(tokens, encoder_hidden_states=context)
    different = torch.randn(tokens.shape, generator=generator)
    unmerged = block(different, encoder_hidden_states=context)
    apply_token_merging(unet, 0.75, max_downsample=DOWN)
    unet._tome_info["size"] = (8, 8)  # latent size a UNet call would record
    merged = block(tokens, encoder_hidden_states=context)
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)
    # Distinct tokens: the same patch does merge (12 of 16) and changes the output.
    assert relative(block(different, encoder_hidden_states=context), unmerged) > 0.01


@pytest.mark.parametrize(("size", "bound"), [(8, 0.1), (16, 0.06)])
def test_ratio_changes_output_within_bound(unet, size, bound):
    """Relative L2 difference of the UNet output, measured over seeds 0-2: 8x8 latents
    0.030-0.034 (ratio 0.3) and 0.043-0.047 (0.5); 16x16 0.020-0.022 and 0.027-0.030.
    The bounds are about twice the largest ratio-0.5 value; more merging, more
    difference; the UNet is itself again after the ``with``."""
    before = run(unet, size)
    differences = []
    for ratio in (0.3, 0.5):
        with token_merging(unet, ratio, max_downsample=DOWN):
            differences.append(relative(run(unet, size), before))
    assert 0 < differences[0] < differences[1] < bound
    assert torch.equal(run(unet, size), before)


def test_keyword_sample_and_too_small_latents(unet):
    apply_token_merging(unet, 0.5, max_downsample=DOWN)
    sample, timestep, context = inputs(8)
    with torch.no_grad():
        unet(sample=sample, timestep=timestep, encoder_hidden_states=context)
    assert unet._tome_info["size"] == (8, 8)
    sample, timestep, context = inputs(2)
    with pytest.raises(TokenMergingError, match=r"^token merging: latents 2x2 are too small;"):
        unet(sample, timestep, encoder_hidden_states=context)


def test_context_manager_restores_earlier_patch(unet):
    apply_token_merging(unet, 0.3, max_downsample=DOWN)
    with token_merging(unet, 0.6, max_downsample=DOWN):
        assert token_merging_ratio(unet) == 0.6
    assert token_merging_ratio(unet) == 0.3
    assert unet._tome_info["args"]["max_downsample"] == DOWN


@pytest.mark.parametrize(
    ("ratio", "message"),
    [(0.95, "token merging ratio must be between 0 and 0.9 (0 = off), got 0.95"),
     (-0.1, "token merging ratio must be between 0 and 0.9 (0 = off), got -0.1"),
     ("0.3", "token merging ratio must be a number, got '0.3'")],
)  # fmt: skip
def test_bad_ratio(unet, ratio, message):
    with pytest.raises(SettingError) as caught:
        apply_token_merging(unet, ratio)
    assert str(caught.value) == message


def test_bad_max_downsample(unet):
    with pytest.raises(SettingError, match=r"max_downsample must be one of 1, 2, 4, 8, got 3$"):
        apply_token_merging(unet, 0.3, max_downsample=3)


def test_unsupported_models(unet):
    from sdstack.models.tiny import tiny_vae

    with pytest.raises(TokenMergingError, match=r"AutoencoderKL has no diffusers Basic"):
        apply_token_merging(tiny_vae(), 0.3)
    blocks(unet)[0].set_chunk_feed_forward(1)
    with pytest.raises(TokenMergingError, match=r"feed-forward chunks 1; tomesd supports SD1"):
        apply_token_merging(unet, 0.3)


def test_missing_tomesd(unet, monkeypatch):
    monkeypatch.setitem(sys.modules, "tomesd", None)
    with pytest.raises(TokenMergingError, match=r"needs the tomesd package.*pip install tomesd"):
        apply_token_merging(unet, 0.3)
