"""Tests of sdstack.generate; the tolerance below is shared by its files."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tests.text import FORWARD_ULPS, U32


def latent_atol(
    calls: int, latents: torch.Tensor, cfg: float, weights: Sequence[float] = (1.0,)
) -> float:
    """Bound on ``max|a - b|`` for two float32 runs of one sampling job whose UNet batches
    are laid out differently (batch size, or row order as in diffusers' pipeline).

    Each denoiser call combines the UNet rows as ``u + cfg * sum_i w_i (c_i - u)``, whose
    coefficients total at most ``1 + 2 * cfg * sum|w_i|``; each row carries the rounding of
    a float32 forward, ``FORWARD_ULPS * U32`` relative to the largest value (see
    ``tests.text``). A sampler step adds the guided output times a step size no larger than
    the noise level of the latents, so each call adds at most that much relative to
    ``max|latent|``; ``calls`` of them add up.
    """
    per_call = (1 + 2 * cfg * sum(abs(w) for w in weights)) * FORWARD_ULPS * U32
    return calls * per_call * float(latents.abs().max())
