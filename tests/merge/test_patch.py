"""Merges as patches: merge:A,B,alpha=... builds (1-a)A + aB per layer on load, block
weights per layer, add difference, removal exact, LoRAs on top, the CLI and its infotext."""

from __future__ import annotations

import pytest
import torch

from sdstack.merge.patch import (
    MergeSpec,
    MergeSpecError,
    apply_merge,
    load_merged,
    parse_merge_spec,
    remove_merge,
)
from sdstack.models import load_model
from sdstack.models.patcher import weights_fingerprint

EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint, tmp_path_factory):
    """Three tiny checkpoints of the same shapes (seeds 0, 1, 2) and their config folder."""
    from sdstack.models.ldm_file import save_single_file
    from sdstack.models.tiny import tiny_components

    a, config = tiny_checkpoint
    folder = tmp_path_factory.mktemp("merge-inputs")
    b, c = folder / "b.safetensors", folder / "c.safetensors"
    save_single_file(tiny_components(seed=1), b)
    save_single_file(tiny_components(seed=2), c)
    return a, b, c, config


def states(model) -> dict[str, torch.Tensor]:
    return {
        f"{part}.{k}": v.detach().clone()
        for part in ("unet", "text_encoder", "vae")
        for k, v in getattr(model, part).state_dict().items()
    }


def test_spec_forms():
    assert parse_merge_spec("merge:a.safetensors,b.safetensors,alpha=0.3") == MergeSpec(
        "a.safetensors", "b.safetensors", None, "weighted-sum", 0.3
    )
    spec = parse_merge_spec("merge:a,b,c,method=add-difference,alpha=1")
    assert (spec.c, spec.method, spec.alpha) == ("c", "add-difference", 1.0)
    assert parse_merge_spec(spec.text()) == spec


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("merge:a", "expected 2 or 3 models"),
        ("merge:a,b,alpha=x", "alpha='x'; expected a number"),
        ("merge:a,b,gamma=1", "unknown option 'gamma'"),
        ("merge:a,b,method=ties", "is not linear in alpha"),
        ("merge:a,b,method=add-difference", "add-difference takes 3 models, got 2"),
    ],
)
def test_bad_specs_are_named(text, message):
    with pytest.raises(MergeSpecError, match=message):
        parse_merge_spec(text)


def test_weighted_sum_is_one_minus_a_times_a_plus_a_times_b(checkpoints):
    a, b, _c, config = checkpoints
    merged = load_merged(f"merge:{a},{b},alpha=0.3", config_dir=config)
    truth_a = states(load_model(a, config_dir=config))
    truth_b = states(load_model(b, config_dir=config))
    got = states(merged)
    changed = 0
    for key, value in got.items():
        if not value.is_floating_point() or "position_ids" in key:
            assert torch.equal(value, truth_a[key]), key
            continue
        truth = 0.7 * truth_a[key].double() + 0.3 * truth_b[key].double()
        # fl(A + 0.3 fl(B - A)): three float32 roundings, each at most eps/2 of |A|+|B|.
        bound = 2 * EPS32 * (truth_a[key].abs() + truth_b[key].abs()).double() + 1e-30
        assert ((value.double() - truth).abs() <= bound).all(), key
        changed += not torch.equal(value, truth_a[key])
    assert changed > 500
    assert merged.name == f"merge:{a},{b},alpha=0.3" and merged.path is None


def test_block_weights_and_add_difference(checkpoints):
    a, b, c, config = checkpoints
    blocks = ",".join(["0"] * 14 + ["1"] * 12)  # BASE, IN00-IN11, M00 at 0; OUT00-OUT11 at 1
    merged = load_merged(
        f"merge:{a},{b},{c},method=add-difference,blocks={blocks}", config_dir=config
    )
    ta, tb, tc = (states(load_model(p, config_dir=config)) for p in (a, b, c))
    got = states(merged)
    out_key = "unet.up_blocks.0.attentions.0.proj_in.weight"  # OUT00 here (tiny: 2 levels)
    in_key = "unet.down_blocks.1.attentions.0.proj_in.weight"  # IN04
    truth = ta[out_key].double() + (tb[out_key].double() - tc[out_key].double())
    bound = 4 * EPS32 * (ta[out_key].abs() + tb[out_key].abs() + tc[out_key].abs()).double()
    assert ((got[out_key].double() - truth).abs() <= bound).all()
    assert torch.equal(got[in_key], ta[in_key])
    assert torch.equal(
        got["text_encoder.encoder.layers.0.mlp.fc1.weight"],
        ta["text_encoder.encoder.layers.0.mlp.fc1.weight"],
    )  # BASE 0


