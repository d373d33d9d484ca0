"""`sdstack grid` on the tiny model: cells and grid files, --dry-run, --spec, errors
before loading."""

from __future__ import annotations

import pytest

from sdstack.cli import main
from sdstack.generate import read_infotext

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def grid(capsys, tiny_checkpoint, out, *options: str) -> tuple[int, str, str]:
    checkpoint, config = tiny_checkpoint
    return cli(
        capsys, "grid", "--model", str(checkpoint), "--config-dir", str(config),
        "--steps", "2", "--size", "64x64", "--seed", "3", "--out", str(out), "--quiet",
        *options,
    )  # fmt: skip


def test_clip_skip_by_prompt_sr_grid(tiny_checkpoint, tmp_path, capsys):
    code, stdout, stderr = grid(
        capsys, tiny_checkpoint, tmp_path, "a cat", "--x", "clip-skip=1,2", "--y",
        "Prompt S/R=cat,dog",
    )  # fmt: skip
    assert code == 0, stderr
    paths = stdout.splitlines()
    assert len(paths) == 5 and paths[-1].endswith("grid-00000.png")
    infotexts = [read_infotext(path) for path in paths[:4]]
    assert sorted(text.splitlines()[0] for text in infotexts) == [
        "a cat",
        "a cat",
        "a dog",
        "a dog",
    ]
    assert sum("Clip skip: 2" in text for text in infotexts) == 2
    assert 'X Type: Clip skip, X Values: "1,2", Y Type: Prompt S/R' in read_infotext(paths[-1])


def test_a_cell_reproduces_with_generate_from_infotext(tiny_checkpoint, tmp_path, capsys):
    code, stdout, _ = grid(
        capsys, tiny_checkpoint, tmp_path / "g", "a cat", "--x", "cfg=3,9", "--no-batch"
    )
    cell = stdout.splitlines()[1]
    checkpoint, config = tiny_checkpoint
    code, again, stderr = cli(
        capsys, "generate", "--model", str(checkpoint), "--config-dir", str(config),
        "--from-infotext", cell, "--out", str(tmp_path / "again"), "--quiet",
    )  # fmt: skip
    assert code == 0, stderr
    from PIL import Image

    assert Image.open(cell).tobytes() == Image.open(again.strip()).tobytes()


def test_dry_run_lists_the_cells(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sdstack.models.load_model", lambda *a, **k: pytest.fail("loaded"))
    code, stdout, _ = grid(
        capsys, tiny_checkpoint, tmp_path, "a cat", "--x", "steps=2,3", "--y", "sampler=Euler,Heun",
        "--dry-run",
    )  # fmt: skip
    assert code == 0
    lines = stdout.splitlines()
    assert lines[0] == "cell 0: Steps: 2, Euler; seed 3"
    assert lines[-1] == "4 cells (2 x 2 x 1), 13 denoiser calls before batching"


def test_spec_file_with_the_command_line_winning(tiny_checkpoint, tmp_path, capsys):
    spec = tmp_path / "grid.toml"
    spec.write_text('prompt = "a fox"\nx = "cfg=4,5"\nsteps = 9\n', encoding="utf-8")
    code, stdout, stderr = grid(
        capsys, tiny_checkpoint, tmp_path / "out", "--spec", str(spec), "--dry-run"
    )
    assert code == 0, stderr
    # --steps 2 on the command line beats steps = 9 in the file: 2 cells x 2 calls.
    assert stdout.splitlines()[-1] == "2 cells (2 x 1 x 1), 4 denoiser calls before batching"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["a cat"], "give --x AXIS=VALUES (e.g. --x clip-skip=1,2,3), or --spec FILE"),
        (["a cat", "--x", "clip-skipp=1,2"], "unknown grid axis 'clip-skipp'; did you mean"),
        (["a cat", "--x", "clip-skip=1,13"], "13"),
        (["a cat", "--x", "Prompt S/R=dog,cat"], "Prompt S/R did not find 'dog'"),
        (["a cat", "--x", "seed=1-1000", "--max-megapixels", "1"], "MPixels"),
    ],
)
def test_bad_grids_fail_before_loading(
    tiny_checkpoint, tmp_path, capsys, monkeypatch, options, message
):
    monkeypatch.setattr("sdstack.models.load_model", lambda *a, **k: pytest.fail("loaded"))
    code, _, stderr = grid(capsys, tiny_checkpoint, tmp_path, *options)
    assert code == 2
    assert stderr.startswith("sdstack: error: ") and message in stderr, stderr


def test_bad_spec_files_are_named(tiny_checkpoint, tmp_path, capsys):
    spec = tmp_path / "grid.toml"
    spec.write_text("stepz = 3\n", encoding="utf-8")
    code, _, stderr = grid(capsys, tiny_checkpoint, tmp_path, "--spec", str(spec))
    assert code == 2 and "unknown option 'stepz'; did you mean steps?" in stderr
    spec.write_text('x = "cfg=1,2"\ncfg = "many"\n', encoding="utf-8")
    code, _, stderr = grid(capsys, tiny_checkpoint, tmp_path, "--spec", str(spec))
    assert code == 2 and "cfg = 'many'" in stderr
    spec.write_text("x = [1\n", encoding="utf-8")
    code, _, stderr = grid(capsys, tiny_checkpoint, tmp_path, "--spec", str(spec))
    assert code == 2 and "not valid TOML" in stderr


def test_the_readme_demo_grid(tmp_path, capsys):
    code, stdout, stderr = cli(
        capsys, "demo", "--x", "clip-skip=1,2", "--y", "Prompt S/R=cat,fox", "--size", "64x64",
        "--steps", "2", "--out", str(tmp_path),
    )  # fmt: skip
    assert code == 0, stderr
    paths = stdout.splitlines()
    assert len(paths) == 5 and paths[-1].endswith("grid-00000.png")
    assert 'Y Type: Prompt S/R, Y Values: "cat,fox"' in read_infotext(paths[-1])
