"""Grids on the tiny model: cells and their infotexts, the grid image and its infotext,
batched cells equal their single jobs, LoRA-weight and checkpoint axes, interruption."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from sdstack.generate import GenerationJob, GenerationParams, generate
from sdstack.generate.grid import GridError, plan_grid, run_grid
from sdstack.generate.grid_image import xyz_grids
from sdstack.generate.images import read_infotext
from sdstack.models.tiny import tiny_components

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def model():
    return tiny_components(seed=0)


def base_job(prompt: str = "a cat in the snow", **settings) -> GenerationJob:
    values = {"steps": 3, "width": 64, "height": 64, "seed": 11, **settings}
    return GenerationJob(GenerationParams(prompt, **values))


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_a_clip_skip_by_prompt_sr_grid(model, tmp_path):
    plan = plan_grid(base_job(), "clip-skip=1,2,1.5", "prompt-sr=cat,dog")
    assert plan.shape == (3, 2, 1) and len(plan.cells) == 6
    result = run_grid(plan, model, out=tmp_path)
    # Every cell saved with its own settings in its infotext.
    texts = {cell.index: read_infotext(cell.path) for cell in result.cells}
    assert texts[0].startswith("a cat in the snow\n") and "Clip skip" not in texts[0]
    assert texts[1].startswith("a cat in the snow\n") and "Clip skip: 2," in texts[1]
    assert texts[5].startswith("a dog in the snow\n") and "Clip skip: 1.5," in texts[5]
    # Columns differ (their conditionings differ), and the grid is the cells, labelled.
    images = [cell.image for cell in sorted(result.cells, key=lambda c: c.index)]
    assert not np.array_equal(pixels(images[0]), pixels(images[1]))
    expected = xyz_grids(images, plan.axes["x"].labels(), plan.axes["y"].labels(), [""])[0]
    assert np.array_equal(pixels(result.grids[0]), pixels(expected))
    assert result.paths[0].name == "grid-00000.png"
    grid_text = read_infotext(result.paths[0])
    assert grid_text.startswith(texts[0].splitlines()[0])
    assert grid_text.endswith(
        'Script: X/Y/Z plot, X Type: Clip skip, X Values: "1,2,1.5", Y Type: Prompt S/R, '
        'Y Values: "cat,dog"'
    )


def test_a_batched_cell_equals_its_job_run_alone(model):
    plan = plan_grid(base_job(), "clip-skip=1,2", "emphasis=original,no-norm")
    batched = run_grid(plan, model, batch=True)
    alone = run_grid(plan, model, batch=False)
    for together, single in zip(batched.cells, alone.cells, strict=True):
        # Unbatched, a cell is exactly generate() of its job.
        assert np.array_equal(pixels(single.image), pixels(generate(model, single.job)[0].image))
        # Batched: the same latents within float32 batched-kernel rounding (see
        # test_cell_batch), so the 8-bit pixels at most one level apart.
        assert np.abs(pixels(together.image) - pixels(single.image)).max() <= 1


def test_cells_of_a_lora_weight_axis_switch_through_the_patcher(model, tmp_path, monkeypatch):
    from sdstack.lora.stack import active_loras
    from sdstack.lora.tiny import write_tiny_lora

    monkeypatch.setenv("SDSTACK_CACHE_DIR", str(tmp_path / "cache"))
    write_tiny_lora(model, tmp_path / "loras/film.safetensors", seed=3)
    job = base_job("a cat <lora:film:1>")
    job.lora_dirs = (str(tmp_path / "loras"),)
    reads = []
    import sdstack.lora.formats as formats

    original_read = formats.read_lora
    monkeypatch.setattr(
        formats, "read_lora", lambda *a, **k: reads.append(a) or original_read(*a, **k)
    )
    result = run_grid(plan_grid(job, "lora:film=0,0.5,1"), model)
    assert len(reads) == 1  # the file is read once; the weights switch from the cache
    plain = generate(model, base_job("a cat "))[0].image
    assert np.array_equal(pixels(result.cells[0].image), pixels(plain))
    assert "<lora:film:0.5>" in result.cells[1].infotext
    assert not np.array_equal(pixels(result.cells[1].image), pixels(result.cells[2].image))
    generate(model, base_job())  # a plain job takes the grid's stack off
    assert active_loras(model) is None


def test_checkpoints_load_once_per_value_costliest_axis_outermost(tmp_path):
    loads = []

    def load(model, vae):
        loads.append(model)
        return tiny_components(seed=0 if model is None else int(model))

    plan = plan_grid(base_job(), "cfg=5,7", "checkpoint=1,2")
    assert plan.order[0] == "y"  # the checkpoint axis is the costliest
    result = run_grid(plan, load)
    assert loads == ["1", "2"]
    assert [c.index for c in result.cells] == [0, 1, 2, 3]
    assert (
        "Model" not in result.cells[0].infotext or "Model: tiny-random" in result.cells[0].infotext
    )


def test_a_checkpoint_axis_needs_a_loader(model):
    with pytest.raises(GridError, match="the grid has a checkpoint or VAE axis: pass a loader"):
        run_grid(plan_grid(base_job(), "checkpoint=a,b"), model)


def test_an_interrupted_grid_keeps_the_cells_it_made(model, tmp_path):
    from sdstack.generate.denoise import GenerationCancelled

    cancel = threading.Event()
    made = []

    def on_cell(cell):
        made.append(cell.path)
        cancel.set()  # stop after the first cell

    plan = plan_grid(base_job(), "steps=2,3,4")
    with pytest.raises(GenerationCancelled):
        run_grid(plan, model, out=tmp_path, on_cell=on_cell, cancel=cancel, batch=False)
    assert len(made) == 1 and made[0].is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [made[0].name]


def test_seeds_are_drawn_once_per_grid_unless_varied():
    plan = plan_grid(base_job(seed=-1), "cfg=5,6,7")
    seeds = {cell.job.params.seed for cell in plan.cells}
    assert len(seeds) == 1 and -1 not in seeds
    varied = plan_grid(base_job(seed=-1), "cfg=5,6,7", vary_seeds=True)
    assert len({cell.job.params.seed for cell in varied.cells}) == 3


def test_dry_run_counts(model):
    plan = plan_grid(base_job(sampler="Heun"), "steps=2,3", "clip-skip=1,2")
    assert plan.denoiser_calls() == 2 * ((2 * 2 - 1) + (2 * 3 - 1))
