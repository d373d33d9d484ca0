"""Deprojector model: CLIP initialisation, the frozen inverse projection, BOS, config."""

from __future__ import annotations

import contextlib
import inspect
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdstack.errors import UnknownNameError
from sdstack.text.clip_skip import text_transformer
from sdstack.text.deprojector import DeprojectorError
from sdstack.text.deprojector.config import MAX_CONDITION, inverse_projection
from sdstack.text.deprojector.model import Deprojector, DeprojectorConfig, clip_outputs
from sdstack.validate import SettingError

TEXTS = ["a cat", "a red hat on a dog, oil painting", ""]


def tiny_clip_with_projection(seed: int = 0, projection_dim: int = 32, kappa: float | None = 4.0):
    """A tiny ``CLIPTextModelWithProjection`` (seeded, eval).

    ``kappa``: give the (square) text projection that condition number (``Q diag(s)``, s
    log-spaced from 1 to 1/kappa, Q a seeded orthogonal matrix); None: transformers'
    default random init (condition number in the thousands at width 32).
    """
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from sdstack.models.tiny import TINY_TEXT_CONFIG, randomize_norms

    config = dict(TINY_TEXT_CONFIG, projection_dim=projection_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModelWithProjection(CLIPTextConfig(**config)).eval()
    randomize_norms(model, torch.Generator().manual_seed(seed + 1))
    if kappa is not None and projection_dim == 32:
        generator = torch.Generator().manual_seed(seed + 2)
        q, _ = torch.linalg.qr(torch.randn(32, 32, generator=generator, dtype=torch.float64))
        singular = torch.logspace(0, -np.log10(kappa), 32, dtype=torch.float64)
        with torch.no_grad():
            model.text_projection.weight.copy_((q * singular).float())
    return model


def token_ids(tokenizer, texts):
    return tokenizer(
        texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids


def clip_layer(layer, x):
    """transformers' own CLIPEncoderLayer on ``x`` with an additive causal mask (4.x/5.x)."""
    length = x.shape[1]
    mask = torch.full((length, length), torch.finfo(x.dtype).min, dtype=x.dtype).triu(1)
    mask = mask[None, None]
    if "causal_attention_mask" in inspect.signature(layer.forward).parameters:
        out = layer(x, None, mask)
    else:
        out = layer(x, mask)
    return out[0] if isinstance(out, tuple) else out


@pytest.fixture(scope="module")
def with_projection():
    return tiny_clip_with_projection()


@torch.no_grad()
def test_inverse_projection_recovers_the_pooled_output(with_projection, tokenizer):
    model = Deprojector.from_clip(
        with_projection, tokenizer, projection=with_projection.text_projection.weight
    )
    truth = with_projection(input_ids=token_ids(tokenizer, TEXTS))  # transformers' own
    embedding = model.embed(with_projection, tokenizer, TEXTS)
    torch.testing.assert_close(embedding, truth.text_embeds, atol=1e-6, rtol=1e-6)
    ids = token_ids(tokenizer, TEXTS)
    eos = (ids == tokenizer.eos_token_id).int().argmax(dim=1)
    pooled = truth.last_hidden_state[torch.arange(len(TEXTS)), eos]
    recovered = model.pooled_from_embedding(truth.text_embeds)
    assert (recovered - pooled).abs().max() <= 1e-5
    weight = with_projection.text_projection.weight.double().numpy()
    assert model.config.embedding == "text_embeds"
    assert model.config.condition_number == pytest.approx(np.linalg.cond(weight), rel=1e-9)
    assert model.config.condition_number == pytest.approx(4.0, rel=1e-5)
    expected_null = model.embedding_from_pooled(pooled[2])
    torch.testing.assert_close(model.null, expected_null, atol=1e-6, rtol=0)


@torch.no_grad()
def test_inverse_of_an_ill_conditioned_random_projection_within_its_rounding(tokenizer):
    clip = tiny_clip_with_projection(kappa=None)  # transformers' random init
    model = Deprojector.from_clip(clip, tokenizer, projection=clip.text_projection.weight)
    kappa = model.config.condition_number
    assert 1e3 < kappa < MAX_CONDITION  # still inverted exactly
    ids = token_ids(tokenizer, TEXTS)
    truth = clip(input_ids=ids)
    eos = (ids == tokenizer.eos_token_id).int().argmax(dim=1)
    pooled = truth.last_hidden_state[torch.arange(len(TEXTS)), eos]
    error = (model.pooled_from_embedding(truth.text_embeds) - pooled).abs().max()
    # float32 rounding of e (and of the inverse) amplified by kappa: kappa eps |p| sqrt(W)
    bound = kappa * torch.finfo(torch.float32).eps * pooled.abs().max() * 32**0.5
    assert error <= bound


def test_pseudo_inverse_for_a_non_square_projection(tokenizer):
    clip = tiny_clip_with_projection(projection_dim=16)
    weight = clip.text_projection.weight  # 16 x 32
    model = Deprojector.from_clip(clip, tokenizer, projection=weight)
    assert model.config.embedding_dim == 16
    assert model.config.condition_number == float("inf")
    embedding = model.embed(clip, tokenizer, TEXTS)
    assert embedding.shape == (3, 16)
    # W pinv(W) = I_16: projecting the recovered pooled vector gives the embedding back
    again = model.embedding_from_pooled(model.pooled_from_embedding(embedding))
    torch.testing.assert_close(again, embedding, atol=1e-5, rtol=1e-5)
    out = model.decode(embedding)
    assert out.shape == (3, 77, 32) and bool(torch.isfinite(out).all())


def test_ill_conditioned_square_projection_uses_the_pseudo_inverse():
    u, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(0)).double())
    singular = torch.logspace(0, -6, 8, dtype=torch.float64)
    weight = u * singular  # u diag(s): condition number 1e6
    inverse, kappa = inverse_projection(weight, 8)
    assert kappa == pytest.approx(1e6, rel=1e-6) and kappa > MAX_CONDITION
    torch.testing.assert_close(inverse, torch.linalg.pinv(weight, rtol=1e-6))
    good, kappa_good = inverse_projection(u, 8)
    assert kappa_good == pytest.approx(1.0)
    torch.testing.assert_close(good @ u, torch.eye(8, dtype=torch.float64))


