"""``sdstack models check``: broken CLIP ``position_ids`` in a checkpoint, and their repair.

CLIP looks token ``i`` up at position ``position_ids[i]``, and the ids of SD1.x
checkpoints are ``int64`` ``0..76``. Merges that averaged them as floats (reference issues
#6728, #7450) left ids like ``75.9995``; converted to integers they truncate to 75, so
the last token gets the position embedding of the one before it, and every image of the
model changes a little. A check reports, for each ``...position_ids`` tensor:

- ids that truncate to another position (``int(75.9995) = 75`` at position 76);
- ids that are not whole numbers but still truncate right (``3.0001``);
- ids stored as anything but ``int64``.

The repair copies the file, tensor by tensor (each tensor's bytes as they are, in row
ranges, the metadata kept), with each broken ``position_ids`` replaced by ``int64``
``0..n-1``, into a new ``.safetensors`` written atomically.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from sdstack.merge import MergeError
from sdstack.merge.checks import is_position_ids, position_ids
from sdstack.merge.reader import TensorSource, open_source, row_slices

COPY_ELEMENTS = 1 << 22
"""Elements per row range when a tensor is copied."""
SHOWN = 3
"""Wrong ids named in a description."""


@dataclass(frozen=True)
class PositionIdsProblem:
    """A ``position_ids`` tensor that is not ``int64`` ``0..n-1``."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    wrong: tuple[tuple[int, float], ...]
    """(position, stored id) of each id that does not truncate to its position."""
    inexact: int
    """Ids that are not whole numbers (the wrong ones included)."""

    def describe(self) -> str:
        """One line: the key, what is stored, what is wrong."""
        count = math.prod(self.shape)
        found = [f"{self.dtype} {list(self.shape)}"]
        if self.wrong:
            shown = ", ".join(f"{value:.7g} at {index}" for index, value in self.wrong[:SHOWN])
            more = f" and {len(self.wrong) - SHOWN} more" if len(self.wrong) > SHOWN else ""
            found.append(
                f"{len(self.wrong)} of {count} ids point at the wrong position ({shown}{more})"
            )
        elif self.inexact:
            found.append(f"{self.inexact} ids are not whole numbers (they still truncate right)")
        elif self.dtype != "int64":
            found.append("the ids are right but not stored as int64")
        return f"{self.key}: {'; '.join(found)}; expected int64 0..{count - 1}"


@dataclass(frozen=True)
class PositionIdsReport:
    """What :func:`check_position_ids` found in one file."""

    path: Path
    keys: tuple[str, ...]
    """Every ``position_ids`` tensor of the file."""
    problems: tuple[PositionIdsProblem, ...]
    sizes: tuple[int, ...] = ()
    """The number of ids of each tensor of ``keys``."""

    def summary(self) -> str:
        """``KEY: int64 0..76`` for each tensor (what a good file holds)."""
        pairs = zip(self.keys, self.sizes, strict=True)
        return ", ".join(f"{key}: int64 0..{size - 1}" for key, size in pairs)

    @property
    def ok(self) -> bool:
        """No broken ``position_ids`` (also true when the file has none)."""
        return not self.problems


def position_ids_problem(key: str, ids: torch.Tensor) -> PositionIdsProblem | None:
    """The problem of one ``position_ids`` tensor, or None when it is ``int64`` ``0..n-1``."""
    expected = position_ids(tuple(ids.shape)).flatten()
    flat = ids.flatten()
    dtype = str(ids.dtype).removeprefix("torch.")
    if flat.is_complex():
        flat = flat.real
    if flat.is_floating_point():
        values = flat.double()
        as_ids = values.trunc()  # what .long() makes of them: truncation toward zero
        inexact = int((values != as_ids).sum())
    else:
        values = as_ids = flat.long()
        inexact = 0
    bad = (as_ids != expected.to(as_ids.dtype)).nonzero().flatten().tolist()
    wrong = tuple((int(index), float(values[index])) for index in bad)
    if not wrong and not inexact and ids.dtype == torch.int64:
        return None
    return PositionIdsProblem(key, dtype, tuple(ids.shape), wrong, inexact)


def _report(path: Path, source: TensorSource) -> PositionIdsReport:
    keys = tuple(sorted(key for key in source if is_position_ids(key)))
    found = (position_ids_problem(key, source.read(key)) for key in keys)
    problems = tuple(problem for problem in found if problem is not None)
    return PositionIdsReport(path, keys, problems, tuple(math.prod(source[k]) for k in keys))


def check_position_ids(path: str | Path) -> PositionIdsReport:
    """Check every ``...position_ids`` tensor of the checkpoint at ``path`` (only those
    tensors are read).

    Raises:
        FileNotFoundError: no such file; CheckpointError: unreadable or unknown file type.
    """
    path = Path(path)
    with open_source(path) as source:
        return _report(path, source)


def _pieces(source: TensorSource, key: str, broken: set[str]) -> Iterator[torch.Tensor]:
    if key in broken:
        yield position_ids(source[key])
        return
    for rows in row_slices(tuple(source[key]), COPY_ELEMENTS):
        yield source.read(key, rows)


def repair_position_ids(
    path: str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[PositionIdsReport, Path | None]:
    """Write a copy of ``path`` to ``out`` with its broken ``position_ids`` repaired.

    Nothing is written when nothing is broken. ``progress(done, total)`` counts tensors.

    Returns:
        The report of ``path`` and the repaired file (None when nothing was written).

    Raises:
        MergeError: ``out`` is not a new ``.safetensors`` path (or is ``path`` itself).
        FileNotFoundError, CheckpointError: as :func:`check_position_ids`.
    """
    from sdstack.lora.bake import BakeError, check_output
    from sdstack.merge.writer import write_pieces

    path = Path(path)
    try:
        output = check_output(out, [path], overwrite, "output")
    except BakeError as error:
        raise MergeError(str(error)) from error
    with open_source(path) as source:
        report = _report(path, source)
        if report.ok:
            return report, None
        broken = {problem.key for problem in report.problems}
        names = sorted(source)
        entries = [
            (key, torch.int64 if key in broken else source.dtype(key), tuple(source[key]))
            for key in names
        ]
        metadata = dict(source.metadata) or {"format": "pt"}
        pieces = (_pieces(source, key, broken) for key in names)
        write_pieces(output, entries, pieces, metadata, overwrite=overwrite, progress=progress)
    return report, output
