"""``sdstack models``: what a reference-UI install folder holds, with the infotext hashes;
``models check``: broken CLIP ``position_ids`` in a checkpoint, repaired with ``--fix``."""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from sdstack.commands.arguments import add_command_group


def register(subparsers) -> None:
    """Add ``models``, ``models list`` and ``models check``."""
    commands = add_command_group(
        subparsers,
        "models",
        help="list checkpoints, LoRAs, VAEs and embeddings of a web UI install folder",
        description="Models of a folder laid out like the reference web UI "
        "(models/Stable-diffusion, models/Lora, models/LyCORIS, models/VAE, embeddings).",
    )
    listing = commands.add_parser(
        "list",
        help="list models with their short hashes",
        description="List checkpoints, LoRAs, VAEs and embeddings with the short hashes the "
        "reference UI writes in infotext: Model/VAE hash = sha256[:10], TI hashes = "
        "sha256[:12], Lora hashes = kohya/addnet hash[:12]. Hashes are cached (keyed by "
        "path, size and modification time) under $SDSTACK_CACHE_DIR, $XDG_CACHE_HOME/sdstack "
        "or ~/.cache/sdstack, so only new or changed files are read. Special files (FIFOs, "
        "devices), broken links and folder loops are skipped with a warning.",
    )
    listing.add_argument(
        "--root",
        default=None,
        metavar="WEBUI_DIR",
        help="web UI install folder holding models/ and embeddings/, or the models/ folder "
        "itself (default: $SDSTACK_ROOT, else the current folder)",
    )
    listing.add_argument(
        "--kind",
        action="append",
        choices=("checkpoint", "lora", "vae", "embedding"),
        help="only this kind (repeatable; default: all)",
    )
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.add_argument(
        "--no-hash",
        action="store_true",
        help="do not read files to hash them (hashes already in the cache are still shown)",
    )
    listing.set_defaults(handler=run_list)
    _register_check(commands)


def _register_check(commands) -> None:
    check = commands.add_parser(
        "check",
        help="report broken CLIP position_ids in a checkpoint (--fix writes a repaired copy)",
        description="Check the CLIP position_ids of a checkpoint: SD1.x expects int64 ids "
        "0..76. Merges that averaged them as floats left ids like 75.9995, which truncate "
        "to the wrong token position and shift every image a little. Exit status 0 when "
        "they are fine (or repaired), 1 when broken ids are found. With --fix -o OUT, a "
        "copy with int64 0..76 is written (every other tensor and the metadata unchanged, "
        "streamed tensor by tensor, OUT appearing only when complete).",
    )
    check.add_argument("file", metavar="FILE", help="checkpoint (.safetensors, .ckpt)")
    check.add_argument("--fix", action="store_true", help="write a repaired copy to OUT")
    check.add_argument("-o", "--out", default=None, metavar="OUT", help="new .safetensors")
    check.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    check.set_defaults(handler=run_check)


