"""The packaged SD1.x CLIP tokenizer: offline, from package data, and lazily imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import resources

from sdstack.prompt.tokenizer import BOS_ID, COMMA_ID, EOS_ID, load_tokenizer, tokenizer_dir


def test_a_photo_of_a_cat_matches_the_reference_ids(tokenizer):
    assert tokenizer("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_special_and_comma_ids_are_the_tokenizer_ids(tokenizer):
    assert tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>", ",</w>"]) == [
        BOS_ID,
        EOS_ID,
        COMMA_ID,
    ]
    assert tokenizer(",", add_special_tokens=False)["input_ids"] == [COMMA_ID]


def test_model_max_length_is_77_and_loading_is_cached(tokenizer):
    assert tokenizer.model_max_length == 77
    assert load_tokenizer() is load_tokenizer()


def test_data_files_are_found_through_importlib_resources():
    folder = resources.files("sdstack.prompt").joinpath("data", "clip-tokenizer")
    vocab = folder.joinpath("vocab.json")
    merges = folder.joinpath("merges.txt")
    assert vocab.is_file() and merges.is_file()
    assert os.path.samefile(tokenizer_dir(), str(folder))
    assert len(json.loads(vocab.read_text(encoding="utf-8"))) == 49408
    assert merges.read_text(encoding="utf-8").startswith("#version")


def _run_python(code: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_tokenizer_loads_offline_in_a_fresh_process():
    code = (
        "from sdstack.prompt import load_tokenizer;"
        "print(load_tokenizer()('a photo of a cat')['input_ids'])"
    )
    assert _run_python(code) == "[49406, 320, 1125, 539, 320, 2368, 49407]"


def test_importing_sdstack_prompt_imports_neither_torch_nor_transformers():
    code = (
        "import sys, sdstack.prompt; print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    assert _run_python(code) == "False False"
