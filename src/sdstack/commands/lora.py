"""``sdstack lora``: inspect a LoRA file, bake LoRAs into a checkpoint, extract a LoRA.

Thin: arguments are parsed and checked here, the work is ``sdstack.lora.inspect``,
``sdstack.lora.bake`` and ``sdstack.lora.extract``; bake and extract show their phases on
stderr (``JobProgress``), results go to stdout.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from sdstack.commands.arguments import add_command_group

DTYPES = ("fp32", "fp16", "bf16")


def register(subparsers: Any) -> None:
    """Add ``lora``, ``lora inspect``, ``lora bake`` and ``lora extract``."""
    commands = add_command_group(
        subparsers,
        "lora",
        help="inspect LoRA files, bake LoRAs into a checkpoint, extract a LoRA",
        description="Tools for LoRA / LyCORIS files of SD1.x models.",
    )
    _register_inspect(commands)
    _register_bake(commands)
    _register_extract(commands)


def _add_config_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config-dir",
        default=None,
        metavar="DIR",
        help="diffusers-layout folder of configs (unet/, vae/, text_encoder/) for a model "
        "that is not SD1.5-shaped (default: the packaged SD1.5 configs)",
    )


def _register_inspect(commands: Any) -> None:
    parser = commands.add_parser(
        "inspect",
        help="what a LoRA file holds: format, modules, ranks, blocks, training metadata",
        description="Report a LoRA/LyCORIS file: its format, the algorithm, rank and alpha "
        "of its modules, the modules per merge block and LoRA Block Weight block, a guess "
        "of the base model (SD1, SD2, SDXL), the kohya training metadata (clip skip, "
        "resolution, network dim/alpha), the most frequent training tags, its hash (as "
        "infotexts write it) and the keys that match no layer.",
    )
    parser.add_argument("file", metavar="FILE", help="LoRA file (.safetensors, .pt)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--top-tags", type=int, default=20, metavar="N", help="training tags listed (20)"
    )
    parser.add_argument(
        "--no-hash", action="store_true", help="do not read the whole file to hash it"
    )
    _add_config_dir(parser)
    parser.set_defaults(handler=run_inspect)


def _register_bake(commands: Any) -> None:
    parser = commands.add_parser(
        "bake",
        help="merge LoRAs into a single-file checkpoint",
        description="Write MODEL with LoRAs merged in: W = W0 + sum(w * dW) per layer in "
        "float32, cast back to each tensor's dtype (or --dtype); the same weights as "
        "applying the LoRAs at generation. The checkpoint is streamed tensor by tensor "
        "and the output written atomically; an input is never overwritten.",
    )
    parser.add_argument("model", metavar="MODEL", help="SD1.x single-file checkpoint")
    parser.add_argument(
        "loras",
        nargs="+",
        metavar="LORA[:W[:UNET_W]]",
        help="LoRA file (or name in --root / --lora-dir folders); W multiplies the text "
        "encoder and the UNet (default 1), UNET_W (if given) the UNet",
    )
    parser.add_argument("-o", "--out", required=True, metavar="OUT", help="new .safetensors")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="cast floating tensors")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    parser.add_argument("--root", default=None, metavar="WEBUI_DIR", help="web UI folder")
    parser.add_argument(
        "--lora-dir", action="append", default=[], metavar="FOLDER", help="LoRA folder"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress display")
    _add_config_dir(parser)
    parser.set_defaults(handler=run_bake)


def _register_extract(commands: Any) -> None:
    parser = commands.add_parser(
        "extract",
        help="extract a kohya LoRA from a fine-tuned checkpoint and its base",
        description="Write the LoRA of TUNED - BASE: per layer, the rank-R SVD truncation "
        "up = U diag(S), down = Vh, both clamped to the --clamp-quantile quantile of their "
        "absolute values, alpha = rank (kohya's extract_lora_from_models). Covers the "
        "transformer layers of the UNet and q/k/v/out, fc1/fc2 of the text encoder; with "
        "--conv-rank also the ResNet convolutions. The text encoder is skipped when no "
        "weight there differs by more than --min-diff.",
    )
    parser.add_argument("tuned", metavar="TUNED", help="fine-tuned single-file checkpoint")
    parser.add_argument("base", metavar="BASE", help="the checkpoint it was tuned from")
    parser.add_argument("--rank", required=True, metavar="R", help="LoRA rank (e.g. 32)")
    parser.add_argument(
        "--conv-rank", default=None, metavar="R", help="rank of 3x3 convs (adds ResNets)"
    )
    parser.add_argument("-o", "--out", required=True, metavar="OUT", help="new .safetensors")
    parser.add_argument(
        "--clamp-quantile",
        type=float,
        default=0.99,
        metavar="Q",
        help="clamp the factors to this quantile of |values| (0.99; 1 = no clamp)",
    )
    parser.add_argument(
        "--min-diff",
        type=float,
        default=0.01,
        metavar="D",
        help="extract the text encoder only if some weight differs by more (0.01)",
    )
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="factor dtype (fp32)")
    parser.add_argument("--device", default="cpu", help="where the SVDs run: cpu, cuda, mps")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    parser.add_argument("--quiet", action="store_true", help="no progress display")
    _add_config_dir(parser)
    parser.set_defaults(handler=run_extract)


class _Progress:
    """``progress(phase, done, total)`` of the library -> the one stderr bar."""

    def __init__(self, display: Any, units: dict[str, str]) -> None:
        self.display, self.units = display, units

    def __call__(self, phase: str, done: int, total: int) -> None:
        display = self.display
        if display.label != phase or display.total != total:
            display.phase(phase, total, self.units.get(phase, "it"))
        display.bar.update(done - display.bar.n)


def run_inspect(args: argparse.Namespace) -> int:
    """Handler of ``sdstack lora inspect``."""
    from sdstack.lora.inspect import inspect_lora, render_report

    key_map = _key_map(args.config_dir)
    report = inspect_lora(
        args.file, key_map=key_map, top_tags=max(0, args.top_tags), hashes=not args.no_hash
    )
    print(json.dumps(report, indent=2, ensure_ascii=False) if args.json else render_report(report))
    return 0


def _key_map(config_dir: str | None) -> Any:
    if config_dir is None:
        return None
    from sdstack.lora.bake import architecture_key_map

    return architecture_key_map(config_dir)


def run_bake(args: argparse.Namespace) -> int:
    """Handler of ``sdstack lora bake``."""
    from pathlib import Path

    from sdstack.cli import CommandError
    from sdstack.commands.progress import JobProgress
    from sdstack.lora.bake import bake_loras
    from sdstack.lora.library import LoraLibrary
    from sdstack.lora.spec import parse_lora_option
    from sdstack.models.root import open_library

    specs = [parse_lora_option(text) for text in args.loras]
    for folder in args.lora_dir:
        if not Path(folder).is_dir():
            raise CommandError(f"--lora-dir {folder!r}: not a folder")
    library = LoraLibrary(open_library(args.root), args.lora_dir)
    units = {"reading LoRAs": "file", "baking": "tensor"}
    with JobProgress(enabled=not args.quiet) as display:
        result = bake_loras(
            args.model,
            specs,
            args.out,
            config_dir=args.config_dir,
            dtype=args.dtype,
            library=library,
            overwrite=args.overwrite,
            progress=_Progress(display, units),
        )
    print(
        f"{result.path}: {', '.join(result.loras)} baked into {result.layers_patched} "
        f"layers ({result.tensors} tensors written)"
    )
    return 0


def _whole_number(value: str | None, option: str) -> int | None:
    from sdstack.cli import CommandError

    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise CommandError(f"{option} {value!r}: expected a whole number >= 1, e.g. {option} 32")
    return number


def run_extract(args: argparse.Namespace) -> int:
    """Handler of ``sdstack lora extract``."""
    import sys

    from sdstack.commands.progress import JobProgress
    from sdstack.lora.extract import extract_lora

    rank = _whole_number(args.rank, "--rank")
    conv_rank = _whole_number(args.conv_rank, "--conv-rank")
    units = {"text encoder": "module", "unet": "module", "writing": "file"}
    with JobProgress(enabled=not args.quiet) as display:
        result = extract_lora(
            args.tuned,
            args.base,
            args.out,
            rank=rank,
            conv_rank=conv_rank,
            clamp_quantile=args.clamp_quantile,
            min_diff=args.min_diff,
            dtype=args.dtype,
            device=args.device,
            config_dir=args.config_dir,
            overwrite=args.overwrite,
            progress=_Progress(display, units),
        )
    for note in result.notes:
        print(f"sdstack: note: {note}", file=sys.stderr)
    print(
        f"{result.path}: {result.unet_modules} UNet and {result.text_modules} text-encoder "
        f"modules, rank {rank}" + (f", conv rank {conv_rank}" if conv_rank else "")
    )
    return 0
