"""Deprojector evaluation: metrics against direct formulas, baselines, table, JSON, plot."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sdstack.text.deprojector import DeprojectorError
from sdstack.text.deprojector.evaluation import (
    Evaluation,
    LinearBaseline,
    deprojector_predictions,
    evaluate,
    format_table,
    pooled_baseline,
    score,
)


def _random(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_score_matches_direct_formulas():
    prediction, target = _random(4, 6, 3, seed=0), _random(4, 6, 3, seed=1)
    eos = torch.tensor([2, 5, 1, 3])
    scores = score("m", prediction, target, eos)

    def cos(a, b):
        return float(a @ b) / math.sqrt(float(a @ a) * float(b @ b))

    table = [[cos(prediction[n, k], target[n, k]) for k in range(6)] for n in range(4)]
    for k in range(6):
        assert scores.cosine[k] == pytest.approx(sum(table[n][k] for n in range(4)) / 4, abs=1e-12)
        mse = float((prediction[:, k] - target[:, k]).square().mean())
        assert scores.mse[k] == pytest.approx(mse, abs=1e-12)
    tokens = [table[n][k] for n in range(4) for k in range(1, int(eos[n]) + 1)]
    padding = [table[n][k] for n in range(4) for k in range(int(eos[n]) + 1, 6)]
    assert scores.cos_tokens == pytest.approx(sum(tokens) / len(tokens), abs=1e-12)
    assert scores.cos_padding == pytest.approx(sum(padding) / len(padding), abs=1e-12)
    assert score("same", target, target, eos).cosine == pytest.approx([1.0] * 6, abs=1e-12)


def test_pooled_baseline_repeats_the_vector():
    pooled = _random(2, 3, seed=2)
    repeated = pooled_baseline(pooled, positions=5)
    assert repeated.shape == (2, 5, 3)
    assert all(torch.equal(repeated[:, k], pooled) for k in range(5))


def test_linear_baseline_recovers_an_exact_linear_map():
    pooled = _random(40, 4, seed=3)
    a, b = _random(5 * 4, 4, seed=4), _random(5 * 4, seed=5)
    states = (pooled @ a.T + b).reshape(40, 5, 4)
    fitted = LinearBaseline.fit(pooled, states)
    test = _random(6, 4, seed=6)
    expected = (test @ a.T + b).reshape(6, 5, 4).float()
    torch.testing.assert_close(fitted.predict(test), expected, rtol=0, atol=1e-5)


def test_linear_baseline_is_least_squares():
    pooled, states = _random(30, 3, seed=7), _random(30, 2, 3, seed=8)
    x = torch.cat([pooled, torch.ones(30, 1, dtype=torch.float64)], 1)
    solution = torch.linalg.lstsq(x, states.reshape(30, -1)).solution
    fitted = LinearBaseline.fit(pooled, states)
    torch.testing.assert_close(fitted.coefficients, solution, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def models(tiny_text_encoder, tokenizer):
    from sdstack.text.deprojector.model import Deprojector

    return {
        decoder: Deprojector.from_clip(tiny_text_encoder, tokenizer, decoder=decoder)
        for decoder in ("autoregressive", "parallel")
    }


def test_deprojector_predictions_are_the_models_outputs(models, tiny_text_encoder, tokenizer):
    ar, parallel = models["autoregressive"], models["parallel"]
    embeddings, states = ar.teacher(tiny_text_encoder, tokenizer, ["a cat", "a dog in a hat"])
    out = deprojector_predictions(ar, embeddings, states, batch_size=1)
    assert set(out) == {"teacher-forced", "free-running"}
    with torch.no_grad():
        torch.testing.assert_close(out["teacher-forced"], ar.teacher_forced(embeddings, states))
        torch.testing.assert_close(out["free-running"], ar.decode(embeddings))
        (only,) = deprojector_predictions(parallel, embeddings, states).values()
        torch.testing.assert_close(only, parallel.decode(embeddings))


CAPTIONS = [
    f"a {c} {t} in the {p}"
    for c in ("red", "blue", "green")
    for t in ("cat", "car")
    for p in ("snow", "city", "rain")
]


def test_evaluate_scores_every_method(models, tiny_text_encoder, tokenizer, tmp_path):
    evaluation = evaluate(
        models,
        tiny_text_encoder,
        tokenizer,
        CAPTIONS,
        holdout=0.2,
        seed=1,
        cache_dir=tmp_path,
        fingerprint="f",
    )
    names = [m.name for m in evaluation.methods]
    assert names == [
        "autoregressive: teacher-forced",
        "autoregressive: free-running",
        "parallel: parallel",
        "pooled repeated",
        "linear map",
    ]
    assert (evaluation.heldout, evaluation.train, evaluation.clip_skip) == (4, 14, 1)
    for method in evaluation.methods:
        assert len(method.cosine) == len(method.mse) == 77
        assert method.baseline == (method.name in ("pooled repeated", "linear map"))
    # position 0 of a deprojector is the fixed BOS state: exact
    assert evaluation.method("parallel: parallel").cosine[0] == pytest.approx(1.0, abs=1e-6)
    data = json.loads(json.dumps(evaluation.to_dict()))
    assert data["methods"][0]["name"] == "autoregressive: teacher-forced"
    table = format_table(evaluation)
    assert "held-out captions: 4 (linear map fitted on 14), clip skip 1" in table
    assert all(name in table for name in names)
    single = evaluate(
        {"x": models["parallel"]},
        tiny_text_encoder,
        tokenizer,
        CAPTIONS,
        holdout=0.2,
        seed=1,
        cache_dir=tmp_path,
        fingerprint="f",
    )
    assert single.methods[0].name == "parallel"


def test_evaluate_errors(models, tiny_text_encoder, tokenizer):
    from sdstack.text.deprojector.model import Deprojector

    with pytest.raises(DeprojectorError, match="at least one deprojector"):
        evaluate({}, tiny_text_encoder, tokenizer, CAPTIONS)
    skip2 = Deprojector.from_clip(tiny_text_encoder, tokenizer, clip_skip=2)
    with pytest.raises(DeprojectorError, match="different clip skips"):
        evaluate({"a": models["parallel"], "b": skip2}, tiny_text_encoder, tokenizer, CAPTIONS)
    with pytest.raises(DeprojectorError, match="at least 2 captions, got 1"):
        evaluate(models, tiny_text_encoder, tokenizer, ["a cat"], fingerprint="f")


def test_plot_is_a_png(models, tiny_text_encoder, tokenizer, tmp_path):
    from PIL import Image

    from sdstack.text.deprojector.plots import plot_evaluation

    evaluation = evaluate(
        models, tiny_text_encoder, tokenizer, CAPTIONS, holdout=0.2, fingerprint="f"
    )
    path = plot_evaluation(evaluation, tmp_path / "eval.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (1000, 750)
    assert not list(tmp_path.glob(".tmp-*"))  # written atomically, nothing left behind
    assert isinstance(evaluation, Evaluation)
