"""TrainableLora against kohya's ``networks.lora`` rules and the formula computed directly.

Targets are checked against the key map (every Linear/conv of a UNet ``attentions.N``
module, every text-encoder attention/MLP Linear; LoCon adds the resnet/sampler layers),
init against kaiming_uniform's bound ``1/sqrt(fan_in)``, the forward against
``W x + b + (up @ down) x * multiplier * alpha / rank`` merged into one weight in float64
(tolerance: float64 rounding of a few dot products of length <= 64 of O(1) values,
~64 * 2^-53 * |terms|, bounded here by 1e-12), and removal bit for bit.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from sdstack.models.key_map import key_map_of, live_module
from sdstack.models.tiny import tiny_components
from sdstack.text.clip_skip import clip_skip_output, final_layer_norm
from sdstack.train.network import (
    NETWORK_MODULE,
    TrainableLora,
    TrainNetworkError,
    UnknownNetworkError,
)

F64 = torch.float64


@pytest.fixture
def model():
    """A fresh tiny model (tests hook into it)."""
    return tiny_components(seed=0)


@pytest.fixture
def model64():
    return tiny_components(seed=0).to(dtype=F64)


def randomise_up(network: TrainableLora, seed: int = 1, scale: float = 0.3) -> None:
    generator = torch.Generator().manual_seed(seed)
    for module in network.loras.values():
        weight = module.lora_up.weight
        with torch.no_grad():
            weight.copy_(torch.randn(weight.shape, generator=generator, dtype=F64) * scale)


def unet_inputs(dtype=torch.float32, seed: int = 2):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 8, 8, generator=generator, dtype=dtype)
    context = torch.randn(2, 77, 32, generator=generator, dtype=dtype)
    return latents, torch.tensor([10, 500]), context


def token_ids(seed: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 49406, (2, 77), generator=generator)


def expected_targets(components, locon: bool) -> set[str]:
    """kohya names of the layers kohya's walk finds, from the key map alone."""
    names = set()
    for layer in key_map_of(components).layers:
        if layer.kind not in ("linear", "conv"):
            continue
        if layer.component == "unet":
            in_transformer = ".attentions." in layer.module
            in_resnet = re.search(r"\.(resnets|downsamplers|upsamplers)\.", layer.module)
            if in_transformer or (locon and in_resnet):
                names.add(layer.kohya)
        elif layer.component == "text_encoder" and re.search(
            r"\.layers\.\d+\.(self_attn|mlp)\.", layer.module
        ):
            names.add(layer.kohya)
    return names


# -- targets, names, init -----------------------------------------------------------------


def test_lora_targets_are_kohyas(model):
    network = TrainableLora(model, rank=4, alpha=2)
    assert set(network.loras) == expected_targets(model, locon=False)
    assert len(network.unet_loras) == 6 * 12  # 6 transformers x (8 attn + 2 ff + 2 proj)
    assert len(network.text_encoder_loras) == 5 * 6  # 5 layers x (q k v out fc1 fc2)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in network.loras
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj" in network.loras
    assert "lora_unet_down_blocks_1_attentions_0_proj_in" in network.loras
    assert {m.rank for m in network.loras.values()} == {4}
    assert {m.scale for m in network.loras.values()} == {0.5}
    assert NETWORK_MODULE == "networks.lora"
    assert network.network_args == {}
    network.remove()


def test_locon_adds_resnet_and_sampler_layers(model):
    network = TrainableLora(model, rank=4, alpha=2, network="locon", conv_rank=2, conv_alpha=1)
    assert set(network.loras) == expected_targets(model, locon=True)
    for module in network.loras.values():
        org = live_module(model, module.layer)
        conv3x3 = isinstance(org, torch.nn.Conv2d) and org.kernel_size != (1, 1)
        assert (module.rank, module.scale) == ((2, 0.5) if conv3x3 else (4, 0.5))
    down = network.loras["lora_unet_down_blocks_0_downsamplers_0_conv"]
    assert (down.lora_down.stride, down.lora_down.padding) == ((2, 2), (1, 1))
    assert tuple(down.lora_up.weight.shape[2:]) == (1, 1)
    assert "lora_unet_down_blocks_1_resnets_0_time_emb_proj" in network.loras
    assert network.network_args == {"conv_dim": "2", "conv_alpha": "1"}
    network.remove()


