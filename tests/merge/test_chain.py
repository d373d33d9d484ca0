"""Merge recipes: chained steps equal the steps written out one by one, with nothing but
the last output written; bad recipes are named."""

from __future__ import annotations

import pytest
import torch

from sdstack.merge.chain import RecipeError, run_recipe
from sdstack.merge.settings import MergeSettings
from sdstack.merge.stream import merge_checkpoints
from tests.merge import merge_files as mf


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("recipe")
    for seed, name in enumerate("abcd"):
        mf.save(mf.tiny_state(seed), folder / f"{name}.safetensors")
    return folder


RECIPE = """
output = "final.safetensors"
dtype = "fp32"

[[step]]
name = "mix"
a = "a.safetensors"
b = "b.safetensors"
alpha = 0.3

[[step]]
a = "mix"
b = "c.safetensors"
c = "d.safetensors"
method = "add-difference"
alpha = 0.5
"""


def test_a_chained_recipe_equals_the_steps_written_one_by_one(inputs, tmp_path):
    recipe = inputs / "mix.toml"
    recipe.write_text(RECIPE, encoding="utf-8")
    out = run_recipe(recipe, tmp_path / "final.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final.safetensors"]  # no intermediate
    step1 = merge_checkpoints(
        inputs / "a.safetensors", inputs / "b.safetensors", None, tmp_path / "one.safetensors",
        MergeSettings(alpha=0.3, dtype="fp32"),
    ).path  # fmt: skip
    step2 = merge_checkpoints(
        step1, inputs / "c.safetensors", inputs / "d.safetensors", tmp_path / "two.safetensors",
        MergeSettings(method="add-difference", alpha=0.5, dtype="fp32"),
    ).path  # fmt: skip
    chained, written = mf.load(out), mf.load(step2)
    assert chained.keys() == written.keys()
    assert all(torch.equal(chained[k], written[k]) for k in chained), "bit for bit"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('output = "x.safetensors"\n', r"expected 1 to 64 \[\[step\]\] tables"),
        ('outptu = 1\n[[step]]\na = "a"\nb = "b"\n', "unknown key 'outptu'"),
        (
            '[[step]]\na = "a.safetensors"\nb = "b.safetensors"\nalfa = 1\n',
            "step 1: unknown key 'alfa'",
        ),
        (
            '[[step]]\na = "nope"\nb = "b.safetensors"\n',
            "a = 'nope': no such file, and no earlier step",
        ),
    ],
)
def test_bad_recipes_are_named(inputs, tmp_path, text, message):
    recipe = inputs / "bad.toml"
    recipe.write_text(text, encoding="utf-8")
    with pytest.raises(RecipeError, match=message):
        run_recipe(recipe, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_the_cli_runs_a_recipe(inputs, tmp_path, capsys):
    from sdstack.cli import main

    recipe = inputs / "cli.toml"
    recipe.write_text(RECIPE, encoding="utf-8")
    out = tmp_path / "final.safetensors"
    assert main(["merge", "--recipe", str(recipe), "-o", str(out), "--quiet"]) == 0
    assert capsys.readouterr().out.startswith(f"{out}: the recipe ")
    assert main(["merge", "a.safetensors", "--recipe", str(recipe), "-o", str(out)]) == 2
    assert "--recipe takes its models from the file" in capsys.readouterr().err
