"""scan_dataset against the kohya folder rules (spec: Dataset folders and captions)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sdstack.errors import SdstackWarning
from sdstack.train.dataset import DatasetError, parse_subset_name, scan_dataset


def _scan(folder, **kwargs):
    """scan_dataset and the messages of the SdstackWarnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = scan_dataset(folder, **kwargs)
    messages = [str(w.message) for w in caught if issubclass(w.category, SdstackWarning)]
    return data, messages


def _png(path: Path, size=(16, 16), colour=(255, 0, 0)) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def test_shapes_dataset_subsets_captions_and_sizes(shapes_dataset):
    data, _ = _scan(shapes_dataset.folder)
    assert [(s.name, s.repeats, s.class_tokens) for s in data.subsets] == [
        ("10_shapes", 10, "shapes"),
        ("2_extra", 2, "extra"),
    ]
    found = {item.path.name: (item.caption, item.width, item.height) for _, item in data.items()}
    expected = {}
    for shape in shapes_dataset.shapes:
        caption = shape.caption.split("\n")[0] if shape.caption else "extra"  # class tokens
        expected[shape.name] = (caption, *shape.size)
    assert found == expected
    for subset in data.subsets:  # sorted by file name
        names = [item.path.name for item in subset.images]
        assert names == sorted(names)


def test_one_warning_each_for_the_unreadable_image_and_the_missing_caption(shapes_dataset):
    _, messages = _scan(shapes_dataset.folder)
    assert len(messages) == 2
    assert messages[0].startswith(f"training image {str(shapes_dataset.unreadable)!r}: skipped, ")
    assert messages[1] == (
        f"training image {str(shapes_dataset.uncaptioned)!r}: no caption file "
        "('cyan_circle.txt' or 'cyan_circle.caption'); using class tokens 'extra'"
    )


def test_counts_tag_frequency_and_dataset_dirs(shapes_dataset):
    data, _ = _scan(shapes_dataset.folder)
    assert data.num_images == 6
    assert data.num_train_images == 4 * 10 + 2 * 2
    assert data.dataset_dirs == {
        "10_shapes": {"n_repeats": 10, "img_count": 4},
        "2_extra": {"n_repeats": 2, "img_count": 2},
    }
    # spec: tag_frequency[dir][tag.strip().lower()] += 1 per comma-split tag, per image
    assert data.tag_frequency == {
        "10_shapes": {
            "blue square": 1, "green triangle": 1, "magenta ring": 1, "red circle": 1,
            "shape": 4, "white background": 4,
        },
        "2_extra": {"extra": 2, "orange square": 1},
    }  # fmt: skip


def test_flat_folder_is_one_subset_with_one_repeat(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("  tag one ,tag two  \r\nline two")
    _png(tmp_path / "b.PNG")
    data, messages = _scan(tmp_path, class_tokens_default="sks dog")
    (subset,) = data.subsets
    assert (subset.name, subset.repeats, subset.class_tokens) == (tmp_path.name, 1, "sks dog")
    assert [item.caption for item in subset.images] == ["tag one ,tag two", "sks dog"]
    assert messages == [
        f"training image {str(tmp_path / 'b.PNG')!r}: no caption file ('b.txt' or "
        "'b.caption'); using class tokens 'sks dog'"
    ]
    assert data.tag_frequency == {tmp_path.name: {"tag one": 1, "tag two": 1, "sks dog": 1}}


def test_folders_without_repeats_are_skipped_with_a_warning(tmp_path):
    for name in ("3_cat", "x_dog", "0_zero", "-2_neg", "notes", "1"):
        _png(tmp_path / name / "i.png")
        (tmp_path / name / "i.txt").write_text("t")
    (tmp_path / ".hidden_5").mkdir()  # dot folders are not looked at
    data, messages = _scan(tmp_path, class_tokens_default="default")
    assert [(s.name, s.repeats, s.class_tokens) for s in data.subsets] == [
        ("1", 1, "default"),
        ("3_cat", 3, "cat"),
    ]
    assert messages == [
        f"training data folder {str(tmp_path / '-2_neg')!r}: skipped, -2 repeats; "
        "expected 1 to 100000",
        f"training data folder {str(tmp_path / '0_zero')!r}: skipped, 0 repeats; "
        "expected 1 to 100000",
        f"training data folder {str(tmp_path / 'notes')!r}: skipped, its name does not "
        "start with a number of repeats (expected N_concept, e.g. 10_shapes)",
        f"training data folder {str(tmp_path / 'x_dog')!r}: skipped, its name does not "
        "start with a number of repeats (expected N_concept, e.g. 10_shapes)",
    ]


def test_caption_extension_order_and_bad_caption_files(tmp_path):
    folder = tmp_path / "1_x"
    for stem in ("both", "empty", "latin1", "bom"):
        _png(folder / f"{stem}.png")
    (folder / "both.txt").write_text("from txt")
    (folder / "both.caption").write_text("from caption")
    (folder / "empty.caption").write_text("\n\n")
    (folder / "latin1.caption").write_bytes("caf\xe9".encode("latin-1"))
    (folder / "bom.caption").write_bytes("\ufeffwith bom".encode())
    data, messages = _scan(tmp_path, caption_extensions=(".caption", ".txt"))
    captions = {item.path.stem: item.caption for _, item in data.items()}
    assert captions == {"both": "from caption", "empty": "x", "latin1": "x", "bom": "with bom"}
    assert messages == [
        f"training image {str(folder / 'empty.png')!r}: caption file 'empty.caption' is "
        "empty; using class tokens 'x'",
        f"training image {str(folder / 'latin1.png')!r}: caption file 'latin1.caption' is "
        "not UTF-8 text; using class tokens 'x'",
    ]


def test_no_caption_and_no_class_tokens_gives_an_empty_caption(tmp_path):
    _png(tmp_path / "5_" / "a.png")
    data, messages = _scan(tmp_path)
    assert data.subsets[0].class_tokens is None
    assert data.subsets[0].images[0].caption == ""
    assert messages[0].endswith("; using an empty caption")


def test_truncated_and_oversized_images_are_warned_and_skipped(tmp_path, monkeypatch):
    from PIL import Image

    good = _png(tmp_path / "good.png", size=(32, 32))
    data = good.read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    _png(tmp_path / "big.png", size=(64, 64))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)
    scanned, messages = _scan(tmp_path, class_tokens_default="t")
    assert [item.path.name for _, item in scanned.items()] == ["good.png"]
    assert messages[0] == (
        f"training image {str(tmp_path / 'big.png')!r}: skipped, more than 2000 pixels "
        "(PIL.Image.MAX_IMAGE_PIXELS)"
    )
    assert messages[1].startswith(f"training image {str(tmp_path / 'cut.png')!r}: skipped, ")
    # header-only scan: the truncated file's size is readable, so it is kept
    header_only, _ = _scan(tmp_path, class_tokens_default="t", verify=False)
    assert [item.path.name for _, item in header_only.items()] == ["cut.png", "good.png"]


