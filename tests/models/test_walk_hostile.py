"""Model folders holding things that must not hang or abort a walk: FIFOs, devices,
sockets, dangling links, link loops, folder loops, unreadable entries."""

from __future__ import annotations

import os
import socket
import warnings

import pytest

from sdstack.errors import SdstackWarning
from sdstack.models import hash_cache, hashes, library
from sdstack.models.library import ModelLibrary, iter_model_files

SUFFIXES = (".safetensors", ".ckpt", ".pt")


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SDSTACK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(hash_cache, "_default_cache", hash_cache.HashCache())


def walk(folder) -> tuple[list[str], list[str]]:
    """(relative paths walked, warning messages with the folder prefix cut)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = [p.relative_to(folder).as_posix() for p in iter_model_files(folder, SUFFIXES)]
    assert all(issubclass(w.category, SdstackWarning) for w in caught)
    return found, [str(w.message).replace(f"{folder}/", "") for w in caught]


@pytest.fixture
def hostile(tmp_path, monkeypatch):
    """models/Stable-diffusion with one good file per folder and one of each hostile kind."""
    folder = tmp_path / "webui" / "models" / "Stable-diffusion"
    (folder / "sub").mkdir(parents=True)
    (folder / "good.safetensors").write_bytes(b"good")
    (folder / "sub" / "deep.ckpt").write_bytes(b"deep")
    os.mkfifo(folder / "fifo.safetensors")
    (folder / "zero.ckpt").symlink_to("/dev/zero")
    (folder / "dangling.safetensors").symlink_to(folder / "missing.safetensors")
    (folder / "loop-a.pt").symlink_to(folder / "loop-b.pt")
    (folder / "loop-b.pt").symlink_to(folder / "loop-a.pt")
    (folder / "sub" / "up").symlink_to(folder, target_is_directory=True)
    (folder / "twin").symlink_to(folder / "sub", target_is_directory=True)
    monkeypatch.chdir(folder)  # AF_UNIX paths are limited to ~107 bytes: bind a short one
    server = socket.socket(socket.AF_UNIX)
    server.bind("sock.pt")
    yield folder
    server.close()


EXPECTED_WARNINGS = [
    "dangling.safetensors: dangling symbolic link (its target does not exist); skipped",
    "fifo.safetensors: a FIFO (named pipe), not a model file; skipped",
    "loop-a.pt: symbolic link loop (too many levels of links); skipped",
    "loop-b.pt: symbolic link loop (too many levels of links); skipped",
    "sock.pt: a socket, not a model file; skipped",
    "zero.ckpt: a character device, not a model file; skipped",
    "sub/up: links back to {folder}, a folder it is inside (a folder loop); not followed",
    "twin: the same folder as sub, already listed; not listed twice",  # {folder}/sub
]


@pytest.mark.timeout(10)
def test_walk_skips_every_hostile_entry_with_a_warning(hostile):
    found, messages = walk(hostile)
    assert found == ["good.safetensors", "sub/deep.ckpt"]
    assert messages == [m.format(folder=hostile) for m in EXPECTED_WARNINGS]


@pytest.mark.timeout(10)
def test_library_lists_and_hashes_around_hostile_entries(hostile):
    models = ModelLibrary(hostile.parent.parent)
    with pytest.warns(SdstackWarning) as caught:
        entries = models.checkpoints()
    assert len(caught) == len(EXPECTED_WARNINGS)
    assert [(e.name, e.relative_path) for e in entries] == [
        ("good", "good.safetensors"),
        ("deep", "sub/deep.ckpt"),
    ]
    assert [e.short_hash() for e in entries] == [
        hashes.file_sha256(hostile / "good.safetensors")[:10],
        hashes.file_sha256(hostile / "sub" / "deep.ckpt")[:10],
    ]


@pytest.mark.timeout(10)
def test_unlistable_subfolder_is_a_warning(tmp_path, monkeypatch):
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / "hidden.pt").write_bytes(b"x")
    (tmp_path / "z.pt").write_bytes(b"z")
    listdir = os.listdir

    def refuse(path):
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return listdir(path)

    monkeypatch.setattr(library.os, "listdir", refuse)
    found, messages = walk(tmp_path)
    assert found == ["z.pt"]
    assert messages == ["locked: could not list the folder (Permission denied); skipped"]


@pytest.mark.timeout(10)
def test_unreadable_lora_header_is_a_warning_not_the_end(tmp_path, monkeypatch):
    folder = tmp_path / "models" / "Lora"
    folder.mkdir(parents=True)
    for name in ("a", "b", "c"):
        (folder / f"{name}.safetensors").write_bytes(b"\2" + b"\0" * 7 + b"{}")  # no tensors
    read_metadata = library.safetensors_metadata

    def refuse(path):
        if path.name == "b.safetensors":
            raise PermissionError(13, "Permission denied", str(path))
        return read_metadata(path)

    monkeypatch.setattr(library, "safetensors_metadata", refuse)
    with pytest.warns(SdstackWarning) as caught:
        names = [entry.name for entry in ModelLibrary(tmp_path).loras()]
    assert names == ["a", "b", "c"]
    assert [str(w.message) for w in caught] == [
        f"{folder}/b.safetensors: could not read the header (Permission denied); listed "
        "without its alias (ss_output_name)"
    ]


@pytest.mark.timeout(10)
@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_permission_denied_file_is_listed_and_fails_only_its_hash(tmp_path):
    folder = tmp_path / "models" / "VAE"
    folder.mkdir(parents=True)
    (folder / "ok.pt").write_bytes(b"ok")
    (folder / "secret.pt").write_bytes(b"secret")
    (folder / "secret.pt").chmod(0)
    entries = ModelLibrary(tmp_path).vaes()
    assert [e.name for e in entries] == ["ok", "secret"]
    with pytest.raises(PermissionError):
        entries[1].sha256()


@pytest.mark.timeout(10)
def test_top_folder_errors_are_raised(tmp_path):
    with pytest.raises(FileNotFoundError):
        list(iter_model_files(tmp_path / "missing", SUFFIXES))
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(NotADirectoryError, match=r"not a folder: .*fifo"):
        list(iter_model_files(tmp_path / "fifo", SUFFIXES))


@pytest.mark.timeout(30)
def test_embedding_folder_with_a_fifo_does_not_hang(tmp_path):
    from sdstack.text import EmbeddingLibrary

    os.mkfifo(tmp_path / "pipe.pt")
    with pytest.warns(SdstackWarning, match=r"pipe\.pt: a FIFO \(named pipe\), not a model"):
        assert len(EmbeddingLibrary.from_dir(tmp_path)) == 0
