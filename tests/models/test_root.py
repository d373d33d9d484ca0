"""--root / SDSTACK_ROOT: model names, titles and hashes resolved against a fake install."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from sdstack.models import hash_cache, hashes
from sdstack.models.library import ModelLibraryError, ModelNotFoundError
from sdstack.models.root import ResolvedPaths, open_library, resolve_model_paths

# a checkpoint long enough to have a legacy hash of its own (0x10000 bytes at 0x100000)
BIG = bytes(range(256)) * (0x110000 // 256)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SDSTACK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("SDSTACK_ROOT", raising=False)
    monkeypatch.setattr(hash_cache, "_default_cache", hash_cache.HashCache())


def write(path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def webui(tmp_path):
    root = tmp_path / "webui"
    checkpoints = root / "models" / "Stable-diffusion"
    write(checkpoints / "v1-5-pruned-emaonly.safetensors", BIG)
    write(checkpoints / "anime" / "anything.ckpt", b"anything")
    write(checkpoints / "anime" / "counterfeit.ckpt", b"counterfeit")
    write(root / "models" / "VAE" / "mse.safetensors", b"mse vae")
    write(root / "models" / "Lora" / "x.safetensors", b"\0" * 8)
    (root / "models" / "LyCORIS").mkdir()
    write(root / "embeddings" / "easyneg.pt", b"ti")
    return root


def model(root, text: str):
    return resolve_model_paths(root, model=text, vae=None, embeddings=None).model


def test_checkpoint_by_name_as_models_list_shows_it(webui):
    folder = webui / "models" / "Stable-diffusion"
    v15 = folder / "v1-5-pruned-emaonly.safetensors"
    assert model(webui, "v1-5-pruned-emaonly") == v15
    assert model(webui, "v1-5-pruned-emaonly.safetensors") == v15
    for text in ("anything", "anything.ckpt", "anime/anything", "anime/anything.ckpt"):
        assert model(webui, text) == folder / "anime" / "anything.ckpt"
    # the web UI's checkpoint title: "name.ext [short hash]"
    assert model(webui, "anime/anything.ckpt [0123456789]") == folder / "anime" / "anything.ckpt"


def test_checkpoint_by_short_full_and_legacy_hash(webui, monkeypatch):
    folder = webui / "models" / "Stable-diffusion"
    v15 = folder / "v1-5-pruned-emaonly.safetensors"
    assert model(webui, sha(b"anything")[:10]) == folder / "anime" / "anything.ckpt"
    assert model(webui, sha(BIG)[:10].upper()) == v15
    assert model(webui, sha(b"counterfeit")) == folder / "anime" / "counterfeit.ckpt"
    legacy = hashlib.sha256(BIG[0x100000:0x110000]).hexdigest()[:8]
    assert model(webui, legacy) == v15
    # once hashed, a lookup by hash reads no file again (the cache answers)
    calls = []
    monkeypatch.setattr(hashes, "_sha256_from", lambda *args: calls.append(args))
    assert model(webui, sha(b"counterfeit")[:10]) == folder / "anime" / "counterfeit.ckpt"
    assert calls == []


def test_hash_lookups_that_fail(webui):
    folder = webui / "models" / "Stable-diffusion"
    with pytest.raises(ModelLibraryError) as caught:
        model(webui, "e3b0c442")  # the legacy hash of every file of at most 1 MiB
    assert str(caught.value) == (
        f"checkpoint legacy hash 'e3b0c442' is ambiguous in {folder}: anime/anything.ckpt, "
        "anime/counterfeit.ckpt; give the name or a longer hash"
    )
    with pytest.raises(ModelNotFoundError) as caught:
        model(webui, "abcdef0123")
    assert str(caught.value) == (
        f"no checkpoint named 'abcdef0123' in {folder}; no checkpoint has the hash "
        "'abcdef0123' (3 files)"
    )


def test_identical_copies_found_by_hash_count_as_one(webui):
    folder = webui / "models" / "Stable-diffusion"
    write(folder / "copy" / "anything.safetensors", b"anything")
    assert model(webui, sha(b"anything")[:10]) == folder / "anime" / "anything.ckpt"


def test_unknown_and_ambiguous_names(webui):
    folder = webui / "models" / "Stable-diffusion"
    with pytest.raises(ModelNotFoundError) as caught:
        model(webui, "v1-5-pruned")
    assert str(caught.value) == (
        f"no checkpoint named 'v1-5-pruned' in {folder}; did you mean v1-5-pruned-emaonly?"
    )
    write(folder / "anything.safetensors", b"another anything")  # top level: its own path
    assert model(webui, "anything") == folder / "anything.safetensors"
    write(folder / "other" / "counterfeit.safetensors", b"another counterfeit")
    with pytest.raises(ModelLibraryError, match=r"checkpoint name 'counterfeit' is ambiguous"):
        model(webui, "counterfeit")


def test_an_explicit_path_always_wins(webui, tmp_path):
    outside = tmp_path / "elsewhere" / "anything.ckpt"
    write(outside, b"outside")
    assert model(webui, str(outside)) == outside
    folder = tmp_path / "diffusers-model"
    folder.mkdir()
    assert model(webui, str(folder)) == folder
    explicit = tmp_path / "my-embeddings"
    paths = resolve_model_paths(webui, model=None, vae=str(outside), embeddings=str(explicit))
    assert (paths.model, paths.vae, paths.embeddings) == (None, outside, explicit)


def test_vae_embeddings_and_lora_folders_from_the_root(webui):
    paths = resolve_model_paths(webui, model="anything", vae="mse", embeddings=None)
    assert paths.vae == webui / "models" / "VAE" / "mse.safetensors"
    assert paths.embeddings == webui / "embeddings"
    assert paths.lora_folders == (webui / "models" / "Lora", webui / "models" / "LyCORIS")
    assert paths.library is not None and paths.library.root == webui
    by_hash = resolve_model_paths(webui, model=None, vae=sha(b"mse vae")[:10], embeddings=None)
    assert by_hash.vae == paths.vae
    message = r"^no vae named 'mse2' in .*VAE, .*Stable-diffusion; did you mean mse\?$"
    with pytest.raises(ModelNotFoundError, match=message):
        resolve_model_paths(webui, model=None, vae="mse2", embeddings=None)


def test_models_folder_as_root_finds_the_sibling_embeddings(webui):
    paths = resolve_model_paths(webui / "models", model="anything", vae=None, embeddings=None)
    assert paths.embeddings == webui / "embeddings"
    assert paths.model == webui / "models" / "Stable-diffusion" / "anime" / "anything.ckpt"


def test_without_a_root_paths_pass_through():
    paths = resolve_model_paths(None, model="m.safetensors", vae=None, embeddings="e", environ={})
    assert paths == ResolvedPaths(None, Path("m.safetensors"), None, Path("e"), ())
    assert open_library(None, environ={}) is None


def test_root_from_the_environment(webui, monkeypatch):
    paths = resolve_model_paths(
        None, model="anything", vae=None, embeddings=None, environ={"SDSTACK_ROOT": str(webui)}
    )
    assert paths.model.name == "anything.ckpt"
    monkeypatch.setenv("SDSTACK_ROOT", str(webui))
    assert open_library(None).root == webui
    assert open_library(webui / "models").root == webui / "models"  # --root beats the variable


def test_missing_root_names_the_option_or_the_variable(tmp_path):
    missing = tmp_path / "nope"
    advice = (
        "; pass the web UI install folder (the one that holds models/ and embeddings/) or its "
        "models/ folder"
    )
    with pytest.raises(ModelLibraryError) as caught:
        resolve_model_paths(missing, model="x", vae=None, embeddings=None)
    assert str(caught.value) == f"--root {missing}: folder not found{advice}"
    with pytest.raises(ModelLibraryError) as caught:
        open_library(None, environ={"SDSTACK_ROOT": str(missing)})
    assert str(caught.value) == f"SDSTACK_ROOT={missing}: folder not found{advice}"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelLibraryError, match=r"^--root .*file: not a folder; pass"):
        open_library(os.fspath(tmp_path / "file"))


@pytest.mark.timeout(10)
def test_special_files_given_as_paths_are_refused(webui, tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    for root in (webui, None):
        with pytest.raises(ModelLibraryError) as caught:
            resolve_model_paths(root, model=str(fifo), vae=None, embeddings=None, environ={})
        assert str(caught.value) == f"{fifo}: a FIFO (named pipe), not a model file or folder"
    with pytest.raises(ModelLibraryError, match=r"^/dev/zero: a character device, not a model"):
        resolve_model_paths(webui, model=None, vae="/dev/zero", embeddings=None)
