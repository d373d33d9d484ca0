"""The ``sdstack generate`` and ``sdstack demo`` commands.

torch and diffusers are imported inside the handlers, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

DEMO_PROMPT = "a (red:1.3) [cat:fox:0.5] in a garden, [[blurry]] AND sunset sky :0.6"
DEMO_NEGATIVE = "lowres, (text:1.2)"

# argparse dest -> GenerationParams field; None means "not given" (infotext may set it).
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
}


def _clip_skip(text: str) -> float:
    """``--clip-skip`` values: "2" -> 2, "1.5" -> 1.5."""
    from sdstack.generate.infotext import read_number

    try:
        return read_number(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from error


def register(subparsers: Any) -> None:
    """Add the ``generate`` and ``demo`` parsers."""
    _add_generate(subparsers)
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
    demo.set_defaults(handler=run_demo)


def _add_generate(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="txt2img / img2img with an SD1.x checkpoint",
        description="Generate images with the reference UI's prompt language, samplers, "
        "seeds and infotext. Images are saved as OUT/NNNNN-SEED.png with a 'parameters' "
        "text chunk; the paths are printed. Unset options take the values of "
        "--from-infotext, else the defaults shown.",
    )
    parser.add_argument(
        "prompt", nargs="?", default=None, help="the prompt (optional with --from-infotext)"
    )
    parser.add_argument(
        "--model", required=True, help="checkpoint (.safetensors/.ckpt) or diffusers folder"
    )
    _add_sampling_options(parser)
    parser.add_argument("--embeddings", default=None, help="folder of textual-inversion files")
    parser.add_argument("--vae", default=None, help="separate VAE file")
    parser.add_argument(
        "--config-dir",
        default=None,
        help="diffusers-layout folder of configs for a single-file checkpoint "
        "that is not SD1.5-shaped (default: the packaged SD1.5 configs)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help="images per batch (default: 1)"
    )
    parser.add_argument("--batch-count", type=int, default=None, help="batches (default: 1)")
    parser.add_argument("--init-image", default=None, help="img2img: the starting image")
    parser.add_argument(
        "--denoising-strength",
        type=float,
        default=None,
        help="img2img strength 0..1 (default: 0.75)",
    )
    parser.add_argument(
        "--dtype",
        default="fp32",
        choices=("fp32", "fp16", "bf16"),
        help="weight dtype (default: fp32)",
    )
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
    parser.set_defaults(handler=run_generate)


def _add_sampling_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--negative", default=None, help="negative prompt (default: '')")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: 20)")
    parser.add_argument("--cfg", type=float, default=None, help="CFG scale (default: 7)")
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
    parser.add_argument("--seed", type=int, default=None, help="seed, -1 = random (default)")
    parser.add_argument("--size", default=None, help="WxH, multiples of 8 (default: 512x512)")
    parser.add_argument(
        "--clip-skip",
        type=_clip_skip,
        default=None,
        help="reference Clip skip, 1 = last layer; fractional values such as 1.5 blend two "
        "layers (default: 1)",
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


def collect_params(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, str]]:
    """GenerationParams keyword arguments (infotext values, then explicit options) and the
    parsed infotext (empty without ``--from-infotext``)."""
    from sdstack.cli import CommandError
    from sdstack.generate import params_from_infotext, parse_infotext, read_infotext

    values: dict[str, Any] = {}
    info: dict[str, str] = {}
    if args.from_infotext:
        text = read_infotext(args.from_infotext)
        if not text:
            raise CommandError(f"{args.from_infotext!r} holds no infotext")
        info = parse_infotext(text)
        values = params_from_infotext(info)
    for flag, field in PARAM_FLAGS.items():
        if getattr(args, flag) is not None:
            values[field] = getattr(args, flag)
    if args.prompt is not None:
        values["prompt"] = args.prompt
    if args.size is not None:
        values["width"], values["height"] = parse_size(args.size)
    if "prompt" not in values:
        raise CommandError("give a PROMPT or --from-infotext IMAGE")
    return values, info


def _note_other_model(info: dict[str, str], components: Any) -> None:
    """Tell (stderr) when --from-infotext names another model or RNG than ours."""
    from sdstack.generate.infotext import file_short_hash

    if info and info.get("RNG", "GPU") != "CPU":
        print(
            f"sdstack: note: the image was made with RNG {info.get('RNG', 'GPU')}; sdstack "
            "draws noise on the CPU (RNG: CPU), so the picture will differ",
            file=sys.stderr,
        )
    wanted = info.get("Model hash"), info.get("Model")
    if wanted == (None, None):
        return
    loaded = file_short_hash(components.path), components.name
    same_hash = wanted[0] is not None and wanted[0] == loaded[0]
    if not same_hash and wanted[1] != loaded[1]:
        print(
            f"sdstack: note: the infotext names model {wanted[1]} ({wanted[0]}); "
            f"generating with {loaded[1]} ({loaded[0]})",
            file=sys.stderr,
        )


def _load_init_image(path: str | None) -> Any:
    if path is None:
        return None
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def run_with_progress(
    components: Any, params: Any, save: Callable[[Any], Any], embeddings: Any = None
) -> list[Any]:
    """``generate`` with a tqdm bar on stderr over all denoiser calls; ``save(result)`` runs
    for each image as soon as it is decoded, so finished images survive a later failure."""
    from tqdm import tqdm

    from sdstack.generate import generate

    with tqdm(total=None, unit="step", file=sys.stderr, desc="sampling") as bar:

        def callback(step: int, total: int, _latents: Any) -> None:
            if bar.total != total:
                bar.reset(total=total)
            bar.update(step - bar.n)

        def on_image(result: Any) -> None:
            bar.write(str(save(result)), file=sys.stdout)

        return generate(
            components, params, embeddings=embeddings, callback=callback, on_image=on_image
        )


def run_generate(args: argparse.Namespace) -> int:
    """Handler of ``sdstack generate``."""
    from sdstack.generate import GenerationParams, check_inputs, save_image
    from sdstack.generate.pipeline import reject_network_tags
    from sdstack.models import load_model

    values, info = collect_params(args)
    values["init_image"] = _load_init_image(args.init_image)
    params = GenerationParams(**values)
    check_inputs(params)
    reject_network_tags(params.prompt)
    components = load_model(
        args.model, vae=args.vae, dtype=args.dtype, device=args.device, config_dir=args.config_dir
    )
    embeddings = None
    if args.embeddings:
        from sdstack.text import EmbeddingLibrary

        width = components.text_encoder.get_input_embeddings().embedding_dim
        embeddings = EmbeddingLibrary.from_dir(args.embeddings, width=width)
    _note_other_model(info, components)

    def save(result: Any) -> Any:
        return save_image(
            result.image, result.infotext, args.out, seed=result.seed, fmt=args.format
        )

    run_with_progress(components, params, save, embeddings)
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """Handler of ``sdstack demo``."""
    from sdstack.generate import GenerationParams, save_image
    from sdstack.models.tiny import tiny_components

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

    result = run_with_progress(tiny_components(seed=0), params, save)[0]
    print(result.infotext)
    return 0
