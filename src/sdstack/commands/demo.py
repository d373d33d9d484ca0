"""The ``sdstack demo`` command: one image from a tiny random model, offline, in seconds."""

from __future__ import annotations

import argparse
from typing import Any

from sdstack.commands.generate import parse_size, run_job
from sdstack.commands.progress import JobProgress

DEMO_PROMPT = "a (red:1.3) [cat:fox:0.5] in a garden, [[blurry]] AND sunset sky :0.6"
DEMO_NEGATIVE = "lowres, (text:1.2)"


def register(subparsers: Any) -> None:
    """Add the ``demo`` parser."""
    demo = subparsers.add_parser(
        "demo",
        help="generate one image with a tiny random model (offline, seconds)",
        description="Build a tiny random SD1-like model in memory and generate one small "
        "image from a prompt that uses emphasis, a prompt schedule and AND; write the PNG "
        "with its infotext and print the path and the infotext. The picture is noise-like "
        "(random weights): this shows the pipeline, not a real model.",
    )
    demo.add_argument("--out", default="outputs", help="output folder (default: outputs)")
    demo.add_argument("--steps", type=int, default=12, help="sampling steps (default: 12)")
    demo.add_argument("--seed", type=int, default=1, help="seed (default: 1; -1 = random)")
    demo.add_argument("--size", default="128x128", help="WxH (default: 128x128)")
    demo.add_argument("--sampler", default="Euler a", help="sampler (default: Euler a)")
    for axis in ("x", "y", "z"):
        demo.add_argument(
            f"--{axis}",
            default=None,
            metavar="AXIS=VALUES",
            help="make a comparison grid instead, as `sdstack grid` does (e.g. --x "
            "clip-skip=1,2,3 --y 'Prompt S/R=cat,dog')",
        )
    demo.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    """Handler of ``sdstack demo``."""
    from sdstack.generate import GenerationJob, GenerationParams, check_output_folder, save_image
    from sdstack.models.tiny import tiny_components

    check_output_folder(args.out)

    width, height = parse_size(args.size)
    params = GenerationParams(
        DEMO_PROMPT,
        negative=DEMO_NEGATIVE,
        steps=args.steps,
        cfg_scale=7.0,
        sampler=args.sampler,
        seed=args.seed,
        width=width,
        height=height,
    )

    def save(result: Any) -> Any:
        return save_image(result.image, result.infotext, args.out, seed=result.seed)

    if args.x is not None or args.y is not None or args.z is not None:
        return _demo_grid(args, GenerationJob(params))
    with JobProgress() as progress:
        result = run_job(tiny_components(seed=0), GenerationJob(params), progress, save)[0]
    print(result.infotext)
    return 0


def _demo_grid(args: argparse.Namespace, job: Any) -> int:
    """The demo prompt as a grid over the tiny model: cells, then the grid, printed."""
    from sdstack.cli import CommandError
    from sdstack.commands.grid import run_with_progress
    from sdstack.generate.grid import plan_grid
    from sdstack.models.tiny import tiny_components

    if args.x is None:
        raise CommandError("a grid needs --x AXIS=VALUES (then --y and --z if you like)")
    plan = plan_grid(job, args.x, args.y, args.z)
    with JobProgress() as progress:
        run_with_progress(plan, tiny_components(seed=0), progress, out=args.out)
    return 0