def test_alpha_none_or_zero_is_rank_and_locon_defaults(model):
    for alpha in (None, 0):
        network = TrainableLora(model, rank=4, alpha=alpha)
        assert network.alpha == 4.0 and {m.scale for m in network.loras.values()} == {1.0}
        network.remove()
    locon = TrainableLora(model, rank=8, alpha=4, network="locon")
    assert (locon.conv_rank, locon.conv_alpha) == (8, 1.0)  # kohya: conv_alpha 1.0
    locon.remove()


def test_init_is_kaiming_uniform_and_zero_up_and_seeded(model):
    first = TrainableLora(model, rank=8, seed=5)
    for module in first.loras.values():
        down = module.lora_down.weight
        bound = 1 / math.sqrt(down[0].numel())  # gain sqrt(2/(1+5)) * sqrt(3/fan_in)
        assert down.abs().max() <= bound
        assert down.abs().max() > 0.8 * bound
        assert torch.count_nonzero(module.lora_up.weight) == 0
    first.remove()
    second = TrainableLora(model, rank=8, seed=5)
    third = TrainableLora(model, rank=8, seed=6)
    a, b, c = (n.state_dict_kohya() for n in (first, second, third))
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert not torch.equal(a[next(iter(a))], c[next(iter(c))])
    second.remove()
    third.remove()


# -- forward --------------------------------------------------------------------------------


def test_linear_forward_is_the_merged_weight_formula(model64):
    network = TrainableLora(model64, rank=4, alpha=3, multiplier=0.7, dtype=F64)
    randomise_up(network)
    generator = torch.Generator().manual_seed(4)
    for name in (
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k",
        "lora_te_text_model_encoder_layers_2_mlp_fc1",
    ):
        module = network.loras[name]
        org = live_module(model64, module.layer)
        x = torch.randn(3, org.in_features, generator=generator, dtype=F64)
        up, down = module.lora_up.weight, module.lora_down.weight
        merged = org.weight + 0.7 * (3 / 4) * (up @ down)
        bias = 0 if org.bias is None else org.bias
        expected = x @ merged.T + bias
        assert torch.allclose(org(x), expected, rtol=0, atol=1e-12)
        assert (org(x) - F.linear(x, org.weight, org.bias)).abs().max() > 1e-3
    network.remove()


def test_conv_forward_is_the_formula(model64):
    network = TrainableLora(model64, rank=4, alpha=2, network="locon", conv_rank=3, dtype=F64)
    randomise_up(network)
    generator = torch.Generator().manual_seed(5)
    for name in (
        "lora_unet_down_blocks_0_downsamplers_0_conv",  # 3x3 stride 2
        "lora_unet_down_blocks_1_attentions_0_proj_in",  # 1x1
    ):
        module = network.loras[name]
        org = live_module(model64, module.layer)
        x = torch.randn(2, org.in_channels, 8, 8, generator=generator, dtype=F64)
        base = F.conv2d(x, org.weight, org.bias, org.stride, org.padding)
        down = F.conv2d(x, module.lora_down.weight, None, org.stride, org.padding)
        expected = base + F.conv2d(down, module.lora_up.weight) * module.scale
        assert torch.allclose(org(x), expected, rtol=0, atol=1e-12)
        assert (org(x) - base).abs().max() > 1e-3
    network.remove()


