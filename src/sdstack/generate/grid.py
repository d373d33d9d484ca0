"""X/Y/Z comparison grids: one job, up to three axes of settings, one model load per value.

:func:`plan_grid` turns a job and its axes (``"clip-skip=1,2,3"``, see ``grid_axes``) into
one checked job per cell, seeds fixed once per grid (the reference's "Keep -1 for seeds"
off) unless ``vary_seeds``. :func:`run_grid` then makes the cells:

1. cells are visited in the reference's order by axis cost (checkpoints, then VAEs,
   change least often; ``grid_rules.loop_order``), and a checkpoint or VAE is loaded once
   per run of cells that use it;
2. a ``merge:A,B,alpha=...`` model loads A once; each cell applies its alpha and block
   weights as patches (the ``merge-alpha`` and ``merge-blocks`` axes);
3. consecutive cells with the same LoRA stack whose prepared jobs differ only in their
   conditioning (clip skip, prompt S/R, emphasis, CFG...) share one UNet batch per step
   (``cell_batch.sample_cells``); a LoRA-weight axis switches stacks through the model's
   patcher (cached deltas, no file read);
4. every cell is saved with its own infotext the moment it is decoded
   (``OUT/NNNNN-SEED.png``), so an interrupted grid keeps what it made;
5. one grid per Z value, ``OUT/grid-NNNNN.png``: the cells left to right, top to bottom,
   with the reference's label strips, and the first cell's infotext plus the axes
   (``Script: X/Y/Z plot, X Type: ..., X Values: ...``).

Each cell makes one image: ``batch_size`` and ``batch_count`` are 1 in a grid.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdstack.errors import SdstackError
from sdstack.generate.grid_axes import Axis, parse_axis
from sdstack.generate.grid_rules import (
    SEED_DRAW,
    check_grid_pixels,
    fix_seeds,
    grid_infotext_fields,
    loop_order,
)
from sdstack.generate.job import GenerationJob

ModelLoader = Callable[[str | None, str | None], Any]
"""``load(model, vae) -> ModelComponents`` for checkpoint and VAE axes."""
CellCallback = Callable[["GridCell"], None]


class GridError(SdstackError):
    """A grid that cannot be made as asked (no loader for a checkpoint axis, ...)."""


@dataclass
class GridCell:
    """One cell: its place, its job, and once made its image, infotext and file."""

    ix: int
    iy: int
    iz: int
    index: int
    job: GenerationJob
    image: Any = None
    infotext: str | None = None
    path: Path | None = None


@dataclass
class GridPlan:
    """The checked cells of a grid and the order they are made in."""

    job: GenerationJob
    axes: dict[str, Axis | None]
    cells: list[GridCell]
    order: tuple[str, str, str]

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(|x|, |y|, |z|)``; a missing axis counts 1."""
        x, y, z = (len(self.axes[a].values) if self.axes[a] else 1 for a in "xyz")
        return x, y, z

    def ordered_cells(self) -> list[GridCell]:
        """The cells in making order: ``order[0]`` outermost, ``order[2]`` innermost."""
        place = {"x": lambda c: c.ix, "y": lambda c: c.iy, "z": lambda c: c.iz}
        return sorted(self.cells, key=lambda c: tuple(place[a](c) for a in self.order))

    def denoiser_calls(self) -> int:
        """Denoiser calls of all cells together (for ``--dry-run``): per cell the steps run
        (img2img runs ``int(min(strength, 0.999) * steps) + 1``), ``2n - 1`` for the
        second-order samplers (diffusers' Heun-type schedulers)."""
        from sdstack.generate.samplers import resolve_sampler

        total = 0
        for cell in self.cells:
            params = cell.job.params
            spec, _ = resolve_sampler(params.sampler, params.schedule_type)
            run = params.steps
            if params.is_img2img:
                run = min(int(min(params.denoising_strength, 0.999) * params.steps) + 1, run)
            total += 2 * run - 1 if spec.second_order else run
        return total