def test_bad_projection_is_refused(tiny_text_encoder, tokenizer):
    with pytest.raises(DeprojectorError, match=r"projection must be the text projection weight"):
        Deprojector.from_clip(tiny_text_encoder, tokenizer, projection=torch.zeros(32, 7))
    with pytest.raises(DeprojectorError, match="NaN or infinite"):
        Deprojector.from_clip(
            tiny_text_encoder, tokenizer, projection=torch.full((32, 32), float("nan"))
        )


@pytest.mark.parametrize("clip_skip", [1, 2])
@torch.no_grad()
def test_bos_is_the_prompt_independent_clip_state(tiny_text_encoder, tokenizer, clip_skip):
    model = Deprojector.from_clip(tiny_text_encoder, tokenizer, clip_skip=clip_skip)
    _, states = clip_outputs(tiny_text_encoder, tokenizer, TEXTS, clip_skip)
    for row in states[:, 0]:
        torch.testing.assert_close(row, model.bos, atol=1e-6, rtol=0)
    embedding, target = model.teacher(tiny_text_encoder, tokenizer, TEXTS)
    for out in (model.decode(embedding), model.teacher_forced(embedding, target)):
        assert torch.equal(out[:, 0], model.bos.expand(3, -1))


@pytest.mark.parametrize("clip_skip", [1, 2, 3])
@torch.no_grad()
def test_layers_copy_the_clip_layers_ending_at_the_clip_skip(
    tiny_text_encoder, tokenizer, clip_skip
):
    model = Deprojector.from_clip(tiny_text_encoder, tokenizer, layers=2, clip_skip=clip_skip)
    out = tiny_text_encoder(input_ids=token_ids(tokenizer, TEXTS), output_hidden_states=True)
    hidden = out.hidden_states  # embeddings, then one per layer
    x = hidden[-clip_skip - 2]
    for layer in model.stacks[0].layers:
        x = layer(x)
    torch.testing.assert_close(x, hidden[-clip_skip], atol=2e-5, rtol=1e-5)
    _, target = clip_outputs(tiny_text_encoder, tokenizer, TEXTS, clip_skip)
    torch.testing.assert_close(model.final_layer_norm(x), target, atol=2e-5, rtol=1e-5)
    position = text_transformer(tiny_text_encoder).embeddings.position_embedding.weight
    assert torch.equal(model.position_embedding.data, position.data)


