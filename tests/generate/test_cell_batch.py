"""Cells denoised in one UNet batch per step against the same cells run alone.

The truth for every cell is ``sample(prepared, seeds)``, the single run. A batched cell
differs from it only where float32 kernels round differently for another number of UNet
rows (as a batch image differs from its single run, see ``test_batch_consistency``), so
the latents must agree within ``latent_atol(calls, single, cfg, weights)`` with that
cell's own CFG scale and AND weights: per denoiser call at most
``(1 + 2 cfg sum|w_i|) * FORWARD_ULPS * U32`` relative to ``max|latent|``, summed over the
calls. Everything the cells share by construction (initial noise, the rows' conditioning,
the UNet calls made) is compared exactly.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from sdstack.generate import GenerationCancelled, GenerationParams
from sdstack.generate.cell_batch import CellBatchError, batch_key, sample_cells
from sdstack.generate.hooks import ROW_COND, ROW_UNCOND
from sdstack.generate.pipeline import prepare, sample
from tests.generate import latent_atol

# diffusers' schedulers trip numpy 2 deprecation warnings on every step
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    # torchsde, for DPM++ SDE: a float32 sigma a hair below the tree's float64 start
    pytest.mark.filterwarnings("ignore:Should have ta>=t0:UserWarning"),
]

SEED = 40
PROMPT = "a (red:1.2) cat AND sky :0.5"
BASE = {"negative": "blurry", "width": 64, "height": 64, "steps": 3, "cfg_scale": 5.0}
LONG = ", ".join(["a red cat on a blue mat"] * 14)  # over 75 tokens: 154-token context


class Recorder:
    """A UNet hook recording each call (rows, kinds, batch, context, step); changes nothing."""

    def __init__(self):
        self.calls = []

    def __call__(self, call):
        self.calls.append(call)
        return call


def cell(components, prompt=PROMPT, *, hooks=(), **changes):
    return prepare(components, GenerationParams(prompt, **{**BASE, **changes}), hooks=hooks)


def and_weights(prepared) -> list[float]:
    """The AND weights of the prompt's first schedule entry (every entry has the same)."""
    return [float(w) for _cond, w in prepared.denoiser.cond_schedule[0][1]]


def assert_cells_are_single_runs(cells, seeds, batched):
    for prepared, cell_seeds, got in zip(cells, seeds, batched, strict=True):
        single = sample(prepared, cell_seeds)
        cfg = prepared.params.cfg_scale
        atol = latent_atol(prepared.calls_per_batch, single, cfg, and_weights(prepared))
        torch.testing.assert_close(got, single, rtol=0, atol=atol)


def test_conditioning_cells_batched_equal_their_single_runs(tiny_components):
    cells = [
        cell(tiny_components, clip_skip=1),
        cell(tiny_components, clip_skip=2),
        cell(tiny_components, clip_skip=1.5),
        cell(tiny_components, "a (blue:1.3) dog AND sky :0.5", emphasis="no-norm"),
        cell(tiny_components, "a [cat:dog:0.5] AND sky :0.8", cfg_scale=2.5),
    ]
    seeds = [[SEED]] * len(cells)
    batched = sample_cells(cells, seeds)
    assert_cells_are_single_runs(cells, seeds, batched)
    # Not vacuous: the cells' conditionings give images far apart.
    atol = latent_atol(cells[0].calls_per_batch, batched[0], 5.0, (1.0, 0.5))
    for a, b in itertools.combinations(batched, 2):
        assert float((a - b).abs().max()) > 100 * atol


def test_one_cell_is_the_single_run_bit_for_bit(tiny_components):
    """One cell makes the very UNet calls ``sample`` makes, in the same order."""
    prepared = cell(tiny_components, sampler="Euler a")
    assert torch.equal(sample_cells([prepared], [[SEED]])[0], sample(prepared, [SEED]))


SAMPLERS = [
    "Euler a",  # ancestral noise from each row's generator
    "DPM++ 2M SDE",  # SDE noise from each row's generator
    "DPM++ SDE",  # one Brownian tree per row, from its seed
    "Heun",  # second order: prompt schedules over 2 * steps
]


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_each_cell_keeps_its_own_noise(tiny_components, sampler):
    """Cells sharing a seed, and a cell with another seed, each draw their single run's
    noise: a mix-up of generators or trees would move the latents by O(1)."""
    prompt = "a [red:blue:0.5] cat"  # the schedule switches mid-run (per cell)
    cells = [
        cell(tiny_components, prompt, sampler=sampler, clip_skip=1),
        cell(tiny_components, prompt, sampler=sampler, clip_skip=2),
        cell(tiny_components, prompt, sampler=sampler, clip_skip=1),
    ]
    seeds = [[SEED], [SEED], [SEED + 7]]
    assert_cells_are_single_runs(cells, seeds, sample_cells(cells, seeds))


