"""Saving with infotext (PNG chunk, EXIF UserComment), unique names claimed atomically
(threads and processes at once), modes, clean errors for outputs and inputs."""

from __future__ import annotations

import errno
import os
import stat
import struct
import subprocess
import sys
import threading
import time

import pytest
from PIL import Image

from sdstack import atomic_files
from sdstack.errors import SdstackError
from sdstack.generate import images as images_module
from sdstack.generate.images import (
    ImageFileError,
    InfotextError,
    load_init_image,
    read_infotext,
    save_image,
)
from sdstack.generate.outputs import OutputError

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


def test_bad_format(tmp_path):
    with pytest.raises(OutputError, match="image format 'gif' is not supported"):
        save_image(image(), TEXT, tmp_path, fmt="gif")
    assert issubclass(OutputError, SdstackError) and issubclass(OutputError, ValueError)


# -- file modes ------------------------------------------------------------------------


@pytest.mark.parametrize(("mask", "fmt"), [(0o022, "png"), (0o077, "jpg"), (0o027, "webp")])
def test_saved_image_mode_follows_the_umask(tmp_path, mask, fmt):
    saved = os.umask(mask)
    try:
        path = save_image(image(), TEXT, tmp_path, seed=1, fmt=fmt)
        (tmp_path / "plain").write_bytes(b"")  # the truth: what open() gives
    finally:
        os.umask(saved)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o666 & ~mask


# -- concurrent savers -----------------------------------------------------------------


def colour(worker: int, number: int) -> tuple[int, int, int]:
    return (worker, number, 77)


def check_saved(folder, expected: list[tuple[int, tuple[int, int, int]]]) -> None:
    """Every (seed, colour) saved is in exactly one file named for its seed; no temp files."""
    names = sorted(p.name for p in folder.iterdir())
    assert not [name for name in names if name.startswith(".")]
    found = []
    for name in names:
        with Image.open(folder / name) as opened:
            found.append((int(name.split("-")[1].removesuffix(".png")), opened.getpixel((0, 0))))
    assert sorted(found) == sorted(expected)


@pytest.mark.timeout(60)
def test_threads_saving_at_once_never_overwrite(tmp_path):
    workers, each = 12, 4
    start = threading.Barrier(workers)
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            start.wait()
            for number in range(each):  # every worker saves seeds 0..3: the same names
                picture = Image.new("RGB", (32, 32), colour(worker, number))
                save_image(picture, TEXT, tmp_path, seed=number)
        except BaseException as error:  # reported below, in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    check_saved(tmp_path, [(n, colour(w, n)) for w in range(workers) for n in range(each)])


@pytest.mark.timeout(60)
def test_threads_with_one_seed_take_distinct_indices(tmp_path):
    workers, start = 12, threading.Barrier(12)
    saved: list = []

    def work(worker: int) -> None:
        start.wait()
        saved.append(save_image(Image.new("RGB", (32, 32), colour(worker, 0)), None, tmp_path))

    threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Same seed (none): the index alone tells them apart, so it must be unique.
    assert sorted(p.name for p in saved) == [f"{i:05d}.png" for i in range(workers)]
    colours = set()
    for path in saved:
        with Image.open(path) as opened:
            colours.add(opened.getpixel((0, 0)))
    assert colours == {colour(w, 0) for w in range(workers)}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in saved)


SAVER = """
import os, sys, time
from PIL import Image
from sdstack.generate.images import save_image
folder, go, worker, each = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
open(f"{go}.ready{worker}", "w").close()
deadline = time.monotonic() + 60  # never outlive a test that failed before the start
while not os.path.exists(go):
    if time.monotonic() > deadline:
        sys.exit("no start signal")
    time.sleep(0.001)
for number in range(each):
    picture = Image.new("RGB", (32, 32), (worker, number, 77))
    save_image(picture, "Steps: 1", folder, seed=number)
"""