@torch.no_grad()
def test_teacher_forced_is_the_v1_layout_through_the_clip_layer(tiny_text_encoder, tokenizer):
    model = Deprojector.from_clip(tiny_text_encoder, tokenizer, relative_to_null=False)
    embedding, target = model.teacher(tiny_text_encoder, tokenizer, TEXTS)
    torch.testing.assert_close(embedding, clip_outputs(tiny_text_encoder, tokenizer, TEXTS)[0])
    # [e, h_0 .. h_75] + pos through transformers' last CLIP layer and final LayerNorm
    x = torch.cat([embedding[:, None], target[:, :-1]], dim=1) + model.position_embedding
    clip = text_transformer(tiny_text_encoder)
    expected = clip.final_layer_norm(clip_layer(clip.encoder.layers[-1], x))
    got = model.teacher_forced(embedding, target)
    torch.testing.assert_close(got[:, 1:], expected[:, 1:], atol=2e-5, rtol=1e-5)


@torch.no_grad()
def test_relative_to_null_centres_the_input_vector(tiny_text_encoder, tokenizer):
    relative = Deprojector.from_clip(tiny_text_encoder, tokenizer)
    plain = Deprojector.from_clip(tiny_text_encoder, tokenizer, relative_to_null=False)
    assert relative.config.relative_to_null and not plain.config.relative_to_null
    embedding = relative.embed(tiny_text_encoder, tokenizer, TEXTS)
    torch.testing.assert_close(relative.input_vector(embedding), embedding - relative.null)
    torch.testing.assert_close(plain.input_vector(embedding), embedding)
    assert torch.equal(relative.input_vector(relative.null[None]), torch.zeros(1, 32))


@torch.no_grad()
def test_input_mlp_starts_as_the_identity(tiny_text_encoder, tokenizer):
    with_mlp = Deprojector.from_clip(tiny_text_encoder, tokenizer, input_mlp=True)
    without = Deprojector.from_clip(tiny_text_encoder, tokenizer)
    assert with_mlp.input_mlp is not None and without.input_mlp is None
    embedding = without.embed(tiny_text_encoder, tokenizer, TEXTS)
    torch.testing.assert_close(with_mlp.decode(embedding), without.decode(embedding))


@pytest.mark.parametrize("decoder", ["autoregressive", "parallel"])
@torch.no_grad()
def test_ensemble_is_the_mean_of_its_members(tiny_text_encoder, tokenizer, decoder):
    model = Deprojector.from_clip(tiny_text_encoder, tokenizer, ensemble=3, decoder=decoder)
    embedding, target = model.teacher(tiny_text_encoder, tokenizer, TEXTS)
    members = []
    for stack in model.stacks:
        single = Deprojector(DeprojectorConfig(**dict(model.config.to_dict(), ensemble=1)))
        state = {k: v for k, v in model.state_dict().items() if not k.startswith("stacks.")}
        state.update({f"stacks.0.{k}": v for k, v in stack.state_dict().items()})
        single.load_state_dict(state)
        members.append(single.teacher_forced(embedding, target))
    expected = torch.stack(members).mean(dim=0)
    torch.testing.assert_close(model.teacher_forced(embedding, target), expected)
    first, second = (stack.layers[0].mlp.fc1.weight for stack in model.stacks[:2])
    assert not torch.equal(first, second)  # members perturbed apart
    scale = (second - first).std() / first.std()
    assert 0.005 < float(scale) < 0.02  # 1% of the weight's standard deviation