def test_cells_of_several_images_and_their_first_inputs(tiny_components):
    """Two images per cell: rows cell after cell; the first UNet input of each row is
    exactly its single run's (the same elementwise scaling of the same numbers)."""
    hook = Recorder()
    cells = [
        cell(tiny_components, sampler="Euler a", batch_size=2, clip_skip=s, hooks=[hook])
        for s in (1, 2)
    ]
    seeds = [[SEED, SEED + 1], [SEED + 5, SEED]]
    batched = sample_cells(cells, seeds)
    first = hook.calls[0]
    assert_cells_are_single_runs(cells, seeds, batched)
    for index, (prepared, cell_seeds) in enumerate(zip(cells, seeds, strict=True)):
        hook.calls.clear()
        sample(prepared, cell_seeds)
        parts = len(and_weights(prepared)) + 1
        rows = first.sample[index * 2 * parts : index * 2 * parts + 2]
        assert torch.equal(rows, hook.calls[0].sample[:2])


def test_one_unet_call_per_step_with_every_cells_rows(tiny_components):
    hook = Recorder()
    cells = [
        cell(tiny_components, clip_skip=1, hooks=[hook]),
        cell(tiny_components, "a dog", clip_skip=2, cfg_scale=3.0, hooks=[hook]),
        cell(tiny_components, emphasis="ignore", hooks=[hook]),
    ]
    sample_cells(cells, [[SEED]] * 3)
    batched = list(hook.calls)
    # As many UNet calls as one job, where the cells run alone make one job each.
    assert len(batched) == cells[0].calls_per_batch == 3
    hook.calls.clear()
    for prepared in cells:
        sample(prepared, [SEED])
    assert len(hook.calls) == 3 * len(batched)
    # Each call: every cell's rows, cell after cell, as each cell's denoiser lays them out.
    for step, call in enumerate(batched):
        contexts = [prepared.denoiser.batch_context(step, 1)[0] for prepared in cells]
        assert all(len(c) == 1 for c in contexts)  # one 77-token call per cell
        assert torch.equal(call.encoder_hidden_states, torch.cat([c[0] for c in contexts]))
        kinds = ()
        for prepared in cells:
            kinds += (ROW_COND,) * len(and_weights(prepared)) + (ROW_UNCOND,)
        assert call.row_kinds == kinds and call.batch == 1 and call.step == step
        assert call.sample.shape[0] == len(kinds)


def test_rows_of_other_token_lengths_go_in_their_own_call(tiny_components):
    """77-token rows in one call, 154-token rows in another; a pad_conds cell pads its
    negative to 154 tokens and joins the 154 call whole."""
    hook = Recorder()
    cells = [
        cell(tiny_components, "a cat", hooks=[hook]),
        cell(tiny_components, LONG, hooks=[hook]),
        cell(tiny_components, LONG, pad_conds=True, clip_skip=2, hooks=[hook]),
    ]
    seeds = [[SEED]] * 3
    batched = sample_cells(cells, seeds)
    calls = cells[0].calls_per_batch
    assert len(hook.calls) == 2 * calls
    short, long = hook.calls[0], hook.calls[1]
    assert short.encoder_hidden_states.shape[1] == 77
    assert short.row_kinds == (ROW_COND, ROW_UNCOND, ROW_UNCOND)  # cell 0, cell 1's negative
    assert long.encoder_hidden_states.shape[1] == 154
    assert long.row_kinds == (ROW_COND, ROW_COND, ROW_UNCOND)  # cell 1's prompt, cell 2
    assert cells[2].denoiser.padded and not cells[1].denoiser.padded
    assert_cells_are_single_runs(cells, seeds, batched)


