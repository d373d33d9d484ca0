"""The model patcher: W = cast(W0 + sum_i s_i dW_i) rebuilt from the original, removal
bit-exact after any history, deltas cached by bytes, only changed layers rebuilt."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdstack.models.patcher import (
    DeltaCache,
    ModelPatcher,
    Patch,
    PatchError,
    default_cache_bytes,
    patcher_of,
    weights_fingerprint,
)
from sdstack.models.tiny import tiny_components

Q = "unet:down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
CONV = "unet:conv_in"
TE = "text_encoder:text_model.encoder.layers.0.self_attn.q_proj"
LAYERS = (Q, CONV, TE)


@pytest.fixture
def model():
    return tiny_components(seed=3)


def parameter(model, key: str, name: str = "weight") -> torch.Tensor:
    from sdstack.models.key_map import live_module

    module = live_module(model, model_key_map(model)[key])
    return getattr(module, name)


def model_key_map(model):
    from sdstack.models.key_map import key_map_of

    return key_map_of(model)


def seeded_delta(seed: int, scale: float = 0.1):
    """A recipe giving a fixed random delta for every parameter, counting its calls."""

    def recipe(originals):
        recipe.calls += 1
        generator = torch.Generator().manual_seed(seed)
        return {
            name: scale * torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
            for name, tensor in originals.items()
        }

    recipe.calls = 0
    return recipe


SOURCES = {name: seeded_delta(seed) for seed, name in enumerate(("a", "b", "c"))}


def seeded_factors(seed: int, layer: str, rank: int = 3):
    """A low-rank patch's two recipes: the factors, and the same delta made dense."""
    shape = layer_shape(layer)

    def factors():
        generator = torch.Generator().manual_seed(seed)
        up = 0.1 * torch.randn((shape[0], rank), generator=generator)
        down = torch.randn((rank, math.prod(shape[1:])), generator=generator)
        return up, down

    def dense(originals):
        up, down = factors()
        return {"weight": (up @ down).view(originals["weight"].shape)}

    return factors, dense


@functools.cache
def layer_shape(layer: str) -> tuple[int, ...]:
    return model_key_map(two_models()[0])[layer].shape("weight")


LOW_RANK = ("d", "e")


def patches_of(stack: list[tuple[str, float]], layers=LAYERS) -> list[Patch]:
    patches = []
    for source, s in stack:
        for layer in layers:
            if source in LOW_RANK:
                factors, dense = seeded_factors(ord(source), layer)
                patches.append(Patch(layer, source, s, dense, factors))
            else:
                patches.append(Patch(layer, source, s, SOURCES[source]))
    return patches


def all_parameters(model) -> dict[str, torch.Tensor]:
    return {
        f"{part}.{name}": tensor.detach().clone()
        for part in ("unet", "text_encoder", "vae")
        for name, tensor in getattr(model, part).state_dict().items()
    }


def test_one_patch_is_w0_plus_strength_times_delta(model):
    original = parameter(model, Q).detach().clone()
    delta = SOURCES["a"]({"weight": original.float()})["weight"]
    ModelPatcher(model).apply([Patch(Q, "a", 0.7, SOURCES["a"])])
    truth = original.double() + 0.7 * delta.double()
    # One float32 rounding of the product and one of the sum.
    tolerance = 2 * torch.finfo(torch.float32).eps * truth.abs().max().item()
    assert (parameter(model, Q).double() - truth).abs().max().item() <= tolerance


