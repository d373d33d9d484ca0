"""``inspect_lora``: the report of files the tests write, and hostile metadata as notes."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch

from sdstack.lora import inspect as inspect_module
from sdstack.lora.inspect import (
    InspectError,
    guess_base_model,
    inspect_lora,
    parse_resolution,
    render_report,
    tag_report,
    training_report,
)
from tests.lora import lora_files as lf

TAGS = {"10_film": {"1girl": 3, " solo": 2, "smile": 1}, "2_reg": {"solo": 4, "outdoors": 1}}
METADATA = {
    "ss_clip_skip": "2",
    "ss_tag_frequency": json.dumps(TAGS),
    "ss_resolution": "(512, 768)",
    "ss_network_module": "networks.lora",
    "ss_network_dim": "4",
    "ss_network_alpha": "2.0",
    "ss_network_args": json.dumps({"conv_dim": "4", "conv_alpha": "1"}),
    "ss_output_name": "film-grain",
    "ss_base_model_version": "sd_v1",
    "ss_num_epochs": "10",
}
# Blocks of lf.KOHYA_LAYERS by the spec's rule (down_blocks.i.*.j -> IN(3i+j+1),
# up_blocks.i.*.j -> OUT(3i+j), mid_block -> M00, text encoder -> BASE).
EXPECTED_BLOCKS = {"BASE": 3, "IN01": 1, "IN04": 6, "M00": 2, "OUT01": 1, "OUT05": 1}


@pytest.fixture(autouse=True)
def hash_cache(tmp_path, monkeypatch):
    """Hashes go to a cache of this test, not the user's."""
    from sdstack.models import hash_cache

    monkeypatch.setenv("SDSTACK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(hash_cache, "_default_cache", hash_cache.HashCache())


@pytest.fixture
def key_map(tiny_components):
    from sdstack.models.key_map import key_map_of

    return key_map_of(tiny_components)


@pytest.fixture
def kohya(tiny_components, tmp_path):
    return lf.write_kohya(tmp_path / "film.safetensors", tiny_components, METADATA, seed=1)


def addnet(path) -> str:
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little") :]).hexdigest()


def test_kohya_file_report(kohya, key_map):
    report = inspect_lora(kohya, key_map=key_map)
    count = len(lf.KOHYA_LAYERS)
    assert report["format"] == "kohya"
    assert report["modules"] == count
    assert report["algorithms"] == {"lora": count}
    assert report["rank_alpha"] == [
        {"algorithm": "lora", "rank": 4, "alpha": 2.0, "scale": 0.5, "modules": count}
    ]
    assert report["components"] == {"unet": 11, "text_encoder": 3}
    assert report["blocks"] == EXPECTED_BLOCKS
    assert report["lbw_blocks"] == {k: v for k, v in EXPECTED_BLOCKS.items() if k != "OUT01"}
    assert report["outside_lbw"] == 1
    assert {row["layer"] for row in report["module_list"]} == set(lf.KOHYA_LAYERS)
    assert report["base_model"] == {"guess": "SD1", "evidence": "ss_base_model_version 'sd_v1'"}
    assert report["training"] == {
        "output_name": "film-grain",
        "network_module": "networks.lora",
        "base_model_version": "sd_v1",
        "epochs": "10",
        "network_dim": 4,
        "network_alpha": 2,
        "network_args": {"conv_dim": "4", "conv_alpha": "1"},
        "clip_skip": 2,
        "resolution": [512, 768],
    }
    assert report["tags"] == {
        "datasets": 2,
        "unique_tags": 4,
        "top": [["solo", 6], ["1girl", 3], ["outdoors", 1], ["smile", 1]],
    }
    digest = addnet(kohya)
    assert report["hashes"] == {
        "lora_hash": digest,
        "addnet_hash": digest,
        "sshs_model_hash": None,
        "sshs_matches": None,
        "short_hash": digest[:12],
    }
    assert report["unmatched"] == [] and report["embeddings"] == {}
    assert report["notes"] == []
    json.dumps(report)  # serialisable as it is


def test_text_rendering(kohya, key_map):
    text = render_report(inspect_lora(kohya, key_map=key_map, top_tags=2))
    lines = text.splitlines()
    assert lines[1] == "base model: SD1 (ss_base_model_version 'sd_v1')"
    assert lines[2] == "format: kohya"
    assert lines[3] == "modules: 14 (lora 14); unet 11, text_encoder 3"
    assert lines[4] == "  lora rank 4 alpha 2 (scale 0.5): 14 modules"
    assert "  clip skip: 2" in lines and "  resolution: 512x768" in lines
    assert "tags: 4 in 2 dataset(s); most frequent: solo 6, 1girl 3" in lines
    assert f"hash: {addnet(kohya)[:12]} (full {addnet(kohya)}; no sshs_model_hash)" in lines


def test_stored_sshs_hash_is_checked(tiny_components, key_map, tmp_path):
    state = lf.lora_state(tiny_components)
    good = lf.save(tmp_path / "a.safetensors", state)
    digest = addnet(good)
    lf.save(good, state, {"sshs_model_hash": digest})
    report = inspect_lora(good, key_map=key_map)
    assert report["hashes"]["sshs_matches"] is True and report["notes"] == []
    wrong = "ab" * 32
    lf.save(good, state, {"sshs_model_hash": wrong})
    report = inspect_lora(good, key_map=key_map)
    assert report["hashes"]["lora_hash"] == wrong  # what the reference UI writes
    assert report["hashes"]["addnet_hash"] == digest
    assert report["hashes"]["sshs_matches"] is False
    assert report["notes"] == [
        "sshs_model_hash differs from the file's tensor hash (edited after training?); "
        "infotexts use the stored one"
    ]


def test_unmatched_keys_and_bundled_embeddings_are_listed(tiny_components, key_map, tmp_path):
    state = lf.lora_state(tiny_components, layers=lf.LINEAR_LAYERS[:1])
    state["lora_unet_no_such_block.lora_down.weight"] = torch.zeros(4, 8)
    state.update(lf.bundle_state(tiny_components))
    path = lf.save(tmp_path / "mixed.safetensors", state)
    report = inspect_lora(path, key_map=key_map, hashes=False)
    assert report["unmatched"] == ["lora_unet_no_such_block.lora_down.weight"]
    assert report["embeddings"] == {"starry": 3, "paramed": 2, "concept": 1, "vector": 1}
    assert report["hashes"] is None
    assert "unmatched keys (1): lora_unet_no_such_block.lora_down.weight" in render_report(report)


@pytest.mark.parametrize(
    ("state", "guess"),
    [(lf.sdxl_like_state, "SDXL"), (lf.sd2_like_state, "SD2")],
)
def test_foreign_lora_is_reported_not_refused(tmp_path, state, guess):
    path = lf.save(tmp_path / "other.safetensors", state())
    report = inspect_lora(path, hashes=False)
    assert report["base_model"]["guess"] == guess
    assert report["modules"] is None and report["format"] is None
    assert report["notes"][0].startswith(f"modules not matched: {path}: is an")
    assert f"modules: not read (a LoRA for {guess})" in render_report(report)


def test_base_model_guess_from_widths_and_metadata(tmp_path):
    path = tmp_path / "x.safetensors"
    sd1_key = (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"
    )
    assert guess_base_model(path, {}, {sd1_key: (4, 768)}) == {
        "guess": "SD1",
        "evidence": f"{sd1_key!r} is 768 wide",
    }
    assert guess_base_model(path, {}, {sd1_key: (4, 2048)})["guess"] == "SDXL"
    assert guess_base_model(path, {}, {sd1_key: (4, 1024)})["guess"] == "SD2"
    assert guess_base_model(path, {"modelspec.architecture": "stable-diffusion-v1/lora"}, {}) == {
        "guess": "SD1",
        "evidence": "modelspec.architecture 'stable-diffusion-v1/lora'",
    }
    assert guess_base_model(path, {}, {sd1_key: (4, 32)})["guess"] == "unknown"


def test_hostile_metadata_becomes_notes(tiny_components, key_map, tmp_path, monkeypatch):
    monkeypatch.setattr(inspect_module, "MAX_JSON_CHARS", 1000)
    metadata = {
        "ss_clip_skip": "two",
        "ss_tag_frequency": json.dumps({"d": {"a": "x", "b": -1, "c": 2, "t": True}, "e": 5}),
        "ss_resolution": "huge",
        "ss_network_dim": "lots",
        "ss_network_alpha": "None",
        "ss_network_args": "[1, 2]",
        "ss_training_comment": "x" * 5000,
        "modelspec.encoder_layer": "None",
    }
    path = lf.write_kohya(tmp_path / "bad.safetensors", tiny_components, metadata)
    report = inspect_lora(path, key_map=key_map, hashes=False)
    assert report["training"] == {"training_comment": "x" * 2000 + "..."}
    assert report["tags"] == {"datasets": 2, "unique_tags": 1, "top": [["c", 2]]}
    assert report["notes"] == [
        "ss_training_comment: 5000 characters; shown cut to 2000",
        "ss_network_dim: 'lots' is not a number; ignored",
        "ss_network_args: a JSON list; expected an object",
        "ss_clip_skip: 'two' is not a clip skip (expected 1 to 12); unknown",
        "ss_resolution: 'huge' is not a resolution; ignored",
        "ss_tag_frequency: 4 entries that are not tag counts; skipped",
    ]
    render_report(report)


@pytest.mark.parametrize(
    ("raw", "note"),
    [
        ("[" * 100_000, "ss_tag_frequency: not JSON"),
        ("{not json", "ss_tag_frequency: not JSON"),
        ('"a string"', "ss_tag_frequency: a JSON str; expected an object"),
        ("x" * 2000, "ss_tag_frequency: 2000 characters of JSON; not parsed (at most 1000)"),
    ],
)
def test_tag_frequency_that_is_not_tags(raw, note, monkeypatch):
    monkeypatch.setattr(inspect_module, "MAX_JSON_CHARS", 1000 if len(raw) == 2000 else 10**7)
    notes: list[str] = []
    assert tag_report(raw, 20, notes) is None
    assert len(notes) == 1 and notes[0].startswith(note)


@pytest.mark.parametrize(
    ("text", "size"),
    [("(512, 768)", [512, 768]), ("512,512", [512, 512]), ("768", [768, 768]),
     ("[640, 384]", [640, 384]), ("0, 5", None), ("1.5, 2", None), ("a", None), (None, None)],
)  # fmt: skip
def test_parse_resolution(text, size):
    assert parse_resolution(text) == size


def test_metadata_part_needs_no_torch():
    code = (
        "import sys, json\n"
        "from sdstack.lora.inspect import training_report, tag_report\n"
        "notes = []\n"
        "r = training_report({'ss_clip_skip': '2', 'ss_resolution': '(512, 512)'}, notes)\n"
        "t = tag_report(json.dumps({'a': {'x': 1}}), 5, notes)\n"
        "assert r == {'clip_skip': 2, 'resolution': [512, 512]}, r\n"
        "assert t['top'] == [['x', 1]] and not notes\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_training_report_of_empty_metadata():
    assert training_report({}, []) == {}


def test_missing_file(tmp_path):
    with pytest.raises(InspectError) as error:
        inspect_lora(tmp_path / "none.safetensors")
    assert str(error.value) == (
        f"{tmp_path / 'none.safetensors'}: no such file; expected a LoRA file (.safetensors, .pt)"
    )


def test_pickle_lora(tiny_components, key_map, tmp_path):
    """A ``.pt`` LoRA has no metadata; its hash is the whole file's sha256 (reference)."""
    path = lf.save(tmp_path / "old.pt", lf.lora_state(tiny_components, layers=lf.LINEAR_LAYERS))
    report = inspect_lora(path, key_map=key_map)
    assert report["format"] == "kohya" and report["modules"] == len(lf.LINEAR_LAYERS)
    assert report["training"] == {} and report["tags"] is None
    assert report["hashes"]["lora_hash"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert report["base_model"]["guess"] == "unknown"
