"""Our denoising loop: per-call prompt schedules, composable diffusion (AND) and CFG.

The UNet and the diffusers scheduler do the numerics; this module decides which
conditioning each denoiser call sees and how the predictions combine:

- Prompt schedules: the entry used by denoiser call ``k`` (0-based count of UNet
  evaluations, the reference's ``CFGDenoiser.step``) is the first one with
  ``k <= end_step``, the last entry beyond the end.
- Composable diffusion + classifier-free guidance (reference ``combine_denoised``):
  ``out = u + cfg * sum_i w_i * (c_i - u)`` where ``c_i`` is the model output for AND
  part ``i`` (weight ``w_i``) and ``u`` the negative prompt's. The reference applies it
  to the denoised image; the denoised image is affine in the noise (or v) prediction
  with the same coefficients for every part, so applying it to the model output is
  the same formula.
- Batching: all parts and the negative go through one UNet call per denoiser call,
  padded to the same chunk count with empty-prompt chunks (the reference's
  "pad prompt/negative prompt to be same length" option).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch

# (end_step, [(conditioning, AND weight), ...]) as PromptEncoder.encode_schedule returns.
Schedule = Sequence[tuple[int, Sequence[tuple[Any, float]]]]


class GenerationCancelled(RuntimeError):
    """Raised between denoiser calls when the ``cancel`` event/callable is set."""


def schedule_index(schedule: Schedule, step: int) -> int:
    """Reference schedule lookup: index of the first entry with ``step <= end_step``.

    Steps past the last ``end_step`` use the last entry.
    """
    for index, (end_step, _parts) in enumerate(schedule):
        if step <= end_step:
            return index
    return len(schedule) - 1


def combine_guidance(
    cond_outputs: Sequence[torch.Tensor],
    weights: Sequence[float],
    uncond_output: torch.Tensor,
    cfg_scale: float,
) -> torch.Tensor:
    """Composable diffusion with CFG: ``u + cfg * sum_i w_i * (c_i - u)``."""
    result = uncond_output.clone()
    for output, weight in zip(cond_outputs, weights, strict=True):
        result += (cfg_scale * weight) * (output - uncond_output)
    return result


def is_cancelled(cancel: Any) -> bool:
    """``cancel`` may be None, a ``threading.Event``-like object or a callable."""
    if cancel is None:
        return False
    if hasattr(cancel, "is_set"):
        return bool(cancel.is_set())
    return bool(cancel())


class GuidedDenoiser:
    """One UNet call per denoiser call: all AND parts + the negative, batched.

    Args:
        unet: ``UNet2DConditionModel``.
        cond_schedule: the prompt's schedule (AND parts with weights).
        uncond_schedule: the negative prompt's schedule (one part each).
        cfg_scale: guidance scale.
        empty: the empty prompt's conditioning (for padding to equal chunk counts).
    """

    def __init__(
        self,
        unet: Any,
        cond_schedule: Schedule,
        uncond_schedule: Schedule,
        cfg_scale: float,
        empty: Any,
    ) -> None:
        self.unet = unet
        self.cond_schedule = cond_schedule
        self.uncond_schedule = uncond_schedule
        self.cfg_scale = float(cfg_scale)
        self.empty = empty
        # diffusers' ModelMixin.dtype/.device walk the parameters (~1 ms): read them once.
        self.device, self.dtype = unet.device, unet.dtype
        self._context: dict[tuple[int, int], tuple[torch.Tensor, list[float]]] = {}
        self._expanded: dict[tuple[int, int, int], tuple[torch.Tensor, list[float]]] = {}

    def _key(self, step: int) -> tuple[int, int]:
        return schedule_index(self.cond_schedule, step), schedule_index(self.uncond_schedule, step)

    def context(self, step: int) -> tuple[torch.Tensor, list[float]]:
        """Hidden states ``(parts + 1, 77 n, width)`` (negative last) and part weights."""
        key = self._key(step)
        if key not in self._context:
            parts = list(self.cond_schedule[key[0]][1])
            uncond = self.uncond_schedule[key[1]][1][0][0]
            conds = [cond for cond, _ in parts] + [uncond]
            n_chunks = max(cond.chunks for cond in conds)
            padded = [c.padded_to(n_chunks, self.empty) for c in conds]
            hidden = torch.cat([c.tensor for c in padded]).to(device=self.device, dtype=self.dtype)
            self._context[key] = (hidden, [float(w) for _, w in parts])
        return self._context[key]

    def batch_context(self, step: int, batch: int) -> tuple[torch.Tensor, list[float]]:
        """:meth:`context` with each row repeated ``batch`` times (cached per batch size)."""
        key = (*self._key(step), batch)
        if key not in self._expanded:
            hidden, weights = self.context(step)
            self._expanded[key] = (hidden.repeat_interleave(batch, dim=0), weights)
        return self._expanded[key]

    def __call__(self, model_input: torch.Tensor, timestep: Any, step: int) -> torch.Tensor:
        """Guided model output for ``model_input`` (B, C, h, w) at denoiser call ``step``."""
        states, weights = self.batch_context(step, model_input.shape[0])
        groups = len(weights) + 1
        sample = model_input.to(self.dtype).repeat(groups, 1, 1, 1)
        output = self.unet(sample, timestep, encoder_hidden_states=states).sample.float()
        chunks = output.chunk(groups)
        return combine_guidance(chunks[:-1], weights, chunks[-1], self.cfg_scale)


def _step_kwargs(scheduler: Any, generators: list[torch.Generator]) -> dict[str, Any]:
    if "generator" in inspect.signature(scheduler.step).parameters:
        return {"generator": generators}
    return {}


def run_denoising(
    scheduler: Any,
    timesteps: Sequence[Any],
    latents: torch.Tensor,
    denoiser: Callable[[torch.Tensor, Any, int], torch.Tensor],
    *,
    generators: list[torch.Generator],
    on_step: Callable[[torch.Tensor], None] | None = None,
    cancel: Any = None,
) -> torch.Tensor:
    """The sampling loop: for each timestep, scale input, call the denoiser, step.

    ``generators`` (one per image) feed the noise of ancestral/SDE steps, so image
    ``i`` draws the same numbers whatever the batch. ``on_step(latents)`` runs after
    every denoiser call; ``cancel`` is checked before each one.

    Raises:
        GenerationCancelled: ``cancel`` was set.
    """
    kwargs = _step_kwargs(scheduler, generators)
    for step, timestep in enumerate(timesteps):
        if is_cancelled(cancel):
            raise GenerationCancelled(f"generation cancelled before denoiser call {step}")
        model_input = scheduler.scale_model_input(latents, timestep)
        output = denoiser(model_input, timestep, step)
        latents = scheduler.step(output, timestep, latents, return_dict=False, **kwargs)[0]
        if on_step is not None:
            on_step(latents)
    return latents
