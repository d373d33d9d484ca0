"""Grid images against the spec's formulas (grid.md "image_grid", "draw_grid_annotations",
"Z axis and output list"): every expected image is built here from those formulas with
Pillow directly (the bundled font via ``ImageFont.load_default``, text drawn with anchor
"mm") and compared pixel for pixel."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from sdstack.errors import SdstackError, SdstackWarning
from sdstack.generate import grid_image
from sdstack.generate.grid_image import (
    GridImageError,
    draw_grid_annotations,
    image_grid,
    label_font,
    xyz_grids,
)

MEASURE = ImageDraw.Draw(Image.new("RGB", (1, 1), "white"))


def colour(i: int) -> tuple[int, int, int]:
    return (40 + 50 * (i % 4), 30 + 40 * (i // 4 % 5), 250 - 13 * i)


def cells(n: int, size: tuple[int, int]) -> list[Image.Image]:
    return [Image.new("RGB", size, colour(i)) for i in range(n)]


def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def line_height(text: str, size: int) -> int:
    box = MEASURE.multiline_textbbox((0, 0), text, font=font(size))
    return box[3] - box[1]


def draw_label(img: Image.Image, x: float, top: float, lines, size: int, spacing: int) -> None:
    """Lines as the spec draws them: centred at (x, top + line_h / 2), full-size heights."""
    d = ImageDraw.Draw(img)
    for text, draw_size in lines:
        h = line_height(text, size)
        d.text((x, top + h / 2), text, font=font(draw_size), fill=(0, 0, 0), anchor="mm")
        top += h + spacing


def assert_same(actual: Image.Image, expected: Image.Image) -> None:
    assert actual.mode == expected.mode == "RGB"
    assert actual.size == expected.size
    diff = np.asarray(actual) != np.asarray(expected)
    assert not diff.any(), f"{diff.any(axis=2).sum()} pixels differ"


def assert_cell(img: Image.Image, x: int, y: int, size: tuple[int, int], rgb) -> None:
    region = np.asarray(img)[y : y + size[1], x : x + size[0]]
    assert region.shape[:2] == (size[1], size[0])
    assert (region == np.array(rgb, dtype=np.uint8)).all(), f"cell at ({x}, {y}) is not {rgb}"


def has_ink(img: Image.Image, box) -> bool:
    return bool((np.asarray(img.crop(box)) < 128).any())


# --- image_grid -----------------------------------------------------------------------


def test_image_grid_odd_count_row_major_with_black_spot():
    imgs = cells(5, (10, 8))
    grid = image_grid(imgs, rows=2)
    assert grid.mode == "RGB" and grid.size == (30, 16)  # cols = ceil(5 / 2) = 3
    for i in range(5):
        assert_cell(grid, i % 3 * 10, i // 3 * 8, (10, 8), colour(i))
    assert_cell(grid, 20, 8, (10, 8), (0, 0, 0))


def test_image_grid_rows_clamped_to_count_and_rgba_pasted():
    imgs = [Image.new("RGBA", (6, 4), (*colour(i), 255)) for i in range(3)]
    grid = image_grid(imgs, rows=7)
    assert grid.size == (6, 12)
    for i in range(3):
        assert_cell(grid, 0, 4 * i, (6, 4), colour(i))


# --- draw_grid_annotations ----------------------------------------------------------


def test_annotations_match_spec_layout_pixel_for_pixel():
    w, h, margin = 200, 150, 8
    size, spacing = (w + h) // 25, (w + h) // 25 // 2
    assert (size, spacing) == (14, 7)
    columns = ["Clip skip: 1", "Clip skip: 2", "Clip skip: 3"]
    rows = ["Seed: 1", "Seed: 2"]
    grid = image_grid(cells(6, (w, h)), rows=2)
    result = draw_grid_annotations(grid, w, h, columns, rows, margin=margin)

    pad_left = w * 3 // 4
    pad_top = max(line_height(t, size) for t in columns) + 2 * spacing
    assert result.size == (3 * w + pad_left + 2 * margin, 2 * h + pad_top + margin)
    expected = Image.new("RGB", result.size, "white")
    for i in range(6):
        r, c = divmod(i, 3)
        pos = (pad_left + (w + margin) * c, pad_top + (h + margin) * r)
        expected.paste(Image.new("RGB", (w, h), colour(i)), pos)
        assert_cell(result, *pos, (w, h), colour(i))
    for c, text in enumerate(columns):
        x = pad_left + (w + margin) * c + w / 2
        draw_label(expected, x, pad_top / 2 - line_height(text, size) / 2, [(text, size)], size, 7)
    for r, text in enumerate(rows):
        y = pad_top + (h + margin) * r + h / 2 - line_height(text, size) / 2
        draw_label(expected, pad_left / 2, y, [(text, size)], size, spacing)
    top_strip = (0, 0, result.width, pad_top)
    left_strip = (0, pad_top, pad_left, result.height)
    assert has_ink(result, top_strip) and has_ink(result, left_strip)
    assert_same(result.crop(top_strip), expected.crop(top_strip))
    assert_same(result.crop(left_strip), expected.crop(left_strip))
    assert_same(result, expected)


def test_long_label_wraps_greedily_into_two_lines():
    w, h = 160, 90
    size, spacing = 10, 5
    first, second = "Prompt S/R: a very long", "replacement text"
    f = font(size)
    assert (
        MEASURE.textlength(first, font=f) <= w < MEASURE.textlength(f"{first} replacement", font=f)
    )
    assert MEASURE.textlength(second, font=f) <= w
    grid = image_grid(cells(2, (w, h)), rows=1)
    result = draw_grid_annotations(grid, w, h, [f"{first} {second}", "Steps: 2"], [""])

    h1, h2 = line_height(first, size), line_height(second, size)
    hor_h = h1 + spacing + h2
    pad_top = hor_h + 2 * spacing
    assert result.size == (2 * w, h + pad_top)
    expected = Image.new("RGB", (2 * w, pad_top), "white")
    draw_label(expected, w / 2, pad_top / 2 - hor_h / 2, [(first, size), (second, size)], size, 5)
    steps_h = line_height("Steps: 2", size)
    draw_label(expected, w + w / 2, pad_top / 2 - steps_h / 2, [("Steps: 2", size)], size, 5)
    assert_same(result.crop((0, 0, 2 * w, pad_top)), expected)


def test_unbreakable_word_shrinks_font_until_it_fits():
    """A first word wider than the cell: the reference's wrap keeps its initial empty line
    (height 0, then one spacing) and draws the word on the second line, the font shrunk
    1 px at a time until the word's right edge fits the cell width."""
    w, h = 100, 75
    size, spacing = (w + h) // 25, (w + h) // 25 // 2
    word = "Checkpoint_name_supercalifragilistic.safetensors"
    fits = [
        s
        for s in range(size, 0, -1)
        if MEASURE.multiline_textbbox((0, 0), word, font=font(s))[2] <= w
    ]
    fitting = fits[0]
    assert fitting < size  # the word does not fit at the grid's size
    result = draw_grid_annotations(image_grid(cells(1, (w, h)), rows=1), w, h, [word], [""])

    hor_h = 0 + spacing + line_height(word, size)
    pad_top = hor_h + 2 * spacing
    assert result.size == (w, h + pad_top)
    expected = Image.new("RGB", (w, pad_top), "white")
    draw_label(
        expected, w / 2, pad_top / 2 - hor_h / 2, [("", size), (word, fitting)], size, spacing
    )
    strip = result.crop((0, 0, w, pad_top))
    assert has_ink(strip, (0, 0, w, pad_top))
    assert_same(strip, expected)


