"""Hooks around each UNet call and the per-step progress record.

A :data:`UNetHook` sees every UNet evaluation of the denoising loop as a
:class:`UNetCall` and returns the call to make (the same object, or a changed copy made
with ``dataclasses.replace``). Hooks run in order; each sees what the previous one
returned. This is where extra inputs go (ControlNet residuals in ``unet_kwargs``:
``down_block_additional_residuals``, ``mid_block_additional_residual``) and where the
conditioning of one call can be changed (``encoder_hidden_states``).

A step callback receives a :class:`StepRecord` after every denoiser call: enough for a
progress bar and for latent previews (``denoised`` is the model's current estimate of
the clean latents).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

ROW_COND = "cond"
ROW_UNCOND = "uncond"


@dataclass
class UNetCall:
    """One UNet evaluation: ``unet(sample, timestep, encoder_hidden_states, **unet_kwargs)``.

    Attributes:
        sample: the scaled model input, ``(rows, C, h, w)``.
        timestep: the scheduler timestep of this denoiser call.
        encoder_hidden_states: the text conditioning, ``(rows, tokens, width)``.
        step: 0-based denoiser call index within the batch's sampling run.
        sigma: the call's noise level (k-diffusion sigma).
        row_kinds: per row, ``"cond"`` (an AND part of the prompt) or ``"uncond"`` (the
            negative prompt); rows are grouped by part, ``batch`` rows each.
        batch: images in the batch.
        unet_kwargs: extra keyword arguments for the UNet call (empty by default).
    """

    sample: torch.Tensor
    timestep: Any
    encoder_hidden_states: torch.Tensor
    step: int
    sigma: float
    row_kinds: tuple[str, ...]
    batch: int
    unet_kwargs: dict[str, Any] = field(default_factory=dict)


UNetHook = Callable[[UNetCall], UNetCall]
"""``hook(call) -> call``: see or change one UNet evaluation before it runs."""


@dataclass(frozen=True)
class StepRecord:
    """What a step callback receives after each denoiser call.

    Attributes:
        step: denoiser calls done so far in the whole job (from 1).
        total: denoiser calls of the whole job (all batches).
        batch: 0-based batch index; ``batches``: batches in the job.
        timestep: the scheduler timestep of the call just made.
        sigma: its noise level (k-diffusion sigma).
        latents: the latents after the scheduler step, ``(batch_size, C, h, w)``.
        denoised: the guided prediction of the clean latents at this call,
            ``x0 = x_t * sqrt(1 + sigma^2) - sigma * eps`` for epsilon prediction (``x_t``
            the scaled model input), ``(x_t - sigma * v) / sqrt(1 + sigma^2)`` for
            v-prediction.
    """

    step: int
    total: int
    batch: int
    batches: int
    timestep: Any
    sigma: float
    latents: torch.Tensor
    denoised: torch.Tensor


StepCallback = Callable[[StepRecord], None]


def run_hooks(call: UNetCall, hooks: tuple[UNetHook, ...]) -> UNetCall:
    """``call`` passed through every hook in order.

    Raises:
        TypeError: a hook returned something other than a UNetCall (a bug in the hook).
    """
    for hook in hooks:
        result = hook(call)
        if not isinstance(result, UNetCall):
            raise TypeError(
                f"UNet hook {hook!r} returned {type(result).__name__}; a hook must return "
                "the UNetCall to make (the one it was given, or a changed copy)"
            )
        call = result
    return call
