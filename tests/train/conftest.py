"""A small training set the tests draw: coloured shapes with captions, kohya layout.

``10_shapes``: four readable shapes (64x64 PNGs, a 96x64 JPEG, a 64x96 PNG) with ``.txt``
captions and one unreadable ``broken.png`` (with a caption); ``2_extra``: one shape with a
``.caption`` file and one without a caption (its class tokens ``extra`` are used).
Scanning it gives exactly two warnings: the unreadable image and the missing caption.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

WHITE = (255, 255, 255)


@dataclass(frozen=True)
class DrawnShape:
    subset: str  # folder name, e.g. "10_shapes"
    name: str  # file name
    size: tuple[int, int]
    caption: str | None  # the caption file's text (None: no caption file)
    caption_extension: str


SHAPES = (
    DrawnShape(
        "10_shapes", "blue_square.png", (64, 64), "blue square, shape, white background", ".txt"
    ),
    DrawnShape(
        "10_shapes",
        "green_triangle.jpg",
        (96, 64),
        "green triangle, shape, white background",
        ".txt",
    ),
    DrawnShape(
        "10_shapes", "magenta_ring.png", (64, 96), "Magenta Ring, shape, white background", ".txt"
    ),
    DrawnShape(
        "10_shapes",
        "red_circle.png",
        (64, 64),
        "red circle, shape, white background\nsecond line is ignored",
        ".txt",
    ),
    DrawnShape("2_extra", "cyan_circle.png", (64, 64), None, ".txt"),
    DrawnShape("2_extra", "orange_square.png", (64, 64), "orange square, extra", ".caption"),
)


@dataclass(frozen=True)
class DrawnDataset:
    """Where the drawing went and what a correct scan must find."""

    folder: Path
    shapes: tuple[DrawnShape, ...]
    unreadable: Path  # 10_shapes/broken.png: not an image (has a caption file)
    uncaptioned: Path  # 2_extra/cyan_circle.png: no caption file

    def path(self, name: str) -> Path:
        shape = next(shape for shape in self.shapes if shape.name == name)
        return self.folder / shape.subset / shape.name


def _draw(shape: DrawnShape, path: Path) -> None:
    from PIL import Image, ImageDraw

    width, height = shape.size
    image = Image.new("RGB", shape.size, WHITE)
    draw = ImageDraw.Draw(image)
    box = (width // 8, height // 8, width - width // 8, height - height // 8)
    colour = shape.name.split("_")[0]
    kind = shape.name.split("_")[1].split(".")[0]
    if kind == "circle":
        draw.ellipse(box, fill=colour)
    elif kind == "square":
        draw.rectangle(box, fill=colour)
    elif kind == "triangle":
        draw.polygon([(box[0], box[3]), (box[2], box[3]), (width // 2, box[1])], fill=colour)
    else:  # ring
        draw.ellipse(box, outline=colour, width=max(2, width // 10))
    image.save(path, quality=95) if path.suffix == ".jpg" else image.save(path)


def draw_shapes_dataset(folder: Path) -> DrawnDataset:
    """Draw the dataset under ``folder`` (created) and describe it."""
    for shape in SHAPES:
        subset = folder / shape.subset
        subset.mkdir(parents=True, exist_ok=True)
        _draw(shape, subset / shape.name)
        if shape.caption is not None:
            stem = Path(shape.name).stem
            (subset / f"{stem}{shape.caption_extension}").write_text(shape.caption + "\n")
    unreadable = folder / "10_shapes" / "broken.png"
    unreadable.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    (folder / "10_shapes" / "broken.txt").write_text("broken, shape")
    return DrawnDataset(
        folder=folder,
        shapes=SHAPES,
        unreadable=unreadable,
        uncaptioned=folder / "2_extra" / "cyan_circle.png",
    )


@pytest.fixture(scope="session")
def shapes_dataset(tmp_path_factory) -> DrawnDataset:
    """The drawn dataset, shared by the session (do not modify its folder)."""
    return draw_shapes_dataset(tmp_path_factory.mktemp("shapes") / "data")


@pytest.fixture
def fresh_shapes_dataset(tmp_path) -> DrawnDataset:
    """A private copy of the drawn dataset for tests that change files."""
    return draw_shapes_dataset(tmp_path / "data")
