"""``extract_lora``: SVD per module; extract then bake gives back tuned - base within the
rank's error (Eckart-Young), exactly up to fp32 rounding at full rank; kohya names and
metadata; the quantile clamp works above 2^24 elements."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from sdstack.lora.bake import BakeError, bake_loras
from sdstack.lora.extract import (
    ExtractError,
    extract_layers,
    extract_lora,
    low_rank,
    quantile,
)
from sdstack.models import load_model
from sdstack.models.single_file import open_tensor_file

EPS32 = torch.finfo(torch.float32).eps
UNCOVERED = ("unet:conv_in", "unet:time_embedding.linear_1", "unet:conv_norm_out")


def perturb(model, layers, generator, scale=0.1):
    """W += A @ B (rank 3, std ``scale``) + 1e-3 noise on every given layer's weight."""
    from sdstack.models.key_map import live_module

    with torch.no_grad():
        for layer in layers:
            weight = live_module(model, layer).weight
            rows, cols = weight.shape[0], weight[0].numel()
            a = torch.randn(rows, 3, generator=generator) * scale
            b = torch.randn(3, cols, generator=generator)
            noise = 1e-3 * torch.randn(rows, cols, generator=generator)
            weight += (a @ b / math.sqrt(3) + noise).reshape(weight.shape)


@pytest.fixture(scope="module")
def tuned(tiny_checkpoint, tmp_path_factory):
    """The tiny model with every LoCon-covered layer changed, plus three layers no kohya
    LoRA covers; a second file changes only the UNet."""
    from sdstack.models.key_map import key_map_of
    from sdstack.models.ldm_file import save_single_file

    checkpoint, config = tiny_checkpoint
    folder = tmp_path_factory.mktemp("tuned")
    paths = {}
    for name, parts in (("all", ("unet", "text_encoder")), ("unet", ("unet",))):
        model = load_model(checkpoint, config_dir=config)
        key_map = key_map_of(model)
        covered = [layer for layer, _ in extract_layers(key_map, conv=True)]
        chosen = [layer for layer in covered if layer.component in parts]
        chosen += [key_map[key] for key in UNCOVERED]
        perturb(model, chosen, torch.Generator().manual_seed(len(name)))
        paths[name] = folder / f"tuned-{name}.safetensors"
        save_single_file(model, paths[name])
    return paths


def weights(path):
    with open_tensor_file(path) as source:
        return {key: source.tensor(key).clone() for key in source}


def module_errors(base, tuned, baked, layers, rank):
    """Per covered layer: (||baked - tuned||_F, Eckart-Young bound, tolerance), float64."""
    rows = []
    for layer, _ in layers:
        key = f"{layer.ldm}.weight"
        w0, w1 = base[key].double(), tuned[key].double()
        delta = (w1 - w0).reshape(w1.shape[0], -1)
        singular = torch.linalg.svdvals(delta)
        bound = float(singular[rank:].square().sum().sqrt())
        error = float((baked[key].double() - w1).norm())
        # fp32 SVD (backward error ~ size * eps * ||dW||) + fp32 rounding of the stored sum.
        size = max(delta.shape)
        tolerance = size * EPS32 * float(delta.norm()) + 4 * EPS32 * float(w1.norm())
        rows.append((layer.key, error, bound, tolerance))
    return rows


def extract_and_bake(tiny_checkpoint, tuned_path, tmp_path, **options):
    checkpoint, config = tiny_checkpoint
    lora, baked = tmp_path / "lora.safetensors", tmp_path / "baked.safetensors"
    result = extract_lora(tuned_path, checkpoint, lora, config_dir=config, **options)
    bake_loras(checkpoint, [(str(lora), 1.0)], baked, config_dir=config)
    return result, lora, weights(baked)


def test_extract_then_bake_is_within_the_rank_error(tiny_checkpoint, tuned, tmp_path):
    from sdstack.lora.bake import architecture_key_map

    checkpoint, config = tiny_checkpoint
    result, _, baked = extract_and_bake(
        tiny_checkpoint, tuned["all"], tmp_path, rank=2, conv_rank=2, clamp_quantile=None
    )
    layers = extract_layers(architecture_key_map(config), conv=True)
    assert result.unet_modules + result.text_modules == len(layers)
    base, changed = weights(checkpoint), weights(tuned["all"])
    for key, error, bound, tolerance in module_errors(base, changed, baked, layers, 2):
        assert bound > 10 * tolerance, key  # rank 2 of a rank-3 change: a real truncation
        assert abs(error - bound) <= tolerance, (key, error, bound)
    covered = {f"{layer.ldm}.weight" for layer, _ in layers}
    for key, tensor in baked.items():
        if key not in covered:  # conv_in, time embedding, norms, VAE: not in a kohya LoRA
            assert torch.equal(tensor, base[key]), key