@torch.no_grad()
def test_parallel_decoder_is_one_pass_from_position_queries(tiny_text_encoder, tokenizer):
    model = Deprojector.from_clip(tiny_text_encoder, tokenizer, decoder="par allel")
    assert model.config.decoder == "parallel"
    embedding, target = model.teacher(tiny_text_encoder, tokenizer, TEXTS)
    _, null_states = clip_outputs(tiny_text_encoder, tokenizer, [""])
    torch.testing.assert_close(model.queries.data, null_states[0, 1:-1])
    out = model.decode(embedding)
    assert torch.equal(out, model.decode(embedding, cache=False))
    assert torch.equal(out, model.teacher_forced(embedding, target))
    assert torch.equal(out, model.teacher_forced(embedding, torch.zeros_like(target)))
    s = model.input_vector(embedding)
    x = torch.cat([s[:, None], model.bos.expand(3, 1, -1), s[:, None] + model.queries], dim=1)
    clip = text_transformer(tiny_text_encoder)
    expected = clip.final_layer_norm(
        clip_layer(clip.encoder.layers[-1], x + model.position_embedding)
    )
    torch.testing.assert_close(out[:, 1:], expected[:, 1:], atol=2e-5, rtol=1e-5)


@torch.no_grad()
def test_parallel_query_term_is_a_per_position_low_rank_map(tiny_text_encoder, tokenizer):
    model = Deprojector.from_clip(tiny_text_encoder, tokenizer, decoder="parallel")
    assert model.config.query_rank == 32  # min(QUERY_RANK, width 32)
    assert model.query_down.shape == (32, 32) and model.query_up.shape == (75, 32, 32)
    assert not model.query_up.any()  # U = 0: the decoder starts as the one without it
    assert float(model.query_down.std()) == pytest.approx(32**-0.5, rel=0.15)  # N(0, 1/W)
    again = Deprojector.from_clip(tiny_text_encoder, tokenizer, decoder="parallel")
    assert torch.equal(again.query_down, model.query_down)  # seeded
    generator = torch.Generator().manual_seed(3)
    model.query_up.copy_(0.1 * torch.randn(model.query_up.shape, generator=generator))
    embedding = model.embed(tiny_text_encoder, tokenizer, TEXTS)
    s = model.input_vector(embedding).double()
    down, up = model.query_down.double(), model.query_up.double()
    rest = torch.stack(
        [s + model.queries[k - 2].double() + (s @ down) @ up[k - 2] for k in range(2, 77)], 1
    )
    x = torch.cat([s[:, None], model.bos.double().expand(3, 1, -1), rest], dim=1).float()
    clip = text_transformer(tiny_text_encoder)
    expected = clip.final_layer_norm(
        clip_layer(clip.encoder.layers[-1], x + model.position_embedding)
    )
    torch.testing.assert_close(
        model.decode(embedding)[:, 1:], expected[:, 1:], atol=2e-5, rtol=1e-5
    )
    none = Deprojector.from_clip(tiny_text_encoder, tokenizer, decoder="parallel", query_rank=0)
    assert none.query_up is None and "query_up" not in none.state_dict()
    assert Deprojector.from_clip(tiny_text_encoder, tokenizer).config.query_rank == 0


def test_gradients_reach_trainable_parameters_only(tiny_text_encoder, tokenizer):
    model = Deprojector.from_clip(tiny_text_encoder, tokenizer, decoder="parallel", input_mlp=True)
    embedding, target = model.teacher(tiny_text_encoder, tokenizer, TEXTS)
    loss = ((model.teacher_forced(embedding, target) - target) ** 2).mean()
    loss.backward()
    names = {name for name, p in model.named_parameters() if p.grad is not None}
    assert {"queries", "query_up", "position_embedding", "final_layer_norm.weight"} <= names
    assert "input_mlp.2.weight" in names
    assert not any(b.requires_grad for b in model.buffers())  # bos, null: frozen


