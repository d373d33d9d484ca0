"""generate() with encoding="deprojected" on the tiny model: the UNet's conditioning against
deprojected_states and a direct CLIP forward, clip skip, infotext, errors, prompt reading."""

from __future__ import annotations

import copy
import hashlib
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from sdstack.errors import SdstackWarning, UnknownNameError
from sdstack.generate import GenerationJob, GenerationParams, generate
from sdstack.generate.deprojected import (
    JobDeprojector,
    open_deprojector,
    read_deprojector_folder,
)
from sdstack.generate.encoding import (
    UnknownEncodingError,
    canonical_deprojected_prompt,
    read_deprojected_prompt,
)
from sdstack.generate.hooks import ROW_COND
from sdstack.generate.infotext import parse_infotext
from sdstack.lora.library import LoraLibrary
from sdstack.lora.tiny import write_tiny_lora
from sdstack.prompt.arithmetic import EmbeddingExpressionError, Sum, Term, Text
from sdstack.prompt.errors import PromptNotSupportedError
from sdstack.text.deprojector import (
    Deprojector,
    DeprojectorFileError,
    load_deprojector,
    save_deprojector,
)
from sdstack.text.deprojector.arithmetic import deprojected_states
from sdstack.validate import SettingError
from tests.text import assert_forward_close, direct_layer

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SMALL = {"width": 64, "height": 64, "steps": 3, "sampler": "Euler", "cfg_scale": 5.0, "seed": 7}
EXPRESSION = '{"a red cat" + 0.5*"a hat" - "blurry" ~0.3~ "a dog"}'


@pytest.fixture(scope="module")
def deprojector(tiny_components):
    """An untrained deprojector initialised from the tiny CLIP (clip skip 1)."""
    return Deprojector.from_clip(tiny_components.text_encoder, tiny_components.tokenizer).eval()


@pytest.fixture(scope="module")
def folder(deprojector, tmp_path_factory):
    return save_deprojector(deprojector, tmp_path_factory.mktemp("dp") / "tiny-dp")


class Recorder:
    """A UNet hook keeping every call's conditioning rows by kind."""

    def __init__(self):
        self.cond, self.uncond = [], []

    def __call__(self, call):
        for row, kind in zip(call.encoder_hidden_states, call.row_kinds, strict=True):
            (self.cond if kind == ROW_COND else self.uncond).append(row.clone())
        return call


def chunk_ids(tokenizer, text: str) -> list[int]:
    """BOS, the text's tokens, EOS padding to 77 (the reference chunk of a short text)."""
    body = tokenizer(text, add_special_tokens=False).input_ids
    return [tokenizer.bos_token_id, *body] + [tokenizer.eos_token_id] * (76 - len(body))


def run(components, prompt, deprojector=None, hooks=(), **settings):
    params = GenerationParams(prompt, **{**SMALL, **settings})
    return generate(components, params, hooks=hooks, deprojector=deprojector)


def test_unet_sees_the_deprojected_prompt_and_the_normal_negative(tiny_components, deprojector):
    te, tokenizer = tiny_components.text_encoder, tiny_components.tokenizer
    recorder = Recorder()
    results = run(
        tiny_components, EXPRESSION, deprojector, (recorder,), negative="blurry",
        encoding="deprojected", batch_size=2,
    )  # fmt: skip
    assert len(results) == 2
    want = deprojected_states(EXPRESSION, deprojector, te, tokenizer)[0]
    assert len(recorder.cond) == len(recorder.uncond) == 3 * 2  # 3 calls, 2 images
    for row in recorder.cond:  # the same computation: equal to the bit
        assert torch.equal(row, want)
    negative = direct_layer(te, chunk_ids(tokenizer, "blurry"), 1)
    for row in recorder.uncond:
        assert_forward_close(row, negative)


def test_the_image_differs_from_the_standard_encoding(tiny_components, deprojector):
    standard = run(tiny_components, "a red cat")[0]
    deprojected = run(tiny_components, "a red cat", deprojector, encoding="deprojected")[0]
    assert not np.array_equal(np.asarray(standard.image), np.asarray(deprojected.image))
    assert "Encoding" not in parse_infotext(standard.infotext)
    assert parse_infotext(deprojected.infotext)["Encoding"] == "deprojected"
    init = Image.fromarray(np.asarray(standard.image)[::-1].copy())  # img2img works too
    again = run(
        tiny_components, "a red cat", deprojector, encoding="deprojected", init_image=init,
        denoising_strength=0.6,
    )[0]  # fmt: skip
    assert parse_infotext(again.infotext)["Denoising strength"] == "0.6"
    assert not np.array_equal(np.asarray(again.image), np.asarray(deprojected.image))


