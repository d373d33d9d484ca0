"""Tiled VAE decode/encode: the blending is exact on a local decoder, a tile over the whole
image is the untiled VAE bit for bit, and on the tiny VAE the tiles stay as close to the
untiled decode as diffusers' own tiling does (and closer as tiles grow)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from sdstack.generate.vae_tiling import (
    AUTO_TILE_PIXELS,
    UnknownTilingModeError,
    axis_weights,
    should_tile,
    tile_starts,
    tiled_decode,
    tiled_encode,
    vae_decode,
    vae_encode,
)
from sdstack.validate import SettingError


@pytest.fixture(scope="module")
def vae():
    from sdstack.models.tiny import tiny_vae

    return tiny_vae(seed=0)


def local_vae(seed: int = 0) -> SimpleNamespace:
    """A stand-in VAE whose output at each pixel depends on its own 8x8 block only:
    decode = 1x1 channel mix then x8 nearest upsampling, encode = 1x1 mix then 8x8
    average. Tiling cannot change such a map, so tiled == untiled up to rounding."""
    generator = torch.Generator().manual_seed(seed)
    down, up = torch.randn(4, 3, generator=generator), torch.randn(3, 4, generator=generator)

    def decode(z):
        mixed = torch.tanh(torch.einsum("oc,bchw->bohw", up, z))
        return SimpleNamespace(sample=F.interpolate(mixed, scale_factor=8, mode="nearest"))

    def encode(x):
        mean = F.avg_pool2d(torch.einsum("oc,bchw->bohw", down, x), 8)
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean))

    config = SimpleNamespace(block_out_channels=(8, 8, 16, 16))
    return SimpleNamespace(decode=decode, encode=encode, config=config)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("length", "tile", "overlap", "expected"),
    [(40, 64, 16, [0]), (64, 64, 16, [0]), (100, 64, 16, [0, 36]),
     (200, 64, 16, [0, 48, 96, 136]), (32, 16, 4, [0, 12, 16]), (30, 10, 0, [0, 10, 20])],
)  # fmt: skip
def test_tile_starts(length, tile, overlap, expected):
    assert tile_starts(length, tile, overlap) == expected


def test_ramps_are_a_partition_of_unity():
    """Two neighbours sharing o pixels: (k + 1/2)/o rising, its mirror falling, sum 1."""
    first, second = axis_weights([0, 12], 16, 28, 1)
    assert torch.equal(second[:4], torch.tensor([0.125, 0.375, 0.625, 0.875]))
    assert torch.equal(first[12:] + second[:4], torch.ones(4))
    assert torch.equal(first[:12], torch.ones(12)) and torch.equal(second[4:], torch.ones(12))


@pytest.mark.parametrize(
    ("shape", "tile", "overlap"),
    [((2, 4, 32, 48), 16, 4), ((1, 4, 27, 19), 8, 3), ((1, 4, 30, 30), 12, 8),
     ((1, 4, 9, 40), 16, 0)],
)  # fmt: skip
def test_local_decoder_tiles_exactly(shape, tile, overlap):
    """Uneven sizes, 3-way overlaps, overlap 0: only float rounding (a few ulp)."""
    fake, z = local_vae(), randn(*shape)
    full = fake.decode(z).sample
    torch.testing.assert_close(tiled_decode(fake, z, tile, overlap), full, rtol=1e-6, atol=1e-6)


def test_local_encoder_tiles_exactly():
    fake, x = local_vae(), randn(1, 3, 8 * 27, 8 * 35, seed=1)
    full = fake.encode(x).latent_dist.mean
    torch.testing.assert_close(tiled_encode(fake, x, 10, 4), full, rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_tile_over_whole_image_is_untiled_exactly(vae):
    z = randn(2, 4, 12, 20, seed=2)
    assert torch.equal(tiled_decode(vae, z, tile=20, overlap=4), vae.decode(z).sample)
    x = randn(1, 3, 96, 160, seed=3).clamp(-1, 1)
    assert torch.equal(tiled_encode(vae, x, tile=64), vae.encode(x).latent_dist.mean)


def relative_error(tiled: torch.Tensor, full: torch.Tensor) -> float:
    """mean |tiled - untiled| in units of the untiled output's standard deviation."""
    return ((tiled - full).abs().mean() / full.std()).item()