def test_bad_inputs_name_the_problem(tiny_text_encoder, tokenizer):
    model = Deprojector.from_clip(tiny_text_encoder, tokenizer)
    with pytest.raises(DeprojectorError, match=r"embedding width 16 does not match .* 32"):
        model.decode(torch.zeros(2, 16))
    with pytest.raises(DeprojectorError, match=r"must be a \(batch, 32\) tensor"):
        model.decode(torch.zeros(32))
    with pytest.raises(DeprojectorError, match=r"target states must have shape \(2, 77, 32\)"):
        model.teacher_forced(torch.zeros(2, 32), torch.zeros(2, 76, 32))
    with pytest.raises(SettingError, match="layers must be between 1 and 4"):
        Deprojector.from_clip(tiny_text_encoder, tokenizer, layers=5, clip_skip=2)
    with pytest.raises(SettingError, match="clip_skip must be between 1 and 5"):
        Deprojector.from_clip(tiny_text_encoder, tokenizer, clip_skip=6)
    with pytest.raises(UnknownNameError, match="did you mean 'parallel'"):
        Deprojector.from_clip(tiny_text_encoder, tokenizer, decoder="paralel")
    with pytest.raises(SettingError, match="query_rank must be between 0 and 32, got 33"):
        Deprojector.from_clip(tiny_text_encoder, tokenizer, decoder="parallel", query_rank=33)
    with pytest.raises(DeprojectorError, match="query_rank must be 0 for the autoregressive"):
        Deprojector.from_clip(tiny_text_encoder, tokenizer, query_rank=4)


def test_config_json_round_trip(tiny_text_encoder, tokenizer):
    model = Deprojector.from_clip(tiny_text_encoder, tokenizer, decoder="parallel", ensemble=2)
    text = json.dumps(model.config.to_dict())
    assert DeprojectorConfig.from_dict(json.loads(text)) == model.config
    assert len(model.config.clip_hash) == 64


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("layers", 0, r"layers must be an integer in \[1, 64\], got 0"),
        ("layers", True, r"layers must be an integer"),
        ("width", 30, "width 30 is not a multiple of heads 12"),
        ("decoder", "paralel", "did you mean 'parallel'"),
        ("embedding", "image", "embedding must be one of text_embeds, pooled"),
        ("layer_norm_eps", -1, r"layer_norm_eps must be a number in \(0, 1\)"),
        ("condition_number", 0.5, "condition_number must be a number >= 1"),
        ("version", 2, "version 2 is newer than this sdstack understands"),
        ("width", 16384, "more than the 1,000,000,000 allowed"),
        ("query_rank", -1, r"query_rank must be an integer in \[0, 16384\], got -1"),
        ("query_rank", 8, "query_rank must be 0 for the autoregressive decoder"),
        ("query_rank", 769, "query_rank must be at most width 768"),
        ("bogus", 1, "unknown field"),
    ],
)
def test_config_errors(field, value, message):
    data = DeprojectorConfig().to_dict()
    data[field] = value
    if field == "width" and value == 16384:
        data.update(heads=16, embedding_dim=16384, layers=2)
    if field == "query_rank" and value == 769:
        data.update(decoder="parallel")
    with pytest.raises(DeprojectorError, match=message):
        DeprojectorConfig.from_dict(data)


_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.lists(st.integers(), max_size=3),
)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from([*DeprojectorConfig().to_dict(), "x"]), _VALUES))
def test_any_config_dict_loads_or_raises_the_clear_error(data):
    full = dict(DeprojectorConfig().to_dict(), **data)
    with contextlib.suppress(DeprojectorError):  # anything else fails the test
        DeprojectorConfig.from_dict(full)
