"""Textual-inversion files: every layout written here, loaded, compared to the tensor saved."""

from __future__ import annotations

import hashlib
import os
import re
import warnings

import pytest
import torch
from safetensors.torch import save_file

from sdstack.text.embeddings import (
    Embedding,
    EmbeddingError,
    EmbeddingLibrary,
    EmbeddingWarning,
    load_embedding_file,
)

WIDTH = 768


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SDSTACK_CACHE_DIR", str(tmp_path / "cache"))


class Payload:
    """A custom class: weights-only loading must refuse to rebuild it."""

    def __reduce__(self):
        return (os.getcwd, ())


def vectors(n: int, width: int = WIDTH, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def write_reference_pt(path, tensor):
    """The reference UI's own layout, with its non-tensor keys."""
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": torch.nn.Parameter(tensor)},
            "name": "some-other-name",
            "step": 1500,
            "sd_checkpoint": "e1441589a6",
            "sd_checkpoint_name": "v1-5-pruned",
        },
        path,
    )


def test_reference_pt_layout(tmp_path):
    expected = vectors(3)
    path = tmp_path / "my-style.pt"
    write_reference_pt(path, expected)
    embedding = load_embedding_file(path, width=WIDTH)
    assert embedding.name == "my-style"  # the stem, not the "name" key
    assert torch.equal(embedding.vectors, expected)
    assert embedding.vectors.dtype == torch.float32 and not embedding.vectors.requires_grad
    assert embedding.num_vectors == 3 and embedding.width == WIDTH
    assert embedding.path == path
    assert embedding.short_hash == hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def test_original_textual_inversion_parameter_dict(tmp_path):
    expected = vectors(2, seed=7)
    path = tmp_path / "original.pt"
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(expected)})
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": params}, path)
    assert torch.equal(load_embedding_file(path, width=WIDTH).vectors, expected)


def test_diffusers_bin_single_token_dict(tmp_path):
    expected = vectors(1)[0]  # diffusers saves (width,)
    path = tmp_path / "cat-toy.bin"
    torch.save({"<cat-toy>": expected}, path)
    embedding = load_embedding_file(path, width=WIDTH)
    assert embedding.vectors.shape == (1, WIDTH)
    assert torch.equal(embedding.vectors[0], expected)


@pytest.mark.parametrize("key", ["emb_params", "whatever_key"])
def test_safetensors_single_tensor(tmp_path, key):
    expected = vectors(4, seed=1).half()
    path = tmp_path / "neg.safetensors"
    save_file({key: expected}, path)
    embedding = load_embedding_file(path, width=WIDTH)
    assert embedding.vectors.dtype == torch.float32
    assert torch.equal(embedding.vectors, expected.float())
    assert embedding.short_hash == hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def test_sdxl_file_is_refused_as_sdxl(tmp_path):
    path = tmp_path / "xl.safetensors"
    save_file({"clip_l": vectors(2), "clip_g": vectors(2, 1280)}, path)
    with pytest.raises(EmbeddingError, match=r"xl\.safetensors: this is an SDXL embedding"):
        load_embedding_file(path, width=WIDTH)


def test_wrong_width_names_the_width(tmp_path):
    path = tmp_path / "sd2.pt"
    torch.save({"string_to_param": {"*": vectors(2, 1024)}}, path)
    message = r"sd2\.pt: embedding width 1024 \(a SD2\.x embedding\?\) does not match the model's"
    with pytest.raises(EmbeddingError, match=message):
        load_embedding_file(path, width=WIDTH)
    assert load_embedding_file(path).width == 1024  # width=None: no check


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"a": torch.zeros(768), "b": torch.zeros(768)}, r"expected 'string_to_param' or exactly"),
        ({"name": "x"}, r"exactly one tensor, got \{'name': str\}"),
        ({"string_to_param": {"*": torch.zeros(1, 768), "x": torch.zeros(1, 768)}}, r"exactly"),
        (
            {"t": torch.zeros(2, 3, 768)},
            r"shape \(vectors, width\) or \(width,\), got \(2, 3, 768\)",
        ),
        ({"t": torch.zeros(0, 768)}, r"got \(0, 768\)"),
        (
            {"t": torch.zeros(2, 768, dtype=torch.int64)},
            r"must be floating point, got torch\.int64",
        ),
        ([1, 2], r"expected a dict of tensors, got list"),
    ],
)
def test_unrecognised_layouts(tmp_path, content, message):
    path = tmp_path / "odd.pt"
    torch.save(content, path)
    with pytest.raises(EmbeddingError, match=message):
        load_embedding_file(path, width=WIDTH)


