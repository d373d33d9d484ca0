"""ModelLibrary on a fake reference-UI install tree written here (small files)."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest

from sdstack.errors import SdstackWarning
from sdstack.models import hash_cache
from sdstack.models.library import (
    ModelLibrary,
    ModelLibraryError,
    ModelNotFoundError,
    iter_model_files,
    lora_sha256,
)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SDSTACK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(hash_cache, "_default_cache", hash_cache.HashCache())


def write_safetensors(path, metadata: dict | None, data: bytes) -> bytes:
    """A minimal safetensors file by hand; returns the data bytes (what addnet hashes)."""
    header: dict = {"w": {"dtype": "U8", "shape": [len(data)], "data_offsets": [0, len(data)]}}
    if metadata is not None:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return data


def write(path, data: bytes) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def install(tmp_path):
    """A web UI install folder with every kind of model file."""
    root = tmp_path / "webui"
    models = root / "models"
    write(models / "Stable-diffusion" / "v1-5.safetensors", b"checkpoint one" * 50)
    write(models / "Stable-diffusion" / "anime" / "anything.ckpt", b"checkpoint two")
    write(models / "Stable-diffusion" / "old.pt", b"checkpoint three")
    write(models / "Stable-diffusion" / "v1-5.vae.pt", b"vae beside")
    write(models / "Stable-diffusion" / "v1-5.preview.png", b"png")
    write(models / "Stable-diffusion" / "readme.txt", b"text")
    write(models / "Stable-diffusion" / ".hidden.ckpt", b"hidden")
    write(models / "VAE" / "mse.safetensors", b"vae file")
    write_safetensors(
        models / "Lora" / "detail.safetensors", {"ss_output_name": "add_detail"}, b"AB"
    )
    write_safetensors(models / "Lora" / "sub" / "plain.safetensors", None, b"CD")
    write(models / "Lora" / "old_lora.pt", b"pickled lora")
    write_safetensors(
        models / "LyCORIS" / "loha.safetensors", {"sshs_model_hash": "AB" * 32}, b"EF"
    )
    write(root / "embeddings" / "easyneg.safetensors", b"ti one")
    write(root / "embeddings" / "more" / "style.pt", b"ti two")
    write(root / "embeddings" / "style.preview.png", b"png")
    return root


def test_finds_every_kind_recursively(install):
    library = ModelLibrary(install)
    by_kind = {
        kind: [(e.name, e.relative_path) for e in library.entries((kind,))]
        for kind in ("checkpoint", "lora", "vae", "embedding")
    }
    assert by_kind == {
        "checkpoint": [
            ("old", "old.pt"),
            ("v1-5", "v1-5.safetensors"),
            ("anything", "anime/anything.ckpt"),
        ],
        "lora": [
            ("detail", "detail.safetensors"),
            ("old_lora", "old_lora.pt"),
            ("plain", "sub/plain.safetensors"),
            ("loha", "loha.safetensors"),
        ],
        "vae": [("mse", "mse.safetensors"), ("v1-5.vae", "v1-5.vae.pt")],
        "embedding": [("easyneg", "easyneg.safetensors"), ("style", "more/style.pt")],
    }
    assert [e.alias for e in library.loras()] == ["add_detail", None, None, None]
    sizes = {e.name: e.size for e in library.entries()}
    assert sizes["v1-5"] == 14 * 50 and sizes["anything"] == 14


def test_short_hashes_follow_the_reference(install):
    library = ModelLibrary(install)
    models = install / "models"
    checkpoint = library.find("checkpoint", "v1-5")
    assert checkpoint.short_hash() == sha(b"checkpoint one" * 50)[:10]
    assert library.find("vae", "mse").short_hash() == sha(b"vae file")[:10]
    embedding = library.find("embedding", "style")
    assert embedding.short_hash() == sha(b"ti two")[:12]
    # LoRA safetensors: the addnet hash covers the tensor data only, not the header
    assert library.find("lora", "detail").short_hash() == sha(b"AB")[:12]
    assert library.find("lora", "plain").sha256() == sha(b"CD")
    assert library.find("lora", "old_lora").short_hash() == sha(b"pickled lora")[:12]
    # ... unless the file states its own hash (kohya's sshs_model_hash), as the reference uses
    loha = library.find("lora", "loha")
    assert loha.short_hash() == "ab" * 6
    assert loha.cached_sha256() == "ab" * 32
    assert sha((models / "LyCORIS" / "loha.safetensors").read_bytes())[:12] != "ab" * 6


def test_cached_hash_needs_no_read(install):
    library = ModelLibrary(install)
    checkpoint = library.find("checkpoint", "anything")
    assert checkpoint.cached_sha256() is None
    digest = checkpoint.sha256()
    assert checkpoint.cached_sha256() == digest == sha(b"checkpoint two")


def test_find_by_alias_and_path_and_suggestions(install):
    library = ModelLibrary(install)
    assert library.find("lora", "add_detail").name == "detail"
    assert library.find("checkpoint", "anime/anything.ckpt").name == "anything"
    assert library.find("checkpoint", "v1-5.safetensors").name == "v1-5"
    assert library.find("checkpoint", "anime/anything").name == "anything"  # no extension
    assert library.find("checkpoint", "anime\\anything.ckpt").name == "anything"
    folder = install / "models" / "Stable-diffusion"
    with pytest.raises(
        ModelNotFoundError,
        match=rf"^no checkpoint named 'v1-6' in {folder}; did you mean v1-5\?$",
    ):
        library.find("checkpoint", "v1-6")
    with pytest.raises(ModelLibraryError, match=r"unknown model kind 'loras'"):
        library.find("loras", "x")


def test_same_name_in_two_subfolders_is_ambiguous(install):
    folder = install / "models" / "Stable-diffusion"
    write(folder / "other" / "anything.safetensors", b"a second anything")
    library = ModelLibrary(install)
    message = (
        rf"^checkpoint name 'anything' is ambiguous in {folder}: anime/anything.ckpt, "
        r"other/anything.safetensors; give the relative path \(e.g. 'anime/anything.ckpt'\)$"
    )
    with pytest.raises(ModelLibraryError, match=message):
        library.find("checkpoint", "anything")
    assert library.find("checkpoint", "other/anything").path.suffix == ".safetensors"
    assert library.find("checkpoint", "anything.ckpt").relative_path == "anime/anything.ckpt"


def test_models_folder_itself_as_root_finds_embeddings_beside_it(install):
    library = ModelLibrary(install / "models")
    assert library.is_models_folder
    assert [e.name for e in library.vaes()] == ["mse", "v1-5.vae"]
    assert library.folders["embedding"] == (install / "embeddings",)
    assert [library.display_path(e.path) for e in library.embeddings()] == [
        "../embeddings/easyneg.safetensors",
        "../embeddings/more/style.pt",
    ]
    assert not ModelLibrary(install).is_models_folder


def test_partial_install_lists_what_exists(tmp_path):
    write(tmp_path / "embeddings" / "only.pt", b"x")
    library = ModelLibrary(tmp_path)
    assert [e.name for e in library.entries()] == ["only"]
    assert library.checkpoints() == [] and library.loras() == []


def test_root_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"models root folder not found: .*missing"):
        ModelLibrary(tmp_path / "missing")
    (tmp_path / "unrelated").mkdir()
    message = (
        r"does not look like a web UI install folder: none of models/Stable-diffusion, "
        r"models/Lora, models/LyCORIS, models/VAE, embeddings, models/ControlNet found"
    )
    with pytest.raises(ModelLibraryError, match=message):
        ModelLibrary(tmp_path)


def test_corrupt_lora_header_lists_without_alias_and_hash_errors(tmp_path):
    write(tmp_path / "models" / "Lora" / "broken.safetensors", b"\xff" * 20)
    library = ModelLibrary(tmp_path)
    message = (
        r"broken\.safetensors: corrupt or truncated safetensors header: .*; listed without "
        r"its alias \(ss_output_name\)$"
    )
    with pytest.warns(SdstackWarning, match=message):
        (entry,) = library.loras()
    assert entry.alias is None
    with pytest.raises(ValueError, match=r"broken\.safetensors: corrupt or truncated"):
        entry.sha256()


def test_symlink_loop_is_walked_once(tmp_path):
    folder = tmp_path / "models" / "Lora"
    write(folder / "a.pt", b"a")
    (folder / "loop").symlink_to(folder, target_is_directory=True)
    with pytest.warns(SdstackWarning, match=r"Lora/loop: links back to .*Lora, a folder it"):
        assert [p.name for p in iter_model_files(folder, (".pt",))] == ["a.pt"]


def test_lora_sha256_for_a_file_outside_a_library(tmp_path):
    data = write_safetensors(tmp_path / "x.safetensors", {"ss_network_dim": "4"}, b"xyz")
    assert lora_sha256(tmp_path / "x.safetensors") == sha(data)
    write_safetensors(tmp_path / "y.safetensors", {"sshs_model_hash": "0x" + "C" * 64}, b"")
    assert lora_sha256(tmp_path / "y.safetensors") == "c" * 64
