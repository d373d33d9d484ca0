"""``--encoding`` and ``--deprojector`` of ``sdstack generate``: the deprojected encoding.

``--encoding deprojected --deprojector DIR`` reads the prompt as an embedding expression
(``sdstack.generate.encoding``) and deprojects it to the conditioning; the negative
prompt is encoded normally. ``--deprojector DIR`` alone implies ``--encoding
deprojected``; with ``--encoding standard`` it is an error. Without ``--clip-skip`` the
deprojector's own clip skip is used (``auto``), except with ``--from-infotext`` of a
deprojected image, whose ``Clip skip`` is kept.

With ``--from-infotext`` the infotext's ``Encoding`` sets the encoding. Its
``Deprojector: NAME [HASH]`` names the folder but the folder's path is not in the
infotext: ``--deprojector DIR`` gives it, else the folder ``NAME`` under
``<root>/models/deprojectors/`` (``--root`` / ``$SDSTACK_ROOT``) is used when it
exists; a folder whose weights have another hash is used with a note. Everything is
checked before the model loads: the encoding, the folder and its config, the expression.

``sdstack grid`` has neither option: a deprojected infotext is refused there.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

DEPROJECTOR_FOLDER = "models/deprojectors"
"""Where ``--root`` keeps deprojector folders, by name."""


def add_deprojector_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--encoding`` and ``--deprojector``."""
    parser.add_argument(
        "--encoding",
        default=None,
        metavar="standard|deprojected",
        help="how the prompt becomes conditioning: standard (default; the prompt language) "
        "or deprojected: the prompt is an embedding expression such as "
        '\'{"a cat" + 0.5*"a hat" - "blurry"}\', \'{"a cat" ~0.3~ "a dog"}\' (slerp) or '
        "'{pooled(\"a cat, red hat\")}' (a plain text is one text), whose texts are "
        "encoded plainly (no emphasis, schedules, AND) and deprojected by --deprojector; "
        "<lora:...> tags still apply; the negative prompt is encoded normally",
    )
    parser.add_argument(
        "--deprojector",
        default=None,
        metavar="DIR",
        help="a deprojector folder (from 'sdstack deproject train'; implies --encoding "
        "deprojected). Without --clip-skip its own clip skip is used",
    )


def apply_deprojector_options(args: argparse.Namespace, job: Any, explicit: dict) -> None:
    """Set the job's encoding and deprojector folder from the options and the infotext
    (the rules of the module docstring), the folder checked.

    Args:
        explicit: the GenerationParams fields given on the command line.

    Raises:
        CommandError: the options do not fit together, or a deprojected infotext
            without a folder to use.
        UnknownEncodingError, DeprojectorFileError: a bad encoding name, a bad folder.
    """
    from sdstack.cli import CommandError
    from sdstack.generate.deprojected import read_deprojector_folder
    from sdstack.generate.encoding import DEPROJECTED, check_encoding

    what = "Encoding (from the --from-infotext image)"
    current = check_encoding(job.params.encoding, what)
    if not hasattr(args, "deprojector"):  # sdstack grid
        if current == DEPROJECTED:
            raise CommandError(
                "sdstack grid does not support the deprojected encoding of this infotext; "
                "use sdstack generate --from-infotext IMAGE --deprojector DIR"
            )
        return
    encoding = current
    if args.encoding is not None:
        encoding = check_encoding(args.encoding, "--encoding")
    elif args.deprojector is not None:
        encoding = DEPROJECTED
    if encoding != DEPROJECTED:
        if args.deprojector is not None:
            raise CommandError(
                "--deprojector DIR is for --encoding deprojected; leave out --encoding "
                f"{encoding} (or --deprojector)"
            )
        job.params = dataclasses.replace(job.params, encoding=encoding)
        return
    folder = args.deprojector
    if folder is None and current != DEPROJECTED:
        raise CommandError(
            "--encoding deprojected needs --deprojector DIR (a folder made by "
            "`sdstack deproject train`)"
        )
    if folder is None:
        folder = _folder_from_infotext(args, job)
    found = read_deprojector_folder(folder, "--deprojector")
    changes: dict[str, Any] = {"encoding": DEPROJECTED}
    if "clip_skip" not in explicit and current != DEPROJECTED:
        changes["clip_skip"] = "auto"  # the deprojector's own
    job.params = dataclasses.replace(job.params, **changes)
    job.deprojector = str(found.path)
    _note_other_deprojector(job, found)


def _folder_from_infotext(args: argparse.Namespace, job: Any) -> str:
    """The folder a deprojected infotext's ``Deprojector`` names, under the root's
    models/deprojectors/.

    Raises:
        CommandError: no ``Deprojector`` field, or no such folder (says to pass
            --deprojector DIR).
    """
    from sdstack.cli import CommandError
    from sdstack.generate.encoding import parse_deprojector_title

    if job.infotext_deprojector is None:
        raise CommandError(
            "the infotext uses the deprojected encoding but names no deprojector: pass "
            "--deprojector DIR"
        )
    name, _hash = parse_deprojector_title(job.infotext_deprojector)
    folder = _root_folder(args, name)
    if folder is not None:
        return str(folder)
    raise CommandError(
        f"the infotext uses the deprojected encoding with deprojector "
        f"{job.infotext_deprojector}; the folder is not part of an infotext: pass "
        f"--deprojector DIR (or --root with it as {DEPROJECTOR_FOLDER}/{name})"
    )


def _root_folder(args: argparse.Namespace, name: str) -> Path | None:
    """``<root>/models/deprojectors/<name>`` (``<root>/deprojectors/<name>`` when the root
    is a models/ folder) when it is a folder; None without a root or a plain name."""
    from sdstack.models.root import open_library

    if not name or name in (".", "..") or Path(name).name != name or "\\" in name:
        return None
    library = open_library(getattr(args, "root", None))
    if library is None:
        return None
    for base in (library.root / DEPROJECTOR_FOLDER, library.root / "deprojectors"):
        if (base / name).is_dir():
            return base / name
    return None


def _note_other_deprojector(job: Any, found: Any) -> None:
    """Tell (stderr) when the infotext's deprojector has another hash than the folder's."""
    from sdstack.generate.encoding import parse_deprojector_title

    if job.infotext_deprojector is None:
        return
    _name, short = parse_deprojector_title(job.infotext_deprojector)
    title = found.title()
    if short is not None and parse_deprojector_title(title)[1] != short:
        print(
            f"sdstack: note: the infotext names deprojector {job.infotext_deprojector}; "
            f"generating with {title}",
            file=sys.stderr,
        )
