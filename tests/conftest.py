"""Shared fixtures: the packaged tokenizer and tiny random SD1-like models."""

from __future__ import annotations

import os
import tempfile

# One torch thread per test process: the tiny models gain nothing from intra-op threads,
# and on a 2-core machine two threads per process stall each other (and pytest -n 2).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Hashes computed by the tests go to a cache of their own, never the user's ~/.cache.
os.environ.setdefault("SDSTACK_CACHE_DIR", tempfile.mkdtemp(prefix="sdstack-test-cache-"))
# `--dtype auto` picks bf16 on a CPU with native bf16: the suite runs fp32 on every machine
# (tests of the policy pass the probe in).
os.environ["SDSTACK_CPU_BF16"] = "0"

import pytest


@pytest.fixture(scope="session")
def tokenizer():
    """The packaged SD1.x CLIP tokenizer."""
    from sdstack.prompt.tokenizer import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def tiny_text_encoder():
    """A 5-layer width-32 CLIPTextModel with randomised LayerNorms (do not mutate)."""
    from sdstack.models.tiny import tiny_text_encoder

    return tiny_text_encoder(seed=0)


@pytest.fixture(scope="session")
def tiny_components():
    """Tiny UNet + VAE + CLIP + tokenizer (do not mutate; build your own to patch)."""
    from sdstack.models.tiny import tiny_components

    return tiny_components(seed=0)


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_components, tmp_path_factory):
    """The tiny model as an LDM single file plus a config folder for its shapes."""
    from sdstack.models.ldm_file import save_single_file

    folder = tmp_path_factory.mktemp("tiny-model")
    checkpoint = folder / "tiny-model.safetensors"
    save_single_file(tiny_components, checkpoint)
    config = folder / "config"
    tiny_components.unet.save_config(config / "unet")
    tiny_components.vae.save_config(config / "vae")
    tiny_components.text_encoder.config.save_pretrained(config / "text_encoder")
    return checkpoint, config
