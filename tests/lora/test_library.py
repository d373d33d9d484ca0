"""Finding LoRA files by path, name, ss_output_name and hash; clip skip from metadata."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from sdstack.errors import SdstackWarning
from sdstack.lora.job_stack import resolve_specs
from sdstack.lora.library import LoraLibrary, LoraNotFoundError
from sdstack.lora.spec import LoraSpec
from sdstack.lora.trained_clip_skip import (
    agreed_clip_skip,
    clip_skip_advice,
    trained_clip_skip,
)
from sdstack.models.hash_cache import HashCache
from sdstack.models.library import ModelLibrary


def write_lora(path, metadata=None, value=1.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"lora_te_x.alpha": torch.tensor(value)}, str(path), metadata=metadata)
    return path


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("SDSTACK_CACHE_DIR", str(tmp_path / "cache"))
    write_lora(tmp_path / "webui/models/Lora/film.safetensors", {"ss_output_name": "film_v2"})
    write_lora(tmp_path / "webui/models/LyCORIS/styles/ink.safetensors", value=2.0)
    write_lora(tmp_path / "extra/detail.safetensors", value=3.0)
    return tmp_path


def test_names_resolve_by_path_stem_alias_and_relative_path(root):
    library = LoraLibrary(ModelLibrary(root / "webui"), [root / "extra"])
    film = root / "webui/models/Lora/film.safetensors"
    assert library.find(str(film)) == film
    assert library.find("film") == film
    assert library.find("film_v2") == film
    assert library.find("styles/ink") == root / "webui/models/LyCORIS/styles/ink.safetensors"
    assert library.find("detail") == root / "extra/detail.safetensors"


def test_unknown_name_lists_the_folders_and_the_closest(root):
    library = LoraLibrary(ModelLibrary(root / "webui"), [root / "extra"])
    with pytest.raises(LoraNotFoundError) as caught:
        library.find("flim")
    message = str(caught.value)
    assert message.startswith("no LoRA named 'flim' in ")
    assert str(root / "extra") in message and message.endswith("did you mean film?")


def test_no_folders_says_how_to_give_one():
    with pytest.raises(LoraNotFoundError, match=r"\(no LoRA folder: give --root with models/Lora"):
        LoraLibrary().find("film")


def test_a_missing_name_is_found_by_its_hash_once_hashed(root, monkeypatch):
    library = LoraLibrary(ModelLibrary(root / "webui"), [root / "extra"])
    detail = root / "extra/detail.safetensors"
    from sdstack.models.library import lora_sha256

    digest = lora_sha256(detail)  # hashing puts it in the cache, as `models list --hashes`
    specs = [LoraSpec("renamed_detail", 0.5), LoraSpec("film")]
    resolved = resolve_specs(specs, library, {"renamed_detail": digest[:12]})
    assert [s.name for s in resolved] == [
        str(detail),
        str(root / "webui/models/Lora/film.safetensors"),
    ]
    assert resolved[0].te == 0.5


def test_every_name_not_found_is_listed_once(root):
    library = LoraLibrary(ModelLibrary(root / "webui"))
    with pytest.raises(LoraNotFoundError) as caught:
        resolve_specs(
            [LoraSpec("a"), LoraSpec("film"), LoraSpec("b")], library, {"a": "0123456789ab"}
        )
    assert str(caught.value).startswith(
        "could not find 2 LoRA(s) by name or hash: a (hash 0123456789ab), b; searched in "
    )


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ({"ss_clip_skip": "2"}, 2),
        ({"ss_clip_skip": "None", "modelspec.encoder_layer": "2"}, 2),
        ({"ss_clip_skip": "None"}, None),
        ({"ss_clip_skip": "1"}, 1),
        ({"ss_clip_skip": "13"}, None),
        ({"ss_clip_skip": "1.5"}, None),
        ({"modelspec.encoder_layer": "x"}, None),
        ({}, None),
    ],
)
def test_trained_clip_skip(metadata, expected):
    assert trained_clip_skip(metadata) == expected


def lora(name, clip_skip=None):
    metadata = {} if clip_skip is None else {"ss_clip_skip": str(clip_skip)}
    return SimpleNamespace(name=name, file=SimpleNamespace(metadata=metadata))


def test_auto_clip_skip_uses_the_agreed_value_else_1():
    assert agreed_clip_skip([lora("a", 2), lora("b"), lora("c", 2)]) == 2
    assert agreed_clip_skip([lora("a", 2), lora("b", 1)]) == 1
    assert agreed_clip_skip([lora("a")]) == 1
    assert agreed_clip_skip([]) == 1


def test_advice_names_the_loras_and_the_fix():
    assert clip_skip_advice([lora("anime", 2), lora("x")], 2) is None
    assert clip_skip_advice([lora("anime", 2), lora("x")], 1) == (
        "clip skip 1 is in use, but LoRA(s) were trained with another: anime at 2; they may "
        "look wrong; try --clip-skip 2 (or --clip-skip auto)"
    )
    assert "the clip skip of the LoRA that matters most" in clip_skip_advice(
        [lora("a", 2), lora("b", 1)], 1.5
    )


def test_hash_cache_is_isolated(root):
    # The fixture points the cache at tmp: nothing of the user's cache is read.
    assert str(HashCache().path).startswith(str(root))


def test_a_file_found_by_name_with_another_hash_is_used_with_a_warning(root):
    library = LoraLibrary(ModelLibrary(root / "webui"))
    with pytest.warns(
        SdstackWarning, match=r"^LoRA film: the infotext's hash is 0123456789ab, but "
    ):
        resolved = resolve_specs([LoraSpec("film")], library, {"film": "0123456789ab"})
    assert resolved[0].name.endswith("film.safetensors")
