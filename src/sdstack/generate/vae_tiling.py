"""Tiled VAE decode and encode with linear-ramp overlap blending, for large images.

The image is cut into square tiles of ``tile`` latent pixels (``8 * tile`` image pixels)
that overlap by ``overlap`` latent pixels; each tile goes through the VAE on its own, so
the peak memory is one tile's. Measured on the CPU in fp32 (``bench/speed_parts.py``,
SD1.5 shapes): an untiled 1024x1024 decode peaks 3.9 GB over the loaded VAE (about 3.7 kB
per output pixel: the decoder's 256- and 128-channel activations at full resolution), so
an untiled 2048x2048 would need about 15.5 GB; tiled with 512-pixel tiles both 1024 and
2048 stay near 1.05 GB. The price is time: the overlaps make 1024x1024 cost 9 tile
decodes of 512x512 (2.25x the pixels; measured 187 s against 96 s untiled).

Blending (the idea of diffusers' ``AutoencoderKL.tiled_decode``, written here as a
weighted average so that tiles of any overlap meet smoothly): along each axis the tile
starts are ``0, s, 2s, ...`` with ``s = tile - overlap``, the last tile moved back to end
at the image edge (every tile is full size). A tile's weight along an axis is 1, except
on a side facing a neighbour, where it ramps linearly over the ``o`` output pixels shared
with that neighbour: ``w_k = (k + 1/2) / o`` for ``k = 0 .. o-1`` counted from the
tile's edge. The 2-D weight is the outer product of the two axes', and the result is
``sum_t w_t * VAE(tile_t) / sum_t w_t``. Where two tiles overlap by ``o`` their ramps add
up to exactly 1; at the image border no ramp is applied. A tile at least as large as the
image gives one tile of weight 1: the untiled result, bit for bit.

Differences from the untiled VAE: near tile edges a tile sees zero padding where the
full image has neighbours (the decoder's receptive field is far larger than any overlap),
and each tile computes its own GroupNorm statistics and mid-block attention. The overlap
ramps hide seams; what remains is measured in the tests and ``bench/speed_parts.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from sdstack.generate.tiling_modes import (
    AUTO_TILE_PIXELS,
    VAE_TILING,
    VAE_TILING_MODES,
    UnknownTilingModeError,
    check_tiling_mode,
    should_tile,
)
from sdstack.validate import SettingError, check_int

__all__ = [
    "AUTO_TILE_PIXELS",
    "VAE_TILING",
    "VAE_TILING_MODES",
    "UnknownTilingModeError",
    "check_tiling_mode",
    "should_tile",
    "tiled_decode",
    "tiled_encode",
    "vae_decode",
    "vae_encode",
]

DEFAULT_TILE = 64
"""Latent pixels per tile side (512 image pixels: SD1's training size)."""
DEFAULT_OVERLAP = 16
"""Latent pixels shared by neighbouring tiles (a quarter tile, as diffusers' 0.25)."""


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Starts of the tiles covering ``[0, length)``: ``0, s, 2s, ...`` (``s = tile -
    overlap``) below ``length - tile``, then ``length - tile``; ``[0]`` when one tile
    covers it."""
    if length <= tile:
        return [0]
    return [*range(0, length - tile, tile - overlap), length - tile]


def axis_weights(starts: list[int], size: int, length: int, scale: int) -> list[torch.Tensor]:
    """The 1-D blending weight of each tile (``size`` input pixels, ``scale`` output
    pixels each): 1, with a ramp ``(k + 1/2) / o`` toward each neighbour it shares
    ``o`` output pixels with (see the module docstring)."""
    weights = []
    span = min(size, length) * scale
    for index, start in enumerate(starts):
        weight = torch.ones(span, dtype=torch.float32)
        if index > 0:
            shared = (starts[index - 1] + size - start) * scale
            weight[:shared] = (torch.arange(shared, dtype=torch.float32) + 0.5) / shared
        if index + 1 < len(starts):
            shared = (start + size - starts[index + 1]) * scale
            ramp = (torch.arange(shared, dtype=torch.float32) + 0.5) / shared
            weight[span - shared :] = torch.minimum(weight[span - shared :], ramp.flip(0))
        weights.append(weight)
    return weights


def vae_scale_factor(vae: Any) -> int:
    """Image pixels per latent pixel: ``2 ** (len(block_out_channels) - 1)`` (8 on SD1)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _check_tiles(tile: Any, overlap: Any) -> None:
    check_int("tile", tile, 2, 4096)
    check_int("overlap", overlap, 0, tile - 1, hint=" (less than the tile)")


def blend_tiles(
    height: int,
    width: int,
    run: Callable[[int, int, int, int], torch.Tensor],
    tile: int,
    overlap: int,
) -> torch.Tensor:
    """The weighted average of ``run`` over overlapping tiles of a ``height x width`` grid.

    ``run(top, left, h, w)`` returns the output for grid rows ``top .. top+h`` and
    columns ``left .. left+w`` as ``(B, C, h * f, w * f)``, one factor ``f`` for all
    tiles (8 when the grid is latents decoded to pixels, 1 when pixels are encoded to
    latents over a latent-sized grid). Returns ``(B, C, height * f, width * f)`` in the
    dtype of ``run``'s output; the sums are kept in float32.
    """
    rows, cols = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    h, w = min(tile, height), min(tile, width)
    out = weight_sum = None
    for r, top in enumerate(rows):
        for c, left in enumerate(cols):
            piece = run(top, left, h, w)
            if out is None:
                scale, dtype, device = piece.shape[-1] // w, piece.dtype, piece.device
                out = torch.zeros((*piece.shape[:2], height * scale, width * scale), device=device)
                weight_sum = torch.zeros(out.shape[-2:], device=device)
                row_weights = axis_weights(rows, tile, height, scale)
                col_weights = axis_weights(cols, tile, width, scale)
            weight = torch.outer(row_weights[r], col_weights[c]).to(device)
            y, x = top * scale, left * scale
            region = (slice(y, y + weight.shape[0]), slice(x, x + weight.shape[1]))
            out[(..., *region)] += piece.float() * weight
            weight_sum[region] += weight
    return (out / weight_sum).to(dtype)


def tiled_decode(
    vae: Any, latents: torch.Tensor, tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP
) -> torch.Tensor:
    """``vae.decode(latents).sample`` computed tile by tile and blended (module docstring).

    Args:
        vae: a diffusers ``AutoencoderKL``.
        latents: ``(B, 4, h, w)`` in the VAE's input scale (already divided by
            ``scaling_factor``), its dtype and device.
        tile: tile side in latent pixels (2..4096).
        overlap: latent pixels shared by neighbouring tiles (0..tile-1).

    Returns:
        ``(B, 3, 8h, 8w)`` in ``[-1, 1]`` roughly, the VAE's dtype.

    Raises:
        SettingError: ``tile`` or ``overlap`` out of range.
    """
    _check_tiles(tile, overlap)

    def decode(top: int, left: int, h: int, w: int) -> torch.Tensor:
        return vae.decode(latents[..., top : top + h, left : left + w]).sample

    return blend_tiles(*latents.shape[-2:], decode, tile, overlap)


def tiled_encode(
    vae: Any, pixels: torch.Tensor, tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP
) -> torch.Tensor:
    """``vae.encode(pixels).latent_dist.mean`` computed tile by tile and blended.

    Tiles and overlaps are given in latent pixels, as for :func:`tiled_decode`: the
    pixel image is cut into ``8 * tile`` squares overlapping by ``8 * overlap``, and the
    posterior means are blended over the ``overlap`` latent pixels they share.

    Args:
        vae: a diffusers ``AutoencoderKL``.
        pixels: ``(B, 3, H, W)`` in ``[-1, 1]``, ``H`` and ``W`` multiples of the VAE's
            downsampling factor (8 for SD1).

    Raises:
        SettingError: ``tile``/``overlap`` out of range, or a size the VAE cannot encode.
    """
    _check_tiles(tile, overlap)
    factor = vae_scale_factor(vae)
    height, width = pixels.shape[-2:]
    if height % factor or width % factor:
        raise SettingError(
            f"tiled VAE encode: image size {width}x{height} is not a multiple of {factor}"
        )

    def encode(top: int, left: int, h: int, w: int) -> torch.Tensor:
        rows = slice(top * factor, (top + h) * factor)
        cols = slice(left * factor, (left + w) * factor)
        return vae.encode(pixels[..., rows, cols]).latent_dist.mean

    return blend_tiles(height // factor, width // factor, encode, tile, overlap)


def vae_decode(
    vae: Any,
    latents: torch.Tensor,
    mode: str = "auto",
    *,
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    threshold: int = AUTO_TILE_PIXELS,
) -> torch.Tensor:
    """``vae.decode(latents).sample``, tiled when :func:`should_tile` says so for the
    output size (``8h x 8w`` for SD1)."""
    factor = vae_scale_factor(vae)
    height, width = (size * factor for size in latents.shape[-2:])
    if should_tile(height, width, mode, threshold):
        return tiled_decode(vae, latents, tile, overlap)
    return vae.decode(latents).sample


def vae_encode(
    vae: Any,
    pixels: torch.Tensor,
    mode: str = "auto",
    *,
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    threshold: int = AUTO_TILE_PIXELS,
) -> torch.Tensor:
    """``vae.encode(pixels).latent_dist.mean``, tiled when :func:`should_tile` says so."""
    if should_tile(*pixels.shape[-2:], mode, threshold):
        return tiled_encode(vae, pixels, tile, overlap)
    return vae.encode(pixels).latent_dist.mean