def test_full_rank_without_clamp_reproduces_the_difference(tiny_checkpoint, tuned, tmp_path):
    from sdstack.lora.bake import architecture_key_map

    checkpoint, config = tiny_checkpoint
    _, _, baked = extract_and_bake(
        tiny_checkpoint, tuned["all"], tmp_path, rank=4096, conv_rank=4096, clamp_quantile=1
    )
    layers = extract_layers(architecture_key_map(config), conv=True)
    base, changed = weights(checkpoint), weights(tuned["all"])
    for key, error, bound, tolerance in module_errors(base, changed, baked, layers, 4096):
        assert bound == 0
        assert error <= tolerance, (key, error, tolerance)


def test_unchanged_text_encoder_is_skipped(tiny_checkpoint, tuned, tmp_path):
    from safetensors import safe_open

    result, lora, _ = extract_and_bake(tiny_checkpoint, tuned["unet"], tmp_path, rank=4)
    assert result.text_encoder_skipped and result.text_modules == 0
    assert result.text_encoder_max_diff == 0
    assert result.notes == (
        "text encoder: max |tuned - base| is 0, not above 0.01; not extracted "
        "(the two models share it)",
    )
    with safe_open(str(lora), "pt") as file:
        assert not [key for key in file.keys() if key.startswith("lora_te_")]  # noqa: SIM118
        assert json.loads(file.metadata()["sdstack_extract"])["text_encoder"] == "skipped"


def test_kohya_names_shapes_alpha_and_metadata(tiny_checkpoint, tuned, tmp_path):
    from safetensors import safe_open

    from sdstack.lora.bake import architecture_key_map
    from sdstack.models.hashes import addnet_hash

    checkpoint, config = tiny_checkpoint
    lora = tmp_path / "lora.safetensors"
    result = extract_lora(
        tuned["all"], checkpoint, lora, rank=3, conv_rank=2, config_dir=config, dtype="fp16"
    )
    assert not result.text_encoder_skipped
    layers = extract_layers(architecture_key_map(config), conv=True)
    with safe_open(str(lora), "pt") as file:
        metadata = file.metadata()
        assert len(list(file.keys())) == 3 * len(layers)
        for layer, conv in layers:
            out, inp, *kernel = layer.shape("weight")
            r = min(2 if conv else 3, out, inp * math.prod(kernel))
            down = file.get_tensor(f"{layer.kohya}.lora_down.weight")
            up = file.get_tensor(f"{layer.kohya}.lora_up.weight")
            assert down.shape == (r, inp, *kernel) and down.dtype == torch.float16
            assert up.shape == ((out, r, 1, 1) if kernel else (out, r))
            assert float(file.get_tensor(f"{layer.kohya}.alpha")) == r
    assert {k: metadata[k] for k in metadata if k.startswith("ss_network")} == {
        "ss_network_module": "networks.lora",
        "ss_network_dim": "3",
        "ss_network_alpha": "3",
        "ss_network_args": json.dumps({"conv_dim": "2", "conv_alpha": "2"}),
    }
    assert metadata["ss_base_model_version"] == "sd_v1"
    assert metadata["sshs_model_hash"] == addnet_hash(lora)


def test_the_clamp_is_the_quantile_of_the_absolute_factors(tiny_checkpoint, tuned, tmp_path):
    from safetensors import safe_open

    from sdstack.lora.bake import architecture_key_map

    checkpoint, config = tiny_checkpoint
    lora = tmp_path / "lora.safetensors"
    extract_lora(tuned["all"], checkpoint, lora, rank=4, config_dir=config)
    layer = architecture_key_map(config)["unet:down_blocks.1.attentions.0.proj_in"]
    key = f"{layer.ldm}.weight"
    delta = weights(tuned["all"])[key].float() - weights(checkpoint)[key].float()
    up, down = low_rank(delta.reshape(layer.shape("weight")), 4, None)
    values = torch.cat([up.reshape(-1), down.reshape(-1)]).abs().double().numpy()
    limit = float(np.quantile(values, 0.99))
    assert limit < values.max()  # the clamp cuts something
    with safe_open(str(lora), "pt") as file:
        got_up = file.get_tensor(f"{layer.kohya}.lora_up.weight").reshape(up.shape)
        got_down = file.get_tensor(f"{layer.kohya}.lora_down.weight").reshape(down.shape)
    atol = 2 * EPS32 * limit
    torch.testing.assert_close(got_up, up.clamp(-limit, limit), atol=atol, rtol=0)
    torch.testing.assert_close(got_down, down.clamp(-limit, limit), atol=atol, rtol=0)