def test_empty_labels_give_no_strips():
    grid = image_grid(cells(6, (20, 10)), rows=2)
    result = draw_grid_annotations(grid, 20, 10, ["", "", ""], ["", ""])
    assert_same(result, grid)
    # whitespace-only column labels wrap to nothing: no top strip either
    assert draw_grid_annotations(grid, 20, 10, [" "] * 3, ["", ""]).size == grid.size


def test_whitespace_row_label_keeps_left_strip_as_reference():
    """The reference decides the left strip on len(text) before wrapping."""
    grid = image_grid(cells(2, (40, 20)), rows=2)
    result = draw_grid_annotations(grid, 40, 20, [""], [" ", ""])
    assert result.size == (40 + 40 * 3 // 4, 40)
    assert not has_ink(result, (0, 0, 30, 40))


def test_margin_positions_cells_and_leaves_white_gaps():
    w, h, margin = 12, 9, 4
    grid = image_grid(cells(4, (w, h)), rows=2)
    result = draw_grid_annotations(grid, w, h, ["", ""], ["", ""], margin=margin)
    assert result.size == (2 * w + margin, 2 * h + margin)
    for i in range(4):
        r, c = divmod(i, 2)
        assert_cell(result, (w + margin) * c, (h + margin) * r, (w, h), colour(i))
    assert_cell(result, w, 0, (margin, result.height), (255, 255, 255))
    assert_cell(result, 0, h, (result.width, margin), (255, 255, 255))


def test_tiny_cells_use_a_one_pixel_font_instead_of_failing():
    grid = image_grid(cells(2, (8, 8)), rows=1)  # (8 + 8) // 25 == 0
    result = draw_grid_annotations(grid, 8, 8, ["Seed: 1", "Seed: 2"], ["x"])
    assert result.size[0] == 16 + 8 * 3 // 4


def test_given_font_object_and_path_are_used_at_the_grid_size(tmp_path):
    grid = image_grid(cells(2, (160, 90)), rows=1)
    labels = ["CFG Scale: 7.0", "CFG Scale: 9.5"]
    default = draw_grid_annotations(grid, 160, 90, labels, ["Seed: 1"])
    as_object = draw_grid_annotations(grid, 160, 90, labels, ["Seed: 1"], font=font(60))
    assert_same(as_object, default)
    # a path opens with ImageFont.truetype's own defaults (its layout engine may differ
    # from load_default's), so compare with that font object resized
    path = tmp_path / "bundled.ttf"
    path.write_bytes(font(10).font_bytes)
    as_path = draw_grid_annotations(grid, 160, 90, labels, ["Seed: 1"], font=path)
    opened = ImageFont.truetype(str(path), 41)
    assert_same(as_path, draw_grid_annotations(grid, 160, 90, labels, ["Seed: 1"], font=opened))
    assert has_ink(as_path, (0, 0, as_path.width, 20))


# --- xyz_grids ------------------------------------------------------------------------


def test_single_y_with_empty_label_has_no_left_strip():
    w, h = 60, 40
    labels = ["Steps: 1", "Steps: 2", "Steps: 3"]
    [result] = xyz_grids(cells(3, (w, h)), labels, [""], [""])
    size = (w + h) // 25
    pad_top = max(line_height(t, size) for t in labels) + 2 * (size // 2)
    assert result.size == (3 * w, h + pad_top)
    for i in range(3):
        assert_cell(result, i * w, pad_top, (w, h), colour(i))


def test_xyz_cells_indexed_x_fastest_and_z_titles_as_reference_main_grid():
    w, h, margin = 50, 40, 6
    n_x, n_y, n_z = 2, 3, 2
    xs, ys = ["Clip skip: 1", "Clip skip: 2"], ["Seed: 1", "Seed: 2", "Seed: 3"]
    zs = ["CFG Scale: 5.0", "CFG Scale: 7.0 with a longer title"]
    imgs = cells(n_x * n_y * n_z, (w, h))
    grids = xyz_grids(imgs, xs, ys, zs, margin=margin)
    assert len(grids) == n_z

    # the reference: sub-grids, then its main grid of them titled with the Z labels
    subs = [
        draw_grid_annotations(image_grid(imgs[z * 6 : z * 6 + 6], rows=n_y), w, h, xs, ys, margin)
        for z in range(n_z)
    ]
    sub_w, sub_h = subs[0].size
    main = draw_grid_annotations(image_grid(subs, rows=1), sub_w, sub_h, zs, [""])
    title = main.height - sub_h
    assert title > 0
    size = (w + h) // 25
    pad_left, pad_top = w * 3 // 4, max(line_height(t, size) for t in xs) + 2 * (size // 2)
    for iz, result in enumerate(grids):
        assert result.size == (sub_w, sub_h + title)
        assert_same(result, main.crop((iz * sub_w, 0, (iz + 1) * sub_w, main.height)))
        for iy in range(n_y):
            for ix in range(n_x):
                x = pad_left + (w + margin) * ix
                y = title + pad_top + (h + margin) * iy
                assert_cell(result, x, y, (w, h), colour(ix + iy * n_x + iz * n_x * n_y))


def test_single_empty_z_label_gives_the_plain_sub_grid():
    imgs = cells(4, (30, 20))
    [result] = xyz_grids(imgs, ["a", "b"], ["c", "d"], [""])
    assert_same(
        result, draw_grid_annotations(image_grid(imgs, rows=2), 30, 20, ["a", "b"], ["c", "d"])
    )


def test_single_z_value_with_a_label_is_titled_as_the_reference_main_grid():
    imgs = cells(2, (40, 30))
    [result] = xyz_grids(imgs, ["a", "b"], [""], ["Seed: 5"])
    sub = draw_grid_annotations(image_grid(imgs, rows=1), 40, 30, ["a", "b"], [""])
    assert_same(result, draw_grid_annotations(sub, *sub.size, ["Seed: 5"], [""]))
    assert result.height > sub.height


# --- bad input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: image_grid([], 1), "image grid: no images; expected a list of at least one image"),
        (
            lambda: image_grid([Image.new("RGB", (10, 8)), Image.new("RGB", (8, 8))], 1),
            "image grid: image 1 is 8x8; expected every image 10x8 like image 0",
        ),
        (lambda: image_grid(["x"], 1), "image grid: item 0 is str; expected a PIL image"),
        (
            lambda: image_grid(cells(2, (4, 4)), 0),
            "image grid rows: 0; expected an integer of at least 1",
        ),
        (
            lambda: draw_grid_annotations(Image.new("RGB", (30, 10)), 10, 10, ["a", "b"], [""]),
            "grid column labels: 2 labels for a grid 3 cells wide; expected 3",
        ),
        (
            lambda: draw_grid_annotations(Image.new("RGB", (10, 30)), 10, 10, [""], ["a"]),
            "grid row labels: 1 labels for a grid 3 cells high; expected 3",
        ),
        (
            lambda: draw_grid_annotations(Image.new("RGB", (10, 10)), 0, 10, [""], [""]),
            "grid annotations cell width: 0; expected an integer from 1 to 10",
        ),
        (
            lambda: draw_grid_annotations(
                Image.new("RGB", (10, 10)), 10, 10, [""], [""], margin=501
            ),
            "grid margin (px): 501; expected an integer from 0 to 500",
        ),
        (
            lambda: draw_grid_annotations(Image.new("RGB", (10, 10)), 10, 10, [3], [""]),
            "grid column labels: 3 is not a string; expected strings",
        ),
        (
            lambda: xyz_grids(cells(5, (4, 4)), ["a", "b"], ["c", "d", "e"], [""]),
            "grid cells: 5 images for 2 X x 3 Y x 1 Z labels; expected 6",
        ),
        (
            lambda: xyz_grids([], ["a"], [""], [""]),
            "grid cells: 0 images for 1 X x 1 Y x 1 Z labels; expected 1",
        ),
        (
            lambda: xyz_grids(cells(1, (4, 4)), [], [""], [""]),
            'grid X labels: []; expected a list of at least one string ([""] for no axis)',
        ),
        (
            lambda: xyz_grids(
                [Image.new("RGB", (4, 4)), Image.new("RGB", (4, 5))], ["a", "b"], [""], [""]
            ),
            "grid cells: image 1 is 4x5; expected every image 4x4 like image 0",
        ),
        (lambda: label_font(0), "label font size: 0; expected an integer of at least 1"),
        (
            lambda: draw_grid_annotations(Image.new("RGB", (10, 10)), 10, 10, [""], [""], font=3),
            "grid label font: int object; expected None (the bundled font), a font file path or "
            "a PIL.ImageFont.FreeTypeFont",
        ),
    ],
)
def test_bad_input_names_what_was_expected(call, message):
    with pytest.raises(GridImageError) as info:
        call()
    assert isinstance(info.value, SdstackError)
    assert str(info.value) == message