def test_restore_is_bit_exact_and_fingerprint_says_so(model):
    before, fingerprint = all_parameters(model), weights_fingerprint(model)
    patcher = ModelPatcher(model)
    patcher.apply(patches_of([("a", 1.0), ("b", -0.5)]))
    assert weights_fingerprint(model) != fingerprint
    patcher.restore()
    assert weights_fingerprint(model) == fingerprint
    after = all_parameters(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_originals_are_kept_by_reference_and_never_written(model):
    original = parameter(model, Q).data
    copy = original.clone()
    patcher = ModelPatcher(model)
    patcher.apply([Patch(Q, "a", 1.0, SOURCES["a"])])
    assert parameter(model, Q).data_ptr() != original.data_ptr()
    patcher.apply([Patch(Q, "a", 0.5, SOURCES["a"])])  # rebuilt in its own tensor again
    assert torch.equal(original, copy)
    patcher.restore()
    assert parameter(model, Q).data_ptr() == original.data_ptr()


stacks = st.lists(
    st.lists(
        st.tuples(
            st.sampled_from(("a", "b", "c", "d", "e")),
            st.sampled_from((-1.0, 0.25, 0.5, 1.0, 2.0)),
        ),
        max_size=3,
    ),
    min_size=1,
    max_size=5,
)


@functools.cache
def two_models():
    """Two identical models for the property test: each example leaves them restored
    (that is what it checks), so they are built once."""
    model = tiny_components(seed=3)
    return model, tiny_components(seed=3), weights_fingerprint(model)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(history=stacks)
def test_any_history_then_a_stack_equals_that_stack_on_a_fresh_model(history):
    model, fresh, original = two_models()
    patcher = ModelPatcher(model, cache_bytes=1 << 16)  # small: some deltas are evicted
    for stack in history:
        patcher.apply(patches_of(stack))
    reference = ModelPatcher(fresh)
    reference.apply(patches_of(history[-1]))
    assert weights_fingerprint(model) == weights_fingerprint(fresh)
    patcher.apply([])
    reference.restore()
    assert weights_fingerprint(model) == original == weights_fingerprint(fresh)


def test_changing_a_strength_resums_cached_deltas(model):
    patcher = ModelPatcher(model)
    first = patcher.apply(patches_of([("a", 1.0), ("b", 1.0)]))
    assert first.deltas_computed == 6 and first.layers_rebuilt == 3
    second = patcher.apply(patches_of([("a", 0.5), ("b", 1.0)]))
    assert second.deltas_computed == 0 and second.deltas_from_cache == 6


def test_only_layers_whose_patches_changed_are_rebuilt(model):
    patcher = ModelPatcher(model)
    patcher.apply(patches_of([("a", 1.0)]))
    stats = patcher.apply(patches_of([("a", 1.0)], (Q, CONV)) + patches_of([("b", 1.0)], (TE,)))
    assert (stats.layers_rebuilt, stats.layers_unchanged, stats.layers_restored) == (1, 2, 0)
    stats = patcher.apply(patches_of([("a", 1.0)], (Q,)))
    assert (stats.layers_rebuilt, stats.layers_unchanged, stats.layers_restored) == (0, 1, 2)


def test_zero_budget_recomputes_every_time(model):
    patcher = ModelPatcher(model, cache_bytes=0)
    patcher.apply(patches_of([("a", 1.0)]))
    stats = patcher.apply(patches_of([("a", 0.5)]))
    assert stats.deltas_computed == 3 and len(patcher.cache) == 0


def test_cache_drops_least_recently_used_past_its_budget():
    cache = DeltaCache(budget=3 * 400)  # three 100-float entries
    for name in "abcd":
        cache.put((name, "x"), {"weight": torch.zeros(100)})
        if name == "b":
            cache.get(("a", "x"))  # a is now more recent than b
    assert cache.get(("b", "x")) is None
    assert all(cache.get((n, "x")) is not None for n in "acd")
    assert cache.bytes == 1200


def test_fp16_weights_are_summed_in_fp32_and_cast_once():
    model = tiny_components(seed=3).to(dtype=torch.float16)
    original = parameter(model, Q).detach().clone()
    deltas = [SOURCES[s]({"weight": original.float()})["weight"] for s in ("a", "b")]
    ModelPatcher(model).apply(patches_of([("a", 0.3), ("b", 0.9)], (Q,)))
    truth = (original.double() + 0.3 * deltas[0].double() + 0.9 * deltas[1].double()).half()
    # float32 accumulation error is far below half an fp16 ulp: at most one ulp apart.
    ulp = torch.finfo(torch.float16).eps * truth.double().abs().clamp(min=2**-14)
    assert ((parameter(model, Q).double() - truth.double()).abs() <= ulp).all()
    assert parameter(model, Q).dtype == torch.float16


def test_moving_the_model_keeps_its_patches_and_restores_exactly():
    model = tiny_components(seed=3)
    patcher = patcher_of(model)
    patcher.apply(patches_of([("a", 1.0)]))
    model.to(dtype=torch.float64)
    assert parameter(model, Q).dtype == torch.float64
    reference = tiny_components(seed=3).to(dtype=torch.float64)
    ModelPatcher(reference).apply(patches_of([("a", 1.0)]))
    assert weights_fingerprint(model) == weights_fingerprint(reference)
    patcher.restore()
    assert weights_fingerprint(model) == weights_fingerprint(
        tiny_components(seed=3).to(dtype=torch.float64)
    )


def test_unknown_layer_is_refused_before_anything_changes(model):
    fingerprint = weights_fingerprint(model)
    with pytest.raises(PatchError, match=r"patch for layer 'unet:no\.such': this model has no"):
        ModelPatcher(model).apply(
            [*patches_of([("a", 1.0)]), Patch("unet:no.such", "a", 1, SOURCES["a"])]
        )
    assert weights_fingerprint(model) == fingerprint


def test_a_delta_of_the_wrong_shape_leaves_the_model_unpatched(model):
    fingerprint = weights_fingerprint(model)

    def wrong(originals):
        return {"weight": torch.zeros(3, 3)}

    patches = [*patches_of([("a", 1.0)], (TE,)), Patch(Q, "wrong", 1.0, wrong)]
    with pytest.raises(PatchError, match=r"delta weight of shape \(3, 3\); the layer has weight"):
        ModelPatcher(model).apply(patches)
    assert weights_fingerprint(model) == fingerprint


def test_a_strength_that_is_not_finite_is_refused(model):
    with pytest.raises(PatchError, match="strength nan"):
        ModelPatcher(model).apply([Patch(Q, "a", float("nan"), SOURCES["a"])])


def test_fingerprint_sees_one_changed_element(model):
    fingerprint = weights_fingerprint(model)
    with torch.no_grad():
        parameter(model, CONV).view(-1)[5] += 2**-20
    assert weights_fingerprint(model) != fingerprint


@pytest.mark.parametrize(("value", "expected"), [(None, 4 << 30), ("0", 0), ("512", 512 << 20)])
def test_cache_budget_from_the_environment(value, expected):
    environ = {} if value is None else {"SDSTACK_DELTA_CACHE_MB": value}
    assert default_cache_bytes(environ) == expected


def test_bad_cache_budget_is_named():
    with pytest.raises(PatchError, match=r"SDSTACK_DELTA_CACHE_MB='lots': expected a whole"):
        default_cache_bytes({"SDSTACK_DELTA_CACHE_MB": "lots"})


def test_low_rank_patches_are_one_product_of_the_stacked_factors(model):
    original = parameter(model, CONV).detach().double()
    patcher = ModelPatcher(model)
    stats = patcher.apply(patches_of([("d", 0.5), ("e", -2.0)], (CONV,)))
    products = []
    for source, strength in (("d", 0.5), ("e", -2.0)):
        up, down = seeded_factors(ord(source), CONV)[0]()
        products.append(strength * (up.double() @ down.double()).view(original.shape))
    truth = original + products[0] + products[1]
    # float32: the rank-6 dot products and the one addition, a few roundings each.
    scale = (original.abs() + products[0].abs() + products[1].abs()).max().item()
    assert (parameter(model, CONV).double() - truth).abs().max().item() <= 16 * EPS32 * scale
    assert stats.deltas_computed == 2 and len(patcher.cache) == 2
    assert patcher.cache.bytes == 2 * 4 * 3 * (32 + 4 * 9)  # the factors, no dense delta


def test_a_layer_mixing_low_rank_and_dense_patches_sums_dense_deltas(model):
    original = parameter(model, Q).detach().double()
    ModelPatcher(model).apply(patches_of([("d", 1.0), ("a", 0.5)], (Q,)))
    up, down = seeded_factors(ord("d"), Q)[0]()
    dense = SOURCES["a"]({"weight": original.float()})["weight"].double()
    truth = original + up.double() @ down.double() + 0.5 * dense
    bound = 16 * EPS32 * (original.abs() + truth.abs()).max().item()
    assert (parameter(model, Q).double() - truth).abs().max().item() <= bound


EPS32 = torch.finfo(torch.float32).eps


def test_a_smaller_budget_drops_the_oldest_deltas():
    cache = DeltaCache(budget=1000)
    for name in "ab":
        cache.put((name, "x"), {"weight": torch.zeros(100)})
    cache.resize(500)
    assert cache.get(("a", "x")) is None and cache.get(("b", "x")) is not None
    assert cache.bytes == 400


def test_owners_keep_their_patches_and_their_order_is_fixed(model):
    fresh = tiny_components(seed=3)
    first = ModelPatcher(model)
    first.apply(patches_of([("a", 0.5)]), owner="merge")
    first.apply(patches_of([("d", 1.0)]), owner="lora")  # the merge patches stay
    assert {name: len(p) for name, p in first.owned.items()} == {"merge": 3, "lora": 3}
    second = ModelPatcher(fresh)
    second.apply(patches_of([("d", 1.0)]), owner="lora")
    second.apply(patches_of([("a", 0.5)]), owner="merge")
    assert weights_fingerprint(model) == weights_fingerprint(fresh)  # order of applying
    first.apply([], owner="lora")
    only_merge = tiny_components(seed=3)
    ModelPatcher(only_merge).apply(patches_of([("a", 0.5)]), owner="merge")
    assert weights_fingerprint(model) == weights_fingerprint(only_merge)
    first.restore()
    assert first.owned == {} and weights_fingerprint(model) == weights_fingerprint(
        tiny_components(seed=3)
    )


def test_channels_last_weights_are_patched_to_the_same_values_and_keep_their_layout():
    """A channels-last model (``models.layout``) takes dense and low-rank patches, the
    conv weights stay channels-last, hold exactly the contiguous model's values (the sums
    are element-wise, so memory order cannot change them), and restore bit-exactly."""
    from sdstack.models.layout import use_channels_last

    plain, laid_out = tiny_components(seed=3), tiny_components(seed=3)
    use_channels_last(laid_out)
    conv = parameter(laid_out, CONV)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    fingerprint = weights_fingerprint(laid_out)
    assert fingerprint == weights_fingerprint(plain)  # the fingerprint reads logical order
    stack = [("a", 0.8), ("d", 1.5), ("b", -0.3)]
    for model in (plain, laid_out):
        patcher_of(model).apply(patches_of(stack))
    for layer in LAYERS:
        assert torch.equal(parameter(plain, layer), parameter(laid_out, layer)), layer
    assert parameter(laid_out, CONV).is_contiguous(memory_format=torch.channels_last)
    low_rank_only = [("d", 0.5), ("e", 2.0)]
    for model in (plain, laid_out):
        patcher_of(model).apply(patches_of(low_rank_only))
    assert torch.equal(parameter(plain, CONV), parameter(laid_out, CONV))
    patcher_of(laid_out).restore()
    assert weights_fingerprint(laid_out) == fingerprint
    assert parameter(laid_out, CONV).is_contiguous(memory_format=torch.channels_last)
