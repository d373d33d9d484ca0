"""``sdstack merge``: merge two or three SD1.x checkpoints into a new one, streamed.

Thin: the arguments are parsed and checked here, the work is
``sdstack.merge.stream.merge_checkpoints``; its phases (hashing the inputs, merging the
tensors) show on stderr (``JobProgress``), the result goes to stdout.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

DTYPES = ("fp16", "bf16", "fp32")
SIDES = ("merge", "a", "b")
METHODS = (
    ("weighted-sum", "(1-a)A + aB (the reference's Weighted sum)"),
    ("add-difference", "A + a(B-C) (the reference's Add difference)"),
    ("sum-twice", "(1-b)((1-a)A + aB) + bC"),
    ("triple-sum", "(1-a-b)A + aB + bC"),
    ("train-difference", "A + 1.8a(B-C)|B-A|/(|B-C|+|B-A|)"),
    ("ties", "C + a * TIES merge of A-C and B-C (--ties-density)"),
    ("dare", "A + a * DARE(B-C) (--dare-drop, --seed; --dare-ties: before TIES)"),
    ("slerp", "spherical interpolation of A and B"),
)
"""Method names and formulas for --help (no torch import; tests keep it in sync)."""
OPTION_FLAGS = {
    "density": "--ties-density",
    "drop": "--dare-drop",
    "seed": "--seed",
    "ties": "--dare-ties",
}


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a finite number, e.g. 0.3")
    return value


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number") from None


def register(subparsers: Any) -> None:
    """Add ``merge``."""
    methods = "; ".join(f"{name}: {formula}" for name, formula in METHODS)
    parser = subparsers.add_parser(
        "merge",
        help="merge two or three SD1.x checkpoints into a new one",
        description="Merge single-file SD1.x checkpoints tensor by tensor into OUT: only one "
        "tensor is in memory at a time, every input is checked (SD1.x, same shapes) before "
        "anything is written, and OUT appears only when complete. Methods (a = --alpha, "
        f"b = --beta): {methods}. Only tensors whose name holds 'model' are merged; tensors "
        "B lacks keep A's values, tensors only in B are left out; an inpainting or "
        "instruct-pix2pix A merges the first 4 conv_in channels with a normal B; "
        "position_ids are written as int64 0..76. The header records sd_merge_recipe and "
        "sd_merge_models as the reference web UI does.",
    )
    parser.add_argument(
        "a", metavar="A", nargs="?", default=None,
        help="the first checkpoint (.safetensors, .ckpt)",
    )  # fmt: skip
    parser.add_argument("b", metavar="B", nargs="?", default=None, help="the second checkpoint")
    parser.add_argument(
        "c", metavar="C", nargs="?", default=None, help="the third (three-model methods)"
    )
    parser.add_argument("-o", "--out", default=None, metavar="OUT", help="new .safetensors")
    parser.add_argument(
        "--recipe",
        default=None,
        metavar="FILE.toml",
        help="run the [[step]] merges of a recipe file, chained without intermediate files "
        "(see sdstack.merge.chain); OUT defaults to its output",
    )
    parser.add_argument(
        "--method", default="weighted-sum", metavar="NAME", help="merge method (weighted-sum)"
    )
    parser.add_argument("--alpha", type=_finite, default=0.5, metavar="X", help="alpha (0.5)")
    parser.add_argument("--beta", type=_finite, default=0.0, metavar="Y", help="beta (0)")
    for name in ("alpha", "beta"):
        parser.add_argument(
            f"--{name}-blocks",
            default=None,
            metavar="V",
            help=f"{name} per block: 26 comma-separated values (BASE, IN00..IN11, M00, "
            "OUT00..OUT11; BASE weights the text encoder and the VAE) or a preset such as "
            "GRAD_V, SMOOTHSTEP, ALL_A",
        )
    parser.add_argument(
        "--dtype", choices=DTYPES, default="fp16", help="output dtype (fp16); math is fp32"
    )
    parser.add_argument("--vae", default=None, metavar="FILE", help="bake this VAE file in")
    parser.add_argument(
        "--discard", default=None, metavar="REGEX", help="leave out the tensors it matches"
    )
    parser.add_argument(
        "--text-encoder", choices=SIDES, default="merge", help="merge it, or copy A's / B's"
    )
    parser.add_argument(
        "--vae-from", choices=SIDES, default="merge", help="merge the VAE, or copy A's / B's"
    )
    _add_method_options(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    parser.add_argument("--quiet", action="store_true", help="no progress display")
    parser.set_defaults(handler=run_merge)


def _add_method_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ties-density",
        type=_finite,
        default=None,
        metavar="K",
        help="ties (and dare with --dare-ties): fraction of each difference kept (0.2)",
    )
    parser.add_argument(
        "--dare-drop",
        type=_finite,
        default=None,
        metavar="P",
        help="dare: probability of dropping each element of the difference (0.9)",
    )
    parser.add_argument(
        "--dare-ties", action="store_true", help="dare: merge the dropped differences by TIES"
    )
    parser.add_argument(
        "--seed", type=_whole, default=None, metavar="S", help="dare: seed of the drop (0)"
    )


def _blocks(text: str | None, flag: str) -> tuple[float, ...] | None:
    from sdstack.cli import CommandError
    from sdstack.merge.blocks import MergeBlockError, parse_merge_blocks

    if text is None:
        return None
    try:
        return parse_merge_blocks(text)
    except MergeBlockError as error:
        raise CommandError(f"{flag}: {error}") from error


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """The method options the flags give, each checked to be one the method takes."""
    from sdstack.cli import CommandError
    from sdstack.merge.methods import MERGE_METHODS

    method = MERGE_METHODS.get(args.method)
    given = {
        "density": args.ties_density,
        "drop": args.dare_drop,
        "seed": args.seed,
        "ties": True if args.dare_ties else None,
    }
    options = {name: value for name, value in given.items() if value is not None}
    for name in options:
        if name not in method.options:
            takes = [OPTION_FLAGS[option] for option in method.options if option in OPTION_FLAGS]
            raise CommandError(
                f"{OPTION_FLAGS[name]}: merge method {method.name!r} has no such option; "
                f"expected {', '.join(takes) if takes else 'none of the method options'}"
            )
    return options


UNITS = {"hashing": "B", "merging": "tensor"}
"""The progress unit of each phase of the merge."""


class _Progress:
    """``progress(phase, done, total)`` of the merge -> the one stderr bar."""

    def __init__(self, display: Any) -> None:
        self.display = display

    def __call__(self, phase: str, done: int, total: int) -> None:
        display = self.display
        if display.label != phase or display.total != total:
            unit = UNITS.get(phase, "it")
            display.phase(phase, total, unit)
            display.bar.unit_scale = unit == "B"
            display.bar.unit_divisor = 1024
        display.bar.update(done - display.bar.n)


def run_merge(args: argparse.Namespace) -> int:
    """Handler of ``sdstack merge``."""
    from pathlib import Path

    from sdstack.cli import CommandError
    from sdstack.commands.progress import JobProgress
    from sdstack.merge.stream import MergeSettings, merge_checkpoints

    if args.recipe is not None:
        return _run_recipe(args)
    if args.a is None or args.b is None or args.out is None:
        raise CommandError("give A B [C] -o OUT (or --recipe FILE.toml)")
    # 1. Turn the flags into settings (each bad value named by its flag).
    settings = MergeSettings(
        method=args.method,
        alpha=args.alpha,
        beta=args.beta,
        alpha_blocks=_blocks(args.alpha_blocks, "--alpha-blocks"),
        beta_blocks=_blocks(args.beta_blocks, "--beta-blocks"),
        dtype=args.dtype,
        vae=None if args.vae is None else Path(args.vae),
        discard=args.discard,
        text_encoder=args.text_encoder,
        vae_from=args.vae_from,
        options=_options(args),
    )
    # 2. Merge, with the phases on stderr.
    with JobProgress(enabled=not args.quiet) as display:
        result = merge_checkpoints(
            args.a,
            args.b,
            args.c,
            args.out,
            settings,
            progress=_Progress(display),
            overwrite=args.overwrite,
        )
    # 3. Say what was written.
    recipe = result.recipe
    models = ", ".join(Path(p).name for p in (args.a, args.b, args.c) if p is not None)
    discarded = f", {len(result.discarded)} discarded" if result.discarded else ""
    print(
        f"{result.path}: {recipe['interp_method']} of {models} (alpha {recipe['alpha']:g}): "
        f"{result.tensors} tensors, {result.merged} merged, {result.copied} copied{discarded}"
    )
    return 0


def _run_recipe(args: argparse.Namespace) -> int:
    """``--recipe FILE``: every step, the last one written."""
    from sdstack.cli import CommandError
    from sdstack.commands.progress import JobProgress
    from sdstack.merge.chain import run_recipe

    if args.a is not None:
        raise CommandError("--recipe takes its models from the file: give no A B C")
    with JobProgress(enabled=not args.quiet) as display:
        path = run_recipe(
            args.recipe, args.out, overwrite=args.overwrite, progress=_Progress(display)
        )
    print(f"{path}: the recipe {args.recipe}")
    return 0