@dataclass
class GridResult:
    """The cells, and one grid image (with its infotext and file) per Z value."""

    plan: GridPlan
    grids: list[Any] = field(default_factory=list)
    infotexts: list[str] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)

    @property
    def cells(self) -> list[GridCell]:
        return self.plan.cells


def plan_grid(
    job: GenerationJob,
    x: Axis | str,
    y: Axis | str | None = None,
    z: Axis | str | None = None,
    *,
    vary_seeds: bool = False,
    max_megapixels: float = 200.0,
    rng: random.Random | None = None,
) -> GridPlan:
    """Every cell's job, checked before anything loads.

    Raises:
        GridAxisError: a bad axis or value. GridSizeError: past ``max_megapixels``.
        SettingError, PromptSyntaxError, ...: a cell whose job does not check.
    """
    # 1. Axes, seeds and the size guard.
    given = {"x": x, "y": y, "z": z}
    axes = {name: parse_axis(a) if isinstance(a, str) else a for name, a in given.items()}
    one_image = dataclasses.replace(job.params, batch_size=1, batch_count=1)
    job = dataclasses.replace(job, params=one_image)
    seeds = rng or random.Random()
    job, axes = fix_seeds(job, axes, vary_seeds=vary_seeds, rng=seeds)
    counts = [len(axes[a].values) if axes[a] else 1 for a in "xyz"]
    check_grid_pixels(*counts, job.params.width, job.params.height, max_megapixels)
    # 2. One job per cell: x, then y, then z applied to the base job; each checked.
    cells = []
    for iz in range(counts[2]):
        for iy in range(counts[1]):
            for ix in range(counts[0]):
                cell_job = job
                for name, i in (("x", ix), ("y", iy), ("z", iz)):  # the reference's order
                    if axes[name] is not None:
                        cell_job = axes[name].apply(cell_job, axes[name].values[i])
                if cell_job.params.seed == -1:  # vary_seeds: a seed of its own per cell
                    cell_job = cell_job.replace(seed=seeds.randrange(SEED_DRAW))
                cell_job.check()
                index = ix + iy * counts[0] + iz * counts[0] * counts[1]
                cells.append(GridCell(ix, iy, iz, index, cell_job))
    return GridPlan(job, axes, cells, loop_order(axes))


@dataclass
class _Run:
    """What making the cells needs besides the cells."""

    out: Path | None
    fmt: str
    loras: Any
    embeddings: Any
    batch: bool
    on_cell: CellCallback | None
    callback: Any
    on_phase: Callable[[str], None]
    cancel: Any
    total: int
    made: int = 0


