"""Reading every LoRA naming: against diffusers on the same tiny model, and each other.

kohya and PEFT files are checked against diffusers' ``load_lora_weights`` + ``fuse_lora``
on a fresh tiny model (``components.diffusers_pipeline()``, PEFT backend): the weight we
would patch, ``W0 + dW`` in float32, against the weight diffusers fused. Tolerance, from
float32 rounding alone (u = 2^-24, gamma(n) = n u / (1 - n u)): each side computes
``dW = s * up @ down`` (r products summed, then the scale) within gamma(r + 1) * s *
(|up| @ |down|) of the exact value, and rounds ``W0 + dW`` once, so the two differ by at
most 2 gamma(r + 1) s (|up| @ |down|) + 2 u |W0 + dW| per element.

The compvis, webui and attention-processor namings of the same tensors give the deltas of
the kohya file bit for bit (same tensors, same arithmetic). Also: unmatched keys, foreign
(SDXL, SD 2.x) files, bundled embeddings, the real SD1 kohya module list, inpainting.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch

from sdstack.lora.algorithms import module_delta
from sdstack.lora.formats import read_lora
from sdstack.lora.formats_keys import SplitKey
from sdstack.lora.network import ForeignLoraError, LoraFileError
from sdstack.models.key_map import key_map_of, live_module, sd1_key_map
from tests.lora import lora_files as lf

U = 2.0**-24
DATA = Path(__file__).parents[1] / "models" / "data"


def gamma(n: int) -> float:
    return n * U / (1 - n * U)


def originals(model, layer) -> dict[str, torch.Tensor]:
    module = live_module(model, layer)
    module = getattr(module, "base_layer", module)
    found = {"weight": module.weight.detach().float().clone()}
    if getattr(module, "bias", None) is not None:
        found["bias"] = module.bias.detach().float().clone()
    return found


def fused_by_diffusers(path: Path):
    """A fresh tiny model with the file loaded and fused by diffusers, and our reading of
    the same file (with each module's originals taken before fusing)."""
    from sdstack.models.tiny import tiny_components

    model = tiny_components(seed=0)
    file = read_lora(path, key_map_of(model))
    before = {key: originals(model, m.layer) for key, m in file.modules.items()}
    pipe = model.diffusers_pipeline()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.load_lora_weights(str(path))
        pipe.fuse_lora()
    after = {key: originals(model, m.layer)["weight"] for key, m in file.modules.items()}
    return file, before, after


def lora_magnitude(module) -> torch.Tensor:
    """s * (|up| @ |down|) in float64, viewed as the layer's weight."""
    up = module.tensors["lora_up.weight"].double().abs()
    down = module.tensors["lora_down.weight"].double().abs()
    product = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
    return abs(module.effective_scale) * product.reshape(module.layer.shape("weight"))


def assert_matches_diffusers(path: Path, expected_scales: dict[str, float]) -> None:
    file, before, after = fused_by_diffusers(path)
    assert set(file.modules) == set(expected_scales)
    for key, module in file.modules.items():
        assert module.effective_scale == pytest.approx(expected_scales[key], rel=1e-12)
        ours = before[key]["weight"] + module_delta(module, before[key])["weight"]
        assert not torch.equal(ours, before[key]["weight"])
        rank = module.rank
        tolerance = 2 * gamma(rank + 1) * lora_magnitude(module) + 2 * U * ours.double().abs()
        excess = (ours.double() - after[key].double()).abs() - tolerance
        assert excess.max().item() <= 0, f"{key}: beyond the rounding bound by {excess.max()}"


def test_kohya_lora_matches_diffusers_fuse(tmp_path, tiny_components):
    path = lf.write_kohya(tmp_path / "kohya.safetensors", tiny_components, rank=4, alpha=3.0)
    assert_matches_diffusers(path, {key: 3.0 / 4 for key in lf.KOHYA_LAYERS})


def test_peft_lora_with_adapter_metadata_matches_diffusers_fuse(tmp_path, tiny_components):
    special, low_rank = lf.LINEAR_LAYERS[0], lf.LINEAR_LAYERS[6]
    path = lf.write_peft(
        tmp_path / "peft.safetensors",
        tiny_components,
        rank=4,
        lora_alpha=8.0,
        alpha_pattern={special: 2.0, low_rank: 3.0},
        rank_pattern={low_rank: 2},
    )
    scales = {key: 8.0 / 4 for key in lf.KOHYA_LAYERS}
    scales.update({special: 2.0 / 4, low_rank: 3.0 / 2})
    assert_matches_diffusers(path, scales)


def test_peft_rs_lora_matches_diffusers_fuse(tmp_path, tiny_components):
    path = lf.write_peft(
        tmp_path / "rs.safetensors", tiny_components, rank=4, lora_alpha=6.0, use_rslora=True
    )
    assert_matches_diffusers(path, {key: 6.0 / math.sqrt(4) for key in lf.KOHYA_LAYERS})


@pytest.mark.parametrize("prefixed", [True, False], ids=["pipeline", "bare"])
def test_peft_without_alpha_has_alpha_rank(tmp_path, tiny_components, prefixed):
    path = lf.write_peft(
        tmp_path / "plain.safetensors", tiny_components, metadata=False, prefixed=prefixed
    )
    file = read_lora(path, key_map_of(tiny_components))
    assert {(m.alpha, m.rank) for m in file.modules.values()} == {(4.0, 4)}
    assert file.format == "peft"
    if prefixed:
        assert_matches_diffusers(path, dict.fromkeys(lf.KOHYA_LAYERS, 1.0))


def test_peft_alpha_key_in_the_file_wins(tmp_path, tiny_components):
    layer = key_map_of(tiny_components)[lf.LINEAR_LAYERS[0]]
    state = lf.peft_state(tiny_components, layers=[layer.key])
    state[f"{layer.peft}.alpha"] = torch.tensor(1.0)
    path = lf.save(
        tmp_path / "alpha.safetensors",
        state,
        lf.adapter_metadata(tiny_components, layers=[layer.key]),
    )
    module = read_lora(path, key_map_of(tiny_components)).modules[layer.key]
    assert (module.alpha, module.effective_scale) == (1.0, 0.25)


def test_peft_dora_magnitude_matches_diffusers_fuse(tmp_path, tiny_components):
    """PEFT DoRA (``lora_magnitude_vector``): one norm per output row."""
    layers = lf.LINEAR_LAYERS[:3]
    keys = key_map_of(tiny_components)
    state = lf.peft_state(tiny_components, layers=layers)
    for index, key in enumerate(layers):
        layer = keys[key]
        w0 = originals(tiny_components, layer)["weight"]
        magnitude = w0.norm(dim=1) * (1 + lf.randn((w0.shape[0],), lf.generator(7, index), 0.1))
        state[f"{layer.peft}.lora_magnitude_vector"] = magnitude
    metadata = lf.adapter_metadata(tiny_components, layers=layers, lora_alpha=4.0)
    fields = json.loads(metadata["lora_adapter_metadata"])
    fields["unet.use_dora"] = True
    path = lf.save(
        tmp_path / "dora.safetensors",
        state,
        {**metadata, "lora_adapter_metadata": json.dumps(fields)},
    )
    file, before, after = fused_by_diffusers(path)
    for key, module in file.modules.items():
        assert module.dora_scale.shape == (module.layer.shape("weight")[0], 1)
        ours = before[key]["weight"] + module_delta(module, before[key])["weight"]
        # dora rescales rows of W0 + dW to the magnitude: the dW bound, relative to the row
        # norm, plus gamma(in + 2) for the norm and 4 roundings (sum, divide, multiply, add)
        w0, magnitude = before[key]["weight"].double(), module.dora_scale.double()
        delta_bound = 2 * gamma(module.rank + 1) * lora_magnitude(module)
        merged = (
            w0 + module_delta(module, {"weight": torch.zeros_like(w0).float()})["weight"].double()
        )
        row = merged.norm(dim=1, keepdim=True)
        relative = delta_bound.norm(dim=1, keepdim=True) / row + 2 * gamma(w0.shape[1] + 2) + 8 * U
        tolerance = (merged.abs() + delta_bound) * (magnitude / row) * relative + delta_bound
        excess = (ours.double() - after[key].double()).abs() - tolerance
        assert excess.max().item() <= 0, f"{key}: beyond the rounding bound by {excess.max()}"


def deltas(model, file):
    return {key: module_delta(m, originals(model, m.layer)) for key, m in file.modules.items()}


@pytest.mark.parametrize("naming", ["compvis", "webui"])
def test_reference_ui_names_read_as_the_kohya_file(tmp_path, tiny_components, naming):
    keys = key_map_of(tiny_components)
    kohya = read_lora(lf.write_kohya(tmp_path / "kohya.safetensors", tiny_components), keys)
    other = read_lora(
        lf.write_kohya(tmp_path / f"{naming}.safetensors", tiny_components, naming=naming), keys
    )
    assert other.format == naming and kohya.format == "kohya"
    ours, theirs = deltas(tiny_components, kohya), deltas(tiny_components, other)
    assert set(ours) == set(theirs) == set(lf.KOHYA_LAYERS)
    for key in ours:
        assert torch.equal(ours[key]["weight"], theirs[key]["weight"])


def test_attention_processor_form_reads_as_the_kohya_file(tmp_path, tiny_components):
    keys = key_map_of(tiny_components)
    procs = lf.save(tmp_path / "pytorch_lora_weights.bin", lf.attn_procs_state(tiny_components))
    kohya = lf.write_kohya(
        tmp_path / "kohya.safetensors", tiny_components, layers=lf.ATTENTION_PROJECTIONS, alpha=None
    )
    old, new = read_lora(procs, keys), read_lora(kohya, keys)
    assert old.format == "attn-procs"
    assert {(m.alpha, m.rank) for m in old.modules.values()} == {(4.0, 4)}
    ours, theirs = deltas(tiny_components, new), deltas(tiny_components, old)
    assert set(theirs) == set(lf.ATTENTION_PROJECTIONS)
    for key in ours:
        assert torch.equal(ours[key]["weight"], theirs[key]["weight"])


def test_pickle_file_reads_as_the_safetensors_file(tmp_path, tiny_components):
    keys = key_map_of(tiny_components)
    state = lf.lora_state(tiny_components, dtype=torch.float16)
    safe = read_lora(lf.save(tmp_path / "a.safetensors", state), keys)
    pickled = read_lora(lf.save(tmp_path / "a.pt", state), keys)
    assert pickled.metadata == {} and set(pickled.modules) == set(safe.modules)
    first = next(iter(safe.modules))
    assert safe.modules[first].tensors["lora_up.weight"].dtype == torch.float16
    ours, theirs = deltas(tiny_components, safe), deltas(tiny_components, pickled)
    for key in ours:
        assert ours[key]["weight"].dtype == torch.float32
        assert torch.equal(ours[key]["weight"], theirs[key]["weight"])


def test_unmatched_keys_are_listed_in_file_order(tmp_path, tiny_components):
    state = lf.lora_state(tiny_components, layers=lf.LINEAR_LAYERS[:2])
    extra = {
        "lora_unet_no_such_block_to_q.lora_down.weight": torch.zeros(4, 64),
        "lora_te_text_model_encoder_layers_9_self_attn_q_proj.alpha": torch.tensor(1.0),
        "some.random.tensor": torch.zeros(2),
        "stray": torch.zeros(1),
    }
    path = lf.save(tmp_path / "partial.safetensors", {**state, **extra})
    file = read_lora(path, key_map_of(tiny_components))
    assert set(file.modules) == set(lf.LINEAR_LAYERS[:2])
    assert file.unmatched == tuple(sorted(extra))  # safetensors stores keys sorted


def test_every_module_of_a_real_sd1_kohya_lora_matches_sd15(tmp_path):
    """The 264 modules of a standard kohya SD1 LoRA, at their real shapes (rank 1)."""
    names = [
        line
        for line in (DATA / "sd1_kohya_lora_modules.txt").read_text().splitlines()
        if line and line[0] != "#"
    ]
    keys = sd1_key_map()
    state = {}
    for name in names:
        out, inp, *kernel = keys.find(name).shape("weight")
        ones = [1] * len(kernel)
        state[f"{name}.lora_down.weight"] = torch.zeros(1, inp, *ones, dtype=torch.float16)
        state[f"{name}.lora_up.weight"] = torch.zeros(out, 1, *ones, dtype=torch.float16)
        state[f"{name}.alpha"] = torch.tensor(1.0, dtype=torch.float16)
    file = read_lora(lf.save(tmp_path / "sd1.safetensors", state))
    assert len(file.modules) == len(names) == 264 and file.unmatched == ()
    components = [m.layer.component for m in file.modules.values()]
    assert (components.count("text_encoder"), components.count("unet")) == (72, 192)


FOREIGN = [
    (
        lambda: lf.sdxl_like_state(),
        {},
        "is an SDXL LoRA (text-encoder keys such as "
        "'lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight'); "
        "this model is SD 1.x",
    ),
    (
        lambda: lf.sdxl_like_state(with_text=False),
        {},
        "is an SDXL LoRA ('lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
        ".lora_down.weight' takes 2048-wide context); this model is SD 1.x",
    ),
    (
        lambda: {
            "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.lora_down.weight": (
                torch.zeros(4, 640)
            ),
            "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.lora_up.weight": (
                torch.zeros(640, 4)
            ),
        },
        {},
        "is an SDXL LoRA (several transformer blocks per attention, such as "
        "'lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.lora_down.weight'); "
        "this model is SD 1.x",
    ),
    (
        lambda: lf.sd2_like_state(),
        {},
        "is an SD 2.x LoRA ('lora_te_text_model_encoder_layers_0_self_attn_q_proj"
        ".lora_down.weight' is 1024 wide); this model is SD 1.x",
    ),
    (
        lambda: {"lora_te_text_model_encoder_layers_23_mlp_fc1.alpha": torch.tensor(1.0)},
        {},
        "is an SD 2.x LoRA (text-encoder layers up to 23, SD 1.x has 0-11); this model is SD 1.x",
    ),
    (
        lambda: {"lora_unet_x.alpha": torch.tensor(1.0)},
        {"ss_base_model_version": "sdxl_base_v1-0"},
        "is an SDXL LoRA (ss_base_model_version 'sdxl_base_v1-0'); this model is SD 1.x",
    ),
    (
        lambda: {"lora_unet_x.alpha": torch.tensor(1.0)},
        {"ss_v2": "True"},
        "is an SD 2.x LoRA (ss_v2 'True'); this model is SD 1.x",
    ),
    (
        lambda: {"lora_unet_x.alpha": torch.tensor(1.0)},
        {"modelspec.architecture": "flux-1-dev/lora"},
        "is a FLUX LoRA (modelspec.architecture 'flux-1-dev/lora'); this model is SD 1.x",
    ),
]


@pytest.mark.parametrize("state, metadata, message", FOREIGN)
@pytest.mark.parametrize("keys", ["tiny", "sd15"])
def test_foreign_loras_are_refused_naming_what_they_are_for(
    tmp_path, tiny_components, state, metadata, message, keys
):
    path = lf.save(tmp_path / "foreign.safetensors", state(), metadata)
    key_map = key_map_of(tiny_components) if keys == "tiny" else sd1_key_map()
    with pytest.raises(ForeignLoraError) as caught:
        read_lora(path, key_map)
    assert str(caught.value) == f"{path}: {message}"


def test_bundled_embeddings_in_every_form(tmp_path, tiny_components):
    state = {
        **lf.lora_state(tiny_components, layers=lf.LINEAR_LAYERS[:1]),
        **lf.bundle_state(tiny_components),
    }
    path = lf.save(tmp_path / "bundle.safetensors", state)
    file = read_lora(path, key_map_of(tiny_components))
    assert {name: tuple(t.shape) for name, t in file.embeddings.items()} == {
        "starry": (3, 32),
        "paramed": (2, 32),
        "concept": (1, 32),
        "vector": (1, 32),
    }
    assert torch.equal(file.embeddings["starry"], state["bundle_emb.starry.string_to_param.*"])
    assert torch.equal(file.embeddings["vector"][0], state["bundle_emb.vector.emb_params"])
    assert all(t.dtype == torch.float32 for t in file.embeddings.values())
    assert len(file.modules) == 1 and file.unmatched == ()
    only = read_lora(
        lf.save(tmp_path / "only.safetensors", lf.bundle_state(tiny_components)),
        key_map_of(tiny_components),
    )
    assert only.format == "embeddings" and only.modules == {}


def test_sdxl_bundled_embedding_is_refused(tmp_path, tiny_components):
    state = {
        "bundle_emb.x.clip_l": torch.zeros(1, 768),
        "bundle_emb.x.clip_g": torch.zeros(1, 1280),
    }
    path = lf.save(tmp_path / "xl.safetensors", state)
    with pytest.raises(ForeignLoraError) as caught:
        read_lora(path, key_map_of(tiny_components))
    assert str(caught.value) == (
        f"{path}: bundled embedding 'x' is an SDXL embedding (clip_l + clip_g); "
        "this model is SD 1.x"
    )


def test_inpainting_conv_in_takes_a_four_channel_lora(tmp_path, tiny_components):
    from diffusers import UNet2DConditionModel

    from sdstack.models.components import ModelComponents
    from sdstack.models.tiny import TINY_UNET_CONFIG

    unet = UNet2DConditionModel(**{**TINY_UNET_CONFIG, "in_channels": 9})
    inpaint = ModelComponents(
        unet=unet,
        vae=tiny_components.vae,
        text_encoder=tiny_components.text_encoder,
        tokenizer=None,
    )
    keys = key_map_of(inpaint)
    assert keys["unet:conv_in"].shape("weight") == (32, 9, 3, 3)
    state = lf.lora_state(tiny_components, layers=["unet:conv_in"], alpha=4.0)
    file = read_lora(lf.save(tmp_path / "conv_in.safetensors", state), keys)
    module = file.modules["unet:conv_in"]
    w0 = unet.conv_in.weight.detach().float()
    delta = module_delta(module, {"weight": w0, "bias": unet.conv_in.bias.detach().float()})[
        "weight"
    ]
    plain = module_delta(
        read_lora(
            lf.save(tmp_path / "plain.safetensors", state), key_map_of(tiny_components)
        ).modules["unet:conv_in"],
        {"weight": torch.zeros(32, 4, 3, 3)},
    )["weight"]
    assert delta.shape == (32, 9, 3, 3)
    assert torch.equal(delta[:, :4], plain) and not delta[:, 4:].any()


def test_model_checkpoint_is_not_a_lora(tmp_path, tiny_checkpoint, tiny_components):
    checkpoint, _ = tiny_checkpoint
    with pytest.raises(LoraFileError) as caught:
        read_lora(checkpoint, key_map_of(tiny_components))
    assert str(caught.value) == (
        f"{checkpoint}: is a full model checkpoint, not a LoRA "
        "(it has model.diffusion_model.* keys)"
    )


@pytest.mark.parametrize(
    "key, module, part, style",
    [
        ("lora_unet_x_y.lora_down.weight", "lora_unet_x_y", "lora_down.weight", "kohya"),
        ("lora_te_text_model_a.alpha", "lora_te_text_model_a", "alpha", "kohya"),
        (
            "diffusion_model_input_blocks_1_1_proj_in.hada_w1_a",
            "diffusion_model_input_blocks_1_1_proj_in",
            "hada_w1_a",
            "kohya",
        ),
        ("lora_unet_x.oft_blocks", "lora_unet_x", "oft_blocks", "kohya"),
        (
            "unet.down_blocks.0.attn1.to_q.lora_A.weight",
            "unet.down_blocks.0.attn1.to_q",
            "lora_down.weight",
            "peft",
        ),
        ("unet.a.to_q.lora_B.bias", "unet.a.to_q", "lora_up.bias", "peft"),
        (
            "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.up.weight",
            "text_encoder.text_model.encoder.layers.0.mlp.fc1",
            "lora_up.weight",
            "peft",
        ),
        ("unet.a.to_k.lora.down.weight", "unet.a.to_k", "lora_down.weight", "peft"),
        ("unet.a.to_k.lora_magnitude_vector", "unet.a.to_k", "magnitude", "peft"),
        ("unet.a.to_k.alpha", "unet.a.to_k", "alpha", "peft"),
        (
            "base_model.model.down_blocks.0.a.to_q.lora_A.weight",
            "down_blocks.0.a.to_q",
            "lora_down.weight",
            "peft",
        ),
        (
            "down_blocks.0.attn1.processor.to_out_lora.up.weight",
            "down_blocks.0.attn1.to_out.0",
            "lora_up.weight",
            "attn-procs",
        ),
        (
            "text_encoder.text_model.encoder.layers.0.self_attn.to_k_lora.down.weight",
            "text_encoder.text_model.encoder.layers.0.self_attn.k_proj",
            "lora_down.weight",
            "attn-procs",
        ),
    ],
)
def test_file_keys_split_into_module_and_part(key, module, part, style):
    from sdstack.lora.formats_keys import split_key

    assert split_key(key) == SplitKey(key, module, part, style)


@pytest.mark.parametrize(
    "key", ["stray", "model.diffusion_model.out.2.weight", "unet.a.weight", "a.lora_A.weight."]
)
def test_keys_of_no_lora_grammar_do_not_split(key):
    from sdstack.lora.formats_keys import split_key

    assert split_key(key) is None


def test_bare_peft_keys_are_found_in_either_component(tmp_path, tiny_components):
    keys = key_map_of(tiny_components)
    state = {
        f"base_model.model.{k.removeprefix('unet.').removeprefix('text_encoder.')}": v
        for k, v in lf.peft_state(tiny_components, layers=lf.LINEAR_LAYERS).items()
    }
    file = read_lora(lf.save(tmp_path / "bare.safetensors", state), keys)
    assert set(file.modules) == set(lf.LINEAR_LAYERS) and file.unmatched == ()
