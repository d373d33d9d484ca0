"""``bake_loras``: a checkpoint with LoRAs merged in loads to the weights ``set_loras`` gives
the loaded model; streamed, atomically written, never over an input."""

from __future__ import annotations

import json
import os

import pytest
import torch

from sdstack.lora.bake import BAKED_METADATA_KEY, BakeError, bake_loras
from sdstack.lora.block_weights import parse_block_weights
from sdstack.lora.spec import LoraSpec
from sdstack.models import load_model
from tests.lora import lora_files as lf

EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(autouse=True)
def hash_cache(tmp_path, monkeypatch):
    """Hashes go to a cache of this test, not the user's."""
    from sdstack.models import hash_cache

    monkeypatch.setenv("SDSTACK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(hash_cache, "_default_cache", hash_cache.HashCache())


@pytest.fixture(scope="module")
def loras(tiny_components, tmp_path_factory):
    """A kohya LoRA/LoCon, a LoHa and a LyCORIS full file (weights and biases)."""
    folder = tmp_path_factory.mktemp("loras")
    kohya = lf.write_kohya(folder / "film.safetensors", tiny_components, seed=1)
    loha = lf.save(folder / "hada.safetensors", lf.loha_state(tiny_components, seed=2))
    full = lf.save(folder / "full.safetensors", lf.full_state(tiny_components, seed=3))
    return kohya, loha, full


def stack_of(loras):
    kohya, loha, full = loras
    midd = LoraSpec(str(full), 1.0, lbw=parse_block_weights("MIDD"), lbw_text="MIDD")
    return [(str(kohya), 0.7), (str(loha), 0.4, -0.6), midd]


def states(model) -> dict[str, torch.Tensor]:
    return {
        f"{part}.{name}": tensor
        for part in ("unet", "text_encoder", "vae")
        for name, tensor in getattr(model, part).state_dict().items()
    }


def test_baked_file_loads_to_the_weights_set_loras_gives(tiny_checkpoint, loras, tmp_path):
    from sdstack.lora.stack import set_loras

    checkpoint, config = tiny_checkpoint
    baked = tmp_path / "baked.safetensors"
    result = bake_loras(checkpoint, stack_of(loras), baked, config_dir=config)
    assert result.loras == ("film", "hada", "full")

    original = states(load_model(checkpoint, config_dir=config))
    live = load_model(checkpoint, config_dir=config)
    set_loras(live, stack_of(loras))
    expected, got = states(live), states(load_model(baked, config_dir=config))
    assert expected.keys() == got.keys()
    changed = 0
    for name, value in expected.items():
        w0 = original[name]
        if torch.equal(value, w0):
            assert torch.equal(got[name], w0), name  # untouched tensors are copied bit for bit
            continue
        changed += 1
        # Both sum W0 + sum s_i dW_i with the same code (patch_sum.layer_writers) from the
        # same originals: the same bits.
        assert torch.equal(got[name], value), name
    # The LoHa layers are kohya layers too; MIDD keeps only the text-encoder layer of the
    # full file (BASE = 1; its IN01/IN04 layers get 0), a kohya layer with a bias delta.
    assert result.layers_patched == len(lf.KOHYA_LAYERS) == 14
    assert changed == 14 + 1


def test_metadata_names_the_loras_baked(tiny_checkpoint, loras, tmp_path):
    from sdstack.models.library import lora_sha256
    from sdstack.models.safetensors_header import safetensors_metadata

    checkpoint, config = tiny_checkpoint
    baked = tmp_path / "baked.safetensors"
    bake_loras(checkpoint, stack_of(loras), baked, config_dir=config)
    note = json.loads(safetensors_metadata(baked)[BAKED_METADATA_KEY])
    assert note["model"] == checkpoint.name
    assert note["loras"] == [
        {"name": "film", "hash": lora_sha256(loras[0])[:12], "te": 0.7, "unet": 0.7},
        {"name": "hada", "hash": lora_sha256(loras[1])[:12], "te": 0.4, "unet": -0.6},
        {"name": "full", "hash": lora_sha256(loras[2])[:12], "te": 1.0, "unet": 1.0,
         "lbw": "MIDD"},
    ]  # fmt: skip


def test_dtype_casts_the_float32_sum_once(tiny_checkpoint, loras, tmp_path):
    """fp16 output = the fp32 bake rounded once to fp16 (the sum is never done in fp16)."""
    from safetensors.torch import load_file

    checkpoint, config = tiny_checkpoint
    full, half = tmp_path / "full.safetensors", tmp_path / "half.safetensors"
    bake_loras(checkpoint, stack_of(loras), full, config_dir=config)
    bake_loras(checkpoint, stack_of(loras), half, config_dir=config, dtype="fp16")
    wide, narrow = load_file(str(full)), load_file(str(half))
    assert wide.keys() == narrow.keys()
    for key, tensor in wide.items():
        if tensor.is_floating_point():
            assert narrow[key].dtype == torch.float16
            assert torch.equal(narrow[key], tensor.half()), key
        else:
            assert torch.equal(narrow[key], tensor), key


def test_progress_counts_files_then_tensors(tiny_checkpoint, loras, tmp_path):
    from sdstack.models.single_file import open_tensor_file

    checkpoint, config = tiny_checkpoint
    calls = []
    bake_loras(
        checkpoint,
        [str(loras[0])],
        tmp_path / "out.safetensors",
        config_dir=config,
        progress=lambda *call: calls.append(call),
    )
    with open_tensor_file(checkpoint) as source:
        total = len(source)
    assert calls[0] == ("reading LoRAs", 0, 1)
    assert calls[1] == ("reading LoRAs", 1, 1)
    assert calls[2:] == [("baking", done, total) for done in range(1, total + 1)]


def test_existing_output_is_refused_unless_overwrite(tiny_checkpoint, loras, tmp_path):
    checkpoint, config = tiny_checkpoint
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep")
    with pytest.raises(BakeError) as error:
        bake_loras(checkpoint, [str(loras[0])], out, config_dir=config)
    assert str(error.value) == (
        f"--out {out}: file exists; choose a new name (or allow overwriting it)"
    )
    assert out.read_bytes() == b"keep"
    bake_loras(checkpoint, [str(loras[0])], out, config_dir=config, overwrite=True)
    assert load_model(out, config_dir=config) is not None


@pytest.mark.parametrize("which", ["model", "lora"])
def test_an_input_is_never_overwritten(tiny_checkpoint, loras, tmp_path, which):
    checkpoint, config = tiny_checkpoint
    model = tmp_path / "model.safetensors"
    model.write_bytes(checkpoint.read_bytes())
    lora = tmp_path / "lora.safetensors"
    lora.write_bytes(loras[0].read_bytes())
    target = model if which == "model" else lora
    before = target.read_bytes()
    with pytest.raises(BakeError) as error:
        bake_loras(model, [str(lora)], target, config_dir=config, overwrite=True)
    assert str(error.value) == (
        f"--out {target}: is an input file ({target}); write to a new file name"
    )
    assert target.read_bytes() == before


def test_a_failure_leaves_no_file_behind(tiny_checkpoint, tmp_path):
    """A LoRA for SDXL is refused before anything is written; no temporary file stays."""
    from sdstack.lora.network import ForeignLoraError

    checkpoint, config = tiny_checkpoint
    sdxl = lf.save(tmp_path / "xl.safetensors", lf.sdxl_like_state())
    before = set(os.listdir(tmp_path))
    with pytest.raises(ForeignLoraError):
        bake_loras(checkpoint, [str(sdxl)], tmp_path / "out.safetensors", config_dir=config)
    assert set(os.listdir(tmp_path)) == before


def test_a_model_that_is_not_sd1_is_refused(loras, tmp_path, tiny_checkpoint):
    from sdstack.models.detect import CheckpointError

    _, config = tiny_checkpoint
    looks = r"cannot load as an SD1\.x model: this looks like a LoRA/LyCORIS network"
    with pytest.raises(CheckpointError, match=looks):
        bake_loras(loras[1], [str(loras[0])], tmp_path / "out.safetensors", config_dir=config)


def test_missing_model_and_folder_model(tmp_path, loras):
    with pytest.raises(BakeError) as error:
        bake_loras(tmp_path / "none.safetensors", [str(loras[0])], tmp_path / "o.safetensors")
    assert str(error.value) == (
        f"{tmp_path / 'none.safetensors'}: no such file; expected a single-file SD1.x checkpoint"
    )
    with pytest.raises(BakeError, match="is a folder; expected a single-file checkpoint"):
        bake_loras(tmp_path, [str(loras[0])], tmp_path / "o.safetensors")


def test_output_must_be_safetensors(tiny_checkpoint, loras, tmp_path):
    checkpoint, config = tiny_checkpoint
    with pytest.raises(BakeError) as error:
        bake_loras(checkpoint, [str(loras[0])], tmp_path / "out.ckpt", config_dir=config)
    assert str(error.value) == f"--out {tmp_path / 'out.ckpt'}: expected a .safetensors file name"


def test_a_pickle_checkpoint_bakes_like_its_safetensors(tiny_checkpoint, loras, tmp_path):
    from safetensors.torch import load_file

    checkpoint, config = tiny_checkpoint
    pickle = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(str(checkpoint))}, pickle)
    from_pickle, from_safetensors = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    bake_loras(pickle, stack_of(loras), from_pickle, config_dir=config)
    bake_loras(checkpoint, stack_of(loras), from_safetensors, config_dir=config)
    first, second = load_file(str(from_pickle)), load_file(str(from_safetensors))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)
