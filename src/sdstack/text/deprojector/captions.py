"""Caption files for deprojector training: ``.txt`` (one per line), ``.csv``, ``.parquet``.

The reference trained on LAION-400M caption parquet parts; any list of captions works.

- ``.txt``: one caption per line (UTF-8, a BOM is ignored).
- ``.csv``: the first column named ``caption``, ``text`` or ``prompt`` (case-insensitive,
  in that order of preference), else the first column; the first row is the header.
- ``.parquet``: the same column choice (needs pyarrow: ``pip install sdstack[parquet]``).

Each caption is stripped of surrounding white space, inner line breaks become spaces;
empty captions and repeats are dropped (first occurrence kept, order preserved). Limits
keep a hostile file from costing unbounded memory or time: the file size, the caption
count and the caption length are bounded, and a file that is not text is refused with
the line (or row) where it went wrong.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from sdstack.errors import SdstackError

CAPTION_COLUMNS = ("caption", "text", "prompt")
"""Column names searched, in order, in .csv and .parquet files."""
MAX_FILE_BYTES = 1 << 30
"""Largest caption file read (1 GiB)."""
MAX_CAPTIONS = 5_000_000
"""Most captions read from one file."""
MAX_CAPTION_CHARS = 10_000
"""Longest caption accepted (CLIP keeps 75 tokens, a few hundred characters)."""
SUFFIXES = (".txt", ".csv", ".parquet")


class CaptionFileError(SdstackError):
    """A caption file that cannot be read: names the file, the line/row and the problem."""


def read_captions(path: str | os.PathLike[str]) -> list[str]:
    """Captions of a ``.txt``/``.csv``/``.parquet`` file, cleaned and deduplicated.

    Args:
        path: the caption file; its suffix chooses the format.

    Returns:
        The non-empty captions in file order, each once.

    Raises:
        CaptionFileError: unknown suffix, not a regular file, too large, not UTF-8, a
            caption over ``MAX_CAPTION_CHARS``, more than ``MAX_CAPTIONS``, no caption at
            all, a corrupt parquet file or one without a string column, pyarrow missing.
        OSError: the file cannot be opened (missing, no permission).
    """
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix not in SUFFIXES:
        raise CaptionFileError(
            f"caption file {str(file)!r}: unknown suffix {file.suffix!r}; expected one of "
            f"{', '.join(SUFFIXES)}"
        )
    if not file.exists():
        raise FileNotFoundError(2, "No such file or directory", str(file))
    if not file.is_file():
        raise CaptionFileError(f"caption file {str(file)!r} is not a regular file")
    size = file.stat().st_size
    if size > MAX_FILE_BYTES:
        raise CaptionFileError(
            f"caption file {str(file)!r} is {size} bytes; at most {MAX_FILE_BYTES} are read "
            "(split it into smaller files)"
        )
    if suffix == ".parquet":
        raw = _parquet_column(file)
    else:
        text = _decode(file)
        raw = _csv_column(file, text) if suffix == ".csv" else text.splitlines()
    captions = clean_captions(raw, where=str(file))
    if not captions:
        raise CaptionFileError(f"caption file {str(file)!r} holds no caption (all lines empty)")
    return captions


def clean_captions(raw: list[str], *, where: str = "captions") -> list[str]:
    """Strip, join inner lines, drop empties and repeats (first kept); check the limits.

    Raises:
        CaptionFileError: a caption longer than ``MAX_CAPTION_CHARS`` (names its line) or
            more than ``MAX_CAPTIONS`` captions.
    """
    seen: set[str] = set()
    captions: list[str] = []
    for number, line in enumerate(raw, start=1):
        caption = " ".join(str(line).split())
        if not caption or caption in seen:
            continue
        if len(caption) > MAX_CAPTION_CHARS:
            raise CaptionFileError(
                f"{where}: caption {number} has {len(caption)} characters; at most "
                f"{MAX_CAPTION_CHARS} are accepted (CLIP reads 75 tokens)"
            )
        seen.add(caption)
        captions.append(caption)
        if len(captions) > MAX_CAPTIONS:
            raise CaptionFileError(f"{where}: more than {MAX_CAPTIONS} captions; split the file")
    return captions


def _decode(file: Path) -> str:
    """UTF-8 text of ``file`` (BOM dropped); NUL bytes or bad UTF-8 name the line."""
    data = file.read_bytes()
    if b"\0" in data:
        line = data[: data.index(b"\0")].count(b"\n") + 1
        raise CaptionFileError(
            f"caption file {str(file)!r} line {line}: NUL byte; this is not a text file"
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise CaptionFileError(
            f"caption file {str(file)!r} line {line}: not UTF-8 text ({error.reason} at "
            f"byte {error.start}); save it as UTF-8"
        ) from None


def _pick_column(names: list[str]) -> int:
    """Index of the caption column: caption/text/prompt (case-insensitive), else 0."""
    lowered = [name.strip().lower() for name in names]
    for wanted in CAPTION_COLUMNS:
        if wanted in lowered:
            return lowered.index(wanted)
    return 0


def _csv_column(file: Path, text: str) -> list[str]:
    """The caption column of a CSV text (header row first)."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            return []
        column = _pick_column(header)
        rows = []
        for row in reader:
            if len(rows) > MAX_CAPTIONS:
                break
            rows.append(row[column] if column < len(row) else "")
    except csv.Error as error:
        raise CaptionFileError(
            f"caption file {str(file)!r} row {reader.line_num}: bad CSV ({error})"
        ) from None
    return rows


def _parquet_column(file: Path) -> list[str]:
    """The caption column of a parquet file (pyarrow), as Python strings."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CaptionFileError(
            f"caption file {str(file)!r}: reading .parquet needs pyarrow; "
            "install it with `pip install sdstack[parquet]`"
        ) from None
    import pyarrow as pa

    try:
        parquet = pq.ParquetFile(str(file))
        names = parquet.schema_arrow.names
        if not names:
            raise CaptionFileError(f"caption file {str(file)!r}: the parquet file has no column")
        if parquet.metadata.num_rows > MAX_CAPTIONS:
            raise CaptionFileError(
                f"caption file {str(file)!r}: {parquet.metadata.num_rows} rows; at most "
                f"{MAX_CAPTIONS} are read (split the file)"
            )
        name = names[_pick_column(names)]
        field = parquet.schema_arrow.field(name)
        if not (pa.types.is_string(field.type) or pa.types.is_large_string(field.type)):
            raise CaptionFileError(
                f"caption file {str(file)!r}: column {name!r} holds {field.type}, expected "
                f"strings (name the caption column one of {', '.join(CAPTION_COLUMNS)})"
            )
        values = parquet.read(columns=[name]).column(name).to_pylist()
    except (pa.ArrowException, OSError) as error:
        if isinstance(error, FileNotFoundError):
            raise
        raise CaptionFileError(
            f"caption file {str(file)!r}: not a readable parquet file ({error})"
        ) from None
    return ["" if value is None else value for value in values]