def _human_size(size: int) -> str:
    """1536 -> '1.5 KiB' (binary units)."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _cached(entry) -> tuple[str | None, str | None]:
    """(cached hash, None), or (None, why) when the file cannot be read or looked at."""
    if entry.error is not None:
        return None, entry.error  # already a warning while listing
    try:
        return entry.cached_sha256(), None
    except (ValueError, OSError) as error:
        return None, str(error)


def _compute_hashes(library, entries, enabled: bool) -> dict:
    """entry -> (full hash or None, error or None); new hashes read with a byte progress bar.

    A file that cannot be hashed is an ``SdstackWarning`` (after the bar), unless listing
    it already was one.
    """
    from tqdm import tqdm

    from sdstack.errors import SdstackWarning

    results = {entry: _cached(entry) for entry in entries}
    pending = [entry for entry in entries if results[entry] == (None, None)] if enabled else []
    total = sum(entry.size for entry in pending)
    with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="hashing",
        file=sys.stderr,
        disable=not pending,
    ) as bar:
        done = 0
        for entry in pending:
            try:
                results[entry] = (entry.sha256(progress=bar.update), None)
            except (ValueError, OSError) as error:
                results[entry] = (None, str(error))
            done += entry.size
            bar.update(done - bar.n)  # the addnet hash skips the header bytes
    for entry, (_, error) in results.items():
        if error is not None and error != entry.error:
            path = library.display_path(entry.path)
            warnings.warn(f"could not hash {path}: {error}", SdstackWarning, stacklevel=2)
    return results


def _rows(library, entries, results) -> list[dict]:
    from sdstack.models.library import SHORT_HASH_LENGTH

    rows = []
    for entry in entries:
        digest, error = results[entry]
        row = {
            "kind": entry.kind,
            "name": entry.name,
            "alias": entry.alias,
            "short_hash": digest[: SHORT_HASH_LENGTH[entry.kind]] if digest else None,
            "sha256": digest,
            "size": entry.size,
            "path": library.display_path(entry.path),
        }
        if error is not None:
            row["error"] = error
        rows.append(row)
    return rows


def _print_table(rows: list[dict], kinds: tuple[str, ...]) -> None:
    header = ("TYPE", "NAME", "ALIAS", "HASH", "SIZE", "PATH")
    table = [
        (
            row["kind"],
            row["name"],
            row["alias"] or "-",
            row["short_hash"] or ("error" if "error" in row else "-"),
            _human_size(row["size"]),
            row["path"],
        )
        for row in rows
    ]
    widths = [
        max(len(str(cell)) for cell in column) for column in zip(header, *table, strict=False)
    ]
    for line in (header, *table):
        cells = [str(cell).ljust(width) for cell, width in zip(line, widths, strict=True)]
        cells[4] = str(line[4]).rjust(widths[4])
        print("  ".join(cells).rstrip())
    for kind in kinds:
        count = sum(row["kind"] == kind for row in rows)
        if count == 0:
            print(f"(no {kind} files)")


def run_list(args: argparse.Namespace) -> int:
    """Handler of ``sdstack models list``."""
    from sdstack.models import hashes

    try:
        return _list(args)  # warnings: SdstackWarning, printed by the CLI as it happens
    finally:
        hashes.flush()  # what was hashed so far is kept, even after Ctrl-C


def _list(args: argparse.Namespace) -> int:
    from sdstack.models.library import KINDS, ModelLibrary
    from sdstack.models.root import open_library

    # 1. find the folders (errors name --root or SDSTACK_ROOT and what was looked for)
    library = open_library(args.root) or ModelLibrary(".")
    kinds = tuple(kind for kind in KINDS if not args.kind or kind in args.kind)
    # 2. list (hostile entries are warnings), then hash what is not cached yet
    entries = library.entries(kinds)
    results = _compute_hashes(library, entries, enabled=not args.no_hash)
    rows = _rows(library, entries, results)
    # 3. print
    if args.json:
        payload = {"root": str(library.root), "models": rows}
        print(json.dumps(payload, indent=2, ensure_ascii=False))
    else:
        _print_table(rows, kinds)
    return 0


def run_check(args: argparse.Namespace) -> int:
    """Handler of ``sdstack models check``."""
    from sdstack.cli import CommandError
    from sdstack.merge.repair import check_position_ids, repair_position_ids

    # 1. --fix and -o come together.
    if args.fix and args.out is None:
        raise CommandError("--fix: give the repaired file's name with -o OUT")
    if args.out is not None and not args.fix:
        raise CommandError(f"-o {args.out}: writing a copy needs --fix")
    # 2. Check (and repair).
    if args.fix:
        report, written = repair_position_ids(args.file, args.out, overwrite=args.overwrite)
    else:
        report, written = check_position_ids(args.file), None
    # 3. Report.
    if not report.keys:
        print(f"{report.path}: no position_ids tensor; nothing to check")
    elif report.ok:
        print(f"{report.path}: position_ids are fine ({report.summary()})")
    for problem in report.problems:
        print(f"{report.path}: {problem.describe()}")
    if written is not None:
        print(f"{written}: repaired copy written (position_ids int64 0..n-1)")
        return 0
    if args.fix:
        print(f"{report.path}: nothing to repair; nothing written")
        return 0
    if report.problems:
        print(f"repair with: sdstack models check {report.path} --fix -o FIXED.safetensors")
        return 1
    return 0
