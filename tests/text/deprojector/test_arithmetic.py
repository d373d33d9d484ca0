"""Embedding arithmetic evaluated against the formulas computed directly (float64)."""

from __future__ import annotations

import math

import pytest
import torch

from sdstack.prompt.arithmetic import (
    EmbeddingExpressionError,
    Interpolation,
    PooledSum,
    Sum,
    Term,
    Text,
    parse_embedding_expression,
)
from sdstack.text.deprojector import DeprojectorError
from sdstack.text.deprojector.arithmetic import deprojected_states, evaluate_expression, slerp

WIDTH = 16
WORDS = ["a", "b", "c", "d", "x y", ""]


def _table(dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    vectors = torch.randn(len(WORDS), WIDTH, generator=generator, dtype=torch.float64) * 3
    table = {word: vectors[i].to(dtype) for i, word in enumerate(WORDS)}
    null = (torch.randn(WIDTH, generator=generator, dtype=torch.float64) * 3).to(dtype)
    table[""] = null.clone()  # the empty prompt embeds to null itself
    return table, null


class _Embed:
    """A stub ``embed``: a fixed table of vectors; records every call."""

    def __init__(self, table):
        self.table = table
        self.calls = []

    def __call__(self, texts):
        self.calls.append(list(texts))
        return torch.stack([self.table[text] for text in texts])


def _evaluate(text, dtype=torch.float64):
    table, null = _table(dtype)
    embed = _Embed(table)
    return evaluate_expression(parse_embedding_expression(text), embed, null), table, null, embed


def test_a_plain_text_is_its_embedding():
    result, table, _, embed = _evaluate("x y")
    assert torch.equal(result, table["x y"])
    assert embed.calls == [["x y"]]


def test_sum_is_relative_to_null():
    result, e, null, embed = _evaluate('{"a" + 0.5*"b" - "c" - 2*("a" - "d")}')
    expected = (
        null
        + (e["a"] - null)
        + 0.5 * (e["b"] - null)
        - (e["c"] - null)
        - 2 * ((e["a"] - null) - (e["d"] - null))
    )
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-12)
    assert embed.calls == [["a", "b", "c", "d"]]  # one call, each text once
    # a weighted sum whose weights add up to 1 is the plain linear combination
    result, e, null, _ = _evaluate('{0.7*"a" + 0.3*"b"}')
    torch.testing.assert_close(result, 0.7 * e["a"] + 0.3 * e["b"], rtol=0, atol=1e-12)
    result, e, null, _ = _evaluate('{-"a"}')
    torch.testing.assert_close(result, 2 * null - e["a"], rtol=0, atol=1e-12)


def _angle(x, y):
    return math.acos(max(-1.0, min(1.0, float(x @ y / (x.norm() * y.norm())))))


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_interpolation_is_a_slerp_about_null(t):
    result, e, null, _ = _evaluate(f'{{"a" ~{t}~ "b"}}')
    u, v, d = e["a"] - null, e["b"] - null, result - null
    omega = _angle(u, v)
    # the characterisation of slerp: on the arc from u to v, at the fraction t of the
    # angle, with the norm interpolated linearly
    assert _angle(u, d) == pytest.approx(t * omega, abs=1e-6)
    assert _angle(d, v) == pytest.approx((1 - t) * omega, abs=1e-6)
    assert float(d.norm()) == pytest.approx((1 - t) * float(u.norm()) + t * float(v.norm()))
    in_plane = torch.linalg.lstsq(torch.stack([u, v], dim=1), d[:, None]).solution
    torch.testing.assert_close(torch.stack([u, v], dim=1) @ in_plane[:, 0], d)
    if t in (0.0, 1.0):
        assert torch.equal(result, null + (u if t == 0.0 else v))