@pytest.mark.timeout(120)
def test_processes_saving_at_once_never_overwrite(tmp_path):
    folder = tmp_path / "out"
    workers, each = 4, 10
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", SAVER, str(folder), str(tmp_path / "go"), str(w), str(each)],
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(workers)
    ]
    try:
        while len(list(tmp_path.glob("go.ready*"))) < workers:  # all imported: start at once
            if any(process.poll() is not None for process in processes):
                break  # one crashed: its stderr is reported below
            time.sleep(0.005)
        (tmp_path / "go").touch()
        outcomes = [(p.communicate(timeout=100)[1], p.returncode) for p in processes]
    finally:
        for process in processes:
            process.kill()
    assert [stderr for stderr, code in outcomes if code] == []
    check_saved(folder, [(n, colour(w, n)) for w in range(workers) for n in range(each)])


# -- output failures -------------------------------------------------------------------


class FailingImage:
    """Writes part of a file, then fails as ``Image.save`` does on a full disk."""

    def __init__(self, code: int = errno.ENOSPC) -> None:
        self.code = code

    def save(self, path, **kwargs):
        with open(path, "wb") as stream:
            stream.write(b"\x89PNG half")
        raise OSError(self.code, os.strerror(self.code))


def test_full_disk_is_a_clean_error_and_keeps_earlier_images(tmp_path):
    first = save_image(image(), TEXT, tmp_path, seed=1)
    second = save_image(image(), TEXT, tmp_path, seed=2)
    before = {p.name: p.read_bytes() for p in (first, second)}
    with pytest.raises(OutputError) as raised:
        save_image(FailingImage(), TEXT, tmp_path, seed=3)
    assert str(raised.value) == (
        f"cannot save an image in {str(tmp_path)!r}: the disk is full; free some space or "
        "choose another folder"
    )
    assert isinstance(raised.value.__cause__, OSError)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert read_infotext(second) == TEXT


def test_full_disk_while_claiming_the_name(tmp_path, monkeypatch):
    def no_space(temporary, target):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(images_module, "publish_new", no_space)
    with pytest.raises(OutputError, match="the disk is full; free some space"):
        save_image(image(), TEXT, tmp_path, seed=3)
    assert list(tmp_path.iterdir()) == []


def test_out_is_a_file(tmp_path):
    (tmp_path / "taken").write_bytes(b"keep")
    with pytest.raises(OutputError) as raised:
        save_image(image(), TEXT, tmp_path / "taken", seed=1)
    expected = f"cannot save an image in {str(tmp_path / 'taken')!r}: it is a file, expected "
    assert str(raised.value) == expected + "a folder"
    with pytest.raises(OutputError) as raised:
        save_image(image(), TEXT, tmp_path / "taken" / "sub", seed=1)
    assert str(raised.value) == (
        f"cannot save an image in {str(tmp_path / 'taken' / 'sub')!r}: a part of the path is "
        "a file, not a folder; choose another folder"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]
    assert (tmp_path / "taken").read_bytes() == b"keep"


def test_name_too_long(tmp_path):
    out = tmp_path / ("x" * 300)
    with pytest.raises(OutputError) as raised:
        save_image(image(), TEXT, out, seed=1)
    assert str(raised.value) == (
        f"cannot save an image in {str(out)!r}: a name in the path is too long; choose a "
        "shorter name"
    )


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (errno.EACCES, "permission denied; choose a folder you can write to"),
        (errno.EROFS, "the file system is read-only; choose a folder you can write to"),
        (errno.EDQUOT, "the disk quota is exceeded; free some space or choose another folder"),
    ],
)
def test_unwritable_folder_simulated(tmp_path, monkeypatch, code, reason):
    def refuse(directory, suffix):
        raise OSError(code, os.strerror(code), str(directory))

    monkeypatch.setattr(atomic_files, "_create_new_file", refuse)
    with pytest.raises(OutputError) as raised:
        save_image(image(), TEXT, tmp_path, seed=1)
    assert str(raised.value) == f"cannot save an image in {str(tmp_path)!r}: {reason}"


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes in read-only folders"
)
def test_read_only_folder(tmp_path):
    first = save_image(image(), TEXT, tmp_path, seed=1)
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="permission denied; choose a folder you can"):
            save_image(image(), TEXT, tmp_path, seed=2)
    finally:
        tmp_path.chmod(0o755)
    assert [p.name for p in tmp_path.iterdir()] == [first.name]


