"""ControlNet files (sdstack.control.files): every layout loads to the same network as
diffusers' ControlNetModel it was written from (residuals bit-identical), foreign models
are named, hostile files get clear errors.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdstack.control.files import (
    ControlFileInfo,
    ControlNetFileError,
    identify_control_file,
    load_controlnet,
)
from sdstack.control.keys import CONTROL_PREFIX, diffusers_to_ldm
from sdstack.control.tiny import TINY_CONTROLNET_CONFIG, tiny_controlnet, write_tiny_controlnet
from sdstack.models.detect import CheckpointError
from sdstack.models.hashes import legacy_model_hash
from sdstack.validate import SettingError
from tests.models.test_hostile_files import Call, address_space_cap, write_zip_torch

LAYOUTS = {
    "ldm.safetensors": "ldm",
    "bare.safetensors": "ldm-bare",
    "diffusers.safetensors": "diffusers",
    "ldm.pth": "ldm",
    "diffusers-folder": "diffusers-folder",
}
EXPECTED_LAYOUT = {"ldm": "ldm", "ldm-bare": "ldm", "diffusers": "diffusers"}


@pytest.fixture(scope="module")
def reference():
    """diffusers' ControlNetModel (the tiny one) and its outputs on seeded inputs."""
    model = tiny_controlnet(seed=0)
    g = torch.Generator().manual_seed(0)
    inputs = (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.tensor([10.0, 500.0]),
        torch.randn(2, 77, 32, generator=g),
        torch.rand(2, 3, 64, 64, generator=g),
    )
    with torch.no_grad():
        down, mid = model(*inputs, return_dict=False)
    return model, inputs, (down, mid)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("controlnets")
    return {name: write_tiny_controlnet(folder / name, layout=lay) for name, lay in LAYOUTS.items()}


def _residuals(model, inputs):
    with torch.no_grad():
        return model(*inputs, return_dict=False)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_layout_loads_the_same_network(reference, files, name):
    _, inputs, (down, mid) = reference
    loaded = load_controlnet(files[name])
    got_down, got_mid = _residuals(loaded.model, inputs)
    assert len(got_down) == len(down) == 6  # conv_in + 2 levels x 2 layers + 1 downsampler
    assert all(torch.equal(a, b) for a, b in zip(got_down, down, strict=True))
    assert torch.equal(got_mid, mid)
    assert mid.abs().mean() > 0.1  # the zero convs are not zero
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    path = files[name]
    assert loaded.path == path
    assert loaded.name == (path.name if path.is_dir() else path.stem)
    weights = path / "diffusion_pytorch_model.safetensors" if path.is_dir() else path
    assert loaded.short_hash == legacy_model_hash(weights)
    assert loaded.label == f"{loaded.name} [{loaded.short_hash}]"
    assert loaded.known is None


def test_config_comes_from_the_shapes(files):
    config = load_controlnet(files["ldm.safetensors"]).model.config
    for key, value in TINY_CONTROLNET_CONFIG.items():
        assert (
            tuple(config[key]) == tuple(value) if isinstance(value, tuple) else config[key] == value
        )
    assert config["global_pool_conditions"] is False


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_identify(files, name):
    layout = EXPECTED_LAYOUT.get(LAYOUTS[name], "diffusers")
    assert identify_control_file(files[name]) == ControlFileInfo(files[name], layout, 3, 32)


def test_dtype_and_device(files, reference):
    loaded = load_controlnet(files["ldm.safetensors"], dtype="fp16", device="cpu")
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float16}
    assert {p.device.type for p in loaded.model.parameters()} == {"cpu"}
    with pytest.raises(SettingError, match="dtype: got 'int8'"):
        load_controlnet(files["ldm.safetensors"], dtype="int8")


def test_known_name_and_shuffle_pooling(tmp_path):
    canny = write_tiny_controlnet(tmp_path / "control_v11p_sd15_canny_fp16.safetensors")
    assert load_controlnet(canny).known.name == "control_v11p_sd15_canny"
    shuffle = write_tiny_controlnet(tmp_path / "control_v11e_sd15_shuffle.safetensors")
    loaded = load_controlnet(shuffle)
    assert loaded.known.global_average_pooling
    assert loaded.model.config.global_pool_conditions is True


