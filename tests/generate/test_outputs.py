"""check_output_folder: a bad --out fails before any model loads, with a message that names
the option, the path and the reason; nothing is created or left behind."""

from __future__ import annotations

import errno
import os

import pytest

from sdstack.errors import SdstackError
from sdstack.generate.outputs import OutputError, check_output_folder, os_error_reason


def listing(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_an_existing_folder_passes_and_is_left_as_it_was(tmp_path):
    (tmp_path / "00001-1.png").write_bytes(b"keep")
    assert check_output_folder(str(tmp_path)) == tmp_path
    assert listing(tmp_path) == ["00001-1.png"]


@pytest.mark.parametrize("relative", ["new", "new/deeper/still"])
def test_a_missing_folder_passes_and_is_not_created(tmp_path, relative):
    assert check_output_folder(tmp_path / relative) == tmp_path / relative
    assert listing(tmp_path) == []


def test_a_file_is_not_a_folder(tmp_path):
    (tmp_path / "x.png").write_bytes(b"keep")
    with pytest.raises(OutputError) as raised:
        check_output_folder(tmp_path / "x.png")
    assert str(raised.value) == f"--out {str(tmp_path / 'x.png')!r}: is a file, expected a folder"
    assert isinstance(raised.value, SdstackError)
    assert (tmp_path / "x.png").read_bytes() == b"keep"


@pytest.mark.parametrize("relative", ["sub", "sub/deeper"])
def test_a_parent_that_is_a_file(tmp_path, relative):
    (tmp_path / "f").write_bytes(b"")
    path = tmp_path / "f" / relative
    with pytest.raises(OutputError) as raised:
        check_output_folder(path, option="--grid-out")
    assert str(raised.value) == (
        f"--grid-out {str(path)!r}: {str(tmp_path / 'f')!r} is a file, expected a folder"
    )
    assert listing(tmp_path) == ["f"]


def test_a_link_to_nothing(tmp_path):
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    with pytest.raises(OutputError) as raised:
        check_output_folder(tmp_path / "link")
    assert str(raised.value) == (
        f"--out {str(tmp_path / 'link')!r}: is a link to nothing, expected a folder"
    )


@pytest.mark.parametrize("relative", ["x" * 300, "x" * 300 + "/inner", "ok/" + "é" * 200])
def test_a_name_too_long(tmp_path, relative):
    path = tmp_path / relative
    name = next(part for part in relative.split("/") if len(part) > 100)
    size = len(name.encode("utf-8"))  # 300 or 400 bytes: over any file system's 255
    with pytest.raises(OutputError) as raised:
        check_output_folder(path)
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    assert str(raised.value) == (
        f"--out {str(path)!r}: the name {name[:16]!r}... is {size} bytes, the file system "
        f"takes at most {limit}; choose a shorter name"
    )


def test_a_folder_we_cannot_write_in_simulated(tmp_path, monkeypatch):
    def refuse(directory, suffix):
        raise PermissionError(errno.EACCES, "Permission denied", str(directory))

    monkeypatch.setattr("sdstack.atomic_files._create_new_file", refuse)
    with pytest.raises(OutputError) as raised:
        check_output_folder(tmp_path)
    assert str(raised.value) == (
        f"--out {str(tmp_path)!r}: cannot write in it: permission denied; choose a folder "
        "you can write to"
    )


def test_a_missing_folder_in_a_folder_we_cannot_write_in_simulated(tmp_path, monkeypatch):
    def read_only(directory, suffix):
        raise OSError(errno.EROFS, "Read-only file system", str(directory))

    monkeypatch.setattr("sdstack.atomic_files._create_new_file", read_only)
    with pytest.raises(OutputError) as raised:
        check_output_folder(tmp_path / "new" / "sub")
    assert str(raised.value) == (
        f"--out {str(tmp_path / 'new' / 'sub')!r}: cannot create it in {str(tmp_path)!r}: "
        "the file system is read-only; choose a folder you can write to"
    )


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes in read-only folders"
)
def test_a_read_only_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        with pytest.raises(OutputError, match="cannot write in it: permission denied"):
            check_output_folder(locked)
        with pytest.raises(OutputError, match=r"cannot create it in .*: permission denied"):
            check_output_folder(locked / "new")
    finally:
        locked.chmod(0o755)
    assert listing(locked) == []


@pytest.mark.parametrize(
    ("code", "text"),
    [
        (errno.ENOSPC, "the disk is full; free some space or choose another folder"),
        (errno.EROFS, "the file system is read-only; choose a folder you can write to"),
        (errno.ENAMETOOLONG, "a name in the path is too long; choose a shorter name"),
        (errno.EIO, "Input/output error"),
    ],
)
def test_os_error_reason(code, text):
    assert os_error_reason(OSError(code, os.strerror(code))) == text


def test_os_error_reason_without_errno():
    assert os_error_reason(OSError("cannot write mode RGBA as JPEG")) == (
        "cannot write mode RGBA as JPEG"
    )
