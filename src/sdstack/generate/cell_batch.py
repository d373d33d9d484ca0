"""Grid cells that differ only in conditioning, denoised together: one UNet batch per step.

Cells (prepared jobs) with the same model, sampler, schedule type, steps, first step,
size and batch size run through one sampler: their latents are stacked along the batch
dimension (cell after cell, ``batch`` rows each) and each denoiser call builds every
cell's UNet rows exactly as its own :class:`~sdstack.generate.denoise.GuidedDenoiser`
would (its prompt schedule entry at that call, its AND parts and weights, its negative,
its padding), puts the rows of all cells that have the same token length into one UNet
call, and guides each cell's outputs with its own CFG scale and AND weights.

Why a cell equals its own run (``sample(prepared[i], seeds[i])``):

- noise: cell ``i``'s initial noise and its generators come from its own seeds
  (``image_noise``, reference "RNG: CPU"); the diffusers schedulers draw ancestral and
  SDE noise row by row from the generator list they are given (``randn_tensor`` with a
  list), which is every cell's generators in row order, and DPM++ SDE builds one
  Brownian tree per row from ``noise_sampler_seed``, every cell's seeds in row order;
  so every row draws the numbers its single run draws, even when cells share a seed;
- the scheduler step is elementwise for every registered sampler, with the same sigmas
  for all rows (same sampler, schedule type, steps and first step);
- img2img: each cell's rows start from its own init latents (the first step must agree);
- the UNet evaluates each row independently; rows of a larger batch differ only by the
  rounding of float32 kernels for another batch size, as for a batch of images (see
  ``tests/generate/test_batch_consistency.py``).

Rows of different token lengths (a prompt over 75 tokens in one cell only, or a cell
whose prompt and negative differ in length without ``pad_conds``) cannot share a tensor:
each length gets its own UNet call in the step. Hooks see every call made, with the
rows of all cells in it (``row_kinds`` concatenated, cell after cell; ``batch`` is the
images per cell).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from sdstack.errors import SdstackError
from sdstack.generate.denoise import GuidedDenoiser, run_denoising
from sdstack.generate.hooks import StepCallback, StepRecord, UNetCall
from sdstack.generate.latents import image_noise
from sdstack.generate.pipeline import PreparedJob
from sdstack.generate.samplers import effective_schedule, make_scheduler
from sdstack.generate.token_merging import token_merging

__all__ = ["CellBatchError", "CellBatchKey", "batch_key", "sample_cells"]


class CellBatchError(SdstackError):
    """Cells given to :func:`sample_cells` that cannot share one sampler run."""


class CellBatchKey(NamedTuple):
    """What cells sharing one UNet batch must agree on (see :func:`batch_key`)."""

    components: int  # id() of the loaded model: the same weights
    sampler: str
    schedule: str  # the effective sigma schedule ("Automatic" resolved)
    steps: int
    start: int  # first step index (img2img)
    img2img: bool
    width: int
    height: int
    batch_size: int
    hooks: tuple[int, ...]  # id() of each hook, in order
    unet_loras: tuple[tuple[str, float, tuple[float, ...] | None], ...]
    token_merging: float  # the UNet is patched for the whole batch


def batch_key(prepared: PreparedJob) -> CellBatchKey | None:
    """The key of a prepared cell: cells with equal keys can share one UNet batch per step.

    Equal keys mean the same model object, sampler, effective schedule type, steps,
    first step (img2img denoising strength), txt2img or img2img, size, batch size,
    hooks (the same functions, in order), LoRAs as the UNet carries them (file hash,
    UNet multiplier, block weights) and the token merging ratio. Prompt, negative, clip
    skip, emphasis, CFG scale, ``pad_conds``, seeds and the init image itself may
    differ. None when the cell's denoiser is not a :class:`GuidedDenoiser` (nothing to
    build its rows from).

    The model must carry the cells' LoRA stack when they are sampled (``prepare``
    applies the stack: prepare the cells of one key after each other, or re-apply it).
    """
    denoiser = prepared.denoiser
    if not isinstance(denoiser, GuidedDenoiser):
        return None
    params, stack = prepared.params, prepared.loras
    loras = tuple(
        (lora.hash, float(lora.spec.unet_multiplier), lora.spec.lbw)
        for lora in (stack.loras if stack is not None else ())
    )
    return CellBatchKey(
        components=id(prepared.components),
        sampler=prepared.spec.name,
        schedule=effective_schedule(prepared.spec, prepared.schedule_type),
        steps=params.steps,
        start=prepared.start,
        img2img=prepared.init_latents is not None,
        width=params.width,
        height=params.height,
        batch_size=params.batch_size,
        hooks=tuple(id(hook) for hook in denoiser.hooks),
        unet_loras=loras,
        token_merging=float(params.token_merging),
    )


class CellDenoiser:
    """The denoiser of stacked cells: each cell's rows built by its own denoiser, rows of
    one token length in one UNet call, each cell guided with its own CFG and AND weights.

    ``model_input`` rows: cell after cell, ``batch`` rows each.

    Attributes:
        calls_made: UNet calls made so far.
    """

    def __init__(self, denoisers: Sequence[GuidedDenoiser], batch: int) -> None:
        self.denoisers = tuple(denoisers)
        self.batch = batch
        self.calls_made = 0

    def __call__(
        self, model_input: torch.Tensor, timestep: Any, step: int, sigma: float = math.nan
    ) -> torch.Tensor:
        """Every cell's guided model output at denoiser call ``step``, stacked like the input."""
        inputs = model_input.split(self.batch)
        cells = [
            denoiser.unet_calls(rows, timestep, step, sigma)
            for denoiser, rows in zip(self.denoisers, inputs, strict=True)
        ]
        # 1. Group every cell's calls by token length (first-seen order).
        groups: dict[int, list[tuple[int, int]]] = {}
        for index, (calls, _weights) in enumerate(cells):
            for position, call in enumerate(calls):
                tokens = call.encoder_hidden_states.shape[1]
                groups.setdefault(tokens, []).append((index, position))
        # 2. One UNet call per group; its output rows handed back to the calls they came from.
        outputs: dict[tuple[int, int], torch.Tensor] = {}
        for members in groups.values():
            parts = [cells[index][0][position] for index, position in members]
            merged = self._merge(parts, timestep, step, sigma)
            result = self.denoisers[members[0][0]].run_unet(merged)
            self.calls_made += 1
            sizes = [part.sample.shape[0] for part in parts]
            outputs.update(zip(members, result.split(sizes), strict=True))
        # 3. Each cell guided with its own CFG scale and AND weights.
        guided = [
            denoiser.guide([outputs[index, p] for p in range(len(calls))], weights)
            for index, (denoiser, (calls, weights)) in enumerate(
                zip(self.denoisers, cells, strict=True)
            )
        ]
        return torch.cat(guided)

    def _merge(self, parts: list[UNetCall], timestep: Any, step: int, sigma: float) -> UNetCall:
        if len(parts) == 1:
            return parts[0]
        return UNetCall(
            torch.cat([part.sample for part in parts]),
            timestep,
            torch.cat([part.encoder_hidden_states for part in parts]),
            step,
            sigma,
            tuple(kind for part in parts for kind in part.row_kinds),
            self.batch,
        )