def test_an_infotext_encoding_is_checked():
    job = GenerationJob.from_infotext("a cat\nSteps: 3, Sampler: Euler, Encoding: bogus")
    with pytest.raises(UnknownEncodingError, match="encoding: unknown prompt encoding 'bogus'"):
        job.check()


def test_auto_clip_skip_is_the_deprojector_s(tiny_components):
    te, tokenizer = tiny_components.text_encoder, tiny_components.tokenizer
    skip2 = Deprojector.from_clip(te, tokenizer, clip_skip=2).eval()
    recorder = Recorder()
    with warnings.catch_warnings():
        warnings.simplefilter("error", SdstackWarning)
        result = run(
            tiny_components, "a cat", skip2, (recorder,), negative="blurry",
            encoding="deprojected", clip_skip="auto",
        )[0]  # fmt: skip
    assert parse_infotext(result.infotext)["Clip skip"] == "2"
    assert_forward_close(recorder.uncond[0], direct_layer(te, chunk_ids(tokenizer, "blurry"), 2))
    with pytest.warns(SdstackWarning, match="trained for clip skip 2, used at clip skip 1"):
        run(tiny_components, "a cat", skip2, encoding="deprojected", clip_skip=1)


def test_a_folder_gives_the_infotext_fields(tiny_components, folder):
    job = GenerationJob(
        GenerationParams('{ "a cat"+0.5 * "a hat" }', encoding="deprojected", **SMALL),
        deprojector=str(folder),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", SdstackWarning)  # same CLIP, same clip skip
        result = generate(tiny_components, job)[0]
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()[:10]
    info = parse_infotext(result.infotext)
    assert info["Prompt"] == '{"a cat" + 0.5*"a hat"}'
    assert info["Deprojector"] == f"tiny-dp [{digest}]"
    assert info["Encoding"] == "deprojected"
    back = GenerationJob.from_infotext(result.infotext)
    assert back.params.encoding == "deprojected"
    assert back.infotext_deprojector == f"tiny-dp [{digest}]"
    assert back.unhonoured == {}
    assert job.infotext(tiny_components, seed=7) == result.infotext


def test_a_folder_is_checked_before_loading(tmp_path, folder):
    assert read_deprojector_folder(folder).config.clip_skip == 1
    with pytest.raises(DeprojectorFileError, match="does not exist; expected a deprojector"):
        read_deprojector_folder(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DeprojectorFileError, match="no deprojector config"):
        read_deprojector_folder(tmp_path / "empty")
    (tmp_path / "empty/config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(DeprojectorFileError, match=r"no model\.safetensors"):
        read_deprojector_folder(tmp_path / "empty")


def test_encoding_and_deprojector_must_fit(tiny_components, deprojector):
    with pytest.raises(SettingError, match="encoding 'deprojected' needs a deprojector"):
        run(tiny_components, "a cat", encoding="deprojected")
    with pytest.raises(SettingError, match="a deprojector was given, but the encoding is"):
        run(tiny_components, "a cat", deprojector)
    with pytest.raises(UnknownEncodingError, match="did you mean 'deprojected'") as error:
        run(tiny_components, "a cat", deprojector, encoding="deprojectd")
    assert isinstance(error.value, UnknownNameError)
    with pytest.raises(SettingError, match="must be a folder, a Deprojector or a JobDeprojector"):
        run(tiny_components, "a cat", 3, encoding="deprojected")
    with pytest.raises(EmbeddingExpressionError, match=r"found .\}. at position 7"):
        run(tiny_components, '{"a" + }', deprojector, encoding="deprojected")


def test_a_job_deprojector_is_used_as_it_is(tiny_components, deprojector, folder):
    loaded = JobDeprojector(deprojector, "mine", "0123456789")
    result = run(tiny_components, "a cat", loaded, encoding="deprojected")[0]
    assert parse_infotext(result.infotext)["Deprojector"] == "mine [0123456789]"
    opened = open_deprojector(folder, tiny_components)  # load once, use for many jobs
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()[:10]
    assert (opened.name, opened.short_hash, opened.clip_skip) == ("tiny-dp", digest, 1)
    with pytest.warns(SdstackWarning, match="tiny-dp was trained for clip skip 1, used at clip"):
        open_deprojector(opened, tiny_components, clip_skip=2)


def test_tags_are_taken_out_and_written_after_the_expression():
    expression, tags = read_deprojected_prompt('{"a <lora:x:0.5>cat" + "b"} <lora:y:1>')
    assert expression == Sum((Term(1.0, Text("a cat")), Term(1.0, Text("b"))))
    assert tags == ["<lora:x:0.5>", "<lora:y:1>"]
    for prompt, canonical in [
        ('{"a <lora:x:0.5>cat" + "b"} <lora:y:1>', '{"a cat" + "b"} <lora:x:0.5> <lora:y:1>'),
        ("a cat <lora:x:1>", "a cat <lora:x:1>"),
        ("  a (cat:1.2) AND dog  ", "a (cat:1.2) AND dog"),  # plain text, read as is
        ("<lora:x:1>", "<lora:x:1>"),
    ]:
        assert canonical_deprojected_prompt(prompt) == canonical
        assert canonical_deprojected_prompt(canonical) == canonical
    with pytest.raises(PromptNotSupportedError, match="<hypernet:h>"):
        read_deprojected_prompt('{"a" + "b"} <hypernet:h:1>')


def test_a_lora_reaches_the_texts_and_the_infotext(tiny_components, deprojector, folder, tmp_path):
    """The texts are embedded by the patched CLIP; no CLIP-mismatch warning for the patch."""
    components = copy.deepcopy(tiny_components)  # patched below
    write_tiny_lora(components, tmp_path / "film.safetensors", seed=1)
    prompt, recorder = '{"a cat" - "a dog"} <lora:film:1>', Recorder()
    params = GenerationParams(prompt, encoding="deprojected", **SMALL)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SdstackWarning)
        result = generate(
            components, params, hooks=(recorder,), loras=LoraLibrary(None, [tmp_path]),
            deprojector=folder,
        )[0]  # fmt: skip
    tokenizer = components.tokenizer
    expression = '{"a cat" - "a dog"}'
    patched = deprojected_states(expression, deprojector, components.text_encoder, tokenizer)
    plain = deprojected_states(expression, deprojector, tiny_components.text_encoder, tokenizer)
    assert torch.equal(recorder.cond[0], patched[0])  # the stack stays applied after the job
    assert not torch.allclose(patched, plain)
    info = parse_infotext(result.infotext)
    assert info["Prompt"] == prompt and info["Lora hashes"].startswith("film: ")


def test_the_author_s_v1_folder_generates(tiny_components, tmp_path):
    """A v1 folder (``pytorch_model.bin`` with the author's key names): read, loaded with
    its null embedding from the CLIP, recorded by the hash of its weights file."""
    te, tokenizer = tiny_components.text_encoder, tiny_components.tokenizer
    width = te.config.hidden_size
    generator = torch.Generator().manual_seed(3)
    projection = torch.eye(width) + 0.1 * torch.randn(width, width, generator=generator)
    source = Deprojector.from_clip(te, tokenizer, projection=projection, relative_to_null=False)
    state = {
        "projection.weight": source.inverse_projection.clone(),
        "position_ids": torch.arange(77)[None],
        "position_embedding.weight": source.position_embedding.detach().clone(),
        "final_layer_norm.weight": source.final_layer_norm.weight.detach().clone(),
        "final_layer_norm.bias": source.final_layer_norm.bias.detach().clone(),
        "sos_embed": source.bos.clone(),
    }
    for key, value in source.stacks[0].layers[0].state_dict().items():
        state[f"encoder_layer.{key}"] = value.detach().clone()
    folder = tmp_path / "v1-dp"
    folder.mkdir()
    torch.save(state, folder / "pytorch_model.bin")
    config = {**te.config.to_dict(), "projection_dim": width}
    (folder / "config.json").write_text(json.dumps(config))
    assert read_deprojector_folder(folder).weights.name == "pytorch_model.bin"
    recorder = Recorder()
    with warnings.catch_warnings():
        warnings.simplefilter("error", SdstackWarning)  # the null comes from the CLIP
        result = run(tiny_components, '{"a cat" - "a dog"}', folder, (recorder,),
                     encoding="deprojected")[0]  # fmt: skip
    loaded = load_deprojector(folder, text_encoder=te, tokenizer=tokenizer)
    want = deprojected_states('{"a cat" - "a dog"}', loaded, te, tokenizer)[0]
    assert torch.equal(recorder.cond[0], want)
    digest = hashlib.sha256((folder / "pytorch_model.bin").read_bytes()).hexdigest()[:10]
    assert parse_infotext(result.infotext)["Deprojector"] == f"v1-dp [{digest}]"