def test_pooling_from_the_yaml_beside_the_model(tmp_path):
    renamed = write_tiny_controlnet(tmp_path / "my_model.safetensors")
    assert load_controlnet(renamed).model.config.global_pool_conditions is False
    (tmp_path / "my_model.yaml").write_text(
        "model:\n  params:\n    control_stage_config:\n      params:\n"
        "        global_average_pooling: True\n"
    )
    assert load_controlnet(renamed).model.config.global_pool_conditions is True
    other = write_tiny_controlnet(tmp_path / "my_shuffle_fp16.safetensors")
    assert load_controlnet(other).model.config.global_pool_conditions is True
    shuffle = write_tiny_controlnet(tmp_path / "control_v11e_sd15_shuffle.pth")
    (tmp_path / "control_v11e_sd15_shuffle.yaml").write_text("global_average_pooling: False\n")
    assert load_controlnet(shuffle).model.config.global_pool_conditions is False


def test_full_v10_file_with_the_sd_model_inside(tmp_path, reference):
    """The original full files hold ``control_model.*`` next to an SD model: only the
    control model is read (as the extension does)."""
    model, inputs, (_, mid) = reference
    state = diffusers_to_ldm(model.state_dict(), prefix=CONTROL_PREFIX)
    state["model.diffusion_model.out.2.weight"] = torch.ones(4, 32, 3, 3)
    state["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = torch.ones(32)
    path = tmp_path / "control_sd15_canny.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    loaded = load_controlnet(path)
    assert torch.equal(_residuals(loaded.model, inputs)[1], mid)
    assert loaded.known.version == "1.0"


def test_linear_projection_file_loads(tmp_path, reference):
    """2-D proj_in/proj_out weights (linear projections) are used as 1x1 convs."""
    model, inputs, (_, mid) = reference
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    for key in [k for k in state if k.endswith(("proj_in.weight", "proj_out.weight"))]:
        state[key] = state[key][:, :, 0, 0].contiguous()
    path = tmp_path / "linear.safetensors"
    save_file(state, str(path))
    assert torch.equal(_residuals(load_controlnet(path).model, inputs)[1], mid)


def test_config_dir(tmp_path, files):
    folder = files["diffusers-folder"]
    loaded = load_controlnet(files["ldm.safetensors"], config_dir=folder)
    assert tuple(loaded.model.config.conditioning_embedding_out_channels) == (8, 16, 16, 32)
    sd15 = tmp_path / "sd15"
    sd15.mkdir()
    (sd15 / "config.json").write_text(
        (
            Path(__file__).parents[2] / "src/sdstack/models/configs/controlnet-sd15/config.json"
        ).read_text()
    )
    with pytest.raises(ControlNetFileError) as caught:
        load_controlnet(files["ldm.safetensors"], config_dir=sd15)
    message = str(caught.value)
    assert message.startswith(
        f"{files['ldm.safetensors']}: the ControlNet tensors do not fit the "
        f"{sd15 / 'config.json'} (config_dir) ControlNet config: "
    )
    assert "178 shapes differ (file vs config: " in message
    assert "down_blocks.0.resnets.0.norm1.bias [32] vs [320]" in message
    with pytest.raises(ControlNetFileError, match=r"config_dir: no config\.json in"):
        load_controlnet(files["ldm.safetensors"], config_dir=tmp_path / "nothing")


def _save(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    save_file({k: torch.zeros(s) for k, s in shapes.items()}, str(path))
    return path


HINT = {"control_model.input_hint_block.0.weight": (16, 3, 3, 3)}
TO_K = "control_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
FOREIGN = {
    "sdxl-label-emb": (
        {**HINT, "control_model.label_emb.0.0.weight": (4, 4), TO_K: (4, 2048)},
        "an SDXL ControlNet (label_emb/add_embedding keys or context width 2048)",
    ),
    "sdxl-diffusers": (
        {
            "controlnet_cond_embedding.conv_in.weight": (16, 3, 3, 3),
            "add_embedding.linear_1.weight": (4, 4),
        },
        "an SDXL ControlNet (label_emb/add_embedding keys or context width 2048)",
    ),
    "sd2": ({**HINT, TO_K: (4, 1024)}, "an SD 2.x ControlNet (context width 1024)"),
    "t2i-diffusers": (
        {"adapter.conv_in.weight": (4, 4)},
        "a T2I-Adapter (adapter./body. keys), not a ControlNet",
    ),
    "t2i-original": (
        {"body.0.block1.weight": (4, 4), "conv_in.weight": (4, 4)},
        "a T2I-Adapter (adapter./body. keys), not a ControlNet",
    ),
    "control-lora": (
        {"lora_controlnet": (1,)},
        "a Control-LoRA (a ControlNet stored as a LoRA: 'lora_controlnet' key)",
    ),
    "control-lora-with-hint": (
        {**HINT, TO_K: (4, 768), "lora_controlnet": (1,)},
        "a Control-LoRA (a ControlNet stored as a LoRA: 'lora_controlnet' key)",
    ),
    "difference": (
        {**HINT, TO_K: (4, 768), "difference": (1,)},
        "a difference ControlNet ('difference' key: it stores the change from a base SD model, "
        "which sdstack does not apply)",
    ),
    "lora": (
        {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 4)},
        "a LoRA/LyCORIS network (lora_down/lora_up-style keys)",
    ),
    "vae": (
        {"encoder.conv_in.weight": (4, 4), "decoder.conv_in.weight": (4, 4)},
        "a VAE-only file",
    ),
    "unknown": ({"foo.weight": (2,)}, "not a recognised model (first keys: foo.weight)"),
    "no-attention": (HINT, "a ControlNet without cross-attention layers (no attn2.to_k weights)"),
    "hint-not-conv": (
        {"control_model.input_hint_block.0.weight": (16, 3), TO_K: (4, 768)},
        "an unknown model (input_hint_block.0.weight has shape [16, 3], expected a 3x3 conv)",
    ),
}


@pytest.mark.parametrize("name", list(FOREIGN))
def test_foreign_models_are_named(tmp_path, name):
    shapes, kind = FOREIGN[name]
    path = _save(tmp_path / f"{name}.safetensors", shapes)
    for call in (identify_control_file, load_controlnet):
        with pytest.raises(ControlNetFileError) as caught:
            call(path)
        assert str(caught.value).startswith(
            f"{path}: cannot load as an SD1.x ControlNet: this looks like {kind}"
        )
        assert str(caught.value).endswith(
            "; expected an SD1.5 ControlNet (control_v11p_sd15_canny and the like)"
        )


def test_full_sd_checkpoint_is_named(tiny_checkpoint):
    checkpoint, _ = tiny_checkpoint
    with pytest.raises(
        ControlNetFileError,
        match=(
            r"this looks like a full Stable Diffusion model \(an SD1\.x checkpoint\), "
            r"not a ControlNet"
        ),
    ):
        identify_control_file(checkpoint)


@pytest.mark.parametrize(
    ("config", "kind"),
    [
        ({"_class_name": "T2IAdapter"}, "a T2I-Adapter (T2IAdapter), not a ControlNet"),
        (
            {"_class_name": "ControlNetModel", "addition_embed_type": "text_time"},
            "an SDXL ControlNet",
        ),
        ({"_class_name": "ControlNetModel", "cross_attention_dim": 1024}, "an SD 2.x ControlNet"),
        (
            {"_class_name": "UNet2DConditionModel"},
            "a UNet2DConditionModel, not an SD1.x ControlNetModel",
        ),
    ],
)
def test_foreign_diffusers_folders(tmp_path, config, kind):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ControlNetFileError) as caught:
        load_controlnet(tmp_path)
    assert str(caught.value).startswith(
        f"{tmp_path}: cannot load as an SD1.x ControlNet: config.json describes {kind}"
    )


