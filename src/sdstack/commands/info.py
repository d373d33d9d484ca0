"""The ``sdstack info`` command: print the infotext stored in an image.

Reads with Pillow only: this command never imports torch or diffusers. A missing file, a
folder, a non-image or a broken image is an ``InfotextError`` naming the file and the
reason (``sdstack: error: image 'x.png': no such file``, exit 2).
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(subparsers: Any) -> None:
    """Add the ``info`` parser."""
    info = subparsers.add_parser(
        "info",
        help="print the generation parameters stored in an image",
        description="Read an image's infotext (PNG 'parameters' chunk, or JPEG/WebP EXIF "
        "UserComment) and print it parsed as the reference UI's PNG Info does.",
    )
    info.add_argument("image", help="PNG, JPEG or WebP file")
    info.add_argument("--json", action="store_true", help="print a JSON object")
    info.set_defaults(handler=run_info)


def run_info(args: argparse.Namespace) -> int:
    """Handler of ``sdstack info``."""
    from sdstack.cli import CommandError
    from sdstack.generate.images import read_infotext
    from sdstack.generate.infotext import parse_infotext

    text = read_infotext(args.image, option="image")
    if not text:
        raise CommandError(
            f"image {args.image!r}: holds no infotext; it was not saved with its generation "
            "parameters"
        )
    parsed = parse_infotext(text)
    if args.json:
        print(json.dumps(parsed, indent=2, ensure_ascii=False))
        return 0
    for key, value in parsed.items():
        print(f"{key}: {value}")
    return 0
