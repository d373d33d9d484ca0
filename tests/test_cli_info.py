"""``sdstack info``: clean errors for bad files, no torch, no traceback on a closed pipe."""

from __future__ import annotations

import subprocess
import sys

import pytest
from PIL import Image

from sdstack.cli import main
from sdstack.generate.images import save_image

INFOTEXT = "a cat\nNegative prompt: blur\nSteps: 2, Sampler: Euler, Seed: 7, Size: 8x8"


def saved_image(folder, infotext: str = INFOTEXT):
    return save_image(Image.new("RGB", (8, 8), (1, 2, 3)), infotext, folder, seed=7)


def test_info_prints_the_parsed_infotext(tmp_path, capsys):
    path = saved_image(tmp_path)
    assert main(["info", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == ["Prompt: a cat", "Negative prompt: blur", "Steps: 2"]


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("missing.png", "no such file"),
        ("folder", "is a folder, expected an image file"),
        ("text.png", "is not an image file Pillow can read"),
        ("plain.png", "holds no infotext; it was not saved with its generation parameters"),
    ],
)
def test_bad_files_exit_2_with_a_clean_message(tmp_path, capsys, name, reason):
    (tmp_path / "folder").mkdir()
    (tmp_path / "text.png").write_text("not an image", encoding="utf-8")
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    path = str(tmp_path / name)
    assert main(["info", path]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"sdstack: error: image {path!r}: {reason}\n"


@pytest.mark.timeout(60)
def test_info_does_not_import_torch(tmp_path):
    path = saved_image(tmp_path)
    code = (
        "import sys\n"
        "from sdstack.cli import main\n"
        f"assert main(['info', {str(path)!r}]) == 0\n"
        "heavy = sorted({'torch', 'diffusers', 'transformers'} & set(sys.modules))\n"
        "print('heavy:', heavy, file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines()[-1] == "heavy: []"


@pytest.mark.timeout(60)
def test_a_pipe_closed_early_is_not_a_traceback(tmp_path):
    # 40,000 prompt lines (about 400 KB) are far more than a pipe buffers (64 KiB on
    # Linux), so the command is still writing when the reader goes away: ``| head -1``.
    prompt = "\n".join(f"line {i:05d}" for i in range(40_000))
    path = saved_image(tmp_path, f"{prompt}\nSteps: 2, Seed: 7")
    process = subprocess.Popen(
        [sys.executable, "-m", "sdstack", "info", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    first = process.stdout.readline()
    process.stdout.close()
    stderr = process.stderr.read().decode("utf-8", errors="replace")
    process.wait(timeout=50)
    assert first == b"Prompt: line 00000\n"
    assert "Traceback" not in stderr
    assert "BrokenPipeError" not in stderr