def init_image(seed: int) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 256, (64, 64, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(values.numpy(), mode="RGB")


def test_img2img_cells_each_start_from_their_own_init_image(tiny_components):
    options = {"sampler": "Euler a", "denoising_strength": 0.6}
    cells = [
        cell(tiny_components, init_image=init_image(1), clip_skip=1, **options),
        cell(tiny_components, init_image=init_image(2), clip_skip=2, **options),
    ]
    assert cells[0].start == 1 and batch_key(cells[0]) == batch_key(cells[1])
    seeds = [[SEED], [SEED]]
    assert_cells_are_single_runs(cells, seeds, sample_cells(cells, seeds))


def test_batch_key_joins_conditioning_and_separates_the_rest(tiny_components):
    hook = Recorder()
    key = batch_key(cell(tiny_components))
    same = [
        {"clip_skip": 2},
        {"emphasis": "no-norm"},
        {"cfg_scale": 9.0},
        {"pad_conds": True},
        {"negative": "ugly"},
        {"seed": 3},
        {"sampler": "DPM++ 2M", "schedule_type": "Karras"},  # its Automatic schedule
    ]
    for changes in same:
        assert batch_key(cell(tiny_components, **changes)) == key, changes
    different = [
        {"steps": 4},
        {"width": 72},
        {"height": 72},
        {"sampler": "Euler"},
        {"schedule_type": "Exponential"},
        {"batch_size": 2},
        {"init_image": init_image(1)},
    ]
    for changes in different:
        assert batch_key(cell(tiny_components, **changes)) != key, changes
    assert batch_key(cell(tiny_components, hooks=[hook])) != key
    strengths = {batch_key(cell(tiny_components, init_image=init_image(1), denoising_strength=d))
                 for d in (0.6, 0.9)}  # fmt: skip
    assert len(strengths) == 2  # first steps 1 and 0
    other_model = dataclasses.replace(tiny_components)
    assert batch_key(cell(other_model)) != key


def test_cancel_stops_before_the_next_denoiser_call(tiny_components):
    hook = Recorder()
    cells = [cell(tiny_components, clip_skip=s, hooks=[hook]) for s in (1, 2)]
    event = threading.Event()
    event.set()
    with pytest.raises(GenerationCancelled):
        sample_cells(cells, [[SEED]] * 2, cancel=event)
    assert hook.calls == []
    with pytest.raises(GenerationCancelled, match="before denoiser call 2"):
        sample_cells(cells, [[SEED]] * 2, cancel=lambda: len(hook.calls) >= 2)
    assert len(hook.calls) == 2


def test_callback_sees_every_cells_rows_each_call(tiny_components):
    cells = [cell(tiny_components, sampler="Heun", clip_skip=s) for s in (1, 2)]
    records = []
    batched = sample_cells(cells, [[SEED]] * 2, callback=records.append)
    calls = cells[0].calls_per_batch
    assert [(r.step, r.total, r.batch, r.batches) for r in records] == [
        (k, calls, 0, 1) for k in range(1, calls + 1)
    ]
    assert records[0].latents.shape == records[0].denoised.shape == (2, 4, 8, 8)
    assert torch.equal(records[-1].latents, torch.cat(batched))


def test_cells_that_cannot_share_are_refused(tiny_components):
    a, b = cell(tiny_components), cell(tiny_components, steps=4)
    with pytest.raises(CellBatchError, match=r"^sample_cells: no cells given"):
        sample_cells([], [])
    with pytest.raises(CellBatchError, match="2 cells but 1 seed lists"):
        sample_cells([a, a], [[SEED]])
    with pytest.raises(CellBatchError, match=r"cell 1 differs from cell 0 in steps; expected"):
        sample_cells([a, b], [[SEED], [SEED]])
    with pytest.raises(CellBatchError, match="cell 1 has 2 seeds, cell 0 1"):
        sample_cells([a, a], [[SEED], [SEED, SEED + 1]])
    with pytest.raises(CellBatchError, match="cell 0 has 0 seeds"):
        sample_cells([a], [[]])
    odd = dataclasses.replace(a, denoiser=lambda *args: None)
    assert batch_key(odd) is None
    with pytest.raises(CellBatchError, match="cell 1 cannot be batched"):
        sample_cells([a, odd], [[SEED], [SEED]])


def test_decoded_cells_are_within_a_pixel_level_of_their_single_runs(tiny_components):
    """What a grid shows: 255 * (x + 1) / 2 truncated moves by at most one level when the
    decoded value moves by less than 2 / 255."""
    from sdstack.generate.pipeline import decode

    cells = [cell(tiny_components, clip_skip=s) for s in (1, 2)]
    batched = sample_cells(cells, [[SEED]] * 2)
    for prepared, got in zip(cells, batched, strict=True):
        want = np.asarray(decode(tiny_components, sample(prepared, [SEED]))[0]).astype(int)
        have = np.asarray(decode(tiny_components, got)[0]).astype(int)
        assert np.abs(have - want).max() <= 1