def test_slerp_falls_back_to_linear_for_parallel_and_zero_vectors():
    generator = torch.Generator().manual_seed(1)
    u = torch.randn(WIDTH, generator=generator, dtype=torch.float64)
    zero = torch.zeros(WIDTH, dtype=torch.float64)
    torch.testing.assert_close(slerp(u, 3 * u, 0.25), 0.75 * u + 0.75 * u)
    torch.testing.assert_close(slerp(u, -u, 0.25), 0.75 * u - 0.25 * u)
    torch.testing.assert_close(slerp(zero, u, 0.25), 0.25 * u)
    # the empty prompt is null: d = 0, so '"" ~t~ "a"' is the linear t * (a - null)
    result, e, null, _ = _evaluate('{"" ~0.25~ "a"}')
    torch.testing.assert_close(result, null + 0.25 * (e["a"] - null), rtol=0, atol=1e-12)


def test_nested_interpolation_and_sums():
    result, e, null, _ = _evaluate('{("a" ~0.5~ "b") - 0.5*"c" ~0.2~ "d"}')
    d = {k: v - null for k, v in e.items()}
    inner = slerp(d["a"], d["b"], 0.5)
    expected = null + slerp(inner - 0.5 * d["c"], d["d"], 0.2)
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-12)


def test_pooled_sum_is_the_spec_pooled_encoding():
    result, e, null, embed = _evaluate('{pooled("a, b,, c , ")}')
    expected = (e["a"] - null) + (e["b"] - null) + (e["c"] - null) + null
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-12)
    assert embed.calls == [["a", "b", "c"]]
    same, *_ = _evaluate('{"a" + "b" + "c"}')
    torch.testing.assert_close(result, same, rtol=0, atol=1e-12)


def test_pooled_sum_renormalised_to_the_mean_norm():
    result, e, null, _ = _evaluate('{pooled("a, b, c", renorm)}')
    plain = (e["a"] - null) + (e["b"] - null) + (e["c"] - null) + null
    mean = (e["a"].norm() + e["b"].norm() + e["c"].norm()) / 3
    assert float(result.norm()) == pytest.approx(float(mean), rel=1e-12)
    torch.testing.assert_close(result, plain * (mean / plain.norm()), rtol=0, atol=1e-12)
    # inside a sum it contributes its difference to null
    outer, *_ = _evaluate('{"d" - 0.5*pooled("a, b, c", renorm)}')
    expected = null + (e["d"] - null) - 0.5 * (result - null)
    torch.testing.assert_close(outer, expected, rtol=0, atol=1e-12)


def test_float32_matches_the_float64_formula():
    text = '{"a" + 0.5*"b" - "c" ~0.4~ pooled("a, d", renorm)}'
    exact, *_ = _evaluate(text, torch.float64)
    single, *_ = _evaluate(text, torch.float32)
    assert single.dtype == torch.float32
    # a handful of float32 operations on values of magnitude ~10: a few ulps of 10
    torch.testing.assert_close(single.double(), exact, rtol=0, atol=64 * 10 * 2**-24)


def test_half_embeddings_are_evaluated_in_float32():
    table, null = _table(torch.float16)
    result = evaluate_expression(
        parse_embedding_expression('{"a" + "b"}'), _Embed(table), null.float()
    )
    assert result.dtype == torch.float32
    expected = table["a"].float() + table["b"].float() - null.float()
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        (
            torch.zeros(2, WIDTH),
            "embed returned (2, 16) for 1 texts; expected a tensor of shape (1, 16)",
        ),
        (torch.zeros(1, WIDTH + 1), "embed returned (1, 17) for 1 texts"),
        ([[0.0] * WIDTH], "embed returned list for 1 texts"),
        (torch.zeros(1, WIDTH, dtype=torch.int64), "embed returned torch.int64; expected floating"),
    ],
)
def test_a_bad_embed_is_a_clear_error(returned, message):
    with pytest.raises(
        DeprojectorError, match="^" + message.replace("(", r"\(").replace(")", r"\)")
    ):
        evaluate_expression(Text("a"), lambda texts: returned, torch.zeros(WIDTH))