# -- reading images --------------------------------------------------------------------


def png_header(width: int, height: int) -> bytes:
    """A PNG signature, IHDR (8-bit RGB) and IEND: a file that declares a size, no pixels."""
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def noisy_png(path) -> bytes:
    """A 64x64 PNG that does not compress to nothing, with infotext; returns its bytes."""
    noise = Image.effect_noise((64, 64), 60).convert("RGB")
    written = save_image(noise, TEXT, path.parent, seed=5)
    data = written.read_bytes()
    written.unlink()
    return data


@pytest.mark.parametrize(
    ("reader", "option"),
    [(load_init_image, "--init-image"), (read_infotext, "image")],
)
def test_reading_errors(tmp_path, reader, option):
    cases = {
        tmp_path / "missing.png": "no such file",
        tmp_path: "is a folder, expected an image file",
        tmp_path / "text.png": "is not an image file Pillow can read",
        tmp_path / "huge.png": (
            f"declares more than {Image.MAX_IMAGE_PIXELS} pixels (PIL.Image.MAX_IMAGE_PIXELS), "
            "which could be a decompression bomb; raise that limit only for a file you trust"
        ),
    }
    (tmp_path / "text.png").write_text("not an image", encoding="utf-8")
    (tmp_path / "huge.png").write_bytes(png_header(100_000, 100_000))
    expected_class = ImageFileError if reader is load_init_image else InfotextError
    for path, reason in cases.items():
        with pytest.raises(expected_class) as raised:
            reader(path)
        assert str(raised.value) == f"{option} {str(path)!r}: {reason}"


def test_truncated_image(tmp_path):
    data = noisy_png(tmp_path / "x")
    half, header = tmp_path / "half.png", tmp_path / "header.png"
    half.write_bytes(data[: len(data) // 2])
    header.write_bytes(data[:20])
    for path in (half, header):
        prefix = f"--init-image {str(path)!r}: is truncated or corrupt: "
        with pytest.raises(ImageFileError) as raised:
            load_init_image(path)
        assert str(raised.value).startswith(prefix) and len(str(raised.value)) > len(prefix)
    with pytest.raises(InfotextError, match="is truncated or corrupt: "):
        read_infotext(header)
    assert read_infotext(half) == TEXT  # the text chunk precedes the pixels, not decoded


def test_pixel_limit_between_pillow_warning_and_error(tmp_path, monkeypatch):
    path = tmp_path / "small.png"
    image().save(path)  # 16 x 8 = 128 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow warns up to 200, we refuse
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(ImageFileError) as raised:
        load_init_image(path, option="--image")
    assert str(raised.value).startswith(f"--image {str(path)!r}: declares more than 100 pixels")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # Pillow raises over 100
    with pytest.raises(ImageFileError, match="declares more than 50 pixels"):
        load_init_image(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 128)
    assert load_init_image(path).size == (16, 8)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "CMYK"])
def test_load_init_image_is_rgb_and_fully_loaded(tmp_path, mode):
    source = Image.effect_noise((12, 10), 60).convert(mode)
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    source.save(path, quality=100)
    with Image.open(path) as truth_file:
        truth = truth_file.convert("RGB")  # Pillow's own conversion of the stored pixels
    fds = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    loaded = load_init_image(path)
    if fds is not None:
        assert len(os.listdir("/proc/self/fd")) == fds  # the file is closed
    path.unlink()  # the pixels live in memory now
    assert loaded.mode == "RGB" and loaded.size == (12, 10)
    assert loaded.tobytes() == truth.tobytes()
