"""X/Y/Z grid images: the reference UI's ``image_grid`` and ``draw_grid_annotations``.

Reference: AUTOMATIC1111 ``modules/images.py`` and ``scripts/xyz_grid.py``
(``draw_xyz_grid``); the exact rules are in the spec ``grid.md``. Summary:

- Grid: cells of ``images[0].size`` pasted row-major on a black RGB canvas,
  ``cols = ceil(n / rows)``, cell ``i`` at ``((i % cols) * w, (i // cols) * h)``.
- Labels: font size ``(w + h) // 25``, line spacing ``size // 2``; greedy word wrap
  (a line grows while ``textlength <= allowed``; allowed is ``w`` for column labels and
  ``pad_left = w * 3 // 4`` for row labels, ``pad_left = 0`` when every row label is
  empty); ``pad_top = max(column label height) + 2 * spacing`` (``0`` when every column
  label is empty); cells pasted ``margin`` px apart; every line drawn black on white with
  anchor ``"mm"``; a line still wider than allowed is drawn with the font shrunk 1 px at a
  time until it fits (its position keeps the full-size line height, as the reference).
- Font: Pillow's bundled scalable font (``ImageFont.load_default(size=...)``, Pillow >=
  10.1) where the reference bundles Roboto, unless a font path or FreeType font is given.

Deviations, only where the reference would crash: the font size is at least 1 px (the
reference asks FreeType for size 0 on cells with ``w + h < 25`` and when shrinking runs
out), and the reference's ``multiline_textsize`` (removed in Pillow 10) is measured as
the right edge of ``multiline_textbbox`` from the origin, which is what it returned.
Labels are plain strings: the reference's inactive (struck-through) annotations belong
to the prompt matrix, not to X/Y/Z grids.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from sdstack.errors import SdstackError, SdstackWarning

TEXT_COLOUR = (0, 0, 0)
BACKGROUND = "white"
MAX_MARGIN = 500  # the reference's "Grid margins (px)" slider: 0 to 500
FALLBACK_FONT = "DejaVuSans.ttf"


class GridImageError(SdstackError):
    """Grid images or labels that do not fit together: no cells, cells of different
    sizes, label counts that do not match the grid, a bad margin or font."""


@dataclass(frozen=True)
class _Line:
    """One wrapped line: its text, its size at the full font size, and the width it must
    fit (the reference's ``GridAnnotation`` after wrapping)."""

    text: str
    size: tuple[int, int]
    allowed: int


@dataclass(frozen=True)
class _Style:
    """The font and spacing of one annotation pass: ``size = max(1, (w + h) // 25)``."""

    size: int
    spacing: int
    sized: Callable[[int], Any]

    @property
    def font(self) -> Any:
        return self.sized(self.size)


def label_font(size: int) -> Any:
    """Pillow's bundled scalable font at ``size`` px (``ImageFont.load_default(size=)``).

    On a Pillow without it (< 10.1, or built without FreeType) falls back to
    ``DejaVuSans.ttf`` with an :class:`SdstackWarning`; raises :class:`GridImageError`
    when neither is available or ``size`` is not a positive integer.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise GridImageError(f"label font size: {size!r}; expected an integer of at least 1")
    return _bundled_font(size)


@lru_cache(maxsize=256)
def _bundled_font(size: int) -> Any:
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:
        font = None
    if isinstance(font, ImageFont.FreeTypeFont):
        return font
    warnings.warn(
        f"this Pillow has no scalable default font (ImageFont.load_default(size=) needs "
        f"Pillow >= 10.1 with FreeType); grid labels use {FALLBACK_FONT} instead",
        SdstackWarning,
        stacklevel=2,
    )
    try:
        return ImageFont.truetype(FALLBACK_FONT, size)
    except OSError as e:
        raise GridImageError(
            f"grid label font: no scalable font available ({FALLBACK_FONT}: {e}); expected "
            f"Pillow >= 10.1 with FreeType (pip install -U Pillow) or a font file passed as font="
        ) from e


def _font_factory(font: Any) -> Callable[[int], Any]:
    """A ``size -> font`` function for ``font``: None (bundled), a path, or a FreeType
    font (resized with ``font_variant``); fonts are made once per size."""
    if font is None:
        return label_font
    if isinstance(font, ImageFont.FreeTypeFont):

        def make(size: int) -> Any:
            return font.font_variant(size=size)

    elif isinstance(font, str | os.PathLike):

        def make(size: int) -> Any:
            try:
                return ImageFont.truetype(os.fspath(font), size)
            except OSError as e:
                raise GridImageError(
                    f"grid label font {os.fspath(font)!r}: cannot be read ({e}); expected a "
                    "TrueType/OpenType font file"
                ) from e

    else:
        raise GridImageError(
            f"grid label font: {type(font).__name__} object; expected None (the bundled "
            "font), a font file path or a PIL.ImageFont.FreeTypeFont"
        )
    return lru_cache(maxsize=None)(make)


def _style(width: int, height: int, font: Any) -> _Style:
    size = max(1, (width + height) // 25)
    return _Style(size=size, spacing=size // 2, sized=_font_factory(font))


def _check_images(images: Sequence[Any], what: str) -> tuple[int, int]:
    """The common size of ``images``; raises when empty, not images, or sizes differ."""
    if isinstance(images, Image.Image) or not isinstance(images, Sequence) or not images:
        raise GridImageError(f"{what}: no images; expected a list of at least one image")
    for i, img in enumerate(images):
        if not isinstance(img, Image.Image):
            raise GridImageError(f"{what}: item {i} is {type(img).__name__}; expected a PIL image")
    size = images[0].size
    for i, img in enumerate(images):
        if img.size != size:
            raise GridImageError(
                f"{what}: image {i} is {img.size[0]}x{img.size[1]}; expected every image "
                f"{size[0]}x{size[1]} like image 0"
            )
    return size


def _check_count(value: Any, what: str, low: int, high: int | None = None) -> int:
    bad = isinstance(value, bool) or not isinstance(value, int)
    if bad or value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise GridImageError(f"{what}: {value!r}; expected an integer {bound}")
    return value


def _check_labels(labels: Sequence[str], count: int, what: str, unit: str) -> list[str]:
    if isinstance(labels, str) or not isinstance(labels, Sequence):
        raise GridImageError(f"{what}: {labels!r}; expected a list of strings")
    for label in labels:
        if not isinstance(label, str):
            raise GridImageError(f"{what}: {label!r} is not a string; expected strings")
    if len(labels) != count:
        raise GridImageError(
            f"{what}: {len(labels)} labels for a grid {count} {unit}; expected {count}"
        )
    return list(labels)


def image_grid(images: Sequence[Image.Image], rows: int) -> Image.Image:
    """Reference ``image_grid`` with explicit ``rows``: a black RGB canvas of
    ``cols * w`` x ``rows * h`` with ``cols = ceil(n / rows)`` (rows clamped to ``n``),
    image ``i`` at ``((i % cols) * w, (i // cols) * h)``; empty spots stay black.

    Raises :class:`GridImageError` for no images, images of different sizes, rows < 1.
    """
    w, h = _check_images(images, "image grid")
    rows = min(_check_count(rows, "image grid rows", 1), len(images))
    cols = math.ceil(len(images) / rows)
    grid = Image.new("RGB", (cols * w, rows * h), "black")
    for i, img in enumerate(images):
        grid.paste(img, (i % cols * w, i // cols * h))
    return grid


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: Any, allowed: int) -> list[str]:
    """Greedy wrap on ``text.split()``: a word joins the line while the line's
    ``textlength`` stays ``<= allowed``, else it starts a new line (``[""]`` for no words)."""
    lines = [""]
    for word in text.split():
        line = f"{lines[-1]} {word}".strip()
        if draw.textlength(line, font=font) <= allowed:
            lines[-1] = line
        else:
            lines.append(word)
    return lines


def _layout(labels: Sequence[str], allowed: int, style: _Style) -> list[list[_Line]]:
    """Each label wrapped to ``allowed`` px, every line measured with the full-size font
    (``multiline_textbbox`` width and height)."""
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1), BACKGROUND))
    font = style.font
    laid = []
    for label in labels:
        lines = []
        for text in _wrap(draw, label, font, allowed):
            left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=font)
            lines.append(_Line(text, (right - left, bottom - top), allowed))
        laid.append(lines)
    return laid


def _column_height(lines: list[_Line], spacing: int) -> int:
    """Column label height: ``sum(line_h + spacing) - spacing``."""
    return sum(line.size[1] + spacing for line in lines) - spacing


def _row_height(lines: list[_Line]) -> int:
    """Row label height as the reference computes it: ``sum(line_h)`` (no spacing)."""
    return sum(line.size[1] for line in lines)


def _pad_top(columns: list[list[_Line]], spacing: int) -> int:
    heights = [_column_height(lines, spacing) for lines in columns]
    return 0 if sum(heights) == 0 else max(heights) + 2 * spacing


def _draw_lines(
    draw: ImageDraw.ImageDraw, x: float, y: float, lines: list[_Line], style: _Style
) -> None:
    """Each line centred (anchor ``"mm"``) at ``(x, y + line_h / 2)``, then
    ``y += line_h + spacing``; a line wider than allowed shrinks the font 1 px at a time."""
    for line in lines:
        size = style.size
        font = style.font
        while draw.multiline_textbbox((0, 0), line.text, font=font)[2] > line.allowed and size > 1:
            size -= 1
            font = style.sized(size)
        draw.text((x, y + line.size[1] / 2), line.text, font=font, fill=TEXT_COLOUR, anchor="mm")
        y += line.size[1] + style.spacing


def _compose(
    im: Image.Image,
    cell: tuple[int, int],
    labels: tuple[list[list[_Line]], list[list[_Line]]],
    pads: tuple[int, int],
    margin: int,
    style: _Style,
) -> Image.Image:
    """The white canvas with the cells of ``im`` pasted ``margin`` apart after the
    ``pad_left``/``pad_top`` strips, and the column/row labels drawn in them."""
    (width, height), (columns, rows), (pad_left, pad_top) = cell, labels, pads
    n_cols, n_rows = len(columns), len(rows)
    size = (
        im.width + pad_left + margin * (n_cols - 1),
        im.height + pad_top + margin * (n_rows - 1),
    )
    result = Image.new("RGB", size, BACKGROUND)
    for r in range(n_rows):
        for c in range(n_cols):
            box = (width * c, height * r, width * (c + 1), height * (r + 1))
            result.paste(
                im.crop(box), (pad_left + (width + margin) * c, pad_top + (height + margin) * r)
            )
    draw = ImageDraw.Draw(result)
    for c, lines in enumerate(columns):
        x = pad_left + (width + margin) * c + width / 2
        _draw_lines(draw, x, pad_top / 2 - _column_height(lines, style.spacing) / 2, lines, style)
    for r, lines in enumerate(rows):
        y = pad_top + (height + margin) * r + height / 2 - _row_height(lines) / 2
        _draw_lines(draw, pad_left / 2, y, lines, style)
    return result


def draw_grid_annotations(
    im: Image.Image,
    width: int,
    height: int,
    column_labels: Sequence[str],
    row_labels: Sequence[str],
    margin: int = 0,
    font: Any = None,
) -> Image.Image:
    """Reference ``draw_grid_annotations``: label strips above (columns) and left (rows)
    of a grid of ``width`` x ``height`` cells, cells ``margin`` px apart (module docstring).

    Output size ``(im.w + pad_left + margin * (cols - 1), im.h + pad_top + margin *
    (rows - 1))``, ``cols = im.width // width``, ``rows = im.height // height``; cell
    ``(r, c)`` at ``(pad_left + (width + margin) * c, pad_top + (height + margin) * r)``;
    column label ``c`` centred on ``x = pad_left + (width + margin) * c + width / 2`` from
    ``y = pad_top / 2 - hor_h / 2``; row label ``r`` at ``x = pad_left / 2`` from
    ``y = pad_top + (height + margin) * r + height / 2 - ver_h / 2``.

    ``font``: None (Pillow's bundled font), a font file path or a FreeType font; it is
    always used at the grid's size. Raises :class:`GridImageError` when the label counts
    do not match the grid, or for a bad size, margin or font.
    """
    # 1. Check inputs.
    if not isinstance(im, Image.Image):
        raise GridImageError(f"grid annotations: {type(im).__name__}; expected a PIL image")
    width = _check_count(width, "grid annotations cell width", 1, im.width)
    height = _check_count(height, "grid annotations cell height", 1, im.height)
    margin = _check_count(margin, "grid margin (px)", 0, MAX_MARGIN)
    columns = _check_labels(column_labels, im.width // width, "grid column labels", "cells wide")
    rows = _check_labels(row_labels, im.height // height, "grid row labels", "cells high")
    # 2. Font and strips: the left strip exists when any row label has text.
    style = _style(width, height, font)
    pad_left = 0 if sum(len(label) for label in rows) == 0 else width * 3 // 4
    laid_columns = _layout(columns, width, style)
    laid_rows = _layout(rows, pad_left, style)
    pad_top = _pad_top(laid_columns, style.spacing)
    # 3. Paste the cells and draw the labels.
    pads = (pad_left, pad_top)
    return _compose(im, (width, height), (laid_columns, laid_rows), pads, margin, style)


def _titled(sub_grids: list[Image.Image], z_labels: list[str], font: Any) -> list[Image.Image]:
    """Each sub-grid with its Z label above, exactly column ``i`` of the reference's main
    grid: ``draw_grid_annotations(image_grid(sub_grids, rows=1), sub_w, sub_h, z_labels,
    [""])`` (font from the sub-grid size, no margin, ``pad_top`` shared by all Z values)."""
    sub_w, sub_h = sub_grids[0].size
    style = _style(sub_w, sub_h, font)
    laid = _layout(z_labels, sub_w, style)
    pad_top = _pad_top(laid, style.spacing)
    no_row: list[list[_Line]] = [[]]
    return [
        _compose(sub, (sub_w, sub_h), ([lines], no_row), (0, pad_top), 0, style)
        for sub, lines in zip(sub_grids, laid, strict=True)
    ]


def xyz_grids(
    cells: Sequence[Image.Image],
    x_labels: Sequence[str],
    y_labels: Sequence[str],
    z_labels: Sequence[str],
    margin: int = 0,
    font: Any = None,
) -> list[Image.Image]:
    """One annotated grid per Z value, as the reference's ``draw_xyz_grid`` lays them out.

    Cell ``ix + iy * nx + iz * nx * ny`` sits at column ``ix``, row ``iy`` of grid ``iz``:
    ``image_grid(cells of iz, rows=ny)`` annotated with the X labels above and the Y labels
    left, ``margin`` px apart. Where the Z labels have text, each grid also gets its Z label
    above: the reference draws the Z labels as the column titles of its main grid (the
    sub-grids side by side, no margin), and grid ``iz`` here is exactly that main grid's
    column ``iz`` (same font size from the sub-grid size, same shared strip height). With
    no Z axis (one empty Z label) there is no title, and empty Y labels give no left strip.

    Raises :class:`GridImageError` when ``len(cells) != nx * ny * nz`` or any label list
    is empty, or for cells of different sizes.
    """
    # 1. Check inputs.
    counts = []
    for axis, labels in (("X", x_labels), ("Y", y_labels), ("Z", z_labels)):
        if isinstance(labels, str) or not isinstance(labels, Sequence) or not labels:
            raise GridImageError(
                f"grid {axis} labels: {labels!r}; expected a list of at least one string "
                '([""] for no axis)'
            )
        counts.append(len(labels))
    n_x, n_y, n_z = counts
    if isinstance(cells, Sequence) and len(cells) != n_x * n_y * n_z:
        raise GridImageError(
            f"grid cells: {len(cells)} images for {n_x} X x {n_y} Y x {n_z} Z labels; "
            f"expected {n_x * n_y * n_z}"
        )
    w, h = _check_images(cells, "grid cells")
    # 2. One sub-grid per Z value, with the X/Y labels.
    per_z = n_x * n_y
    sub_grids = [
        draw_grid_annotations(
            image_grid(cells[iz * per_z : (iz + 1) * per_z], rows=n_y),
            w,
            h,
            x_labels,
            y_labels,
            margin,
            font,
        )
        for iz in range(n_z)
    ]
    # 3. The Z titles.
    return _titled(sub_grids, _check_labels(z_labels, n_z, "grid Z labels", "deep"), font)