def test_folder_without_config_or_weights(tmp_path):
    with pytest.raises(ControlNetFileError, match=r"a folder without config\.json"):
        load_controlnet(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel"}))
    with pytest.raises(ControlNetFileError, match="diffusers ControlNet folder without weights"):
        load_controlnet(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ControlNetFileError, match="unreadable config file"):
        load_controlnet(tmp_path)


def _tiny_ldm(reference) -> dict[str, torch.Tensor]:
    model = reference[0]
    state = diffusers_to_ldm(model.state_dict(), prefix=CONTROL_PREFIX)
    return {k: v.contiguous() for k, v in state.items()}


def test_missing_and_wrong_shaped_tensors(tmp_path, reference):
    state = _tiny_ldm(reference)
    del state["control_model.middle_block.1.transformer_blocks.0.attn2.to_v.weight"]
    save_file(state, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ControlNetFileError) as caught:
        load_controlnet(tmp_path / "missing.safetensors")
    assert str(caught.value) == (
        f"{tmp_path / 'missing.safetensors'}: the ControlNet tensors do not fit the packaged "
        "SD1.5 ControlNet config: 1 tensors missing "
        "(mid_block.attentions.0.transformer_blocks.0.attn2.to_v.weight); if it is an "
        "SD1.x-family ControlNet of other sizes, give its config with config_dir="
    )
    state = _tiny_ldm(reference)
    state["control_model.zero_convs.3.0.weight"] = torch.zeros(64, 32, 1, 1)
    save_file(state, str(tmp_path / "shape.safetensors"))
    with pytest.raises(
        ControlNetFileError,
        match=(
            r"1 shapes differ \(file vs config: controlnet_down_blocks\.3\.weight \[64, 32, 1, 1\] "
            r"vs \[32, 32, 1, 1\]\)"
        ),
    ):
        load_controlnet(tmp_path / "shape.safetensors")
    state = _tiny_ldm(reference)
    state["control_model.input_blocks.1.0.in_layers.7.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "extra.safetensors"))
    with pytest.raises(
        ControlNetFileError,
        match=(
            r"extra.safetensors: 1 keys are not part of an SD1\.x ControlNet "
            r"\(input_blocks\.1\.0\.in_layers\.7\.weight\)"
        ),
    ):
        load_controlnet(tmp_path / "extra.safetensors")


def test_integer_weights_are_refused(tmp_path, reference):
    state = _tiny_ldm(reference)
    key = "control_model.zero_convs.0.0.bias"
    state[key] = state[key].to(torch.int32)
    save_file(state, str(tmp_path / "int.safetensors"))
    with pytest.raises(
        ControlNetFileError, match=f"tensor '{key}' is torch.int32, expected a floating"
    ):
        load_controlnet(tmp_path / "int.safetensors")


def test_missing_special_and_unknown_files(tmp_path):
    with pytest.raises(ControlNetFileError, match=r"nope\.safetensors: ControlNet model not found"):
        load_controlnet(tmp_path / "nope.safetensors")
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(
        ControlNetFileError,
        match=r"pipe\.safetensors: a FIFO \(named pipe\), not a ControlNet file",
    ):
        load_controlnet(fifo)
    (tmp_path / "model.onnx").write_bytes(b"x")
    with pytest.raises(ControlNetFileError, match=r"unknown checkpoint file type '\.onnx'"):
        identify_control_file(tmp_path / "model.onnx")


def test_truncated_and_corrupt_files(tmp_path, files):
    data = files["ldm.safetensors"].read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ControlNetFileError, match="truncated safetensors file"):
        load_controlnet(truncated)
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 2**63) + b"{}")
    with (
        pytest.raises(ControlNetFileError, match=f"header length {2**63} bytes"),
        address_space_cap(),
    ):
        identify_control_file(huge)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(ControlNetFileError, match="empty file"):
        load_controlnet(empty)
    torn = tmp_path / "torn.pth"
    torn.write_bytes(files["ldm.pth"].read_bytes()[:5000])
    with pytest.raises(ControlNetFileError, match="corrupt or truncated pickle checkpoint"):
        load_controlnet(torn)


@pytest.mark.timeout(20)
def test_pickle_that_wants_code_is_refused(tmp_path):
    marker = tmp_path / "executed"
    path = write_zip_torch(tmp_path / "evil.pth", {"x": Call(os.system, f"touch {marker}")}, {})
    with (
        pytest.raises(ControlNetFileError, match=r"refuses to call posix\.system"),
        address_space_cap(),
    ):
        load_controlnet(path)
    assert not marker.exists()


def test_errors_are_checkpoint_errors():
    assert issubclass(ControlNetFileError, CheckpointError)


def test_config_with_linear_projections_takes_conv_weights(tmp_path, files, reference):
    """An ldm file (1x1-conv projections) with a config that has use_linear_projection."""
    _, inputs, (_, mid) = reference
    config = json.loads((files["diffusers-folder"] / "config.json").read_text())
    config["use_linear_projection"] = True
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = load_controlnet(files["ldm.safetensors"], config_dir=tmp_path)
    proj = loaded.model.down_blocks[1].attentions[0].proj_in
    assert isinstance(proj, torch.nn.Linear)
    torch.testing.assert_close(_residuals(loaded.model, inputs)[1], mid, rtol=1e-5, atol=1e-5)