def run_grid(
    plan: GridPlan,
    model: Any,
    *,
    out: str | Path | None = None,
    fmt: str = "png",
    loras: Any = None,
    embeddings: Any = None,
    batch: bool = True,
    margin: int = 0,
    on_cell: CellCallback | None = None,
    callback: Any = None,
    on_phase: Callable[[str], None] | None = None,
    cancel: Any = None,
) -> GridResult:
    """Make every cell of ``plan``, then one grid per Z value (see the module docstring).

    Args:
        plan: from :func:`plan_grid`.
        model: a loaded model, or ``load(model, vae) -> ModelComponents`` (needed for
            checkpoint and VAE axes; called once per run of cells that share both).
        out: the folder cells and grids are saved in as they are made (None: not saved).
        loras: a ``LoraLibrary`` (default: the job's ``lora_dirs`` after the root's).
        embeddings: an ``EmbeddingLibrary`` (default: the job's ``embeddings`` folder).
        batch: let cells that differ only in conditioning share one UNet batch.
        margin: pixels between cells in the grid images.
        on_cell: ``on_cell(cell)`` as each cell is decoded (and saved).
        callback, on_phase, cancel: as for ``generate`` (``StepRecord.batch`` is the cell).

    Raises:
        GridError: a checkpoint or VAE axis without a loader.
        GenerationCancelled: ``cancel`` was set (the cells made so far are saved).
    """
    from sdstack.generate.grid_image import xyz_grids

    state = _Run(
        Path(out) if out is not None else None, fmt, loras, embeddings, batch, on_cell,
        callback, on_phase or (lambda _name: None), cancel, len(plan.cells),
    )  # fmt: skip
    loader = None if hasattr(model, "unet") else model
    components = model if loader is None else None
    # 1. The cells, one model (and VAE) load per run of cells that share them.
    for key, cells in _runs_by_model(plan.ordered_cells()):
        if loader is not None:
            components = None  # the previous model goes before the next one loads
            state.on_phase("loading")
            components = loader(*loaded_model(cells[0].job))
        elif key != _model_key(plan.job):
            raise GridError(
                "the grid has a checkpoint or VAE axis: pass a loader, load(model, vae) -> "
                "ModelComponents, instead of a loaded model"
            )
        _make_cells(components, cells, state)
    # 2. One grid per Z value, labelled, with the first cell's infotext plus the axes.
    result = GridResult(plan)
    labels = [plan.axes[a].labels() if plan.axes[a] else [""] for a in "xyz"]
    images = [cell.image for cell in sorted(plan.cells, key=lambda c: c.index)]
    per_z = len(labels[0]) * len(labels[1])
    for iz, image in enumerate(xyz_grids(images, *labels, margin=margin)):
        text = grid_infotext(plan.cells[iz * per_z].infotext, plan.axes)
        result.grids.append(image)
        result.infotexts.append(text)
        if state.out is not None:
            from sdstack.generate.images import save_image

            result.paths.append(save_image(image, text, state.out, fmt=fmt, prefix="grid-"))
    return result


def grid_infotext(first_cell: str | None, axes: dict[str, Axis | None]) -> str:
    """The first cell's infotext with the grid's fields appended to its parameters line
    (``Script: X/Y/Z plot, X Type: Clip skip, X Values: "1, 2"``, as the reference)."""
    from sdstack.generate.infotext import quote

    fields = grid_infotext_fields(axes.get("x"), axes.get("y"), axes.get("z"))
    extra = ", ".join(f"{key}: {quote(value)}" for key, value in fields.items())
    return f"{first_cell or ''}, {extra}" if extra else first_cell or ""


def _model_key(job: GenerationJob) -> tuple[Any, Any]:
    """What a cell needs loaded: its checkpoint and VAE; for a ``merge:`` model its files
    and method (the alpha and block weights are patches, applied per cell)."""
    from sdstack.merge.patch import is_merge_spec, parse_merge_spec

    if is_merge_spec(job.model):
        return (parse_merge_spec(job.model).base, job.vae)
    return (job.model, job.vae)


def loaded_model(job: GenerationJob) -> tuple[Any, Any]:
    """``(model, vae)`` the loader is called with: a merge's model A."""
    from sdstack.merge.patch import is_merge_spec, parse_merge_spec

    model = parse_merge_spec(job.model).a if is_merge_spec(job.model) else job.model
    return model, job.vae


def _runs_by_model(cells: Sequence[GridCell]) -> list[tuple[tuple[Any, Any], list[GridCell]]]:
    """Consecutive cells grouped by the (checkpoint, VAE) they use."""
    runs: list[tuple[tuple[Any, Any], list[GridCell]]] = []
    for cell in cells:
        key = _model_key(cell.job)
        if runs and runs[-1][0] == key:
            runs[-1][1].append(cell)
        else:
            runs.append((key, [cell]))
    return runs


