"""set_loras: exactly the stack asked for, from the formula, removal and switching exact,
multiplier changes from cached deltas, block weights, unmatched keys warned once."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from sdstack.errors import SdstackWarning
from sdstack.lora.block_weights import LBW_PRESETS
from sdstack.lora.library import LoraLibrary, LoraNotFoundError
from sdstack.lora.spec import LoraSpec
from sdstack.lora.stack import active_loras, set_loras
from sdstack.lora.tiny import write_tiny_lora
from sdstack.models.key_map import key_map_of, live_module
from sdstack.models.patcher import weights_fingerprint
from sdstack.models.tiny import tiny_components

ATTN = "unet:down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"  # IN04
IN05_ATTN = "unet:down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k"  # IN05
UP_ATTN = "unet:up_blocks.0.attentions.2.transformer_blocks.0.attn2.to_v"  # OUT02 here
TE = "text_encoder:text_model.encoder.layers.1.mlp.fc1"


@pytest.fixture
def model():
    return tiny_components(seed=5)


@pytest.fixture
def loras(tmp_path, model, monkeypatch):
    monkeypatch.setenv("SDSTACK_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "loras"
    for seed, name in enumerate(("film", "detail", "ink")):
        write_tiny_lora(model, folder / f"{name}.safetensors", seed=seed, rank=4, alpha=2.0)
    return LoraLibrary(None, [folder])


def weight(model, key):
    return live_module(model, key_map_of(model)[key]).weight.detach().clone()


def kohya_delta(path, layer_key, model) -> torch.Tensor:
    """alpha / rank * up @ down, in float64, straight from the file."""
    layer = key_map_of(model)[layer_key]
    tensors = load_file(str(path))
    up = tensors[f"{layer.kohya}.lora_up.weight"].double()
    down = tensors[f"{layer.kohya}.lora_down.weight"].double()
    alpha = tensors[f"{layer.kohya}.alpha"].item()
    return alpha / down.shape[0] * up @ down


def bound(truth: torch.Tensor, terms: int = 4) -> float:
    """float32: the product (rank-4 sums), the scaling and the sums, a few roundings each."""
    return terms * 8 * torch.finfo(torch.float32).eps * max(truth.abs().max().item(), 1.0)


def test_two_loras_with_separate_multipliers_follow_the_formula(model, loras):
    originals = {key: weight(model, key).double() for key in (ATTN, TE)}
    set_loras(model, [("film", 0.8), ("detail", 0.3, -0.5)], library=loras)
    film, detail = loras.find("film"), loras.find("detail")
    for key, (film_m, detail_m) in {ATTN: (0.8, -0.5), TE: (0.8, 0.3)}.items():
        truth = (
            originals[key]
            + film_m * kohya_delta(film, key, model)
            + detail_m * kohya_delta(detail, key, model)
        )
        assert (weight(model, key).double() - truth).abs().max().item() <= bound(truth)


def test_block_weights_scale_each_block(model, loras):
    keys = (ATTN, IN05_ATTN, UP_ATTN, TE)
    originals = {key: weight(model, key).double() for key in keys}
    spec = LoraSpec("film", 1.0, 2.0, lbw=LBW_PRESETS["MIDD"], lbw_text="MIDD")
    set_loras(model, [spec], library=loras)
    film = loras.find("film")
    # MIDD: BASE 1 (the text encoder, x te), IN04 0, IN05 1 (x unet); OUT02 is not one
    # of the 17 blocks: 0.
    for key, strength in ((IN05_ATTN, 2.0), (TE, 1.0)):
        truth = originals[key] + strength * kohya_delta(film, key, model)
        assert (weight(model, key).double() - truth).abs().max().item() <= bound(truth)
    for key in (ATTN, UP_ATTN):
        assert torch.equal(weight(model, key).double(), originals[key])


def test_removing_every_lora_is_bit_exact(model, loras):
    original = weights_fingerprint(model)
    set_loras(model, [("film", 1), ("detail", 0.5)], library=loras)
    set_loras(model, [("ink", -1)], library=loras)
    assert weights_fingerprint(model) != original
    set_loras(model, [], library=loras)
    assert weights_fingerprint(model) == original
    assert active_loras(model) is None


def test_switching_equals_applying_to_a_fresh_model(model, loras):
    set_loras(model, [("film", 1), ("detail", 0.5)], library=loras)
    set_loras(model, [("ink", 0.7), ("film", 0.2)], library=loras)
    fresh = tiny_components(seed=5)
    set_loras(fresh, [("ink", 0.7), ("film", 0.2)], library=loras)
    assert weights_fingerprint(model) == weights_fingerprint(fresh)


def test_a_multiplier_change_reads_no_file_and_computes_no_delta(model, loras, monkeypatch):
    first = set_loras(model, [("film", 1), ("detail", 1)], library=loras)
    assert first.stats.deltas_computed > 0

    def no_reading(*args, **kwargs):
        raise AssertionError("a file was read again")

    monkeypatch.setattr("sdstack.lora.formats.read_lora", no_reading)
    stack = set_loras(model, [("film", 0.5), ("detail", 1)], library=loras)
    assert stack.stats.deltas_computed == 0
    assert stack.stats.deltas_from_cache == first.stats.deltas_computed


def test_nothing_is_applied_when_one_entry_fails(model, loras):
    set_loras(model, [("film", 1)], library=loras)
    before = weights_fingerprint(model)
    with pytest.raises(LoraNotFoundError, match="no LoRA named 'flim' in "):
        set_loras(model, [("detail", 1), ("flim", 1)], library=loras)
    assert weights_fingerprint(model) == before


def test_unmatched_keys_are_listed_in_one_warning(model, loras, tmp_path):
    path = loras.find("film")
    tensors = load_file(str(path))
    tensors["lora_unet_no_such_layer.lora_down.weight"] = torch.zeros(4, 8)
    tensors["lora_unet_no_such_layer.lora_up.weight"] = torch.zeros(8, 4)
    extra = tmp_path / "extra.safetensors"
    save_file(tensors, str(extra))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        set_loras(model, [(str(extra), 1)], library=loras)
    messages = [str(w.message) for w in caught if issubclass(w.category, SdstackWarning)]
    assert len(messages) == 1
    assert "2 key(s) match no layer of this model and are not applied" in messages[0]
    assert "lora_unet_no_such_layer.lora_down.weight" in messages[0]


def test_the_stack_gives_the_reference_lora_hashes(model, loras):
    from sdstack.models.hashes import addnet_hash

    stack = set_loras(model, [("film", 1), ("detail", 1)], library=loras)
    film, detail = (addnet_hash(loras.find(n))[:12] for n in ("film", "detail"))
    assert stack.hashes_field() == f"film: {film}, detail: {detail}"


def test_embeddings_bundled_in_a_lora_are_usable_by_name(model, loras, tmp_path):
    from sdstack.generate import GenerationParams, prepare
    from sdstack.generate.pipeline import _used_embeddings
    from tests.lora import lora_files

    tensors = load_file(str(loras.find("film")))
    tensors.update(lora_files.bundle_state(model))
    path = tmp_path / "bundled.safetensors"
    save_file(tensors, str(path))
    params = GenerationParams(f"a starry cat <lora:{path.stem}:1>", steps=2, width=64, height=64)
    prepared = prepare(model, params, loras=LoraLibrary(None, [tmp_path]))
    assert "starry" in _used_embeddings(prepared.denoiser)
    set_loras(model, [])


def test_a_foreign_lora_is_refused_naming_the_file(model, loras, tmp_path):
    from sdstack.lora.network import ForeignLoraError
    from tests.lora import lora_files

    path = lora_files.save(tmp_path / "xl.safetensors", lora_files.sdxl_like_state())
    before = weights_fingerprint(model)
    with pytest.raises(ForeignLoraError, match=rf"^{path}: is an SDXL LoRA \("):
        set_loras(model, [("film", 1), (str(path), 1)], library=loras)
    assert weights_fingerprint(model) == before


@pytest.fixture(scope="module")
def property_setup(tmp_path_factory):
    """One model and three LoRA files for the property test (each example restores it)."""
    folder = tmp_path_factory.mktemp("property-loras")
    model = tiny_components(seed=5)
    for seed, name in enumerate(("film", "detail", "ink")):
        write_tiny_lora(model, folder / f"{name}.safetensors", seed=seed, rank=4, alpha=2.0)
    library = LoraLibrary(None, [folder])
    return model, library, weights_fingerprint(model)


entries = st.lists(
    st.tuples(
        st.sampled_from(("film", "detail", "ink")),
        st.sampled_from((-1.0, 0.0, 0.3, 1.0)),
        st.sampled_from((None, 0.5, 2.0)),
    ),
    max_size=3,
)


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(history=st.lists(entries, min_size=1, max_size=4))
def test_removal_is_bit_exact_after_any_sequence_of_stacks(property_setup, history):
    model, library, original = property_setup
    for stack in history:
        set_loras(
            model,
            [(n, te) if unet is None else (n, te, unet) for n, te, unet in stack],
            library=library,
        )
    set_loras(model, [], library=library)
    assert weights_fingerprint(model) == original