def _check_cells(prepared: Sequence[PreparedJob], seeds: Sequence[Sequence[int]]) -> int:
    """The images per cell; raises CellBatchError for cells that cannot share a run."""
    if not prepared:
        raise CellBatchError("sample_cells: no cells given; expected at least one prepared job")
    if len(seeds) != len(prepared):
        raise CellBatchError(
            f"sample_cells: {len(prepared)} cells but {len(seeds)} seed lists; expected one "
            "seed list per cell"
        )
    batch = len(seeds[0])
    first = batch_key(prepared[0])
    for index, (cell, cell_seeds) in enumerate(zip(prepared, seeds, strict=True)):
        key = batch_key(cell)
        if key is None:
            raise CellBatchError(
                f"sample_cells: cell {index} cannot be batched (its denoiser is "
                f"{type(cell.denoiser).__name__}); expected a GuidedDenoiser: sample it alone"
            )
        if key != first:
            differ = [name for name in key._fields if getattr(key, name) != getattr(first, name)]
            raise CellBatchError(
                f"sample_cells: cell {index} differs from cell 0 in {', '.join(differ)}; "
                "expected cells with equal batch_key (group them by batch_key)"
            )
        if not cell_seeds or len(cell_seeds) != batch:
            raise CellBatchError(
                f"sample_cells: cell {index} has {len(cell_seeds)} seeds, cell 0 {batch}; "
                "expected the same number of seeds, at least 1, for every cell"
            )
    return batch


