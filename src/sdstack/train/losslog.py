"""The training loss log: one CSV row per optimizer step, and a loss plot (PNG).

CSV columns: ``step`` (1-based optimizer step), ``epoch`` (1-based), ``loss`` (the mean
loss of the step's micro-batches, as kohya logs ``loss/current``), ``loss_average`` (the
mean of the last ``window`` losses, kohya's ``loss/average`` over an epoch is the same
idea), ``lr_unet``, ``lr_text_encoder``. The plot draws the losses and the moving average
against the step, with matplotlib's Agg canvas (no display, no pyplot global state). Both
files are written atomically (temporary file, then a rename).
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sdstack.atomic_files import replace, temporary_file
from sdstack.errors import SdstackError

COLUMNS = ("step", "epoch", "loss", "loss_average", "lr_unet", "lr_text_encoder")


class LossLogError(SdstackError):
    """The loss log or plot cannot be written or read."""


@dataclass(frozen=True)
class LossRecord:
    """One optimizer step: its 1-based number, epoch, mean loss and learning rates."""

    step: int
    epoch: int
    loss: float
    lr_unet: float
    lr_text_encoder: float


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean: ``out[i] = mean(values[max(0, i - window + 1) .. i])``."""
    out = []
    for index in range(len(values)):
        part = values[max(0, index - window + 1) : index + 1]
        out.append(math.fsum(part) / len(part))  # exact sums: no running-total drift
    return out


def default_window(count: int) -> int:
    """Moving-average window: a twentieth of the run, at least 1, at most 100 steps."""
    return max(1, min(100, count // 20))


def loss_csv_text(records: Sequence[LossRecord], window: int | None = None) -> str:
    """The CSV text of ``records`` (header + one row per record; floats as ``repr``)."""
    window = default_window(len(records)) if window is None else window
    averages = moving_average([r.loss for r in records], window)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for record, average in zip(records, averages, strict=True):
        writer.writerow(
            (record.step, record.epoch, repr(record.loss), repr(average),
             repr(record.lr_unet), repr(record.lr_text_encoder))
        )  # fmt: skip
    return buffer.getvalue()


def _write_atomic(path: Path, data: bytes, what: str) -> Path:
    try:
        with temporary_file(path.parent, suffix=path.suffix) as temporary:
            temporary.write_bytes(data)
            replace(temporary, path)
    except OSError as error:
        raise LossLogError(f"{what} {str(path)!r} cannot be written: {error}") from error
    return path


def write_loss_csv(path: str | os.PathLike[str], records: Sequence[LossRecord]) -> Path:
    """Write the loss log CSV atomically (replaces an earlier log of the same run).

    Raises:
        LossLogError: the file cannot be written.
    """
    return _write_atomic(Path(path), loss_csv_text(records).encode("utf-8"), "loss log")


def read_loss_csv(path: str | os.PathLike[str]) -> list[LossRecord]:
    """The records of a loss log :func:`write_loss_csv` wrote.

    Raises:
        LossLogError: unreadable, not this CSV layout, or a value that is not a number.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise LossLogError(f"loss log {str(path)!r} cannot be read: {error}") from error
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or tuple(rows[0]) != COLUMNS:
        raise LossLogError(
            f"loss log {str(path)!r}: expected the header {','.join(COLUMNS)}, "
            f"got {','.join(rows[0]) if rows else 'an empty file'}"
        )
    records = []
    for number, row in enumerate(rows[1:], start=2):
        try:
            step, epoch, loss, _average, lr_unet, lr_te = row
            records.append(
                LossRecord(int(step), int(epoch), float(loss), float(lr_unet), float(lr_te))
            )
        except ValueError as error:
            raise LossLogError(f"loss log {str(path)!r} line {number}: {error}") from error
    return records


def plot_png(records: Sequence[LossRecord], *, title: str = "training loss") -> bytes:
    """The loss plot as PNG bytes: losses (thin) and their moving average against step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    steps = [r.step for r in records]
    losses = [r.loss if math.isfinite(r.loss) else math.nan for r in records]
    window = default_window(len(records))
    axes.plot(steps, losses, linewidth=0.8, alpha=0.45, label="loss")
    axes.plot(steps, moving_average(losses, window), linewidth=1.8, label=f"mean of {window}")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    if records:
        axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def write_loss_plot(
    path: str | os.PathLike[str], records: Sequence[LossRecord], *, title: str = "training loss"
) -> Path:
    """Write :func:`plot_png` atomically.

    Raises:
        LossLogError: the file cannot be written.
    """
    return _write_atomic(Path(path), plot_png(records, title=title), "loss plot")