def _make_cells(components: Any, cells: Sequence[GridCell], state: _Run) -> None:
    """Prepare each cell; consecutive cells with the same LoRA stack and batch key are
    sampled together, then decoded and saved one by one."""
    from sdstack.generate.cell_batch import batch_key
    from sdstack.generate.pipeline import prepare

    pending: list[tuple[GridCell, Any]] = []
    pending_key: Any = None
    for cell in cells:
        stack = (tuple(cell.job.lora_specs()), cell.job.model)
        if pending and stack != pending_key[0]:
            _flush(components, pending, state)
        _apply_cell_merge(components, cell.job)
        state.on_phase("encoding")
        prepared = prepare(components, cell.job.params, **_cell_inputs(components, cell, state))
        key = (stack, batch_key(prepared) if state.batch else None)
        if pending and (key[1] is None or key != pending_key):
            _flush(components, pending, state)
        pending.append((cell, prepared))
        pending_key = key
        if key[1] is None:
            _flush(components, pending, state)
    _flush(components, pending, state)


def _apply_cell_merge(components: Any, job: GenerationJob) -> None:
    """A cell of a ``merge:`` model re-weights the merge through the patcher."""
    from sdstack.merge.patch import apply_merge, is_merge_spec, parse_merge_spec

    if is_merge_spec(job.model):
        spec = parse_merge_spec(job.model)
        apply_merge(components, spec)
        components.name, components.path = spec.text(), None  # the infotext's Model


def _cell_inputs(components: Any, cell: GridCell, state: _Run) -> dict[str, Any]:
    """``prepare``'s keyword arguments for a cell: embeddings and its LoRA stack."""
    from sdstack.generate.run import _embedding_library, _lora_library

    job = cell.job
    if state.embeddings is None and job.embeddings is not None:
        state.embeddings = _embedding_library(components, job.embeddings)
    if state.loras is None and job.lora_dirs:
        state.loras = _lora_library(job.lora_dirs)
    return {
        "embeddings": state.embeddings,
        "networks": job.networks,
        "lora_hashes": job.lora_hashes,
        "loras": state.loras,
    }


def _flush(components: Any, pending: list[tuple[GridCell, Any]], state: _Run) -> None:
    """Sample the pending cells (together when several), decode, save, report; empties it."""
    from sdstack.generate.cell_batch import sample_cells
    from sdstack.generate.pipeline import decode, sample

    if not pending:
        return
    state.on_phase("sampling")
    seeds = [[cell.job.params.seed] for cell, _ in pending]
    first = pending[0][0].index
    callback = None
    if state.callback is not None:  # the record names the (first) cell: "sampling 3/12"

        def callback(record: Any) -> None:
            state.callback(dataclasses.replace(record, batch=first, batches=state.total))

    if len(pending) == 1:
        latents = [sample(pending[0][1], seeds[0], callback=callback, cancel=state.cancel)]
    else:
        latents = sample_cells(
            [p for _, p in pending], seeds, callback=callback, cancel=state.cancel
        )
    state.on_phase("decoding")
    for (cell, prepared), cell_latents, cell_seeds in zip(pending, latents, seeds, strict=True):
        cell.image = decode(components, cell_latents, cell.job.params.vae_tiling)[0]
        cell.infotext = prepared.infotext(cell_seeds[0])
        if state.out is not None:
            from sdstack.generate.images import save_image

            cell.path = save_image(
                cell.image, cell.infotext, state.out, seed=cell_seeds[0], fmt=state.fmt
            )
        state.made += 1
        if state.on_cell is not None:
            state.on_cell(cell)
    pending.clear()


def grid(
    model: Any,
    job: GenerationJob,
    x: Axis | str,
    y: Axis | str | None = None,
    z: Axis | str | None = None,
    *,
    vary_seeds: bool = False,
    max_megapixels: float = 200.0,
    **options: Any,
) -> GridResult:
    """:func:`plan_grid` then :func:`run_grid`: ``grid(model, job, "clip-skip=1,2,3",
    "prompt-sr=dog,cat", out="outputs")``. ``options`` are :func:`run_grid`'s."""
    plan = plan_grid(job, x, y, z, vary_seeds=vary_seeds, max_megapixels=max_megapixels)
    return run_grid(plan, model, **options)