def _start_latents(
    prepared: Sequence[PreparedJob], noise: torch.Tensor, scheduler: Any, timesteps: Any
) -> torch.Tensor:
    """txt2img: ``noise * init_noise_sigma``; img2img: each cell's init latents (expanded
    to its rows) noised to the first timestep (``add_noise``), as ``sample`` does."""
    if prepared[0].init_latents is None:
        return noise * scheduler.init_noise_sigma
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(prepared[0].start * scheduler.order)
    batch = noise.shape[0] // len(prepared)
    init = torch.cat([cell.init_latents.expand(batch, -1, -1, -1) for cell in prepared])
    return scheduler.add_noise(init.to(noise.device), noise, timesteps[:1])


@torch.inference_mode()
def sample_cells(
    prepared: Sequence[PreparedJob],
    seeds: Sequence[Sequence[int]],
    *,
    callback: StepCallback | None = None,
    cancel: Any = None,
) -> list[torch.Tensor]:
    """Denoise cells with equal :func:`batch_key` in one sampler run: one UNet batch per step.

    Cell ``i`` (image ``j`` from ``seeds[i][j]``) gets what ``sample(prepared[i],
    seeds[i])`` gives, up to the rounding of float32 kernels for another batch size (see
    the module doc); UNet calls per step: one per distinct token length among the cells'
    contexts (one when all agree), not one per cell.

    Args:
        prepared: the cells (``pipeline.prepare``), sharing one model (the same object).
        seeds: per cell, one seed per image; the same number for every cell.
        callback: a :class:`StepRecord` after every denoiser call (``step`` counted as
            in one job of ``calls_per_batch`` calls); ``latents``/``denoised`` hold all
            cells' rows, cell ``i`` at rows ``i * b`` to ``(i + 1) * b``.
        cancel: ``threading.Event``-like or callable; checked before every denoiser call.

    Returns:
        One latent tensor ``(b, C, h, w)`` per cell, in the order given.

    Raises:
        CellBatchError: no cells, unequal keys or seed counts, a cell that cannot batch.
        GenerationCancelled: ``cancel`` was set.
    """
    # 1. Check the cells; each cell's noise and generators from its own seeds.
    batch = _check_cells(prepared, seeds)
    first = prepared[0]
    unet, scale = first.components.unet, first.components.vae_scale_factor
    shape = (unet.config.in_channels, first.params.height // scale, first.params.width // scale)
    flat_seeds = [seed for cell_seeds in seeds for seed in cell_seeds]
    noises, generators = zip(*(image_noise(seed, shape) for seed in flat_seeds), strict=True)
    noise = torch.cat(noises).to(unet.device)
    # 2. One scheduler for all rows; the start latents.
    scheduler = make_scheduler(first.spec, first.schedule_type, first.components.scheduler_config)
    if hasattr(scheduler, "noise_sampler_seed"):
        scheduler.noise_sampler_seed = flat_seeds  # DPM++ SDE: one Brownian tree per row
    scheduler.set_timesteps(first.params.steps, device=unet.device)
    timesteps = scheduler.timesteps[first.start * scheduler.order :]
    latents = _start_latents(prepared, noise, scheduler, timesteps)
    # 3. Denoise all rows together; split per cell.
    on_step = None
    if callback is not None:
        count, total = iter(range(1, first.calls_per_batch + 1)), first.calls_per_batch

        def on_step(timestep: Any, sigma: float, state: torch.Tensor, x0: torch.Tensor) -> None:
            callback(StepRecord(next(count), total, 0, 1, timestep, sigma, state, x0))

    denoiser = CellDenoiser([cell.denoiser for cell in prepared], batch)
    with token_merging(unet, first.params.token_merging):  # one ratio per batch key
        latents = run_denoising(
            scheduler,
            timesteps,
            latents,
            denoiser,
            generators=list(generators),
            on_step=on_step,
            cancel=cancel,
        )
    return list(latents.split(batch))
