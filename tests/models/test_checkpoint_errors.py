"""Files that are not loadable SD1.x models: other architectures (from telltale keys and
shapes on small fake state dicts), corrupt or truncated files, refused pickles."""

from __future__ import annotations

import json
import pathlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdstack.models import CheckpointError, load_model
from sdstack.models.detect import SD1, detect_kind

CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
ATTN2_K = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


class Payload:
    """A custom class: a weights-only load must refuse to construct it."""

    def __init__(self) -> None:
        self.note = "not a tensor"


class Touch:
    """Unpickling this would create ``self.path`` (if anything executed it)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (self.path,))


def sd1_like(conv_in_channels: int = 4, context: int = 768) -> dict[str, torch.Tensor]:
    return {
        CONV_IN: torch.zeros(320, conv_in_channels, 3, 3),
        ATTN2_K: torch.zeros(320, context),
        "first_stage_model.encoder.conv_in.weight": torch.zeros(128, 3, 3, 3),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(768),
    }


def write(tmp_path: Path, name: str, tensors: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / name
    save_file(tensors, path)
    return path


SDXL_TEXT_KEY = "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"


@pytest.mark.parametrize(
    ("name", "tensors", "kind"),
    [
        (
            "sdxl.safetensors",
            {
                SDXL_TEXT_KEY: torch.zeros(4),
                CONV_IN: torch.zeros(320, 4, 3, 3),
            },
            r"an SDXL checkpoint \(conditioner\.embedders\.\* keys\)",
        ),
        (
            "sd2.safetensors",
            {
                "cond_stage_model.model.ln_final.weight": torch.zeros(4),
                CONV_IN: torch.zeros(320, 4, 3, 3),
            },
            r"an SD 2\.x checkpoint \(OpenCLIP cond_stage_model\.model\.\* keys\)",
        ),
        (
            "sd2-width.safetensors",
            sd1_like(context=1024),
            r"an SD 2\.x checkpoint \(UNet context width 1024\)",
        ),
        (
            "inpaint.safetensors",
            sd1_like(conv_in_channels=9),
            r"an SD1\.x inpainting checkpoint \(conv_in has 9 input channels\)",
        ),
        (
            "pix2pix.safetensors",
            sd1_like(conv_in_channels=8),
            r"an instruct-pix2pix checkpoint \(conv_in has 8 input channels\)",
        ),
        (
            "lora.safetensors",
            {
                "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(
                    4, 320
                ),
                "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0),
            },
            r"a LoRA/LyCORIS network \(lora_down/lora_up-style keys\)",
        ),
        (
            "embedding.safetensors",
            {"emb_params": torch.zeros(2, 768)},
            r"a textual-inversion embedding",
        ),
        (
            "vae.safetensors",
            {
                "encoder.conv_in.weight": torch.zeros(128, 3, 3, 3),
                "decoder.conv_out.weight": torch.zeros(3, 128, 3, 3),
            },
            r"a VAE-only file \(encoder\./decoder\. keys\); pass it as vae=",
        ),
        (
            "unet.safetensors",
            {"conv_in.weight": torch.zeros(4), "down_blocks.0.x": torch.zeros(1)},
            r"a diffusers-format UNet file; load the whole diffusers folder instead",
        ),
    ],
)
def test_other_kinds_are_refused_with_what_they_are(tmp_path, name, tensors, kind):
    path = write(tmp_path, name, tensors)
    with pytest.raises(
        CheckpointError,
        match=(
            rf"{name}: cannot load as an SD1\.x model: this looks like {kind}; "
            r"expected an SD1\.x text-to-image checkpoint"
        ),
    ):
        load_model(path)


def test_sd1_shapes_detect_as_sd1():
    shapes = {key: tuple(t.shape) for key, t in sd1_like().items()}
    assert detect_kind(shapes) == SD1


def test_lora_given_as_vae(tmp_path):
    model = write(tmp_path, "model.safetensors", sd1_like())
    lora = write(tmp_path, "lora.safetensors", {"lora_te_x.lora_up.weight": torch.zeros(2, 2)})
    with pytest.raises(
        CheckpointError,
        match=(r"lora\.safetensors: not a VAE file: this looks like a LoRA/LyCORIS network"),
    ):
        from sdstack.models.vae_file import load_vae_weights

        load_vae_weights(lora, None, torch.float32, torch.device("cpu"))
    assert model.exists()


def _valid_bytes(tmp_path: Path) -> bytes:
    return write(tmp_path, "ok.safetensors", sd1_like()).read_bytes()


def test_truncated_safetensors(tmp_path):
    data = _valid_bytes(tmp_path)
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[:-1000])
    with pytest.raises(
        CheckpointError,
        match=(
            rf"cut\.safetensors: truncated safetensors file: the header declares {len(data)} bytes "
            rf"but the file has {len(data) - 1000} \(1000 missing\); download it again"
        ),
    ):
        load_model(path)


def test_header_length_beyond_file(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes((10**6).to_bytes(8, "little") + b"{}")
    with pytest.raises(
        CheckpointError,
        match=(
            r"huge\.safetensors: corrupt or truncated safetensors header: header length 1000000 "
            r"bytes, but the file has 10 bytes"
        ),
    ):
        load_model(path)


def test_header_not_json(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes((5).to_bytes(8, "little") + b"{oops" + bytes(64))
    with pytest.raises(CheckpointError, match=r"garbage\.safetensors: corrupt safetensors header"):
        load_model(path)


def test_header_entry_without_offsets(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [1]}}).encode()
    path = tmp_path / "entry.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))
    with pytest.raises(
        CheckpointError,
        match=r"entry\.safetensors: corrupt safetensors header: "
        r"entry 'w' is",
    ):
        load_model(path)


def test_pickle_with_custom_class_is_refused_not_executed(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": sd1_like(), "payload": Payload()}, path)
    with pytest.raises(
        CheckpointError,
        match=(
            r"evil\.ckpt: refused to load this pickle checkpoint: the weights-only unpickler "
            r"refuses to call tests\.models\.test_checkpoint_errors\.Payload \(a weights-only "
            r"load rebuilds only tensors and plain containers and never runs code from the "
            r"file\); use a \.safetensors version of the model"
        ),
    ):
        load_model(path)
    touch = tmp_path / "touch.ckpt"
    torch.save({"state_dict": sd1_like(), "x": Touch(marker)}, touch)
    with pytest.raises(
        CheckpointError,
        match=r"refused to load this pickle checkpoint: the weights-only unpickler refuses to "
        r"call builtins\.getattr ",
    ):
        load_model(touch)
    assert not marker.exists()


def test_corrupt_pickle(tmp_path):
    path = tmp_path / "broken.ckpt"
    torch.save({"state_dict": sd1_like()}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=r"broken\.ckpt: corrupt or truncated pickle"):
        load_model(path)


def test_unknown_suffix_and_plain_folder(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    unknown = r"model\.gguf: unknown checkpoint file type '\.gguf'"
    with pytest.raises(CheckpointError, match=unknown):
        load_model(path)
    with pytest.raises(CheckpointError, match=r"a folder but not a diffusers model"):
        load_model(tmp_path)


@pytest.mark.parametrize(
    ("config", "kind"),
    [
        (
            {"addition_embed_type": "text_time", "cross_attention_dim": 2048, "in_channels": 4},
            r"an SDXL model \(addition_embed_type 'text_time'\)",
        ),
        (
            {"cross_attention_dim": 1024, "in_channels": 4},
            r"an SD 2\.x model \(cross_attention_dim 1024\)",
        ),
        (
            {"cross_attention_dim": 768, "in_channels": 9},
            r"an SD1\.x inpainting model \(in_channels 9\)",
        ),
    ],
)
def test_diffusers_folder_of_another_architecture(tmp_path, config, kind):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps(config))
    expected = rf"cannot load as an SD1\.x model: this looks like {kind}"
    with pytest.raises(CheckpointError, match=expected):
        load_model(tmp_path)


def test_tiny_checkpoint_against_the_packaged_configs_suggests_config_dir(
    tiny_components, tmp_path
):
    from sdstack.models.detect import CONFIG_DIR_HINT
    from sdstack.models.ldm_file import save_single_file

    checkpoint = tmp_path / "tiny.safetensors"
    save_single_file(tiny_components, checkpoint)
    with pytest.raises(CheckpointError) as caught:
        load_model(checkpoint)
    assert str(caught.value) == (
        f"{checkpoint}: cannot load as an SD1.x model: this looks like an unknown UNet "
        "(context width 32, the config has 768); expected an SD1.x text-to-image checkpoint; "
        f"{CONFIG_DIR_HINT}"
    )
    assert CONFIG_DIR_HINT.endswith("config_dir= (--config-dir on the command line)")


def test_shapes_that_differ_from_config_dir_are_named_before_any_tensor_is_read(
    tiny_components, tmp_path, monkeypatch
):
    from sdstack.models import single_file
    from sdstack.models.ldm_file import save_single_file
    from sdstack.models.tiny import TINY_UNET_CONFIG

    checkpoint = tmp_path / "tiny.safetensors"
    save_single_file(tiny_components, checkpoint)
    tiny_components.vae.save_config(tmp_path / "config" / "vae")
    tiny_components.text_encoder.config.save_pretrained(tmp_path / "config" / "text_encoder")
    wider = dict(TINY_UNET_CONFIG, block_out_channels=[32, 96])
    (tmp_path / "config" / "unet").mkdir()
    (tmp_path / "config" / "unet" / "config.json").write_text(json.dumps(wider))

    def no_read(self, key):
        raise AssertionError(f"{key} was read before the shapes were checked")

    monkeypatch.setattr(single_file.SafetensorsFile, "tensor", no_read)
    with pytest.raises(CheckpointError) as caught:
        load_model(checkpoint, config_dir=tmp_path / "config")
    message = str(caught.value)
    assert message.startswith(
        f"{checkpoint}: the UNet tensors do not fit the {tmp_path / 'config'} (config_dir) UNet "
        "config: 238 shapes differ (file vs config: down_blocks.1.attentions.0.norm.weight [64] "
        "vs [96], down_blocks.1.attentions.0.norm.bias [64] vs [96], "
    )
    assert message.endswith(" and 233 more)")


def test_key_lists_in_messages_are_capped():
    from sdstack.models.assemble import Fit, check_fit

    expected = {f"k{i:02d}": (4,) for i in range(30)}
    with pytest.raises(CheckpointError) as caught:
        check_fit(Path("m.safetensors"), "UNet", {k: (5,) for k in expected}, Fit(expected))
    assert str(caught.value) == (
        "m.safetensors: the UNet tensors do not fit the SD1.x UNet config: 30 shapes differ "
        "(file vs config: k00 [5] vs [4], k01 [5] vs [4], k02 [5] vs [4], k03 [5] vs [4], "
        "k04 [5] vs [4] and 25 more)"
    )
    found = {f"extra{i:02d}": (4,) for i in range(30)}
    with pytest.raises(CheckpointError) as caught:
        check_fit(Path("m.safetensors"), "VAE", found, Fit({}, "packaged SD1.5", "a hint"))
    names = ", ".join(f"extra{i:02d}" for i in range(10))
    assert str(caught.value) == (
        "m.safetensors: the VAE tensors do not fit the packaged SD1.5 VAE config: 30 tensors "
        f"the config does not have ({names} and 20 more); a hint"
    )
