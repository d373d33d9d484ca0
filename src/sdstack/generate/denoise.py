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
- Batching (reference ``reconstruct_multicond_batch`` + ``CFGDenoiser.forward``):
  AND parts of different token lengths are brought to the longest by repeating each
  shorter part's last token vector (row ``77 n - 1``). If the positive rows and the
  negative then have the same length, all go through one UNet call (negative last).
  If not, by default the positive rows (all AND parts) and the negative go through
  two separate UNet calls, unpadded: cross-attention over padding tokens changes the
  output, so padding is not neutral. With ``pad_conds`` (the reference's "Pad
  prompt/negative prompt" option, off by default) the shorter side instead gets
  copies of the empty prompt's 77-token encoding appended, and one call is made; the
  reference then writes ``Pad conds: True`` in the infotext. (The reference feeds
  the positive rows in slices of ``2 * batch`` rows; we make one call for all of them,
  which gives the same per-row result up to batched-kernel rounding.)
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from sdstack.generate.hooks import ROW_COND, ROW_UNCOND, UNetCall, UNetHook, run_hooks

# (end_step, [(conditioning, AND weight), ...]) as PromptEncoder.encode_schedule returns.
Schedule = Sequence[tuple[int, Sequence[tuple[Any, float]]]]
# (hidden states of each UNet call, AND weights) for one denoiser call.
Context = tuple[tuple[torch.Tensor, ...], list[float]]


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


def extend_last_token(tensor: torch.Tensor, tokens: int) -> torch.Tensor:
    """Reference AND-part equalisation: append copies of the last token vector.

    ``(rows, n, width) -> (rows, tokens, width)`` with rows ``n..tokens-1`` equal to row
    ``n - 1``; ``tensor`` itself when already ``tokens`` long.
    """
    missing = tokens - tensor.shape[1]
    if missing <= 0:
        return tensor
    return torch.cat([tensor, tensor[:, -1:].expand(-1, missing, -1)], dim=1)


def pad_with_empty(tensor: torch.Tensor, tokens: int, empty: torch.Tensor) -> torch.Tensor:
    """Reference ``pad_cond``: append copies of the empty prompt's encoding ``empty``
    ``(1, 77, width)`` to every row until ``tokens`` long.

    Raises:
        ValueError: the missing length is not a whole number of ``empty`` chunks.
    """
    missing = tokens - tensor.shape[1]
    repeats, rest = divmod(missing, empty.shape[1])
    if rest or repeats < 0:
        raise ValueError(
            f"cannot pad {tensor.shape[1]} tokens to {tokens} with {empty.shape[1]}-token "
            "empty chunks: expected a whole, non-negative number of chunks"
        )
    if repeats == 0:
        return tensor
    pad = empty.to(tensor).repeat(tensor.shape[0], repeats, 1)
    return torch.cat([tensor, pad], dim=1)


class GuidedDenoiser:
    """Reference ``CFGDenoiser``: AND parts + negative through the UNet, then guidance.

    One UNet call per denoiser call when the positive and negative contexts have the
    same length (always with ``pad_conds``), else two (positive rows, then negative
    rows); see the module doc.

    Args:
        unet: ``UNet2DConditionModel``.
        cond_schedule: the prompt's schedule (AND parts with weights).
        uncond_schedule: the negative prompt's schedule (one part each).
        cfg_scale: guidance scale.
        empty: the empty prompt's conditioning (one chunk); needed only with ``pad_conds``,
            may be None otherwise.
        pad_conds: pad the shorter of positive/negative with ``empty`` chunks and make
            one call (reference option "Pad prompt/negative prompt").
        hooks: :data:`~sdstack.generate.hooks.UNetHook` functions run before every UNet
            call, in order; each may change the call (inputs, conditioning, extra UNet
            arguments such as ControlNet residuals).

    Attributes:
        padded: True once some denoiser call's context was padded with ``empty``.

    Raises:
        ValueError: ``pad_conds`` without ``empty``.
    """

    def __init__(
        self,
        unet: Any,
        cond_schedule: Schedule,
        uncond_schedule: Schedule,
        cfg_scale: float,
        empty: Any | None,
        *,
        pad_conds: bool = False,
        hooks: Sequence[UNetHook] = (),
    ) -> None:
        self.unet = unet
        self.cond_schedule = cond_schedule
        self.uncond_schedule = uncond_schedule
        self.cfg_scale = float(cfg_scale)
        if pad_conds and empty is None:
            raise ValueError("pad_conds needs empty, the empty prompt's conditioning")
        self.empty = empty
        self.pad_conds = bool(pad_conds)
        self.padded = False
        self.hooks = tuple(hooks)
        # diffusers' ModelMixin.dtype/.device walk the parameters (~1 ms): read them once.
        self.device, self.dtype = unet.device, unet.dtype
        self._context: dict[tuple[int, int], Context] = {}
        self._expanded: dict[tuple[int, int, int], Context] = {}

    def _key(self, step: int) -> tuple[int, int]:
        return schedule_index(self.cond_schedule, step), schedule_index(self.uncond_schedule, step)

    def _build(self, key: tuple[int, int]) -> Context:
        parts = list(self.cond_schedule[key[0]][1])
        negative = self.uncond_schedule[key[1]][1][0][0].tensor
        tokens = max(cond.tensor.shape[1] for cond, _ in parts)
        positive = torch.cat([extend_last_token(cond.tensor, tokens) for cond, _ in parts])
        if self.pad_conds and tokens != negative.shape[1]:
            longest = max(tokens, negative.shape[1])
            positive = pad_with_empty(positive, longest, self.empty.tensor)
            negative = pad_with_empty(negative, longest, self.empty.tensor)
            self.padded = True
        if positive.shape[1] == negative.shape[1]:
            calls: tuple[torch.Tensor, ...] = (torch.cat([positive, negative]),)
        else:
            calls = (positive, negative)
        calls = tuple(c.to(device=self.device, dtype=self.dtype) for c in calls)
        return calls, [float(w) for _, w in parts]

    def context(self, step: int) -> Context:
        """Hidden states per UNet call and the AND weights at denoiser call ``step``.

        One tensor ``(parts + 1, L, width)`` (negative last) when the lengths agree, else
        ``((parts, L, width), (1, L', width))``. Cached per schedule entry pair.
        """
        key = self._key(step)
        if key not in self._context:
            self._context[key] = self._build(key)
        return self._context[key]

    def batch_context(self, step: int, batch: int) -> Context:
        """:meth:`context` with each row repeated ``batch`` times (cached per batch size)."""
        key = (*self._key(step), batch)
        if key not in self._expanded:
            calls, weights = self.context(step)
            self._expanded[key] = (tuple(c.repeat_interleave(batch, dim=0) for c in calls), weights)
        return self._expanded[key]

    def __call__(
        self, model_input: torch.Tensor, timestep: Any, step: int, sigma: float = math.nan
    ) -> torch.Tensor:
        """Guided model output for ``model_input`` (B, C, h, w) at denoiser call ``step``
        (noise level ``sigma``, passed on to the hooks)."""
        calls, weights = self.unet_calls(model_input, timestep, step, sigma)
        return self.guide([self.run_unet(call) for call in calls], weights)

    def unet_calls(
        self, model_input: torch.Tensor, timestep: Any, step: int, sigma: float = math.nan
    ) -> tuple[list[UNetCall], list[float]]:
        """The UNet calls of denoiser call ``step`` before the hooks run, and the AND weights.

        Each call's rows are the input repeated once per context row group (AND parts,
        then the negative; ``batch`` rows each), as :meth:`batch_context` lays them out.
        """
        batch = model_input.shape[0]
        contexts, weights = self.batch_context(step, batch)
        sample = model_input.to(self.dtype)
        kinds = self._row_kinds(contexts, len(weights), batch)
        calls = []
        for states, row_kinds in zip(contexts, kinds, strict=True):
            rows = sample.repeat(states.shape[0] // batch, 1, 1, 1)
            calls.append(UNetCall(rows, timestep, states, step, sigma, row_kinds, batch))
        return calls, weights

    def run_unet(self, call: UNetCall) -> torch.Tensor:
        """``call`` through the hooks, then the UNet: its output rows (model dtype)."""
        if self.hooks:
            call = run_hooks(call, self.hooks)
        output = self.unet(
            call.sample,
            call.timestep,
            encoder_hidden_states=call.encoder_hidden_states,
            **call.unet_kwargs,
        )
        return output.sample

    def guide(self, outputs: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
        """The UNet outputs of one denoiser call's calls, in order, combined:
        ``u + cfg * sum_i w_i * (c_i - u)`` (:func:`combine_guidance`), in float32."""
        output = (outputs[0] if len(outputs) == 1 else torch.cat(list(outputs))).float()
        chunks = output.chunk(len(weights) + 1)
        return combine_guidance(chunks[:-1], weights, chunks[-1], self.cfg_scale)

    @staticmethod
    def _row_kinds(
        calls: tuple[torch.Tensor, ...], parts: int, batch: int
    ) -> list[tuple[str, ...]]:
        cond, uncond = (ROW_COND,) * parts * batch, (ROW_UNCOND,) * batch
        return [cond + uncond] if len(calls) == 1 else [cond, uncond]


def noise_level(scheduler: Any, timestep: Any) -> float:
    """The k-diffusion sigma of the current denoiser call.

    ``scheduler.sigmas[step_index]`` for the sigma-tracking diffusers schedulers (the
    interpolated sigma in KDPM2's second stage), else ``sqrt((1 - a) / a)`` with ``a`` the
    model's ``alphas_cumprod`` at the (integer) timestep (DDIM); NaN when the scheduler
    exposes neither.
    """
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and hasattr(scheduler, "step_index"):
        if scheduler.step_index is None and hasattr(scheduler, "_init_step_index"):
            scheduler._init_step_index(timestep)  # what step() does first anyway
        index = scheduler.step_index
        if hasattr(scheduler, "sigmas_interpol") and not scheduler.state_in_first_order:
            sigmas = scheduler.sigmas_interpol
        return float(sigmas[index])
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if alphas is None:
        return math.nan
    a = float(alphas[int(timestep)])
    return math.sqrt((1.0 - a) / a)


def denoised_estimate(
    model_input: torch.Tensor, output: torch.Tensor, sigma: float, prediction_type: str
) -> torch.Tensor:
    """The clean-latent estimate x0 of one denoiser call.

    The UNet input is ``x_t = (x0 + sigma * eps) / sqrt(1 + sigma^2)`` for every diffusers
    scheduler (k-diffusion ones divide by ``sqrt(1 + sigma^2)`` in ``scale_model_input``,
    DDIM/DPM-Solver latents are in that form already), so
    ``x0 = x_t * sqrt(1 + sigma^2) - sigma * eps``; for v-prediction
    ``x0 = (x_t - sigma * v) / sqrt(1 + sigma^2)``. With an unknown sigma, ``x_t``.
    """
    if math.isnan(sigma):
        return model_input.float()
    scale = math.sqrt(1.0 + sigma * sigma)
    if prediction_type == "v_prediction":
        return (model_input.float() - sigma * output) / scale
    return model_input.float() * scale - sigma * output


def _step_kwargs(scheduler: Any, generators: list[torch.Generator]) -> dict[str, Any]:
    if "generator" in inspect.signature(scheduler.step).parameters:
        return {"generator": generators}
    return {}


StepReport = Callable[[Any, float, torch.Tensor, torch.Tensor], None]
"""``on_step(timestep, sigma, latents, denoised)`` after every denoiser call."""


def run_denoising(
    scheduler: Any,
    timesteps: Sequence[Any],
    latents: torch.Tensor,
    denoiser: Callable[..., torch.Tensor],
    *,
    generators: list[torch.Generator],
    on_step: StepReport | None = None,
    cancel: Any = None,
) -> torch.Tensor:
    """The sampling loop: for each timestep, scale input, call the denoiser, step.

    ``denoiser(model_input, timestep, step, sigma)`` returns the guided model output.
    ``generators`` (one per image) feed the noise of ancestral/SDE steps, so image
    ``i`` draws the same numbers whatever the batch. ``on_step(timestep, sigma,
    latents, denoised)`` runs after every denoiser call (see :func:`denoised_estimate`);
    ``cancel`` is checked before each one.

    Raises:
        GenerationCancelled: ``cancel`` was set.
    """
    kwargs = _step_kwargs(scheduler, generators)
    prediction = getattr(getattr(scheduler, "config", None), "prediction_type", "epsilon")
    for step, timestep in enumerate(timesteps):
        if is_cancelled(cancel):
            raise GenerationCancelled(f"generation cancelled before denoiser call {step}")
        model_input = scheduler.scale_model_input(latents, timestep)
        sigma = noise_level(scheduler, timestep)
        output = denoiser(model_input, timestep, step, sigma)
        if on_step is not None:
            denoised = denoised_estimate(model_input, output, sigma, prediction)
        latents = scheduler.step(output, timestep, latents, return_dict=False, **kwargs)[0]
        if on_step is not None:
            on_step(timestep, sigma, latents, denoised)
    return latents
