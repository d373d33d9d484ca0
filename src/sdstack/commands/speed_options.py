"""How ``sdstack generate`` and ``sdstack grid`` run: ``--dtype``, the ``--device`` check,
``--token-merging`` and ``--vae-tiling``."""

from __future__ import annotations

import argparse


def _ratio(text: str) -> float:
    """``--token-merging`` values: a number (checked 0..0.9 with the other settings)."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number 0..0.9, got {text!r}") from None


def add_speed_options(parser: argparse.ArgumentParser) -> None:
    """Add the options that trade exactness or time for speed and memory."""
    parser.add_argument(
        "--token-merging",
        "--token-merging-ratio",
        dest="token_merging",
        type=_ratio,
        default=None,
        metavar="RATIO",
        help="the reference's 'Token merging ratio' (ToMe for SD, tomesd): merge this "
        "fraction of the self-attention tokens at the highest resolution, 0..0.9; faster, "
        "changes the image; written as 'Token merging ratio: R' (default: 0, off)",
    )
    parser.add_argument(
        "--vae-tiling",
        default=None,
        metavar="auto|on|off",
        help="decode (and img2img-encode) with the VAE in overlapping tiles, blended: "
        "auto = above 1024x1024 pixels, where an untiled decode needs more than 4 GB "
        "(default: auto); the image differs from an untiled decode by a fraction of a "
        "level",
    )


def add_dtype_option(parser: argparse.ArgumentParser) -> None:
    """``--dtype auto|fp32|fp16|bf16`` (default auto; its help says what auto picks here)."""
    from sdstack.models.precision import DTYPE_CHOICES, auto_help

    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help=auto_help())


def check_device(args: argparse.Namespace) -> None:
    """``--device`` usable here, before anything loads (the message names the option)."""
    from sdstack.models.assemble import resolve_device
    from sdstack.validate import SettingError

    try:
        resolve_device(args.device)
    except SettingError as error:
        raise SettingError(f"--{error}") from None
