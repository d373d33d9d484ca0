"""``--control``, ``--control-mode``, ``--control-image`` of ``sdstack generate``.

``--control MODULE:MODEL:IMAGE[:WEIGHT[:START:END]]`` adds a ControlNet unit
(repeatable); ``--control-mode`` and ``--control-resize-mode`` set those of every unit.
With ``--from-infotext`` the infotext's ``ControlNet N`` units are used unless
``--control`` is given; their images are not in the infotext, so ``--control-image``
gives them, in unit order. Every unit is checked, its model found and its image read
before the model loads.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any


def add_control_options(parser: argparse.ArgumentParser) -> None:
    """Add the ControlNet options."""
    parser.add_argument(
        "--control",
        action="append",
        default=[],
        metavar="MODULE:MODEL:IMAGE[:W[:START:END]]",
        help="a ControlNet unit (repeatable): preprocessor (none, canny, invert, scribble, "
        "lineart, tile; see 'sdstack control modules'), ControlNet file or name under "
        "models/ControlNet, control image, weight 0..2 (default 1), guidance start and end "
        "as fractions of the steps (default 0 and 1)",
    )
    parser.add_argument(
        "--control-mode",
        default=None,
        help="control mode of every unit: Balanced (default), 'My prompt is more "
        "important', 'ControlNet is more important' (or prompt, controlnet)",
    )
    parser.add_argument(
        "--control-resize-mode",
        default=None,
        help="how each control image fits the image size: 'Just Resize', 'Crop and "
        "Resize' (default), 'Resize and Fill'",
    )
    parser.add_argument(
        "--control-image",
        action="append",
        default=[],
        metavar="IMAGE",
        help="with --from-infotext: the control image of each of the infotext's ControlNet "
        "units, in order (the infotext does not carry them)",
    )


def _job_units(args: argparse.Namespace, job: Any) -> list[Any]:
    from sdstack.cli import CommandError
    from sdstack.control.unit import parse_control_option, with_image

    if args.control:
        if args.control_image:
            raise CommandError(
                "--control-image fills the images of an infotext's ControlNet units; with "
                "--control, give each image in its MODULE:MODEL:IMAGE value"
            )
        return [parse_control_option(text, what=f"--control {text!r}") for text in args.control]
    units = list(job.controls)
    if args.control_image and not units:
        raise CommandError(
            "--control-image: there is no ControlNet unit to give it to (use --control "
            "MODULE:MODEL:IMAGE, or --from-infotext with an image made with ControlNet)"
        )
    if len(args.control_image) > len(units):
        raise CommandError(
            f"--control-image given {len(args.control_image)} times, but the infotext has "
            f"{len(units)} ControlNet unit(s)"
        )
    for index, image in enumerate(args.control_image):
        units[index] = with_image(units[index], image)
    missing = [i for i, unit in enumerate(units) if unit.image is None]
    if missing:
        raise CommandError(
            f"the infotext has {len(units)} ControlNet unit(s), but the control image is not "
            "part of an infotext: pass --control-image IMAGE for each unit, in order "
            f"(missing for unit {', '.join(str(i) for i in missing)})"
        )
    return units


def apply_control_options(args: argparse.Namespace, job: Any) -> None:
    """Put the command line's (or the infotext's) ControlNet units on ``job``, checked,
    with their models found (under ``--root``) and their images readable.

    Raises:
        CommandError: an image missing for an infotext unit, or misused options.
        ControlUnitError, UnknownNameError, ControlNetNotFoundError, ControlImageError.
    """
    from sdstack.control.images import read_control_image
    from sdstack.control.prepare import check_units

    units = _job_units(args, job)
    changes = {}
    if args.control_mode is not None:
        changes["control_mode"] = args.control_mode
    if args.control_resize_mode is not None:
        changes["resize_mode"] = args.control_resize_mode
    units = [dataclasses.replace(unit, **changes) for unit in units]
    units = check_units(units, root=getattr(args, "root", None))
    for unit in units:
        if isinstance(unit.image, str):
            read_control_image(unit.image)
    job.controls = tuple(units)


def control_options(args: argparse.Namespace) -> dict[str, Any]:
    """``generate``'s ``control_options``: where ControlNet names are found."""
    return {"root": getattr(args, "root", None)}