def test_fresh_network_is_the_identity_and_remove_is_bit_exact(model):
    latents, timesteps, context = unet_inputs()
    ids = token_ids()
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    with torch.no_grad():
        base = model.unet(latents, timesteps, context).sample
        base_te = model.text_encoder(ids).last_hidden_state
    network = TrainableLora(model, rank=4, network="locon")
    with torch.no_grad():
        assert torch.equal(model.unet(latents, timesteps, context).sample, base)
        randomise_up(network)
        assert not torch.allclose(model.unet(latents, timesteps, context).sample, base)
        assert not torch.allclose(model.text_encoder(ids).last_hidden_state, base_te)
    network.remove()
    network.remove()  # idempotent
    assert not network.attached
    with torch.no_grad():
        assert torch.equal(model.unet(latents, timesteps, context).sample, base)
        assert torch.equal(model.text_encoder(ids).last_hidden_state, base_te)
    after = model.unet.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[key], after[key]) for key in before)
    network.attach()
    with torch.no_grad():
        assert not torch.allclose(model.unet(latents, timesteps, context).sample, base)
    network.multiplier = 0.0
    with torch.no_grad():
        assert torch.equal(model.unet(latents, timesteps, context).sample, base)
    network.remove()


# -- gradients ------------------------------------------------------------------------------


def lora_grads(model, network, checkpointing: bool) -> dict[str, torch.Tensor]:
    model.unet.requires_grad_(False)
    model.text_encoder.requires_grad_(False)
    model.unet.train()
    model.text_encoder.train()
    te = model.text_encoder
    if checkpointing:  # transformers 5 renamed gradient_checkpointing_enable
        model.unet.enable_gradient_checkpointing()
        getattr(te, "activation_checkpointing_enable", te.gradient_checkpointing_enable)()
    else:
        model.unet.disable_gradient_checkpointing()
        getattr(te, "activation_checkpointing_disable", te.gradient_checkpointing_disable)()
    latents, timesteps, _ = unet_inputs()
    for parameter in network.parameters_unet() + network.parameters_text_encoder():
        parameter.grad = None
    calls = []
    probe = model.unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn1.to_q")
    handle = probe.register_forward_hook(lambda *_: calls.append(1))
    context = model.text_encoder(token_ids()).last_hidden_state
    model.unet(latents, timesteps, context).sample.square().mean().backward()
    handle.remove()
    assert len(calls) == (2 if checkpointing else 1)  # recomputed in the backward pass
    return {
        f"{name}.{leaf}": getattr(module, leaf).weight.grad.clone()
        for name, module in network.loras.items()
        for leaf in ("lora_down", "lora_up")
    }


def test_gradients_flow_and_gradient_checkpointing_gives_the_same(model):
    network = TrainableLora(model, rank=4, seed=0)
    randomise_up(network)  # so that the down weights get a gradient too
    plain = lora_grads(model, network, checkpointing=False)
    checkpointed = lora_grads(model, network, checkpointing=True)
    assert all(grad.abs().max() > 0 for grad in plain.values())
    for key, grad in plain.items():
        # the same operations recomputed: equal up to summation order (float32, tiny)
        torch.testing.assert_close(checkpointed[key], grad, rtol=1e-5, atol=1e-9)
    assert all(not p.requires_grad for p in model.unet.parameters())
    network.remove()


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_last_clip_layer_gets_no_gradient_at_clip_skip_2(model, clip_skip):
    network = TrainableLora(model, rank=4, train_unet=False, seed=0)
    assert network.parameters_unet() == [] and not network.unet_loras
    model.text_encoder.requires_grad_(False)
    out = model.text_encoder(token_ids(), output_hidden_states=True)
    norm = final_layer_norm(model.text_encoder)
    cond = clip_skip_output(out.hidden_states, out.last_hidden_state, norm, clip_skip)
    cond.square().mean().backward()
    last = [m for n, m in network.loras.items() if "_layers_4_" in n]
    earlier = [m for n, m in network.loras.items() if "_layers_3_" in n]
    assert len(last) == 6
    assert all(m.lora_up.weight.grad.abs().max() > 0 for m in earlier)
    if clip_skip == 2:
        assert all(m.lora_up.weight.grad is None for m in last)
    else:
        assert all(m.lora_up.weight.grad.abs().max() > 0 for m in last)
    network.remove()


# -- state ----------------------------------------------------------------------------------