def test_removing_the_merge_is_exact_and_loras_stay_on_top(checkpoints, tmp_path):
    from sdstack.lora.library import LoraLibrary
    from sdstack.lora.stack import set_loras
    from sdstack.lora.tiny import write_tiny_lora

    a, b, _c, config = checkpoints
    model = load_model(a, config_dir=config)
    original = weights_fingerprint(model)
    write_tiny_lora(model, tmp_path / "film.safetensors", seed=4)
    set_loras(model, [("film", 1.0)], library=LoraLibrary(None, [tmp_path]))
    with_lora = weights_fingerprint(model)
    apply_merge(model, parse_merge_spec(f"merge:{a},{b},alpha=0.5"))
    apply_merge(model, parse_merge_spec(f"merge:{a},{b},alpha=0.2"))  # re-weighted, not added
    assert weights_fingerprint(model) not in (original, with_lora)
    remove_merge(model)
    assert weights_fingerprint(model) == with_lora
    set_loras(model, [], library=LoraLibrary(None, [tmp_path]))
    assert weights_fingerprint(model) == original


def test_generate_with_a_merge_and_reproduce_from_its_infotext(checkpoints, tmp_path, capsys):
    from PIL import Image

    from sdstack.cli import main
    from sdstack.generate import read_infotext

    a, b, _c, config = checkpoints
    base = ["generate", "--config-dir", str(config), "--steps", "2", "--size", "64x64",
            "--seed", "1", "--quiet"]  # fmt: skip
    spec = f"merge:{a},{b},alpha=0.4"
    assert main([*base, "--model", spec, "a cat", "--out", str(tmp_path / "a")]) == 0
    first = tmp_path / "a" / "00000-1.png"
    info = read_infotext(first)
    assert f'Model: "{spec}"' in info and "Model hash" not in info
    assert (
        main([*base, "--from-infotext", str(first), "--model", spec, "--out", str(tmp_path / "b")])
        == 0
    )
    assert Image.open(first).tobytes() == Image.open(tmp_path / "b" / "00000-1.png").tobytes()
    capsys.readouterr()


def test_a_merge_alpha_grid_loads_once_and_patches_each_cell(checkpoints):
    import numpy as np

    from sdstack.generate import GenerationJob, GenerationParams, generate
    from sdstack.generate.grid import plan_grid, run_grid

    a, b, _c, config = checkpoints
    loads = []

    def load(model, vae):
        loads.append(model)
        return load_model(model, config_dir=config)

    params = GenerationParams("a cat", steps=2, width=64, height=64, seed=2)
    job = GenerationJob(params, model=f"merge:{a},{b},alpha=0.5")
    result = run_grid(plan_grid(job, "merge-alpha=0,1"), load)
    assert loads == [str(a)]
    assert "Merge alpha" not in result.cells[0].infotext  # the spec itself is the Model
    plain_a = generate(load_model(a, config_dir=config), params)[0].image
    only_b = load_merged(f"merge:{a},{b},alpha=1", config_dir=config)
    assert np.array_equal(np.asarray(result.cells[0].image), np.asarray(plain_a))
    assert np.array_equal(
        np.asarray(result.cells[1].image), np.asarray(generate(only_b, params)[0].image)
    )


def test_merge_axes_need_a_merge_model():
    from sdstack.generate import GenerationJob, GenerationParams
    from sdstack.generate.grid import plan_grid

    job = GenerationJob(GenerationParams("a cat", steps=2, width=64, height=64))
    with pytest.raises(MergeSpecError, match="the merge-alpha axis re-weights a merge: give"):
        plan_grid(job, "merge-alpha=0,1")