@pytest.mark.parametrize(
    ("null", "message"),
    [
        (torch.zeros(2, WIDTH), r"null embedding must be a \(W,\) tensor, got \(2, 16\)"),
        (torch.zeros(1, 2, 3), r"null embedding must be a \(W,\) tensor, got \(1, 2, 3\)"),
        ("null", r"null embedding must be a \(W,\) tensor, got str"),
        (torch.zeros(WIDTH, dtype=torch.int32), "null embedding must be floating point"),
    ],
)
def test_a_bad_null_is_a_clear_error(null, message):
    with pytest.raises(DeprojectorError, match=message):
        evaluate_expression(Text("a"), lambda texts: torch.zeros(1, WIDTH), null)


def test_an_unparsed_expression_is_a_clear_error():
    with pytest.raises(DeprojectorError, match=r"expression must be parsed first .* got str"):
        evaluate_expression('{"a"}', lambda texts: torch.zeros(1, WIDTH), torch.zeros(WIDTH))


def test_a_null_of_shape_1_w_is_accepted():
    table, null = _table()
    expression = Sum((Term(2.0, Text("a")),))
    result = evaluate_expression(expression, _Embed(table), null[None])
    torch.testing.assert_close(result, 2 * table["a"] - null, rtol=0, atol=1e-12)


class _StubDeprojector:
    """The contract's surface: ``embed(text_encoder, tokenizer, texts)``, ``null``, ``decode``."""

    def __init__(self):
        self.table, null = _table(torch.float32)
        self.null = null
        self.decoded = []

    def embed(self, text_encoder, tokenizer, texts):
        assert (text_encoder, tokenizer) == ("te", "tok")
        return torch.stack([self.table[text] for text in texts])

    def decode(self, embedding):
        self.decoded.append(embedding)
        return embedding[:, None].expand(-1, 77, -1) * 1.0


def test_deprojected_states_parse_embed_evaluate_decode():
    stub = _StubDeprojector()
    states = deprojected_states('{"a" - "b"}', stub, "te", "tok")
    assert states.shape == (1, 77, WIDTH)
    (embedding,) = stub.decoded
    e = stub.table
    torch.testing.assert_close(embedding[0], e["a"] - e["b"] + stub.null)
    plain = deprojected_states("a", stub, "te", "tok", device="cpu")
    assert torch.equal(plain[0, 5], e["a"])
    parsed = Interpolation(Text("a"), PooledSum("b, c"), 0.5)
    deprojected_states(parsed, stub, "te", "tok")
    assert len(stub.decoded) == 3


def test_deprojected_states_reports_syntax_errors():
    with pytest.raises(EmbeddingExpressionError, match="at position 6"):
        deprojected_states('{"a" +}', _StubDeprojector(), "te", "tok")


@pytest.fixture(scope="module")
def tiny_deprojector(tiny_text_encoder, tokenizer):
    from sdstack.text.deprojector.model import Deprojector

    torch.manual_seed(0)
    return Deprojector.from_clip(tiny_text_encoder, tokenizer)


def test_with_the_real_deprojector(tiny_deprojector, tiny_text_encoder, tokenizer):
    deprojector = tiny_deprojector
    texts = ["a cat", "a red hat", "blurry"]
    embedded = deprojector.embed(tiny_text_encoder, tokenizer, texts)
    null = deprojector.null
    # the deprojector's null is the empty prompt's embedding
    empty = deprojector.embed(tiny_text_encoder, tokenizer, [""])[0]
    torch.testing.assert_close(empty, null, rtol=0, atol=1e-5)

    states = deprojected_states("a cat", deprojector, tiny_text_encoder, tokenizer)
    torch.testing.assert_close(states, deprojector.decode(embedded[:1]))

    text = '{"a cat" + 0.5*"a red hat" - "blurry"}'
    states = deprojected_states(text, deprojector, tiny_text_encoder, tokenizer)
    combined = embedded[0] + 0.5 * embedded[1] - embedded[2] + 0.5 * null
    assert states.shape == (1, 77, tiny_text_encoder.config.hidden_size)
    torch.testing.assert_close(states, deprojector.decode(combined[None]), rtol=1e-5, atol=1e-5)
    # position 0 is the fixed BOS state, whatever the expression
    torch.testing.assert_close(states[0, 0], deprojector.bos)
