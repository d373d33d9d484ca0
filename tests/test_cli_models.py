"""`sdstack models list` in-process on a fake install tree."""

from __future__ import annotations

import hashlib
import json

import pytest

from sdstack.cli import main


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SDSTACK_CACHE_DIR", str(tmp_path / "cache"))


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


def test_unhashable_file_is_reported_not_fatal(tmp_path, capsys):
    broken = tmp_path / "models" / "Lora" / "broken.safetensors"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"\x01")
    assert main(["models", "list", "--root", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[1].split()[:4] == ["lora", "broken", "-", "error"]
    assert "sdstack: warning: could not hash models/Lora/broken.safetensors: " in captured.err
    assert "not a safetensors file: 1 bytes" in captured.err


def test_bad_root_is_a_user_error(tmp_path, capsys):
    assert main(["models", "list", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdstack: error: ")
    assert "none of models/Stable-diffusion, models/Lora, models/LyCORIS" in err
    assert main(["models", "list", "--root", str(tmp_path / "nope")]) == 2
    assert "models root folder not found" in capsys.readouterr().err


def test_group_without_command_prints_help(capsys):
    assert main(["models"]) == 2
    assert "list" in capsys.readouterr().out
