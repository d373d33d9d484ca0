"""Hostile textual-inversion files, written into tmp_path: storage and zip bombs, pickles
that want to run code, shapes far beyond one prompt chunk, corrupt safetensors. A file
named on its own raises ``EmbeddingError`` (pinned message); in a folder it is skipped
with one ``SdstackWarning`` and the good files still load. Bombs run under an
address-space cap that the allocation they declare could not pass."""

from __future__ import annotations

import os
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdstack.errors import SdstackWarning
from sdstack.text.embeddings import (
    EmbeddingError,
    EmbeddingLibrary,
    EmbeddingWarning,
    load_embedding_file,
)
from tests.models.test_hostile_files import (
    GIB,
    Call,
    StorageRef,
    TensorRef,
    address_space_cap,
    f32,
    write_legacy_torch,
    write_safetensors,
    write_zip_torch,
)

WIDTH = 768


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SDSTACK_CACHE_DIR", str(tmp_path / "cache"))


def vectors(n: int, width: int = WIDTH, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def legacy_bomb(path: Path) -> str:
    """The probe's file: ~350 bytes declaring a 4 GiB float32 (n, 768) embedding."""
    storage = StorageRef("0", GIB)
    obj = {"string_to_param": {"*": TensorRef(storage, (GIB // WIDTH, WIDTH), (WIDTH, 1))}}
    write_legacy_torch(path, obj, [("0", GIB, b"")])
    size = path.stat().st_size
    return (
        f"not a readable torch file (truncated: storage '0' needs {4 * GIB} bytes from byte "
        f"{size} but the file has {size} bytes)"
    )


def zip_bomb(path: Path) -> str:
    numel = 2**20  # 4 MiB of zeros, deflated to a few KiB
    storage = StorageRef("0", numel)
    obj = {"emb_params": TensorRef(storage, (numel // WIDTH, WIDTH), (WIDTH, 1))}
    write_zip_torch(path, obj, {"0": bytes(4 * numel)}, compress=zipfile.ZIP_DEFLATED)
    return (
        "not a readable torch file (record archive/data/0 is compressed (zip method 8); "
        "torch.save stores tensor data uncompressed, and a compressed record could inflate "
        "to any size, so it is not read)"
    )


def wants_system(path: Path) -> str:
    marker = path.with_suffix(".executed")
    write_zip_torch(path, {"emb_params": Call(os.system, f"touch {marker}")}, {})
    return (
        "refused to unpickle: the weights-only unpickler refuses to call posix.system "
        "(nothing from the file was run; an embedding holds only tensors); re-save it as "
        ".safetensors from a trusted source"
    )


def broadcast(path: Path) -> str:
    storage = StorageRef("0", WIDTH)  # one stored vector viewed as 2**20 of them
    obj = {"emb_params": TensorRef(storage, (2**20, WIDTH), (0, 1))}
    write_zip_torch(path, obj, {"0": bytes(4 * WIDTH)})
    return (
        f"not a readable torch file (a tensor of shape [{2**20}, {WIDTH}] (stride [0, 1], "
        f"offset 0) needs {2**20 * WIDTH} elements but its storage holds {WIDTH})"
    )


def many_vectors(path: Path) -> str:
    """100000 vectors declared in a sparse file: nothing of it may be read or converted."""
    shape = [100_000, WIDTH]
    nbytes = 2 * shape[0] * WIDTH
    header = {"emb_params": {"dtype": "F16", "shape": shape, "data_offsets": [0, nbytes]}}
    write_safetensors(path, header)
    os.truncate(path, path.stat().st_size + nbytes)
    return "embedding has 100000 vectors; at most 75 fit in a prompt (one chunk of 75 tokens)"


def wide(path: Path) -> str:
    width = 50_000_000  # a 200 MB (sparse) single vector, 400 MB once converted
    header = {"emb_params": {"dtype": "F32", "shape": [width], "data_offsets": [0, 4 * width]}}
    write_safetensors(path, header)
    os.truncate(path, path.stat().st_size + 4 * width)
    return f"embedding width {width} does not match the model's token embedding width 768"


def trailing(path: Path) -> str:
    write_safetensors(path, f32("emb_params", [WIDTH], 0, 4 * WIDTH), bytes(4 * WIDTH + 3))
    size = path.stat().st_size
    return (
        f"not a readable safetensors file (corrupt safetensors file: 3 bytes after the last "
        f"tensor (the header accounts for {size - 3} of the file's {size} bytes; the format "
        "allows no trailing data))"
    )


def deep(path: Path) -> str:
    write_safetensors(path, b"[" * 100_000 + b"]" * 100_000)
    return (
        "not a readable safetensors file (corrupt safetensors header: the JSON is nested too "
        "deeply to be a safetensors header (which is one object of tensor entries))"
    )


HOSTILE = {
    "legacy-bomb.pt": legacy_bomb,
    "zip-bomb.pt": zip_bomb,
    "system.pt": wants_system,
    "broadcast.bin": broadcast,
    "many.safetensors": many_vectors,
    "wide.safetensors": wide,
    "trailing.safetensors": trailing,
    "deep.safetensors": deep,
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
@pytest.mark.timeout(20)
def test_a_hostile_file_named_alone_is_an_error(tmp_path, name):
    path = tmp_path / name
    reason = HOSTILE[name](path)
    with pytest.raises(EmbeddingError) as caught, address_space_cap(256 * 2**20):
        load_embedding_file(path, width=WIDTH)
    assert str(caught.value) == f"{path}: {reason}"
    assert not path.with_suffix(".executed").exists()


@pytest.mark.timeout(30)
def test_a_folder_of_hostile_files_warns_for_each_and_loads_the_rest(tmp_path):
    root = tmp_path / "embeddings"
    root.mkdir()
    reasons = {name: build(root / name) for name, build in HOSTILE.items()}
    good = vectors(2, seed=3)
    save_file({"emb_params": good}, root / "good.safetensors")
    with warnings.catch_warnings(record=True) as caught, address_space_cap(256 * 2**20):
        warnings.simplefilter("always")
        library = EmbeddingLibrary.from_dir(root, width=WIDTH)
    assert list(library) == ["good"]
    assert torch.equal(library["good"].vectors, good)
    expected = sorted(f"skipped embedding {root / name}: {why}" for name, why in reasons.items())
    assert sorted(str(w.message) for w in caught) == expected
    assert all(issubclass(w.category, SdstackWarning) for w in caught)
    assert issubclass(EmbeddingWarning, SdstackWarning)
    assert sorted(path.name for path, _ in library.skipped) == sorted(HOSTILE)


@pytest.mark.parametrize(
    ("tensor", "reason"),
    [
        (
            vectors(76).half(),
            "embedding has 76 vectors; at most 75 fit in a prompt (one chunk of 75 tokens)",
        ),
        (
            vectors(2, 1024).half(),
            "embedding width 1024 (a SD2.x embedding?) does not match the model's token "
            "embedding width 768",
        ),
    ],
)
def test_shape_and_width_are_checked_before_any_conversion(tmp_path, monkeypatch, tensor, reason):
    path = tmp_path / "big.pt"
    torch.save({"string_to_param": {"*": tensor}}, path)

    def no_conversion(*args, **kwargs):
        raise AssertionError("a tensor was converted before its shape was checked")

    monkeypatch.setattr(torch.Tensor, "to", no_conversion)
    with pytest.raises(EmbeddingError) as caught:
        load_embedding_file(path, width=WIDTH)
    assert str(caught.value) == f"{path}: {reason}"


def test_75_vectors_still_load(tmp_path):
    path = tmp_path / "full-chunk.pt"
    torch.save({"string_to_param": {"*": vectors(75).half()}}, path)
    assert torch.equal(load_embedding_file(path, width=WIDTH).vectors, vectors(75).half().float())


def test_safetensors_embedding_reads_only_its_tensor(tmp_path):
    """A legitimate file: the vectors come back equal, as float32, not views of the file."""
    path = tmp_path / "neg.safetensors"
    expected = vectors(3, seed=5).bfloat16()
    save_file({"emb_params": expected}, path)
    embedding = load_embedding_file(path, width=WIDTH)
    assert embedding.vectors.dtype == torch.float32
    assert torch.equal(embedding.vectors, expected.float())
