"""Jobs carry their LoRA stack: prompt tags and job.networks are applied through the
patcher, consecutive jobs switch stacks exactly, a caller's own set_loras is respected."""

from __future__ import annotations

import numpy as np
import pytest

from sdstack.generate import GenerationJob, GenerationParams, generate, prepare
from sdstack.lora.library import LoraLibrary
from sdstack.lora.stack import active_loras, set_loras
from sdstack.lora.tiny import write_tiny_lora
from sdstack.models.patcher import weights_fingerprint
from sdstack.models.tiny import tiny_components

pytestmark = pytest.mark.filterwarnings("ignore::sdstack.errors.SdstackWarning")


@pytest.fixture(scope="module")
def model():
    return tiny_components(seed=0)


@pytest.fixture
def folder(tmp_path, model, monkeypatch):
    monkeypatch.setenv("SDSTACK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("SDSTACK_ROOT", raising=False)
    write_tiny_lora(model, tmp_path / "loras/film.safetensors", seed=1)
    write_tiny_lora(model, tmp_path / "loras/detail.safetensors", seed=2, clip_skip=2)
    yield tmp_path / "loras"
    set_loras(model, [])


def job(prompt: str, folder, **settings) -> GenerationJob:
    params = GenerationParams(prompt, steps=2, width=64, height=64, seed=3, **settings)
    return GenerationJob(params, lora_dirs=(str(folder),))


def image(results) -> np.ndarray:
    return np.asarray(results[0].image)


def test_consecutive_jobs_switch_stacks_and_a_plain_job_restores(model, folder):
    original = weights_fingerprint(model)
    with_loras = image(generate(model, job("a cat <lora:film:1> <lora:detail:0.5>", folder)))
    switched = image(generate(model, job("a cat <lora:detail:1>", folder)))
    assert not np.array_equal(with_loras, switched)
    plain = generate(model, job("a cat", folder))
    assert weights_fingerprint(model) == original and active_loras(model) is None
    # The same job on a fresh model gives the same picture: switching left no residue.
    fresh = tiny_components(seed=0)
    assert np.array_equal(switched, image(generate(fresh, job("a cat <lora:detail:1>", folder))))
    assert np.array_equal(image(plain), image(generate(fresh, job("a cat", folder))))


def test_a_callers_own_stack_stays_and_is_written_as_tags(model, folder):
    library = LoraLibrary(None, [folder])
    set_loras(model, [("film", 0.7)], library=library)
    results = generate(model, job("a cat", folder))
    assert active_loras(model) is not None
    assert results[0].infotext.startswith("a cat <lora:film:0.7>\n")
    assert "Lora hashes: " in results[0].infotext


def test_networks_apply_after_the_tags_and_clip_skip_auto(model, folder):
    entry = GenerationJob(
        GenerationParams("a cat <lora:film:1>", steps=2, width=64, height=64, clip_skip="auto"),
        networks=(("detail", 1.0),),
        lora_dirs=(str(folder),),
    )
    prepared = prepare(
        model, entry.params, networks=entry.networks, loras=LoraLibrary(None, [folder])
    )
    assert [lora.name for lora in prepared.loras.loras] == ["film", "detail"]
    # film records no clip skip, detail 2: auto takes 2 and the infotext says so.
    assert prepared.params.clip_skip == 2
    assert "Clip skip: 2" in prepared.infotext(1)
    assert prepared.infotext(1).startswith("a cat <lora:film:1> <lora:detail:1>\n")


def test_job_check_reads_the_stack_without_a_model(folder):
    from sdstack.lora.block_weights import BlockWeightError

    with pytest.raises(BlockWeightError, match="lbw='X': not a preset"):
        job("a <lora:film:1:lbw=X>", folder).check()
    assert [s.name for s in job("a <lora:film:1> <lyco:x:2>", folder).lora_specs()] == ["film", "x"]