def diffusers_tiled(vae, function, tensor, tile: int):
    """diffusers' ``enable_tiling`` with ``tile`` latent pixels (overlap factor 0.25)."""
    vae.enable_tiling()
    vae.tile_sample_min_size, vae.tile_latent_min_size = 8 * tile, tile
    try:
        return function(tensor)
    finally:
        vae.disable_tiling()
        vae.tile_sample_min_size, vae.tile_latent_min_size = 64, 8


@torch.no_grad()
@pytest.mark.parametrize("seed", [0, 1])
def test_tiny_vae_decode_close_to_untiled(vae, seed):
    """On the tiny VAE a tile of 16 latent pixels is all border: its decoder's receptive
    field reaches about 13 latent pixels (9 3x3 convs at latent size, 5 at each of x2,
    x4, x8), and GroupNorm statistics are per tile. So the bound is relative: ours is
    no further from the untiled decode than diffusers' own tiling with the same tile and
    stride (diffusers: measured 0.34 to 0.38 sigma, ours 0.30 to 0.33); a larger
    overlap and a larger tile each bring it closer; at tile 28 the mean difference is
    measured 0.055 to 0.061 sigma (bound 0.1 sigma). A misplaced or unnormalised tile
    gives differences of the order of 1 sigma."""
    z = randn(1, 4, 28, 40, seed=seed)
    full = vae.decode(z).sample
    ours = relative_error(tiled_decode(vae, z, 16, 4), full)
    peer = relative_error(diffusers_tiled(vae, lambda t: vae.decode(t).sample, z, 16), full)
    assert ours <= peer
    assert relative_error(tiled_decode(vae, z, 16, 8), full) < ours
    assert relative_error(tiled_decode(vae, z, 28, 4), full) < 0.1


@torch.no_grad()
def test_tiny_vae_encode_close_to_untiled(vae):
    """Encode, same construction: ours no further than diffusers' tiled encode."""
    x = randn(1, 3, 8 * 28, 8 * 40, seed=4).clamp(-1, 1)
    full = vae.encode(x).latent_dist.mean
    ours = relative_error(tiled_encode(vae, x, 16, 4), full)
    peer = diffusers_tiled(vae, lambda t: vae.encode(t).latent_dist.mean, x, 16)
    assert ours <= relative_error(peer, full)


def test_should_tile():
    assert should_tile(1024, 1024) is False  # exactly the threshold: untiled
    assert should_tile(1024, 1032) is True
    assert should_tile(2048, 2048, "auto") is True
    assert should_tile(64, 64, "on") is True
    assert should_tile(4096, 4096, "off") is False
    assert should_tile(600, 600, "auto", threshold=512 * 512) is True
    assert AUTO_TILE_PIXELS == 1024 * 1024


def test_unknown_mode_names_the_modes():
    with pytest.raises(UnknownTilingModeError, match=r"'of'.*auto, on, off"):
        should_tile(64, 64, "of")


@pytest.mark.parametrize(
    ("tile", "overlap", "message"),
    [(1, 0, "tile must be between 2 and 4096, got 1"),
     (16, 16, "overlap must be between 0 and 15 (less than the tile), got 16"),
     (16, -1, "overlap must be between 0 and 15 (less than the tile), got -1"),
     (16.0, 4, "tile must be an integer, got 16.0")],
)  # fmt: skip
def test_bad_tiles(tile, overlap, message):
    with pytest.raises(SettingError) as caught:
        tiled_decode(local_vae(), randn(1, 4, 8, 8), tile, overlap)
    assert str(caught.value) == message


def test_encode_size_must_divide():
    with pytest.raises(SettingError, match=r"^tiled VAE encode: image size 70x64 is not a "):
        tiled_encode(local_vae(), randn(1, 3, 64, 70), 8, 2)


def test_mode_dispatch():
    """``auto`` decides from the output size: 8h x 8w pixels."""
    fake, calls = local_vae(), []
    decode = fake.decode
    fake.decode = lambda z: calls.append(tuple(z.shape[-2:])) or decode(z)
    z = randn(1, 4, 24, 24)
    vae_decode(fake, z, "auto", tile=16, overlap=4, threshold=192 * 192 - 1)
    assert calls == [(16, 16)] * 4
    calls.clear()
    vae_decode(fake, z, "auto", tile=16, overlap=4)
    assert calls == [(24, 24)]
    x = randn(1, 3, 64, 64)
    torch.testing.assert_close(vae_encode(fake, x, "on", tile=4, overlap=1), vae_encode(fake, x))