def test_a_folder_with_no_images_is_an_error(tmp_path):
    (tmp_path / "10_x").mkdir()
    (tmp_path / "10_x" / "readme.txt").write_text("hi")
    with pytest.raises(DatasetError) as info:
        _scan(tmp_path)
    assert str(info.value) == (
        f"training data folder {str(tmp_path)!r}: no readable images found; expected "
        "images (.png, .jpg, .jpeg, .webp, .bmp) in subfolders named N_concept (N = "
        "repeats, e.g. 10_shapes) or directly in the folder"
    )


def test_missing_folder_file_and_bad_extension_are_errors(tmp_path):
    with pytest.raises(DatasetError, match="no such folder"):
        scan_dataset(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DatasetError, match="is a file, expected a folder"):
        scan_dataset(tmp_path / "file")
    with pytest.raises(DatasetError) as info:
        scan_dataset(tmp_path, caption_extensions=("txt",))
    assert str(info.value) == "caption extension 'txt': expected a dot and a name, e.g. '.txt'"


def test_an_empty_subset_is_warned_and_left_out(tmp_path):
    _png(tmp_path / "2_a" / "i.png")
    (tmp_path / "3_b").mkdir()
    data, messages = _scan(tmp_path, class_tokens_default="t")
    assert [s.name for s in data.subsets] == ["2_a"]
    assert f"training data folder {str(tmp_path / '3_b')!r}: skipped, no readable images" in (
        messages
    )


@given(st.integers(min_value=-(10**12), max_value=10**12), st.text(max_size=20))
def test_parse_subset_name_reads_the_first_token_as_repeats(repeats, rest):
    assert parse_subset_name(f"{repeats}_{rest}") == (repeats, rest)


@given(st.text(max_size=20))
def test_parse_subset_name_without_a_number_is_none(name):
    first = name.partition("_")[0]
    digits = first.lstrip("+-")
    if digits.isascii() and digits.isdigit() and len(first) - len(digits) <= 1:
        assert parse_subset_name(name) == (int(first), name.partition("_")[2])
    else:
        assert parse_subset_name(name) is None


def test_images_beside_subfolders_are_warned_as_unused(tmp_path):
    _png(tmp_path / "2_a" / "i.png")
    _png(tmp_path / "loose.png")
    data, messages = _scan(tmp_path, class_tokens_default="t")
    assert [s.name for s in data.subsets] == ["2_a"]
    assert messages[-1] == (
        f"training data folder {str(tmp_path)!r}: 1 images directly in it (e.g. 'loose.png') "
        "are not used; only its N_concept subfolders are (move them into one, e.g. 1_extra)"
    )
