"""save_lora: kohya's sshs hashes, atomic writes, and the saved file read by sdstack and diffusers.

Independent truths: the hashes against ``sdstack.models.hashes`` (the reference UI's
addnet and legacy hashes) run on a file ``safetensors.torch.save_file`` writes with only the
``ss_*`` metadata; the trained network's forward against diffusers' ``load_lora_weights``
(PEFT, unfused) on the same tiny model in float64, and ``sdstack.lora.set_loras`` (weights
patched in float32) against the merged-weight formula.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdstack.lora.formats import read_lora
from sdstack.models.hashes import addnet_hash, legacy_model_hash
from sdstack.models.key_map import key_map_of, live_module
from sdstack.models.tiny import tiny_components
from sdstack.train.network import TrainableLora
from sdstack.train.save import LoraSaveError, safetensors_hashes, save_lora

F64 = torch.float64
U32 = 2.0**-24


@pytest.fixture(autouse=True)
def hash_cache(tmp_path, monkeypatch):
    from sdstack.models import hash_cache

    monkeypatch.setenv("SDSTACK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(hash_cache, "_default_cache", hash_cache.HashCache())


def big_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """More than 0x110000 bytes, so that the legacy window is full."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "lora_unet_x.lora_down.weight": torch.randn(4, 80_000, generator=generator),
        "lora_unet_x.lora_up.weight": torch.randn(64, 4, generator=generator).half(),
        "lora_unet_x.alpha": torch.tensor(2.0),
    }


METADATA = {
    "ss_network_dim": "4",
    "ss_clip_skip": "2",
    "ss_tag_frequency": json.dumps({"1_x": {"ink": 2}}),
    "modelspec.title": "x",
}


def file_metadata(path) -> dict[str, str]:
    with safe_open(str(path), "pt") as file:
        return file.metadata()


def test_sshs_hashes_are_the_hashes_of_the_ss_only_file(tmp_path):
    tensors = big_tensors()
    saved = save_lora(tmp_path / "out.safetensors", tensors, METADATA)
    reference = tmp_path / "reference.safetensors"
    only_ss = {k: v for k, v in METADATA.items() if k.startswith("ss_")}
    save_file(tensors, str(reference), metadata=only_ss)
    assert reference.stat().st_size > 0x110000
    written = file_metadata(saved.path)
    assert written == saved.metadata
    assert written["sshs_model_hash"] == addnet_hash(reference, use_cache=False)
    assert written["sshs_legacy_hash"] == legacy_model_hash(reference)
    # the tensor bytes do not depend on the metadata: the file's own addnet hash agrees
    assert written["sshs_model_hash"] == addnet_hash(saved.path, use_cache=False)
    assert {k: written[k] for k in METADATA} == METADATA
    loaded = load_file(str(saved.path))
    assert all(torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype for k, v in tensors.items())


