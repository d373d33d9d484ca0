"""Textual inversion: slot rows hold the embedding vectors; results differ from the words."""

from __future__ import annotations

import pytest
import torch

from sdstack.text import Embedding, PromptEncoder
from tests.text import inner

WIDTH = 32


def _vectors(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, WIDTH, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def library():
    # A plain Mapping works: values may be Embedding objects or bare tensors.
    return {
        "mystyle": Embedding(name="mystyle", vectors=_vectors(1, 1)),
        "twovec": _vectors(2, 2),
        "flat": _vectors(1, 3)[0],  # a 1-D tensor is one vector
    }


@pytest.fixture(scope="module")
def encoder(tiny_text_encoder, tokenizer, library):
    return PromptEncoder(tiny_text_encoder, tokenizer, library)


def _embedding_outputs(encoder, prompt, **kw):
    """Token + position embeddings of every chunk, captured from the model's embedding layer."""
    model = encoder.text_model
    seen = []
    handle = inner(model).embeddings.register_forward_hook(
        lambda _m, _a, out: seen.append(out.clone())
    )
    try:
        cond = encoder.encode(prompt, **kw)
    finally:
        handle.remove()
    return cond, seen[0]


@pytest.mark.parametrize(("name", "count"), [("mystyle", 1), ("twovec", 2), ("flat", 1)])
def test_slot_rows_hold_the_vectors(encoder, library, name, count):
    prompt = f"a ({name}:1.2) cat"
    (chunk,) = encoder.tokenize(prompt).chunks
    (slot,) = chunk.embeddings
    assert (slot.name, slot.vectors) == (name, count)
    cond, embedded = _embedding_outputs(encoder, prompt, clip_skip=2)
    positions = inner(encoder.text_model).embeddings.position_embedding.weight
    rows = slice(slot.position, slot.position + count)
    vectors = getattr(library[name], "vectors", library[name]).reshape(count, WIDTH)
    # The embedding layer adds the position rows with one float32 addition, as here: exact.
    torch.testing.assert_close(embedded[0, rows], vectors + positions[rows])
    assert cond.embeddings_used == (name,)
    assert chunk.weights[slot.position] == pytest.approx(1.2)


def test_result_differs_from_the_plain_word(encoder, tiny_text_encoder, tokenizer):
    plain = PromptEncoder(tiny_text_encoder, tokenizer)
    for prompt in ("a mystyle cat", "twovec"):
        assert not torch.allclose(encoder.encode(prompt).tensor, plain.encode(prompt).tensor)
    # Text without embedding names is untouched by the library: the identical computation.
    torch.testing.assert_close(encoder.encode("a cat").tensor, plain.encode("a cat").tensor)


def test_rows_other_than_slots_are_the_token_embeddings(encoder):
    prompt = "a twovec cat, mystyle"
    (chunk,) = encoder.tokenize(prompt).chunks
    _, embedded = _embedding_outputs(encoder, prompt)
    with torch.no_grad():
        plain = inner(encoder.text_model).embeddings(input_ids=torch.tensor([chunk.ids]))
    slot_rows = {p for s in chunk.embeddings for p in range(s.position, s.position + s.vectors)}
    assert len(slot_rows) == 3
    others = [i for i in range(77) if i not in slot_rows]
    torch.testing.assert_close(embedded[0, others], plain[0, others])  # same lookup + add


def test_slots_in_a_later_chunk_and_in_a_pair(encoder):
    prompt = "cat BREAK twovec dog"
    cond, uncond = encoder.encode_pair(prompt, "mystyle")
    assert cond.embeddings_used == ("twovec",)
    assert uncond.embeddings_used == ("mystyle",)
    assert cond.chunks == uncond.chunks == 2


def test_width_mismatch_is_refused(tiny_text_encoder, tokenizer):
    bad = {"wide": torch.zeros(2, 768)}
    message = r"embedding 'wide' has shape \(2, 768\): expected \(vectors, 32\)"
    with pytest.raises(ValueError, match=message):
        PromptEncoder(tiny_text_encoder, tokenizer, bad)


def test_non_tensor_embedding_is_refused(tiny_text_encoder, tokenizer):
    with pytest.raises(
        ValueError, match="embedding 'x': expected an Embedding or a tensor, got str"
    ):
        PromptEncoder(tiny_text_encoder, tokenizer, {"x": "nope"})


def test_embedding_library_from_files(tmp_path, tiny_text_encoder, tokenizer):
    from safetensors.torch import save_file

    from sdstack.text import EmbeddingLibrary

    save_file({"emb_params": _vectors(2, 5)}, str(tmp_path / "filestyle.safetensors"))
    library = EmbeddingLibrary.from_dir(tmp_path, width=WIDTH, hash_files=False)
    encoder = PromptEncoder(tiny_text_encoder, tokenizer, library)
    cond, embedded = _embedding_outputs(encoder, "filestyle")
    positions = inner(tiny_text_encoder).embeddings.position_embedding.weight
    torch.testing.assert_close(embedded[0, 1:3], _vectors(2, 5) + positions[1:3])  # one add
    assert cond.embeddings_used == ("filestyle",)