def test_unreadable_font_file_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.ttf"
    path.write_bytes(b"not a font")
    with pytest.raises(
        GridImageError, match=r"broken\.ttf'?: cannot be read .*expected a TrueType"
    ):
        draw_grid_annotations(Image.new("RGB", (10, 10)), 10, 10, ["a"], [""], font=str(path))


@pytest.fixture
def no_scalable_default(monkeypatch):
    def old_load_default(*args, **kwargs):
        if kwargs or args:
            raise TypeError("load_default() takes no arguments")  # Pillow < 10.1
        return ImageFont.ImageFont()

    grid_image._bundled_font.cache_clear()
    monkeypatch.setattr(ImageFont, "load_default", old_load_default)
    yield
    grid_image._bundled_font.cache_clear()


def test_old_pillow_falls_back_to_dejavu_with_a_warning(no_scalable_default, monkeypatch):
    opened = []
    monkeypatch.setattr(
        ImageFont, "truetype", lambda name, size: opened.append((name, size)) or "F"
    )
    with pytest.warns(SdstackWarning, match=r"Pillow >= 10\.1.*DejaVuSans\.ttf"):
        assert label_font(12) == "F"
    assert opened == [("DejaVuSans.ttf", 12)]


def test_old_pillow_without_fallback_font_is_a_clear_error(no_scalable_default, monkeypatch):
    def missing(name, size):
        raise OSError("cannot open resource")

    monkeypatch.setattr(ImageFont, "truetype", missing)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SdstackWarning)
        with pytest.raises(
            GridImageError, match=r"no scalable font available.*pip install -U Pillow"
        ):
            label_font(12)


def test_label_font_is_the_bundled_scalable_font():
    got = label_font(17)
    assert isinstance(got, ImageFont.FreeTypeFont) and got.size == 17
    assert got.font_bytes == font(17).font_bytes
    assert math.isclose(
        MEASURE.textlength("Seed: 1", font=got), MEASURE.textlength("Seed: 1", font=font(17))
    )
