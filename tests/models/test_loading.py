"""load_model on the tiny model written as an LDM single file, checked against diffusers'
own single-file loader and against the in-memory modules it was written from."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from sdstack.models import CheckpointError, load_model
from sdstack.models.key_map.ldm import VAE_PREFIX, vae_key_map
from sdstack.models.ldm_file import save_single_file, to_ldm_state_dict
from sdstack.prompt.tokenizer import tokenizer_dir

PACKAGED_SCHEDULER = (
    Path(__file__).parents[2] / "src/sdstack/models/configs/sd15/scheduler/scheduler_config.json"
)
MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "safety_checker": [None, None],
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
}


def write_config_folder(components, folder: Path) -> Path:
    """A diffusers-layout config folder for ``components`` (configs + tokenizer, no weights)."""
    components.unet.save_config(folder / "unet")
    components.vae.save_config(folder / "vae")
    components.text_encoder.config.save_pretrained(folder / "text_encoder")
    (folder / "scheduler").mkdir(parents=True)
    shutil.copy(PACKAGED_SCHEDULER, folder / "scheduler" / "scheduler_config.json")
    shutil.copytree(tokenizer_dir(), folder / "tokenizer")
    (folder / "model_index.json").write_text(json.dumps(MODEL_INDEX))
    return folder


def assert_same_tensors(module_a, module_b) -> None:
    state_a, state_b = module_a.state_dict(), module_b.state_dict()
    assert state_a.keys() == state_b.keys()
    # Loading copies or casts tensors, never computes with them: exact equality.
    unequal = [k for k in state_a if not torch.equal(state_a[k], state_b[k])]
    assert unequal == []


@pytest.fixture(scope="module")
def tiny_files(tiny_components, tmp_path_factory):
    """The tiny model as ``tiny.safetensors`` (LDM keys) plus its config folder."""
    folder = tmp_path_factory.mktemp("tiny")
    checkpoint = folder / "tiny-model.safetensors"
    save_single_file(tiny_components, checkpoint)
    return checkpoint, write_config_folder(tiny_components, folder / "config")


@pytest.fixture(scope="module")
def loaded(tiny_files):
    checkpoint, config = tiny_files
    return load_model(checkpoint, config_dir=config)


@pytest.fixture(scope="module")
def other_vae():
    from sdstack.models.tiny import tiny_vae

    return tiny_vae(seed=7)


def test_single_file_matches_diffusers_from_single_file(tiny_files, loaded):
    from diffusers import StableDiffusionPipeline

    checkpoint, config = tiny_files
    pipe = StableDiffusionPipeline.from_single_file(
        str(checkpoint), config=str(config), local_files_only=True, safety_checker=None
    )
    for part in ("unet", "vae", "text_encoder"):
        assert_same_tensors(getattr(pipe, part), getattr(loaded, part))


def test_single_file_round_trips_the_written_modules(tiny_components, loaded):
    for part in ("unet", "vae", "text_encoder"):
        assert_same_tensors(getattr(tiny_components, part), getattr(loaded, part))


def test_components_fields(tiny_files, loaded):
    checkpoint, _ = tiny_files
    assert loaded.name == "tiny-model"
    assert loaded.path == checkpoint
    assert loaded.vae_path is None
    assert loaded.vae_scale_factor == 8
    assert loaded.scheduler_config == {
        k: v for k, v in json.loads(PACKAGED_SCHEDULER.read_text()).items() if k[0] != "_"
    }
    assert loaded.tokenizer.model_max_length == 77
    assert not loaded.unet.training and not loaded.vae.training
    meta = [n for n, p in loaded.unet.named_parameters() if p.is_meta]
    assert meta == []


def test_fp16_load_casts_every_float_tensor(tiny_components, tiny_files):
    checkpoint, config = tiny_files
    half = load_model(checkpoint, config_dir=config, dtype="fp16")
    for part in ("unet", "vae"):
        reference = getattr(tiny_components, part).state_dict()
        for key, tensor in getattr(half, part).state_dict().items():
            assert tensor.dtype == torch.float16
            assert torch.equal(tensor, reference[key].half())
    same = load_model(checkpoint, config_dir=config, dtype=torch.bfloat16)
    assert same.text_encoder.get_input_embeddings().weight.dtype == torch.bfloat16


def test_same_dtype_load_shares_the_file_mapping(tiny_components, tmp_path, tiny_files):
    _, config = tiny_files
    checkpoint = tmp_path / "half.safetensors"
    save_single_file(tiny_components, checkpoint, dtype=torch.float16)
    # Mapped only in the contiguous layout: channels-last re-lays (copies) the 4-D weights.
    model = load_model(checkpoint, config_dir=config, dtype="fp16", channels_last=False)
    if Path("/proc/self/maps").is_file():
        # Zero-copy: every UNet parameter lies inside a memory map of the file itself.
        ranges = [
            [int(x, 16) for x in line.split()[0].split("-")]
            for line in Path("/proc/self/maps").read_text().splitlines()
            if line.endswith(str(checkpoint))
        ]
        outside = [
            name
            for name, p in model.unet.named_parameters()
            if not any(lo <= p.data_ptr() < hi for lo, hi in ranges)
        ]
        assert ranges and outside == []
    fp32 = load_model(checkpoint, config_dir=config, dtype="fp32")
    assert {p.dtype for p in fp32.unet.parameters()} == {torch.float32}


def test_ckpt_weights_only_with_state_dict_wrapper(tiny_components, tmp_path, tiny_files):
    _, config = tiny_files
    checkpoint = tmp_path / "wrapped.ckpt"
    torch.save(
        {"state_dict": to_ldm_state_dict(tiny_components), "global_step": 470000}, checkpoint
    )
    model = load_model(checkpoint, config_dir=config)
    for part in ("unet", "vae", "text_encoder"):
        assert_same_tensors(getattr(tiny_components, part), getattr(model, part))
    legacy = tmp_path / "legacy.pt"
    torch.save(to_ldm_state_dict(tiny_components), legacy, _use_new_zipfile_serialization=False)
    assert_same_tensors(tiny_components.unet, load_model(legacy, config_dir=config).unet)


def _vae_files(vae, folder: Path) -> dict[str, Path]:
    ldm = {}
    state = vae.state_dict()
    for row in vae_key_map(vae):
        tensor = state[row.diffusers]
        ldm[row.ldm] = tensor[:, :, None, None] if row.conv1x1 else tensor
    from safetensors.torch import save_file

    files = {
        "prefixed": folder / "prefixed.safetensors",
        "bare": folder / "bare.vae.pt",
        "diffusers": folder / "diffusers.safetensors",
    }
    save_file({VAE_PREFIX + k: v.contiguous() for k, v in ldm.items()}, files["prefixed"])
    torch.save({"state_dict": ldm}, files["bare"])
    save_file({k: v.contiguous() for k, v in state.items()}, files["diffusers"])
    return files


@pytest.mark.parametrize("layout", ["prefixed", "bare", "diffusers"])
def test_separate_vae_in_each_layout(tiny_components, tiny_files, other_vae, tmp_path, layout):
    checkpoint, config = tiny_files
    vae_file = _vae_files(other_vae, tmp_path)[layout]
    model = load_model(checkpoint, config_dir=config, vae=vae_file)
    assert model.vae_path == vae_file
    assert_same_tensors(other_vae, model.vae)
    assert_same_tensors(tiny_components.unet, model.unet)


def test_old_diffusers_vae_attention_names(tiny_files, other_vae, tmp_path):
    from safetensors.torch import save_file

    checkpoint, config = tiny_files
    renames = {
        ".to_q.": ".query.",
        ".to_k.": ".key.",
        ".to_v.": ".value.",
        ".to_out.0.": ".proj_attn.",
    }
    old = {}
    for key, tensor in other_vae.state_dict().items():
        for new, previous in renames.items():
            key = key.replace(new, previous) if "mid_block.attentions" in key else key
        old[key] = tensor.contiguous()
    save_file(old, tmp_path / "old.safetensors")
    model = load_model(checkpoint, config_dir=config, vae=tmp_path / "old.safetensors")
    assert_same_tensors(other_vae, model.vae)


def test_diffusers_folder(tiny_components, tmp_path):
    folder = tmp_path / "tiny-diffusers"
    tiny_components.unet.save_pretrained(folder / "unet")
    tiny_components.vae.save_pretrained(folder / "vae")
    tiny_components.text_encoder.save_pretrained(folder / "text_encoder")
    (folder / "model_index.json").write_text(json.dumps(MODEL_INDEX))
    model = load_model(folder, dtype="fp16")
    assert model.name == "tiny-diffusers"
    assert model.path == folder
    for part in ("unet", "vae", "text_encoder"):
        reference = getattr(tiny_components, part).state_dict()
        loaded = getattr(model, part).state_dict()
        assert all(torch.equal(loaded[k], v.half()) for k, v in reference.items())


def test_diffusers_folder_with_sharded_unet_and_separate_vae(tiny_components, other_vae, tmp_path):
    folder = tmp_path / "sharded"
    tiny_components.unet.save_pretrained(folder / "unet", max_shard_size="200KB")
    tiny_components.vae.save_pretrained(folder / "vae")
    tiny_components.text_encoder.save_pretrained(folder / "text_encoder")
    assert list((folder / "unet").glob("*.index.json"))
    other = _vae_files(other_vae, tmp_path)["prefixed"]
    model = load_model(folder, vae=other)
    assert_same_tensors(tiny_components.unet, model.unet)
    assert_same_tensors(other_vae, model.vae)


def test_bad_dtype_and_device(tiny_files):
    checkpoint, config = tiny_files
    expected = (
        r"^dtype: got 'fp8', expected auto or one of fp32, fp16, bf16 \(or a floating "
        r"torch\.dtype, or a ComponentDtypes\)$"
    )
    with pytest.raises(ValueError, match=expected):
        load_model(checkpoint, config_dir=config, dtype="fp8")
    with pytest.raises(ValueError, match=r"device: got 'tpu', expected one of cpu, cuda, mps"):
        load_model(checkpoint, config_dir=config, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device: got 'cuda' but CUDA is not available"):
            load_model(checkpoint, config_dir=config, device="cuda")


def test_missing_files(tiny_files, tmp_path):
    checkpoint, config = tiny_files
    with pytest.raises(FileNotFoundError, match=r"model not found: .*nothing\.safetensors"):
        load_model(tmp_path / "nothing.safetensors")
    with pytest.raises(FileNotFoundError, match=r"VAE file not found: .*novae\.pt"):
        load_model(checkpoint, vae=tmp_path / "novae.pt", config_dir=config)
    with pytest.raises(FileNotFoundError, match=r"config_dir: folder not found"):
        load_model(checkpoint, config_dir=tmp_path / "nofolder")


def test_missing_unet_tensor_is_named(tiny_components, tiny_files, tmp_path):
    from safetensors.torch import save_file

    _, config = tiny_files
    state = {k: v.contiguous() for k, v in to_ldm_state_dict(tiny_components).items()}
    del state["model.diffusion_model.out.2.weight"]
    save_file(state, tmp_path / "holes.safetensors")
    with pytest.raises(
        CheckpointError,
        match=(
            r"holes\.safetensors: SD1\.x checkpoint with an incomplete UNet: 1 tensors missing "
            r"\(model\.diffusion_model\.out\.2\.weight\)"
        ),
    ):
        load_model(tmp_path / "holes.safetensors", config_dir=config)


def test_checkpoint_without_vae_needs_a_vae_file(tiny_components, tiny_files, other_vae, tmp_path):
    from safetensors.torch import save_file

    _, config = tiny_files
    state = {
        k: v.contiguous()
        for k, v in to_ldm_state_dict(tiny_components).items()
        if not k.startswith(VAE_PREFIX)
    }
    save_file(state, tmp_path / "no-vae.safetensors")
    with pytest.raises(
        CheckpointError,
        match=(
            r"no-vae\.safetensors: SD1\.x checkpoint with an incomplete VAE: \d+ tensors missing "
            r"\(first_stage_model\..*\); give a separate VAE file with vae="
        ),
    ):
        load_model(tmp_path / "no-vae.safetensors", config_dir=config)
    vae_file = _vae_files(other_vae, tmp_path)["bare"]
    model = load_model(tmp_path / "no-vae.safetensors", config_dir=config, vae=vae_file)
    assert_same_tensors(other_vae, model.vae)


def test_packaged_sd15_config_mismatch_is_reported(tiny_files):
    checkpoint, _ = tiny_files
    # The tiny file against the packaged SD1.5 configs: context width 32, not 768.
    expected = r"unknown UNet \(context width 32, the config has 768\)"
    with pytest.raises(CheckpointError, match=expected):
        load_model(checkpoint)


def test_cli_does_not_import_torch_for_the_models_package():
    import subprocess
    import sys

    code = "import sys, sdstack.models; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ}, check=True
    )
    assert out.stdout.strip() == "False"