def test_malicious_pickle_is_refused_not_run(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": Payload()}}, path)
    message = (
        r"evil\.pt: refused to unpickle: the weights-only unpickler refuses to call "
        r"posix\.getcwd \(nothing from the file was run; an embedding holds only tensors\); "
        r"re-save it as \.safetensors from a trusted source$"
    )
    with pytest.raises(EmbeddingError, match=message):
        load_embedding_file(path)


@pytest.mark.parametrize(
    ("name", "blob", "message"),
    [
        ("junk.pt", b"\x07" * 300, r"junk\.pt: not a readable torch file"),
        ("empty.bin", b"", r"empty\.bin: not a readable torch file \(empty file\)"),
        ("junk.safetensors", b"\x07" * 300, r"junk\.safetensors: not a readable safetensors"),
    ],
)
def test_corrupt_bytes(tmp_path, name, blob, message):
    path = tmp_path / name
    path.write_bytes(blob)
    with pytest.raises(EmbeddingError, match=message):
        load_embedding_file(path)


def test_truncated_torch_file(tmp_path):
    path = tmp_path / "cut.pt"
    write_reference_pt(path, vectors(2))
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(EmbeddingError, match=r"cut\.pt: not a readable torch file \(.+\)"):
        load_embedding_file(path)


def test_bad_arguments(tmp_path):
    with pytest.raises(EmbeddingError, match=r"unsupported embedding file type '\.png'"):
        load_embedding_file(tmp_path / "a.png")
    with pytest.raises(FileNotFoundError, match=r"embedding file not found: .*gone\.pt"):
        load_embedding_file(tmp_path / "gone.pt")
    with pytest.raises(FileNotFoundError, match=r"embeddings folder not found"):
        EmbeddingLibrary.from_dir(tmp_path / "nothing")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(EmbeddingError, match=r"embeddings path is not a folder: .*file\.txt"):
        EmbeddingLibrary.from_dir(tmp_path / "file.txt")


def build_folder(root):
    """A folder mixing good files, bad files, previews and a subfolder."""
    root.mkdir()
    write_reference_pt(root / "style.pt", vectors(2, seed=1))
    torch.save({"<tok>": vectors(1, seed=2)[0]}, root / "token.bin")
    save_file({"emb_params": vectors(8, seed=3)}, root / "bad-hands.safetensors")
    torch.save({"string_to_param": {"*": vectors(1, 1024)}}, root / "sd2.pt")
    (root / "broken.pt").write_bytes(b"not a torch file at all")
    torch.save({"x": Payload()}, root / "evil.pt")
    save_file({"clip_l": vectors(1), "clip_g": vectors(1, 1280)}, root / "xl.safetensors")
    (root / "style.preview.png").write_bytes(b"\x89PNG fake")
    (root / "style.preview.pt").write_bytes(b"skipped because of .preview.")
    (root / "notes.txt").write_text("ignored")
    (root / ".hidden.pt").write_bytes(b"ignored")
    sub = root / "sub" / "deeper"
    sub.mkdir(parents=True)
    torch.save({"emb_params": vectors(3, seed=4)}, sub / "nested.pt")
    torch.save({"emb_params": vectors(5, seed=5)}, sub / "style.pt")  # duplicate stem


def test_from_dir_loads_the_good_files_and_warns_once_per_bad_one(tmp_path):
    root = tmp_path / "embeddings"
    build_folder(root)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        library = EmbeddingLibrary.from_dir(root, width=WIDTH)
    messages = sorted(str(w.message) for w in caught if w.category is EmbeddingWarning)
    assert len(caught) == len(messages) == 5
    patterns = [
        r"skipped embedding .*broken\.pt: not a readable torch file",
        r"skipped embedding .*evil\.pt: refused to unpickle",
        r"skipped embedding .*sd2\.pt: embedding width 1024",
        r"skipped embedding .*deeper/style\.pt: duplicate embedding name 'style', already "
        r"loaded from .*embeddings/style\.pt; keeping the first",
        r"skipped embedding .*xl\.safetensors: this is an SDXL embedding",
    ]
    for pattern in patterns:
        assert sum(bool(re.match(pattern, m)) for m in messages) == 1, pattern
    assert sorted(library) == ["bad-hands", "nested", "style", "token"]
    assert library.vector_counts() == {"bad-hands": 8, "style": 2, "token": 1, "nested": 3}
    assert torch.equal(library["style"].vectors, vectors(2, seed=1))
    assert len(library.skipped) == 5
    assert all(isinstance(e, Embedding) for e in library.values())


def test_from_dir_single_warning_is_pinned(tmp_path):
    root = tmp_path / "emb"
    root.mkdir()
    torch.save({"emb_params": vectors(1)}, root / "ok.pt")
    (root / "bad.safetensors").write_bytes(b"")
    with pytest.warns(EmbeddingWarning, match=r"skipped embedding .*bad\.safetensors: not a"):
        library = EmbeddingLibrary.from_dir(root)
    assert list(library) == ["ok"]


def test_library_constructor_refuses_duplicates():
    first = Embedding("a", vectors(1))
    with pytest.raises(EmbeddingError, match=r"duplicate embedding name 'a'"):
        EmbeddingLibrary([first, Embedding("a", vectors(2))])
    assert EmbeddingLibrary([first]).vector_counts() == {"a": 1}


def test_original_parameter_dict_in_the_legacy_format(tmp_path):
    """torch.save(..., _use_new_zipfile_serialization=False) of an nn.ParameterDict: the
    module's class comes as a 'module' persistent id; still read as its parameters."""
    expected = vectors(2, seed=9)
    path = tmp_path / "old.pt"
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(expected)})
    torch.save({"string_to_param": params}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(load_embedding_file(path, width=WIDTH).vectors, expected)


def test_folder_warnings_are_sdstack_warnings(tmp_path):
    from sdstack.errors import SdstackWarning

    root = tmp_path / "emb"
    root.mkdir()
    (root / "bad.pt").write_bytes(b"\x80\x02]q\x00.")  # a pickle of [], not an embedding
    with pytest.warns(SdstackWarning) as caught:
        EmbeddingLibrary.from_dir(root)
    assert [str(w.message) for w in caught] == [
        f"skipped embedding {root / 'bad.pt'}: not a readable torch file (a pickle without "
        "torch's magic number: not a torch.save file)"
    ]
