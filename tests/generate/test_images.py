"""Saving with infotext (PNG chunk, EXIF UserComment), unique names, reading back."""

from __future__ import annotations

import struct

import pytest
from PIL import Image

from sdstack.generate.images import InfotextError, read_infotext, save_image

TEXT = "a cat, (red:1.2)\nNegative prompt: blur\nSteps: 2, Sampler: Euler, Seed: 7"


def image():
    return Image.new("RGB", (16, 8), (200, 10, 30))


def png_chunks(path) -> list[tuple[bytes, bytes]]:
    data = path.read_bytes()[8:]
    chunks = []
    while data:
        (length,) = struct.unpack(">I", data[:4])
        kind, body = data[4:8], data[8 : 8 + length]
        chunks.append((kind, body))
        data = data[12 + length :]
    return chunks


def test_png_parameters_text_chunk(tmp_path):
    path = save_image(image(), TEXT, tmp_path, seed=7)
    assert path.name == "00000-7.png"
    texts = [body for kind, body in png_chunks(path) if kind == b"tEXt"]
    assert texts == [b"parameters\0" + TEXT.encode("latin-1")]
    assert read_infotext(path) == TEXT


def test_png_itxt_when_not_latin1(tmp_path):
    text = "猫 🐱\nSteps: 2, Sampler: Euler, Seed: 7"
    path = save_image(image(), text, tmp_path, seed=7)
    itxt = [body for kind, body in png_chunks(path) if kind == b"iTXt"]
    assert len(itxt) == 1 and itxt[0].startswith(b"parameters\0")
    # keyword, flag 0 (uncompressed), method, language, translated keyword, UTF-8 text
    assert itxt[0] == b"parameters\0\0\0\0\0" + text.encode("utf-8")
    assert read_infotext(path) == text


@pytest.mark.parametrize("fmt", ["jpg", "webp"])
def test_exif_user_comment(tmp_path, fmt):
    text = TEXT + ", Model: ünï"
    path = save_image(image(), text, tmp_path, seed=3, fmt=fmt)
    assert path.suffix == f".{fmt}"
    with Image.open(path) as opened:
        raw = opened.getexif().get_ifd(0x8769)[0x9286]
    assert raw == b"UNICODE\0" + text.encode("utf-16-be")
    assert read_infotext(path) == text


def test_unique_names_never_overwrite(tmp_path):
    (tmp_path / "00007-1.png").write_bytes(b"keep")
    (tmp_path / "notes.txt").write_text("x")
    paths = [save_image(image(), TEXT, tmp_path, seed=s) for s in (1, 1, 2)]
    assert [p.name for p in paths] == ["00008-1.png", "00009-1.png", "00010-2.png"]
    assert (tmp_path / "00007-1.png").read_bytes() == b"keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "00007-1.png",
        "00008-1.png",
        "00009-1.png",
        "00010-2.png",
        "notes.txt",
    ]


def test_failed_save_leaves_no_temp_file(tmp_path):
    class Broken:
        def save(self, stream, **kwargs):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_image(Broken(), None, tmp_path, seed=1)
    assert list(tmp_path.iterdir()) == []


def test_read_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_infotext(tmp_path / "missing.png")
    (tmp_path / "x.png").write_text("not an image")
    with pytest.raises(InfotextError, match="is not an image file"):
        read_infotext(tmp_path / "x.png")
    plain = tmp_path / "plain.png"
    image().save(plain)
    assert read_infotext(plain) is None


def test_bad_format(tmp_path):
    with pytest.raises(ValueError, match="image format 'gif' is not supported"):
        save_image(image(), TEXT, tmp_path, fmt="gif")
