"""`sdstack models list` in-process on a fake install tree."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from sdstack.cli import main
from sdstack.models import hash_cache, hashes


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SDSTACK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("SDSTACK_ROOT", raising=False)
    monkeypatch.setattr(hash_cache, "_default_cache", hash_cache.HashCache())
    return tmp_path / "cache"


@pytest.fixture
def install(tmp_path):
    root = tmp_path / "webui"
    files = {
        "models/Stable-diffusion/v1-5.safetensors": b"c" * 3000,
        "models/VAE/mse.pt": b"v" * 10,
        "models/Lora/detail.pt": b"l" * 20,
        "embeddings/easyneg.pt": b"e" * 30,
    }
    for relative, data in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(data)
    return root


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_table_lists_every_kind_with_short_hashes(install, capsys):
    assert main(["models", "list", "--root", str(install)]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].split() == ["TYPE", "NAME", "ALIAS", "HASH", "SIZE", "PATH"]
    assert lines[1].split() == [
        "checkpoint",
        "v1-5",
        "-",
        sha(b"c" * 3000)[:10],
        "2.9",
        "KiB",
        "models/Stable-diffusion/v1-5.safetensors",
    ]
    assert lines[2].split() == ["lora", "detail", "-", sha(b"l" * 20)[:12], "20", "B",
                                "models/Lora/detail.pt"]  # fmt: skip
    assert lines[3].split()[:4] == ["vae", "mse", "-", sha(b"v" * 10)[:10]]
    assert lines[4].split()[:4] == ["embedding", "easyneg", "-", sha(b"e" * 30)[:12]]
    assert len(lines) == 5
    assert "hashing" in captured.err  # the byte progress bar goes to stderr


def test_json_and_no_hash_uses_only_the_cache(install, capsys):
    assert main(["models", "list", "--root", str(install), "--json", "--no-hash"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["root"] == str(install)
    assert [m["sha256"] for m in first["models"]] == [None] * 4

    assert main(["models", "list", "--root", str(install), "--kind", "vae", "--json"]) == 0
    (vae,) = json.loads(capsys.readouterr().out)["models"]
    assert vae == {
        "kind": "vae",
        "name": "mse",
        "alias": None,
        "short_hash": sha(b"v" * 10)[:10],
        "sha256": sha(b"v" * 10),
        "size": 10,
        "path": "models/VAE/mse.pt",
    }
    assert main(["models", "list", "--root", str(install), "--json", "--no-hash"]) == 0
    cached = {m["name"]: m["sha256"] for m in json.loads(capsys.readouterr().out)["models"]}
    assert cached == {"v1-5": None, "detail": None, "mse": sha(b"v" * 10), "easyneg": None}


def test_empty_kinds_are_named(tmp_path, capsys):
    (tmp_path / "embeddings").mkdir()
    assert main(["models", "list", "--root", str(tmp_path), "--kind", "embedding"]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == ["(no embedding files)"]


def test_unhashable_file_is_reported_once_not_fatal(tmp_path, capsys, monkeypatch):
    broken = tmp_path / "models" / "Lora" / "broken.safetensors"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"\x01")
    vae = tmp_path / "models" / "VAE" / "gone.pt"
    vae.parent.mkdir(parents=True)
    vae.write_bytes(b"vae")

    def fail(path, offset, progress):
        raise OSError(5, "Input/output error", str(path))

    monkeypatch.setattr(hashes, "_sha256_from", fail)
    assert main(["models", "list", "--root", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert [line.split()[:4] for line in captured.out.splitlines()[1:3]] == [
        ["lora", "broken", "-", "error"],
        ["vae", "gone", "-", "error"],
    ]
    warnings = [line for line in captured.err.splitlines() if "warning" in line]
    assert warnings == [
        f"sdstack: warning: {broken}: not a safetensors file: 1 bytes, expected at least 8 (an "
        "8-byte header length then a JSON header); listed without its alias (ss_output_name)",
        f"sdstack: warning: could not hash models/VAE/gone.pt: [Errno 5] Input/output error: "
        f"'{vae}'",
    ]


def test_bad_root_is_a_user_error(tmp_path, capsys):
    assert main(["models", "list", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdstack: error: ")
    assert "none of models/Stable-diffusion, models/Lora, models/LyCORIS" in err
    assert main(["models", "list", "--root", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err == (
        f"sdstack: error: --root {tmp_path / 'nope'}: folder not found; pass the web UI "
        "install folder (the one that holds models/ and embeddings/) or its models/ folder\n"
    )


def test_root_from_the_environment_and_the_models_folder(install, capsys, monkeypatch):
    monkeypatch.setenv("SDSTACK_ROOT", str(install / "models"))
    assert main(["models", "list", "--kind", "embedding", "--no-hash", "--json"]) == 0
    (embedding,) = json.loads(capsys.readouterr().out)["models"]
    assert embedding["path"] == "../embeddings/easyneg.pt"  # beside models/
    monkeypatch.setenv("SDSTACK_ROOT", str(install / "missing"))
    assert main(["models", "list"]) == 2
    assert capsys.readouterr().err.startswith(
        f"sdstack: error: SDSTACK_ROOT={install / 'missing'}: folder not found; "
    )


def test_cache_is_written_once_when_the_command_ends(install, capsys, cache_dir):
    assert main(["models", "list", "--root", str(install)]) == 0
    stored = json.loads((cache_dir / "hashes.json").read_text())["sections"]["sha256"]
    assert sorted(entry["sha256"] for entry in stored.values()) == sorted(
        sha(data) for data in (b"c" * 3000, b"v" * 10, b"l" * 20, b"e" * 30)
    )


@pytest.mark.timeout(20)
def test_hostile_entries_are_warnings_and_the_listing_goes_on(install, capsys):
    folder = install / "models" / "Stable-diffusion"
    os.mkfifo(folder / "pipe.safetensors")
    (folder / "zero.ckpt").symlink_to("/dev/zero")
    (folder / "gone.ckpt").symlink_to(folder / "nothing.ckpt")
    (folder / "loop").symlink_to(folder, target_is_directory=True)
    assert main(["models", "list", "--root", str(install), "--kind", "checkpoint"]) == 0
    captured = capsys.readouterr()
    assert [line.split()[:2] for line in captured.out.splitlines()[1:]] == [["checkpoint", "v1-5"]]
    warnings = [line for line in captured.err.splitlines() if "warning" in line]
    assert warnings == [
        f"sdstack: warning: {folder}/gone.ckpt: dangling symbolic link (its target does not "
        "exist); skipped",
        f"sdstack: warning: {folder}/pipe.safetensors: a FIFO (named pipe), not a model file; "
        "skipped",
        f"sdstack: warning: {folder}/zero.ckpt: a character device, not a model file; skipped",
        f"sdstack: warning: {folder}/loop: links back to {folder}, a folder it is inside (a "
        "folder loop); not followed",
    ]


def test_group_without_command_prints_help(capsys):
    assert main(["models"]) == 2
    assert "list" in capsys.readouterr().out
