"""The ``sdstack grid`` command: an X/Y/Z comparison grid in one process, one load per model.

Every ``generate`` option sets the base job; ``--x/--y/--z AXIS=VALUES`` vary it (see
``sdstack.generate.grid_axes``). ``--spec grid.toml`` gives the same options as a file
(keys are the long option names; options on the command line win). Cells are saved as
``OUT/NNNNN-SEED.png`` as they are made, grids as ``OUT/grid-NNNNN.png``; the paths are
printed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from sdstack.commands.generate import add_job_arguments
from sdstack.commands.progress import JobProgress

AXIS_HELP = (
    "AXIS=VALUES, e.g. clip-skip=1,2,3 or 'Prompt S/R=dog,cat' or lora:film=0-1 [5]; axes: "
    "seed, steps, cfg, sampler, schedule-type, clip-skip, emphasis, size, denoising, "
    "checkpoint, vae, prompt-sr, lora:NAME, lora-te:NAME, lora-unet:NAME, merge-alpha, "
    "merge-blocks (with --model merge:A,B,...; the reference UI's "
    "labels work too); values: comma lists with quoting, 1-5, 1-10 (+2), 0-1 [5]"
)


def register(subparsers: Any) -> None:
    """Add the ``grid`` parser."""
    parser = subparsers.add_parser(
        "grid",
        help="X/Y/Z comparison grid: vary clip skip, LoRA weights, samplers, checkpoints...",
        description="Make one image per combination of up to three axes of settings, with "
        "every generate option as the base, and a labelled grid per Z value (OUT/grid-NNNNN"
        ".png, with the first cell's infotext and the axes). Each cell is saved with its own "
        "infotext as soon as it is made, so --from-infotext reproduces any cell and an "
        "interrupted grid keeps what it made. The model loads once; cells that differ only "
        "in conditioning (clip skip, prompt S/R, emphasis) share one UNet batch per step.",
    )
    add_job_arguments(parser)
    for axis in ("x", "y", "z"):
        parser.add_argument(f"--{axis}", default=None, metavar="AXIS=VALUES", help=AXIS_HELP)
    parser.add_argument(
        "--spec", default=None, metavar="FILE", help="a TOML file of these options (CLI wins)"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the cells and the denoiser calls; no work"
    )
    parser.add_argument(
        "--vary-seeds",
        action="store_true",
        help="with --seed -1, a new random seed per cell (default: one for the whole grid)",
    )
    parser.add_argument(
        "--max-megapixels",
        type=float,
        default=200.0,
        help="refuse grids larger than this (default: 200, as the reference)",
    )
    parser.add_argument("--margin", type=int, default=0, help="pixels between cells (default 0)")
    parser.add_argument(
        "--no-batch", action="store_true", help="make every cell on its own (no shared batches)"
    )
    parser.set_defaults(handler=run_grid_command, grid_parser=parser)


def run_grid_command(args: argparse.Namespace) -> int:
    """Handler of ``sdstack grid``: check everything, plan, then load and make the cells."""
    from sdstack.cli import CommandError
    from sdstack.commands.generate import build_job
    from sdstack.commands.grid_spec import apply_spec
    from sdstack.commands.job_files import resolve_files
    from sdstack.commands.lora_options import find_job_loras
    from sdstack.commands.speed_options import check_device
    from sdstack.generate.grid import plan_grid
    from sdstack.generate.outputs import check_output_folder

    # 1. Options (the spec file fills what the command line left unset), job, axes, files.
    if args.spec is not None:
        apply_spec(args, args.grid_parser, Path(args.spec))
    if args.x is None:
        raise CommandError("give --x AXIS=VALUES (e.g. --x clip-skip=1,2,3), or --spec FILE")
    job = build_job(args)
    paths = resolve_files(args, job)
    loras = find_job_loras(job, paths.library)
    if paths.embeddings is not None:
        job.embeddings = str(paths.embeddings)
    if paths.merge is not None:  # merge:A,B,...: A loads once, each cell is patched
        job.model = paths.merge.text()
    plan = plan_grid(
        job, args.x, args.y, args.z, vary_seeds=args.vary_seeds,
        max_megapixels=args.max_megapixels,
    )  # fmt: skip
    loader = _model_loader(args, paths, plan)
    if args.dry_run:
        _print_plan(plan)
        return 0
    check_output_folder(args.out)
    check_device(args)
    # 2. Load and make the cells (each saved as it is decoded), then the grids.
    with JobProgress(enabled=not args.quiet) as progress:
        run_with_progress(
            plan,
            lambda model, vae: loader(model, vae, progress),
            progress,
            out=args.out,
            fmt=args.format,
            loras=loras,
            batch=not args.no_batch,
            margin=args.margin,
        )
    return 0


def run_with_progress(plan: Any, model: Any, progress: JobProgress, **options: Any) -> Any:
    """``run_grid`` with the phase display; each cell's path, then the grids', printed."""
    from sdstack.generate.grid import run_grid

    result = run_grid(
        plan,
        model,
        on_cell=lambda cell: progress.write(str(cell.path)),
        callback=progress.on_step,
        on_phase=progress.on_phase,
        **options,
    )
    for path in result.paths:
        progress.write(str(path))
    return result


def _model_loader(args: argparse.Namespace, paths: Any, plan: Any) -> Any:
    """``load(model, vae, progress)`` for the cells; every checkpoint and VAE an axis names
    is found now (``--root`` names and hashes), before anything loads."""
    from sdstack.generate.grid import loaded_model
    from sdstack.models.root import resolve_model_paths

    base = loaded_model(plan.job)
    found: dict[tuple[Any, Any], tuple[Any, Any]] = {base: (paths.model, paths.vae)}
    for cell in plan.cells:
        key = loaded_model(cell.job)
        if key in found:
            continue
        model = key[0] if key[0] is not None else str(paths.model)
        vae = key[1] if key[1] is not None else paths.vae
        resolved = resolve_model_paths(
            args.root, model=model, vae=vae and str(vae), embeddings=None
        )
        _require_file(resolved.model, "checkpoint axis value", folder_ok=True)
        if resolved.vae is not None:
            _require_file(resolved.vae, "VAE axis value")
        found[key] = (resolved.model, resolved.vae)

    def load(model: Any, vae: Any, progress: JobProgress) -> Any:
        from sdstack.models import load_model

        model_path, vae_path = found[(model, vae)]
        return load_model(
            model_path, vae=vae_path, dtype=args.dtype, device=args.device,
            config_dir=args.config_dir, progress=progress.loading,
        )  # fmt: skip

    return load


def _require_file(path: Any, what: str, *, folder_ok: bool = False) -> None:
    from sdstack.cli import CommandError

    target = Path(path)
    if target.is_file() or (folder_ok and target.is_dir()):
        return
    raise CommandError(f"{what} {str(path)!r}: not found (with --root it may be a name or hash)")


def _print_plan(plan: Any) -> None:
    """One line per cell in making order, then the totals."""
    labels = {a: plan.axes[a].labels() if plan.axes[a] else None for a in "xyz"}
    for cell in plan.ordered_cells():
        place = [
            labels[a][i]
            for a, i in zip("xyz", (cell.ix, cell.iy, cell.iz), strict=True)
            if labels[a]
        ]
        print(f"cell {cell.index}: {', '.join(place)}; seed {cell.job.params.seed}")
    x, y, z = plan.shape
    print(
        f"{len(plan.cells)} cells ({x} x {y} x {z}), {plan.denoiser_calls()} denoiser calls "
        "before batching",
        file=sys.stdout,
    )
