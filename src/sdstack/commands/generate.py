"""The ``sdstack generate`` command.

torch and diffusers are imported inside the handlers, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from typing import Any

from sdstack.commands.control_options import (
    add_control_options,
    apply_control_options,
    control_options,
)
from sdstack.commands.deproject_options import add_deprojector_options, apply_deprojector_options
from sdstack.commands.lora_options import add_lora_options, apply_lora_options, find_job_loras
from sdstack.commands.progress import JobProgress
from sdstack.commands.speed_options import add_dtype_option, add_speed_options, check_device

# argparse dest -> GenerationParams field; None means "not given" (infotext may set it).
OPTION_NAMES = {
    "steps": "--steps",
    "cfg_scale": "--cfg",
    "sampler": "--sampler",
    "schedule_type": "--schedule-type",
    "seed": "--seed",
    "width": "--width",
    "height": "--height",
    "batch_size": "--batch-size",
    "batch_count": "--batch-count",
    "clip_skip": "--clip-skip",
    "emphasis": "--emphasis",
    "denoising_strength": "--denoising-strength",
    "pad_conds": "--pad-conds",
    "init_image": "--init-image",
    "encoding": "--encoding",
    "token_merging": "--token-merging",
    "vae_tiling": "--vae-tiling",
}
"""GenerationParams field -> the option that sets it, for messages."""

PARAM_FLAGS = {
    "negative": "negative",
    "steps": "steps",
    "cfg": "cfg_scale",
    "sampler": "sampler",
    "schedule_type": "schedule_type",
    "seed": "seed",
    "clip_skip": "clip_skip",
    "emphasis": "emphasis",
    "batch_size": "batch_size",
    "batch_count": "batch_count",
    "denoising_strength": "denoising_strength",
    "pad_conds": "pad_conds",
    "token_merging": "token_merging",
    "vae_tiling": "vae_tiling",
}


def _clip_skip(text: str) -> float | str:
    """``--clip-skip`` values: "2" -> 2, "1.5" -> 1.5, "auto"."""
    from sdstack.generate.infotext import read_number

    if text.strip().lower() == "auto":
        return "auto"
    try:
        return read_number(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from error


def register(subparsers: Any) -> None:
    """Add the ``generate`` parser."""
    _add_generate(subparsers)


def _add_generate(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="txt2img / img2img with an SD1.x checkpoint",
        description="Generate images with the reference UI's prompt language, samplers, "
        "seeds and infotext. Images are saved as OUT/NNNNN-SEED.png with a 'parameters' "
        "text chunk; the paths are printed. Unset options take the values of "
        "--from-infotext, else the defaults shown. Everything is checked before the model "
        "loads.",
    )
    add_job_arguments(parser)
    add_deprojector_options(parser)
    parser.set_defaults(handler=run_generate)


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """Every option of a generation job (``generate`` and ``grid`` share them)."""
    parser.add_argument(
        "prompt",
        nargs="?",
        default=None,
        help="the prompt; - reads it from standard input (optional with --from-infotext)",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="checkpoint (.safetensors/.ckpt) or diffusers folder; with --root also a name "
        "as 'sdstack models list' shows it, or a hash (default with --from-infotext and "
        "--root: the infotext's model)",
    )
    parser.add_argument(
        "--root",
        default=None,
        help="a web UI install folder (or its models/ folder): finds --model and --vae by "
        "name or hash and embeddings/ without --embeddings (default: $SDSTACK_ROOT)",
    )
    _add_sampling_options(parser)
    add_lora_options(parser)
    add_control_options(parser)
    add_speed_options(parser)
    parser.add_argument("--embeddings", default=None, help="folder of textual-inversion files")
    parser.add_argument("--vae", default=None, help="separate VAE file (or a name with --root)")
    parser.add_argument(
        "--config-dir",
        default=None,
        help="diffusers-layout folder of configs for a single-file checkpoint "
        "that is not SD1.5-shaped (default: the packaged SD1.5 configs)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help="images per batch (default: 1)"
    )
    parser.add_argument(
        "--batch-count",
        "--n-iter",
        dest="batch_count",
        type=int,
        default=None,
        help="batches (default: 1)",
    )
    parser.add_argument("--init-image", default=None, help="img2img: the starting image")
    parser.add_argument(
        "--denoising-strength",
        type=float,
        default=None,
        help="img2img strength 0..1 (default: 0.75); needs --init-image",
    )
    _add_run_options(parser)


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    """Where it runs and where the images go."""
    add_dtype_option(parser)
    parser.add_argument(
        "--device", default="cpu", help="torch device: cpu (default), cuda, cuda:1, mps"
    )
    parser.add_argument("--out", default="outputs", help="output folder (default: outputs)")
    parser.add_argument(
        "--format",
        default="png",
        choices=("png", "jpg", "webp"),
        help="png (default; infotext in a text chunk), jpg or webp (EXIF UserComment)",
    )
    parser.add_argument(
        "--from-infotext",
        default=None,
        metavar="IMAGE",
        help="take the settings from this image's infotext; explicit options override them",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no progress display (paths are still printed)"
    )


def _add_sampling_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--negative",
        "--negative-prompt",
        dest="negative",
        default=None,
        help="negative prompt (default: '')",
    )
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: 20)")
    parser.add_argument(
        "--cfg", "--cfg-scale", dest="cfg", type=float, default=None, help="CFG scale (default: 7)"
    )
    parser.add_argument(
        "--sampler",
        default=None,
        help="sampler name, e.g. 'Euler a', 'DPM++ 2M', 'DPM++ 2M Karras' (default: DPM++ 2M)",
    )
    parser.add_argument(
        "--schedule-type",
        default=None,
        help="Automatic, Uniform, Karras or Exponential (default: Automatic)",
    )
    parser.add_argument("--seed", type=int, default=None, help="seed; -1 = a random seed (default)")
    parser.add_argument("--size", default=None, help="WxH, multiples of 8 (default: 512x512)")
    parser.add_argument("--width", type=int, default=None, help="width (instead of --size)")
    parser.add_argument("--height", type=int, default=None, help="height (instead of --size)")
    parser.add_argument(
        "--clip-skip",
        type=_clip_skip,
        default=None,
        help="reference Clip skip, 1 = last layer; fractional values such as 1.5 blend two "
        "layers; auto = what the active LoRAs were trained with when they agree, else 1 "
        "(default: 1)",
    )
    parser.add_argument(
        "--emphasis", default=None, help="original, no-norm, ignore or comfy (default: original)"
    )
    parser.add_argument(
        "--pad-conds",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="when prompt and negative prompt have different token lengths, pad the shorter "
        "with empty-prompt chunks and run one UNet call instead of two (faster, changes the "
        "image; written as 'Pad conds: True'). The reference UI's 'Pad prompt/negative "
        "prompt' option; off by default, as in the reference (--no-pad-conds overrides "
        "--from-infotext)",
    )


def parse_size(text: str) -> tuple[int, int]:
    """``"512x768"`` -> ``(512, 768)``.

    Raises:
        CommandError: not ``WxH`` with integers.
    """
    from sdstack.cli import CommandError

    width, sep, height = text.lower().partition("x")
    if not sep or not width.strip().isdigit() or not height.strip().isdigit():
        raise CommandError(f"--size must look like 512x512 (WIDTHxHEIGHT), got {text!r}")
    return int(width), int(height)


def explicit_params(args: argparse.Namespace) -> dict[str, Any]:
    """GenerationParams keyword arguments for the options given on the command line.

    Raises:
        CommandError: ``--size`` with ``--width``/``--height``, or ``--denoising-strength``
            without ``--init-image``.
    """
    from sdstack.cli import CommandError
    from sdstack.commands.arguments import read_prompt_argument

    values = {
        f: getattr(args, flag) for flag, f in PARAM_FLAGS.items() if getattr(args, flag) is not None
    }
    if args.prompt is not None:
        values["prompt"] = read_prompt_argument(args.prompt)
    if args.size is not None:
        if args.width is not None or args.height is not None:
            raise CommandError("give either --size WxH or --width/--height, not both")
        values["width"], values["height"] = parse_size(args.size)
    for side in ("width", "height"):
        if getattr(args, side) is not None:
            values[side] = getattr(args, side)
    if args.denoising_strength is not None and args.init_image is None:
        raise CommandError(
            "--denoising-strength is the img2img strength: it needs --init-image IMAGE"
        )
    return values


def option_names(explicit: dict[str, Any], from_infotext: bool) -> dict[str, str]:
    """Field -> how a message names it: the option, and where the value came from."""
    names = dict(OPTION_NAMES)
    if from_infotext:
        for field, option in OPTION_NAMES.items():
            if field not in explicit:
                names[field] = f"{option} (from the --from-infotext image)"
    return names


def build_job(args: argparse.Namespace) -> Any:
    """The :class:`GenerationJob` of the command line: infotext, then explicit options;
    checked (settings, limits, init image) before anything loads.

    Raises:
        CommandError, SettingError, ImageFileError, PromptSyntaxError: bad input.
    """
    from sdstack.cli import CommandError
    from sdstack.generate.images import load_init_image, read_infotext
    from sdstack.generate.job import GenerationJob
    from sdstack.generate.params import GenerationParams

    explicit = explicit_params(args)
    if args.init_image is not None:
        explicit["init_image"] = load_init_image(args.init_image)
    if args.from_infotext:
        text = read_infotext(args.from_infotext, option="--from-infotext")
        if not text:
            raise CommandError(f"--from-infotext {args.from_infotext!r}: holds no infotext")
        job = GenerationJob.from_infotext(text, **explicit)
    elif "prompt" not in explicit:
        raise CommandError(
            "give a PROMPT (or - to read it from standard input), or --from-infotext IMAGE"
        )
    else:
        job = GenerationJob(GenerationParams(**explicit))
    apply_lora_options(args, job)
    apply_control_options(args, job)
    apply_deprojector_options(args, job, explicit)
    job.dtype, job.device = args.dtype, args.device
    job.check(option_names(explicit, bool(args.from_infotext)))
    return job


def _note_other_model(job: Any, components: Any) -> None:
    """Tell (stderr) when --from-infotext names another model than the one loaded."""
    from sdstack.generate.infotext import file_short_hash

    if job.model_hash is None and job.model is None:
        return
    loaded = file_short_hash(components.path), components.name
    same_hash = job.model_hash is not None and job.model_hash == loaded[0]
    if not same_hash and job.model != loaded[1]:
        _note(
            f"the infotext names model {job.model} ({job.model_hash}); generating with "
            f"{loaded[1]} ({loaded[0]})"
        )


def _note(text: str) -> None:
    print(f"sdstack: note: {text}", file=sys.stderr)


def run_generate(args: argparse.Namespace) -> int:
    """Handler of ``sdstack generate``: check everything, then load, then generate."""
    from sdstack.commands.job_files import resolve_files
    from sdstack.generate.images import save_image
    from sdstack.generate.job import describe_unhonoured
    from sdstack.generate.outputs import check_output_folder

    # 1. Check settings, files and the output folder before anything heavy.
    job = build_job(args)
    paths = resolve_files(args, job)
    loras = find_job_loras(job, paths.library)
    check_output_folder(args.out)
    check_device(args)
    if job.unhonoured:
        _note("not applied from the infotext: " + describe_unhonoured(job.unhonoured))

    def save(result: Any) -> Any:
        return save_image(
            result.image, result.infotext, args.out, seed=result.seed, fmt=args.format
        )

    # 2. Load, 3. generate; each image is saved as soon as it is decoded.
    with JobProgress(enabled=not args.quiet) as progress:
        components = _load(args, job, paths, progress)
        if args.from_infotext:
            _note_other_model(job, components)
        if paths.embeddings is not None:
            job.embeddings = str(paths.embeddings)  # generate() loads the library
        run_job(components, job, progress, save, loras=loras, control_options=control_options(args))
    return 0


def _load(args: argparse.Namespace, job: Any, paths: Any, progress: JobProgress) -> Any:
    """The resolved model (or ``merge:`` spec) and VAE, in the job's dtype on its device.
    Only the resolved VAE is used: the job's own ``vae`` may be an infotext's file name
    that was not found (reported as not applied)."""
    model = paths.merge if paths.merge is not None else paths.model
    resolved = dataclasses.replace(job, model=model, vae=paths.vae)
    return resolved.load(config_dir=args.config_dir, progress=progress.loading)


def run_job(
    components: Any,
    job: Any,
    progress: JobProgress,
    save: Callable[[Any], Any],
    *,
    loras: Any = None,
    control_options: dict[str, Any] | None = None,
) -> list[Any]:
    """``generate`` with the phase display; ``save(result)`` runs for each image as soon as
    it is decoded (its path printed), so finished images survive a later failure."""
    from sdstack.generate import generate

    def on_image(result: Any) -> None:
        progress.write(str(save(result)))

    return generate(
        components,
        job,
        callback=progress.on_step,
        on_phase=progress.on_phase,
        on_image=on_image,
        loras=loras,
        control_options=control_options,
    )
