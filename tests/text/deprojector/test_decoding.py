"""Decoders: the key/value cache equals the naive full re-run; the decode is self-consistent."""

from __future__ import annotations

import pytest
import torch

from sdstack.text.deprojector import DeprojectorError
from sdstack.text.deprojector.decoding import (
    ACTIVATIONS,
    DeprojectorLayer,
    KeyValueCache,
    LayerStack,
    quick_gelu,
)
from sdstack.text.deprojector.model import Deprojector

TEXTS = ["a cat", "a castle on a hill at night, watercolor, very detailed", ""]


@pytest.fixture(scope="module")
def embeddings(tiny_text_encoder, tokenizer):
    model = Deprojector.from_clip(tiny_text_encoder, tokenizer)
    return model.embed(tiny_text_encoder, tokenizer, TEXTS)


def _trained_like(model: Deprojector, seed: int) -> Deprojector:
    """Move every parameter off CLIP's values (seeded), as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
            parameter.add_(0.05 * noise)
    return model


@pytest.mark.parametrize(
    ("layers", "ensemble", "clip_skip", "input_mlp"),
    [(1, 1, 1, False), (2, 2, 2, True), (3, 1, 1, False)],
)
@torch.no_grad()
def test_cached_decode_equals_naive_decode(
    tiny_text_encoder, tokenizer, embeddings, layers, ensemble, clip_skip, input_mlp
):
    model = Deprojector.from_clip(
        tiny_text_encoder,
        tokenizer,
        layers=layers,
        ensemble=ensemble,
        clip_skip=clip_skip,
        input_mlp=input_mlp,
    )
    model = _trained_like(model, seed=layers)
    cached = model.decode(embeddings)
    naive = model.decode(embeddings, cache=False)
    assert cached.shape == (3, 77, 32)
    # float32: one rounding difference per step, fed back through 76 steps
    torch.testing.assert_close(cached, naive, atol=1e-5, rtol=1e-5)
    # float64: the same sums in another order only
    model64 = model.double()
    cached64 = model64.decode(embeddings.double())
    naive64 = model64.decode(embeddings.double(), cache=False)
    torch.testing.assert_close(cached64, naive64, atol=1e-12, rtol=1e-12)


@torch.no_grad()
def test_free_running_output_is_a_fixed_point_of_teacher_forcing(
    tiny_text_encoder, tokenizer, embeddings
):
    """Teacher forcing on the decoder's own outputs gives those outputs back."""
    model = _trained_like(Deprojector.from_clip(tiny_text_encoder, tokenizer, layers=2), 3)
    model = model.double()
    decoded = model.decode(embeddings.double())
    again = model.teacher_forced(embeddings.double(), decoded)
    torch.testing.assert_close(again, decoded, atol=1e-12, rtol=1e-12)


@torch.no_grad()
def test_rows_of_a_batch_decode_independently(tiny_text_encoder, tokenizer, embeddings):
    model = _trained_like(Deprojector.from_clip(tiny_text_encoder, tokenizer), 4).double()
    batch = model.decode(embeddings.double())
    for row in range(3):
        alone = model.decode(embeddings[row : row + 1].double())
        torch.testing.assert_close(alone[0], batch[row], atol=1e-12, rtol=1e-12)


@torch.no_grad()
def test_decode_keeps_the_module_dtype_and_device(tiny_text_encoder, tokenizer, embeddings):
    model = Deprojector.from_clip(tiny_text_encoder, tokenizer)
    out = model.decode(embeddings.double())  # input converted to the module's float32
    assert out.dtype == torch.float32 and out.device.type == "cpu"


@torch.no_grad()
def test_layer_with_a_cache_fed_in_chunks_equals_one_causal_pass():
    torch.manual_seed(0)
    layer = DeprojectorLayer(16, 4, 24, 1e-5, "quick_gelu").double()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    full = layer(x)
    cache = KeyValueCache(2, 4, 9, 4, x)
    parts = [layer(x[:, :3], cache), layer(x[:, 3:4], cache), layer(x[:, 4:], cache)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-12, rtol=1e-12)
    assert cache.length == 9


def test_layer_attention_matches_the_formula():
    """softmax(q k^T / sqrt(d) + causal mask) v per head, written out in float64."""
    torch.manual_seed(1)
    layer = DeprojectorLayer(8, 2, 12, 1e-5, "gelu").double()
    x = torch.randn(1, 5, 8, dtype=torch.float64)
    attention = layer.self_attn
    h = layer.layer_norm1(x)
    q, k, v = attention.q_proj(h), attention.k_proj(h), attention.v_proj(h)
    heads = []
    for head in range(2):
        part = slice(4 * head, 4 * head + 4)
        scores = q[0, :, part] @ k[0, :, part].T / 2.0
        scores = scores.masked_fill(torch.ones(5, 5).triu(1).bool(), float("-inf"))
        heads.append(torch.softmax(scores, dim=-1) @ v[0, :, part])
    mid = x + attention.out_proj(torch.cat(heads, dim=-1))[None]
    ff = layer.mlp.fc2(torch.nn.functional.gelu(layer.mlp.fc1(layer.layer_norm2(mid))))
    torch.testing.assert_close(layer(x), mid + ff, atol=1e-12, rtol=1e-12)


def test_cache_overflow_is_an_error():
    stack = LayerStack(1, 8, 2, 8, 1e-5, "quick_gelu")
    x = torch.zeros(1, 3, 8)
    caches = stack.new_caches(1, 2, x)
    with pytest.raises(DeprojectorError, match="cache holds 2 positions, asked for 3"):
        stack(x, caches)


def test_activations():
    x = torch.linspace(-4, 4, 9, dtype=torch.float64)
    torch.testing.assert_close(quick_gelu(x), x * torch.sigmoid(1.702 * x))
    assert ACTIVATIONS.canonical("gelu_pytorch_tanh") == "gelu_new"


def test_config_accepts_exactly_the_registered_activations():
    from sdstack.text.deprojector.config import ACTIVATION_NAMES

    assert set(ACTIVATIONS.names()) <= set(ACTIVATION_NAMES)
    assert all(ACTIVATIONS.canonical(name) for name in ACTIVATION_NAMES)


def test_naive_decode_is_differentiable_and_cached_is_inference(tiny_text_encoder, tokenizer):
    model = Deprojector.from_clip(tiny_text_encoder, tokenizer)
    embedding = torch.zeros(1, 32, requires_grad=True)
    model.decode(embedding, cache=False).sum().backward()
    assert embedding.grad is not None and bool(embedding.grad.abs().sum() > 0)
    assert not model.decode(embedding).requires_grad