@pytest.mark.parametrize("size", [1, 2, 7, 1000])
@pytest.mark.parametrize("q", [0.0, 0.5, 0.99, 1.0])
def test_quantile_matches_numpy(size, q):
    values = torch.randn(size, generator=torch.Generator().manual_seed(size))
    expected = float(np.quantile(values.double().numpy(), q))
    assert quantile(values, q) == pytest.approx(expected, rel=4 * EPS32, abs=4 * EPS32)


def test_quantile_works_above_two_to_the_24_elements():
    # torch.quantile refuses inputs above 2^24 elements on torch 2.13 (not on 2.14): the
    # reason kthvalue is used. Ours must work on both.
    values = torch.rand(2**24 + 3, generator=torch.Generator().manual_seed(0))
    expected = float(np.quantile(values.double().numpy(), 0.99))
    assert quantile(values, 0.99) == pytest.approx(expected, rel=4 * EPS32)


def test_low_rank_is_the_eckart_young_truncation():
    generator = torch.Generator().manual_seed(5)
    delta = torch.randn(24, 8, 3, 3, generator=generator)
    up, down = low_rank(delta, 5, None)
    assert up.shape == (24, 5) and down.shape == (5, 72)
    matrix = delta.double().reshape(24, -1)
    bound = float(torch.linalg.svdvals(matrix)[5:].square().sum().sqrt())
    error = float((up.double() @ down.double() - matrix).norm())
    assert abs(error - bound) <= 72 * EPS32 * float(matrix.norm())
    assert low_rank(delta, 500, None)[0].shape == (24, 24)  # capped by the matrix


def test_sd15_has_kohyas_module_counts():
    """kohya's networks.lora on SD1.5: 72 text-encoder and 192 UNet modules; 278 UNet
    modules with conv_dim (its "create LoRA for U-Net" counts)."""
    from sdstack.models.key_map import sd1_key_map

    plain = extract_layers(sd1_key_map(), conv=False)
    assert sum(layer.component == "text_encoder" for layer, _ in plain) == 72
    assert sum(layer.component == "unet" for layer, _ in plain) == 192
    with_conv = extract_layers(sd1_key_map(), conv=True)
    assert sum(layer.component == "unet" for layer, _ in with_conv) == 278
    assert sum(conv for _, conv in with_conv) == 22 * 2 + 6  # ResNet 3x3 + samplers


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rank": 0}, "rank 0: expected a whole number >= 1 (e.g. 32)"),
        ({"rank": True}, "rank True: expected a whole number >= 1 (e.g. 32)"),
        ({"rank": "4"}, "rank '4': expected a whole number >= 1 (e.g. 32)"),
        ({"rank": 4, "conv_rank": -1}, "conv rank -1: expected a whole number >= 1 (e.g. 32)"),
        ({"rank": 4, "clamp_quantile": 1.5}, "clamp quantile 1.5: expected a number in (0, 1], "
         "e.g. 0.99"),
    ],
)  # fmt: skip
def test_bad_options_are_refused(tiny_checkpoint, tuned, tmp_path, options, message):
    checkpoint, _ = tiny_checkpoint
    with pytest.raises(ExtractError) as error:
        extract_lora(tuned["all"], checkpoint, tmp_path / "o.safetensors", **options)
    assert str(error.value) == message


def test_same_file_missing_file_and_existing_output(tiny_checkpoint, tmp_path):
    checkpoint, config = tiny_checkpoint
    out = tmp_path / "o.safetensors"
    with pytest.raises(ExtractError) as error:
        extract_lora(checkpoint, checkpoint, out, rank=4)
    assert str(error.value) == (
        f"{checkpoint}: TUNED and BASE are the same file; expected two checkpoints to subtract"
    )
    missing = tmp_path / "none.safetensors"
    with pytest.raises(ExtractError) as error:
        extract_lora(missing, checkpoint, out, rank=4)
    assert str(error.value) == f"{missing}: no such file; expected the TUNED single-file checkpoint"
    out.write_bytes(b"x")
    other = tmp_path / "copy.safetensors"
    other.write_bytes(checkpoint.read_bytes())
    with pytest.raises(BakeError, match="file exists; choose a new name"):
        extract_lora(other, checkpoint, out, rank=4, config_dir=config)
    assert out.read_bytes() == b"x"