def test_state_dict_kohya_keys_dtype_and_round_trip(model):
    network = TrainableLora(model, rank=4, alpha=2, seed=0)
    randomise_up(network)
    state = network.state_dict_kohya(torch.float16)
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    assert len(state) == 3 * len(network.loras)
    assert state[f"{name}.lora_down.weight"].shape == (4, 64)
    assert state[f"{name}.lora_up.weight"].shape == (64, 4)
    assert state[f"{name}.alpha"].shape == () and float(state[f"{name}.alpha"]) == 2.0
    assert {t.dtype for t in state.values()} == {torch.float16}
    exact = network.state_dict_kohya()
    other = TrainableLora(model, rank=4, alpha=2, seed=9)
    other.load_state(exact)
    assert all(torch.equal(exact[k], v) for k, v in other.state_dict_kohya().items())
    network.remove()
    other.remove()


def test_load_state_errors(model):
    network = TrainableLora(model, rank=4, alpha=2, train_text_encoder=False)
    state = network.state_dict_kohya()
    name = next(iter(network.loras))
    missing = {k: v for k, v in state.items() if k != f"{name}.alpha"}
    with pytest.raises(TrainNetworkError, match=r"1 missing keys .*alpha\) and 0 unexpected"):
        network.load_state(missing)
    extra = {**state, "lora_te_text_model_x.alpha": torch.tensor(1.0)}
    with pytest.raises(TrainNetworkError, match=r"0 missing keys .* 1 unexpected keys"):
        network.load_state(extra)
    shaped = {**state, f"{name}.lora_up.weight": torch.zeros(3, 3)}
    with pytest.raises(
        TrainNetworkError,
        match=r"proj_in.lora_up.weight has shape \(3, 3\); expected \(64, 4, 1, 1\)",
    ):
        network.load_state(shaped)
    alpha = {**state, f"{name}.alpha": torch.tensor(7.0)}
    with pytest.raises(TrainNetworkError, match="alpha is 7; this network has alpha 2"):
        network.load_state(alpha)
    for value, message in (
        (torch.ones(2), r"is Tensor \(2,\); expected a scalar tensor"),
        ([2.0], "is list ; expected a scalar tensor"),
        (torch.tensor(float("nan")), "alpha is nan; this network has"),
    ):
        with pytest.raises(TrainNetworkError, match=message):
            network.load_state({**state, f"{name}.alpha": value})
    network.remove()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"rank": 0}, TrainNetworkError, "rank is 0; expected a whole number >= 1"),
        ({"rank": True}, TrainNetworkError, "rank is True; expected a whole number >= 1"),
        ({"rank": 2.5}, TrainNetworkError, "rank is 2.5; expected"),
        ({"alpha": -1}, TrainNetworkError, "alpha is -1; expected a finite number > 0"),
        ({"alpha": "8"}, TrainNetworkError, "alpha is '8'; expected a number"),
        ({"conv_rank": 4}, TrainNetworkError, "only trained by network 'locon'"),
        ({"network": "loco"}, UnknownNetworkError, "did you mean 'locon'"),
        (
            {"train_unet": False, "train_text_encoder": False},
            TrainNetworkError,
            "both False; expected at least one",
        ),
    ],
)
def test_bad_settings(model, kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        TrainableLora(model, **kwargs)


def test_float32_lora_under_autocast_and_on_a_low_precision_model(model):
    """CPU bfloat16 autocast stands in for CUDA fp16/bf16: the LoRA stays float32 (its
    gradients too), the hooked output keeps the model's dtype."""
    model.unet.requires_grad_(False)
    network = TrainableLora(model, rank=4, seed=0)
    latents, timesteps, context = unet_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.unet(latents, timesteps, context).sample
    out.float().square().mean().backward()
    up = network.parameters_unet()[1]
    assert up.dtype == torch.float32 and up.grad.dtype == torch.float32
    assert up.grad.abs().max() > 0
    network.remove()
    model.unet.to(torch.bfloat16)
    network = TrainableLora(model, rank=4, seed=0)
    randomise_up(network)
    with torch.no_grad():
        out = model.unet(latents.bfloat16(), timesteps, context.bfloat16()).sample
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert {p.dtype for p in network.parameters_unet()} == {torch.float32}
    network.remove()
