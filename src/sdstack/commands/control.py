"""``sdstack control``: preview a ControlNet preprocessor's map, list the modules.

Thin: arguments are parsed and checked here; the work is ``sdstack.control.images``
(read, preprocess, resize) and ``sdstack.control.preprocessors``. numpy, cv2 and Pillow
are imported inside the handlers, so ``--help`` stays fast. The map is written to a
temporary file beside ``-o`` and moved into place; an existing file is replaced only
with ``--overwrite``, and never when it is the input image.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from sdstack.commands.arguments import add_command_group

MAP_FORMATS = {".png": "PNG", ".webp": "WEBP", ".jpg": "JPEG", ".jpeg": "JPEG"}


def register(subparsers: Any) -> None:
    """Add ``control``, ``control preview`` and ``control modules``."""
    commands = add_command_group(
        subparsers,
        "control",
        help="ControlNet tools: preview a preprocessor's map, list the modules",
        description="ControlNet helpers. A unit's image goes through a preprocessor "
        "(module) and is resized to the job as the reference extension does it; "
        "`control preview` writes that map so you can see what the ControlNet gets.",
    )
    _register_preview(commands)
    _register_modules(commands)


def _register_preview(commands: Any) -> None:
    parser = commands.add_parser(
        "preview",
        help="write the control map a preprocessor makes from an image",
        description="Run a ControlNet preprocessor on IMAGE and write the map to OUT: "
        "the image scaled to --resolution (short side) for detection, as the reference "
        "extension; with --size, the map is then resized to that job size by "
        "--resize-mode (Just Resize, Crop and Resize, Resize and Fill), exactly as a "
        "generation would use it. Modules that need downloaded detector weights "
        "(openpose, depth, hed, ...) are refused with the reason; `sdstack control "
        "modules` lists them all.",
    )
    parser.add_argument("image", metavar="IMAGE", help="input image (PNG, JPEG, WebP, ...)")
    parser.add_argument(
        "--module", "-m", required=True, metavar="MODULE", help="preprocessor, e.g. canny"
    )
    parser.add_argument("-o", "--out", required=True, metavar="OUT", help="map file (.png)")
    parser.add_argument("--low", type=float, default=None, help="canny low threshold (100)")
    parser.add_argument("--high", type=float, default=None, help="canny high threshold (200)")
    parser.add_argument(
        "--threshold-a", type=float, default=None, metavar="A", help="the module's slider A"
    )
    parser.add_argument(
        "--threshold-b", type=float, default=None, metavar="B", help="the module's slider B"
    )
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        metavar="PX",
        help="preprocessor resolution, 64..2048 (512)",
    )
    parser.add_argument(
        "--size", default=None, metavar="WxH", help="resize the map to this job size"
    )
    parser.add_argument(
        "--resize-mode",
        default=None,
        metavar="MODE",
        help="with --size: 'Just Resize', 'Crop and Resize' (default), 'Resize and Fill' "
        "(or 0, 1, 2)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    parser.set_defaults(handler=run_preview)


def _register_modules(commands: Any) -> None:
    parser = commands.add_parser(
        "modules",
        help="list the preprocessors (and the reference's that sdstack cannot run)",
        description="The control modules sdstack runs (no weights needed), with their "
        "reference names and sliders, then the reference extension's detectors that "
        "need downloaded weights or are not implemented, with the reason.",
    )
    parser.add_argument("--json", action="store_true", help="print the list as JSON")
    parser.set_defaults(handler=run_modules)


def parse_size(text: str) -> tuple[int, int]:
    """``"512x768"`` -> ``(512, 768)``.

    Raises:
        CommandError: not ``WIDTHxHEIGHT`` with whole numbers.
    """
    from sdstack.cli import CommandError

    width, sep, height = text.lower().partition("x")
    if not sep or not width.strip().isdigit() or not height.strip().isdigit():
        raise CommandError(f"--size must look like 512x512 (WIDTHxHEIGHT), got {text!r}")
    return int(width), int(height)


def _thresholds(args: argparse.Namespace, preprocessor: Any) -> tuple[Any, Any]:
    """``(threshold_a, threshold_b)`` from ``--low/--high`` or ``--threshold-a/-b``.

    Raises:
        CommandError: --low/--high with a module other than canny, with --threshold-a/-b,
            or a threshold for a slider the module does not have.
    """
    from sdstack.cli import CommandError

    a, b = args.threshold_a, args.threshold_b
    if args.low is not None or args.high is not None:
        if preprocessor.name != "canny":
            raise CommandError(
                f"--low/--high are canny's thresholds; for module {preprocessor.name!r} "
                f"use --threshold-a/--threshold-b ({_sliders(preprocessor)})"
            )
        if a is not None or b is not None:
            raise CommandError("give --low/--high or --threshold-a/--threshold-b, not both")
        a, b = args.low, args.high
    for option, value, slider in (
        ("--threshold-a", a, preprocessor.threshold_a),
        ("--threshold-b", b, preprocessor.threshold_b),
    ):
        if value is not None and slider is None:
            raise CommandError(
                f"{option}: module {preprocessor.name!r} has no such slider "
                f"({_sliders(preprocessor)})"
            )
    return a, b


def _sliders(preprocessor: Any) -> str:
    parts = [
        f"{option} = {slider.label}"
        for option, slider in (("A", preprocessor.threshold_a), ("B", preprocessor.threshold_b))
        if slider is not None
    ]
    return "its sliders: " + ", ".join(parts) if parts else "it has no sliders"


def _check_out(out: Path, image: Path, overwrite: bool) -> str:
    """The Pillow format of ``out``, after the checks that need no work.

    Raises:
        CommandError: another suffix, a folder, the input image, or an existing file
            without ``--overwrite``.
    """
    from sdstack.cli import CommandError

    fmt = MAP_FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise CommandError(f"-o {out}: expected a .png, .webp or .jpg file name")
    if out.is_dir():
        raise CommandError(f"-o {out}: is a folder; expected an image file name")
    if out.exists():
        if image.exists() and os.path.samefile(out, image):
            raise CommandError(f"-o {out}: is the input image; write the map to a new file")
        if not overwrite:
            raise CommandError(f"-o {out}: file exists; choose a new name (or --overwrite)")
    return fmt


def _write_map(pixels: Any, out: Path, fmt: str, overwrite: bool) -> None:
    """Save ``pixels`` (H x W x 3 uint8) to ``out`` atomically (temporary file, rename).

    Raises:
        CommandError: the folder cannot be written, or ``out`` appeared meanwhile.
    """
    from PIL import Image

    from sdstack.atomic_files import publish_new, replace, temporary_file
    from sdstack.cli import CommandError
    from sdstack.generate.outputs import os_error_reason

    folder = out.parent if str(out.parent) else Path(".")
    try:
        with temporary_file(folder, suffix=out.suffix) as temporary:
            Image.fromarray(pixels).save(temporary, format=fmt)
            if overwrite:
                replace(temporary, out)
            else:
                publish_new(temporary, out)
    except FileExistsError:
        raise CommandError(f"-o {out}: was created meanwhile; nothing overwritten") from None
    except OSError as error:
        raise CommandError(f"-o {out}: cannot be written: {os_error_reason(error)}") from error


def run_preview(args: argparse.Namespace) -> int:
    """Handler of ``sdstack control preview``."""
    from sdstack.cli import CommandError
    from sdstack.control.images import image_array, read_control_image
    from sdstack.control.preprocessors import find_preprocessor, preprocess
    from sdstack.control.resize import resize_control_map, resize_mode_name

    # 1. Check the options before reading anything.
    preprocessor = find_preprocessor(args.module)
    threshold_a, threshold_b = _thresholds(args, preprocessor)
    if args.resize_mode is not None and args.size is None:
        raise CommandError("--resize-mode needs --size WxH (the job size to resize to)")
    size = parse_size(args.size) if args.size is not None else None
    mode = resize_mode_name(args.resize_mode if args.resize_mode is not None else 1)
    image_path, out = Path(args.image), Path(args.out)
    fmt = _check_out(out, image_path, args.overwrite)
    # 2. Read, preprocess, resize, write.
    pixels = image_array(read_control_image(image_path, option="IMAGE"))
    detected = preprocess(
        preprocessor.name,
        pixels,
        resolution=args.resolution,
        threshold_a=threshold_a,
        threshold_b=threshold_b,
    )
    if size is not None:
        detected = resize_control_map(detected, size[0], size[1], mode)
    _write_map(detected, out, fmt, args.overwrite)
    print(out)
    return 0


def module_list() -> dict[str, list[dict[str, Any]]]:
    """What ``sdstack control modules --json`` prints: runnable and unavailable modules."""
    from sdstack.control.detectors import UNAVAILABLE_PREPROCESSORS
    from sdstack.control.preprocessors import PREPROCESSORS

    def slider(value: Any) -> dict[str, Any] | None:
        if value is None:
            return None
        keys = ("label", "default", "minimum", "maximum")
        return {key: getattr(value, key) for key in keys}

    runnable = [
        {
            "name": p.name,
            "reference": p.reference,
            "summary": p.summary,
            "uses_resolution": p.uses_resolution,
            "threshold_a": slider(p.threshold_a),
            "threshold_b": slider(p.threshold_b),
        }
        for p in PREPROCESSORS.values()
    ]
    unavailable = [
        {"name": u.name, "needs_weights": u.needs, "reason": u.message()}
        for u in UNAVAILABLE_PREPROCESSORS.values()
    ]
    return {"modules": runnable, "unavailable": unavailable}


def run_modules(args: argparse.Namespace) -> int:
    """Handler of ``sdstack control modules``."""
    listing = module_list()
    if args.json:
        print(json.dumps(listing, indent=2, ensure_ascii=False))
        return 0
    print("Modules sdstack runs (no weights needed):")
    for entry in listing["modules"]:
        sliders = [
            f"{which}: {s['label']} {s['minimum']:g}..{s['maximum']:g} (default {s['default']:g})"
            for which, s in (("A", entry["threshold_a"]), ("B", entry["threshold_b"]))
            if s is not None
        ]
        reference = "" if entry["reference"] == entry["name"] else f" [{entry['reference']}]"
        extra = f"; {'; '.join(sliders)}" if sliders else ""
        print(f"  {entry['name']}{reference}: {entry['summary']}{extra}")
    print("Reference modules that need downloaded weights (preprocess elsewhere, use 'none'):")
    for entry in listing["unavailable"]:
        if entry["needs_weights"] is not None:
            print(f"  {entry['name']}: {entry['needs_weights']}")
    print("Reference modules not implemented:")
    for entry in listing["unavailable"]:
        if entry["needs_weights"] is None:
            print(f"  {entry['name']}")
    return 0
