"""``--lora`` and ``--lora-dir`` of ``sdstack generate``: the LoRA stack besides the tags.

Every LoRA of the job (the prompt's ``<lora:...>`` tags, then ``--lora`` entries) is
found before the model loads, so a typo in a name fails in a second, not after loading.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_lora_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--lora`` (repeatable) and ``--lora-dir`` (repeatable)."""
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE_OR_NAME[:W[:UNET_W]]",
        help="apply a LoRA (repeatable), after the prompt's <lora:name:w> tags: a file, or a "
        "name in the LoRA folders; W multiplies the text encoder and the UNet, UNET_W (if "
        "given) the UNet. The infotext writes it as a <lora:...> tag",
    )
    parser.add_argument(
        "--lora-dir",
        action="append",
        default=[],
        metavar="FOLDER",
        help="a folder of LoRA files to find names in (repeatable), after --root's "
        "models/Lora and models/LyCORIS",
    )


def apply_lora_options(args: argparse.Namespace, job: Any) -> None:
    """Put ``--lora`` and ``--lora-dir`` on the job (checked: multipliers, names given).

    Raises:
        LoraSpecError: a ``--lora`` value that cannot be read.
    """
    from sdstack.lora.spec import parse_lora_option

    job.networks = tuple(parse_lora_option(text) for text in args.lora)
    job.lora_dirs = tuple(args.lora_dir)


def find_job_loras(job: Any, library: Any) -> Any:
    """The ``LoraLibrary`` of the job, with every LoRA of its stack found in it.

    Raises:
        LoraNotFoundError: names (and infotext hashes) that no file has, all listed.
        CommandError: a ``--lora-dir`` that is not a folder.
    """
    from pathlib import Path

    from sdstack.cli import CommandError
    from sdstack.lora.job_stack import resolve_specs
    from sdstack.lora.library import LoraLibrary

    for folder in job.lora_dirs:
        if not Path(folder).is_dir():
            raise CommandError(f"--lora-dir {folder!r}: not a folder")
    loras = LoraLibrary(library, job.lora_dirs)
    specs = job.lora_specs()
    if specs:
        resolve_specs(specs, loras, job.lora_hashes)
    return loras