def test_only_ss_keys_are_hashed(tmp_path):
    tensors = big_tensors()
    first = save_lora(tmp_path / "a.safetensors", tensors, METADATA).metadata
    other_title = {**METADATA, "modelspec.title": "another title, longer"}
    second = save_lora(tmp_path / "b.safetensors", tensors, other_title).metadata
    other_ss = {**METADATA, "ss_training_comment": "sixteen more chars"}
    third = save_lora(tmp_path / "c.safetensors", tensors, other_ss).metadata
    hashes = ("sshs_model_hash", "sshs_legacy_hash")
    assert [first[k] for k in hashes] == [second[k] for k in hashes]
    # an ss_ value moves the header, so the legacy window (not the tensor hash) changes
    assert first["sshs_model_hash"] == third["sshs_model_hash"]
    assert first["sshs_legacy_hash"] != third["sshs_legacy_hash"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"old")

    def full_disk(_fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(LoraSaveError, match="cannot write \\(No space left on device\\)"):
        save_lora(target, big_tensors(), METADATA)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == ["out.safetensors"]


@pytest.mark.parametrize(
    ("name", "tensors", "metadata", "message"),
    [
        ("out.pt", {"a": torch.zeros(1)}, {}, "expected a .safetensors file"),
        ("out.safetensors", {}, {}, "no tensors to save"),
        ("out.safetensors", {"a": [1.0]}, {}, "entry 'a' is list; expected str -> torch.Tensor"),
        ("out.safetensors", {"a": torch.zeros(1)}, {"ss_seed": 0}, "metadata 'ss_seed' is int"),
    ],
)
def test_bad_input(tmp_path, name, tensors, metadata, message):
    with pytest.raises(LoraSaveError, match=message.replace("(", "\\(").replace(")", "\\)")):
        save_lora(tmp_path / name, tensors, metadata)
    assert not (tmp_path / name).exists()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_hashes_of_any_bytes_are_hashes_or_an_error(data):
    try:
        model_hash, legacy = safetensors_hashes(data)
    except LoraSaveError as error:
        assert "expected at least 8" in str(error) or "truncated" in str(error)
        return
    offset = 8 + int.from_bytes(data[:8], "little")
    assert model_hash == hashlib.sha256(data[offset:]).hexdigest()
    assert legacy == hashlib.sha256(b"").hexdigest()[:8]  # nothing at 0x100000


def test_hashes_of_a_header_claiming_more_than_there_is():
    with pytest.raises(LoraSaveError, match="header of 1000 bytes in 20; truncated"):
        safetensors_hashes((1000).to_bytes(8, "little") + b"x" * 12)


# -- the saved file in sdstack and diffusers ------------------------------------------------


def model64():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tiny_components(seed=0).to(dtype=F64)


def outputs(model) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    latents = torch.randn(2, 4, 8, 8, generator=generator, dtype=F64)
    context = torch.randn(2, 77, 32, generator=generator, dtype=F64)
    ids = torch.randint(0, 49406, (2, 77), generator=generator)
    with torch.no_grad():
        unet = model.unet(latents, torch.tensor([10, 500]), context).sample
        text = model.text_encoder(ids).last_hidden_state
    return unet, text


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A network with seeded non-zero up weights, its outputs, and the file it saved."""
    model = model64()
    base = outputs(model)
    network = TrainableLora(model, rank=4, alpha=2, seed=0, dtype=F64)
    generator = torch.Generator().manual_seed(1)
    for module in network.loras.values():
        with torch.no_grad():
            up = module.lora_up.weight
            up.copy_(torch.randn(up.shape, generator=generator, dtype=F64) * 0.3)
    hooked = outputs(model)
    path = tmp_path_factory.mktemp("trained") / "trained.safetensors"
    save_lora(path, network.state_dict_kohya(F64), {"ss_network_dim": "4"})
    return network, base, hooked, path


def test_diffusers_load_lora_weights_computes_what_training_computed(trained):
    _, base, hooked, path = trained
    model = model64()
    pipe = model.diffusers_pipeline()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.load_lora_weights(str(path))
    loaded = outputs(model)
    for ours, theirs, before in zip(hooked, loaded, base, strict=True):
        assert (ours - before).abs().max() > 1e-2  # the LoRA changes the output
        # the same float64 operations (base + up(down(x)) * scale): rounding only
        torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-12)


def test_the_saved_file_resumes_a_network(trained):
    network, _, _, path = trained
    other = TrainableLora(model64(), rank=4, alpha=2, seed=3, dtype=F64)
    other.load_state(load_file(str(path)))
    state = network.state_dict_kohya()
    assert all(torch.equal(value, state[key]) for key, value in other.state_dict_kohya().items())
    other.remove()


def test_sdstack_reads_and_applies_the_saved_file(trained):
    network, base, hooked, path = trained
    model = model64()
    file = read_lora(path, key_map_of(model))
    assert file.format == "kohya" and not file.unmatched
    assert set(file.modules) == {m.layer.key for m in network.loras.values()}
    assert {(m.alpha, m.rank) for m in file.modules.values()} == {(2.0, 4)}
    originals = {
        name: live_module(model, m.layer).weight.detach().clone()
        for name, m in network.loras.items()
    }
    from sdstack.lora import set_loras

    set_loras(model, [(str(path), 1.0)])
    for name, module in network.loras.items():
        # the patcher works in float32: within 2 gamma(r+1) s |up||down| + 2u |W0 + dW|
        up, down = module.lora_up.weight.detach(), module.lora_down.weight.detach()
        delta = (up.reshape(up.shape[0], -1) @ down.reshape(4, -1)) * module.scale
        exact = originals[name] + delta.reshape(originals[name].shape)
        magnitude = (up.abs().reshape(up.shape[0], -1) @ down.abs().reshape(4, -1)) * 0.5
        bound = 2 * 5 * U32 * magnitude.reshape(exact.shape) + 2 * U32 * exact.abs()
        patched = live_module(model, module.layer).weight.detach()
        assert ((patched - exact).abs() - bound).max() <= 0, name
    applied = outputs(model)
    for ours, theirs, before in zip(hooked, applied, base, strict=True):
        # float32-rounded weights (relative 2^-23) through a few layers of O(1) gain
        torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
        assert (theirs - before).abs().max() > 1e3 * 1e-5
    set_loras(model, [])
    assert all(
        torch.equal(live_module(model, m.layer).weight, originals[n])
        for n, m in network.loras.items()
    )
