"""temporary_file and publish_new: outputs appear whole or not at all, with the mode a plain
``open()`` gives, never over an existing file, and no temporary file is left."""

from __future__ import annotations

import errno
import os
import stat
import tempfile
import threading

import pytest

from sdstack import atomic_files
from sdstack.atomic_files import publish_new, replace, temporary_file

UMASKS = [0o022, 0o077, 0o002, 0o027, 0o000]


@pytest.fixture
def umask():
    """Set the process umask for one test, then restore it (tests run one at a time per
    process, so no other thread is creating files meanwhile)."""
    saved = os.umask(0o022)
    yield os.umask
    os.umask(saved)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_replace_moves_the_file_and_leaves_nothing_else(tmp_path):
    folder = tmp_path / "new" / "folder"
    with temporary_file(folder, suffix=".txt") as temporary:
        assert temporary.parent == folder and temporary.name.startswith(".tmp-")
        assert temporary.name.endswith(".txt") and temporary.read_bytes() == b""
        temporary.write_text("done", encoding="utf-8")
        os.replace(temporary, folder / "out.txt")
    assert sorted(p.name for p in folder.iterdir()) == ["out.txt"]
    assert (folder / "out.txt").read_text(encoding="utf-8") == "done"


def test_a_failure_removes_the_temporary_file(tmp_path):
    with pytest.raises(RuntimeError, match="disk full"), temporary_file(tmp_path) as temporary:
        temporary.write_text("half", encoding="utf-8")
        raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mask", UMASKS)
def test_mode_is_what_a_plain_open_gives(tmp_path, umask, mask):
    umask(mask)
    plain = tmp_path / "plain.txt"
    plain.write_text("x", encoding="utf-8")  # the truth: the kernel's own umask rule
    with temporary_file(tmp_path, suffix=".txt") as temporary:
        temporary.write_text("y", encoding="utf-8")
        assert mode(temporary) == mode(plain) == 0o666 & ~mask
        publish_new(temporary, tmp_path / "published.txt")
    with temporary_file(tmp_path) as temporary:
        replace(temporary, tmp_path / "replaced.txt")
    assert mode(tmp_path / "published.txt") == mode(tmp_path / "replaced.txt") == mode(plain)


def _write_by_rename(path) -> None:
    """A writer that renames its own mkstemp (0600) file over ``path``, as safetensors
    >= 0.8 ``save_file`` does."""
    handle, name = tempfile.mkstemp(dir=os.path.dirname(path))
    os.write(handle, b"written")
    os.close(handle)
    os.replace(name, path)


@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_mode_survives_a_writer_that_renames(tmp_path, umask, mask):
    umask(mask)
    for name, move in (("replaced", replace), ("published", publish_new)):
        with temporary_file(tmp_path) as temporary:
            _write_by_rename(temporary)
            assert mode(temporary) == 0o600
            move(temporary, tmp_path / name)
        assert mode(tmp_path / name) == 0o666 & ~mask
        assert (tmp_path / name).read_bytes() == b"written"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["published", "replaced"]


def test_safetensors_output_gets_the_umask_mode(tmp_path, umask):
    import torch
    from safetensors.torch import load_file, save_file

    umask(0o022)
    with temporary_file(tmp_path, suffix=".safetensors") as temporary:
        save_file({"x": torch.arange(3.0)}, str(temporary))
        replace(temporary, tmp_path / "x.safetensors")
    assert mode(tmp_path / "x.safetensors") == 0o644
    assert load_file(tmp_path / "x.safetensors")["x"].tolist() == [0.0, 1.0, 2.0]


def test_names_are_random_and_a_taken_name_is_skipped(tmp_path, monkeypatch):
    names = iter(["aaaaaaaaaaaa", "aaaaaaaaaaaa", "bbbbbbbbbbbb"])
    monkeypatch.setattr(atomic_files.secrets, "token_hex", lambda n: next(names))
    with temporary_file(tmp_path) as first, temporary_file(tmp_path) as second:
        assert (first.name, second.name) == (".tmp-aaaaaaaaaaaa.tmp", ".tmp-bbbbbbbbbbbb.tmp")
    assert list(tmp_path.iterdir()) == []


def test_publish_new_never_overwrites(tmp_path):
    (tmp_path / "taken.txt").write_text("keep", encoding="utf-8")
    (tmp_path / "folder").mkdir()
    with temporary_file(tmp_path, suffix=".txt") as temporary:
        temporary.write_text("new", encoding="utf-8")
        for name in ("taken.txt", "folder"):
            with pytest.raises(FileExistsError):
                publish_new(temporary, tmp_path / name)
        assert temporary.read_text(encoding="utf-8") == "new"  # still ours to retry
        publish_new(temporary, tmp_path / "free.txt")
        assert not temporary.exists()
    assert (tmp_path / "taken.txt").read_text(encoding="utf-8") == "keep"
    assert (tmp_path / "free.txt").read_text(encoding="utf-8") == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "free.txt", "taken.txt"]


def _no_hard_links(source, target, **kwargs):
    raise OSError(errno.EPERM, "Operation not permitted")  # what vfat answers to link(2)


def test_publish_new_without_hard_links(tmp_path, monkeypatch, umask):
    monkeypatch.setattr(atomic_files.os, "link", _no_hard_links)
    umask(0o027)
    (tmp_path / "taken.txt").write_text("keep", encoding="utf-8")
    with temporary_file(tmp_path, suffix=".txt") as temporary:
        temporary.write_text("new", encoding="utf-8")
        with pytest.raises(FileExistsError):
            publish_new(temporary, tmp_path / "taken.txt")
        publish_new(temporary, tmp_path / "free.txt")
    assert (tmp_path / "taken.txt").read_text(encoding="utf-8") == "keep"
    assert (tmp_path / "free.txt").read_text(encoding="utf-8") == "new"
    assert mode(tmp_path / "free.txt") == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["free.txt", "taken.txt"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("hard_links", [True, False])
def test_concurrent_publish_new_has_one_winner(tmp_path, monkeypatch, hard_links):
    if not hard_links:
        monkeypatch.setattr(atomic_files.os, "link", _no_hard_links)
    threads, start = 16, threading.Barrier(16)
    winners: list[int] = []

    def claim(number: int) -> None:
        with temporary_file(tmp_path) as temporary:
            temporary.write_text(str(number), encoding="utf-8")
            start.wait()
            try:
                publish_new(temporary, tmp_path / "target")
            except FileExistsError:
                return
            winners.append(number)

    workers = [threading.Thread(target=claim, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert len(winners) == 1
    assert (tmp_path / "target").read_text(encoding="utf-8") == str(winners[0])
    assert [p.name for p in tmp_path.iterdir()] == ["target"]


def test_save_single_file_gets_the_umask_mode(tmp_path, umask, tiny_components):
    from sdstack.models.ldm_file import save_single_file

    umask(0o027)
    checkpoint = tmp_path / "model.safetensors"
    save_single_file(tiny_components, checkpoint)
    assert mode(checkpoint) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_save_single_file_never_overwrites_its_source(tmp_path, tiny_components):
    import dataclasses

    from sdstack.models.detect import CheckpointError
    from sdstack.models.ldm_file import save_single_file

    checkpoint = tmp_path / "model.safetensors"
    save_single_file(tiny_components, checkpoint)
    before = checkpoint.read_bytes()
    loaded = dataclasses.replace(tiny_components, path=checkpoint)
    with pytest.raises(CheckpointError, match="is the file this model was loaded from"):
        save_single_file(loaded, checkpoint)
    assert checkpoint.read_bytes() == before
