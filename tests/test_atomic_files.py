"""temporary_file: outputs appear whole or not at all, and no temporary file is left."""

from __future__ import annotations

import os

import pytest

from sdstack.atomic_files import temporary_file


def test_replace_moves_the_file_and_leaves_nothing_else(tmp_path):
    folder = tmp_path / "new" / "folder"
    with temporary_file(folder, suffix=".txt") as temporary:
        assert temporary.parent == folder and temporary.name.startswith(".tmp-")
        temporary.write_text("done", encoding="utf-8")
        os.replace(temporary, folder / "out.txt")
    assert sorted(p.name for p in folder.iterdir()) == ["out.txt"]
    assert (folder / "out.txt").read_text(encoding="utf-8") == "done"


def test_a_failure_removes_the_temporary_file(tmp_path):
    with pytest.raises(RuntimeError, match="disk full"), temporary_file(tmp_path) as temporary:
        temporary.write_text("half", encoding="utf-8")
        raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []
