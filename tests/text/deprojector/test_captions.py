"""Caption files: .txt/.csv/.parquet, cleaning, and hostile files."""

from __future__ import annotations

import builtins
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdstack.errors import SdstackError
from sdstack.text.deprojector import captions as captions_module
from sdstack.text.deprojector.captions import CaptionFileError, clean_captions, read_captions

DATA = Path(__file__).resolve().parents[2] / "data" / "captions.txt"


def test_txt_one_per_line_cleaned_and_deduplicated(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes("\ufeffa cat\r\n\n  a   dog \n a cat\n\t\nred  hat\n".encode())
    assert read_captions(path) == ["a cat", "a dog", "red hat"]


def test_csv_prefers_a_caption_column(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text('id,url,TEXT\n1,x,"a cat, on a mat"\n2,y,a dog\n3,z,\n4,w,a dog\n')
    assert read_captions(path) == ["a cat, on a mat", "a dog"]


def test_csv_without_a_named_column_uses_the_first(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text('words,n\n"multi\nline",1\nshort\n')
    assert read_captions(path) == ["multi line", "short"]


def test_csv_preference_order_caption_before_text(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("text,caption\nfrom text,from caption\n")
    assert read_captions(path) == ["from caption"]


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"n": [1, 2, 3, 4], "prompt": ["a cat", None, " a dog ", "a cat"]})
    pq.write_table(table, tmp_path / "c.parquet")
    assert read_captions(tmp_path / "c.parquet") == ["a cat", "a dog"]


def test_parquet_column_that_is_not_text(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"caption": [1, 2]}), tmp_path / "c.parquet")
    with pytest.raises(CaptionFileError, match=r"column 'caption' holds int64, expected strings"):
        read_captions(tmp_path / "c.parquet")


def test_corrupt_parquet(tmp_path):
    pytest.importorskip("pyarrow")
    path = tmp_path / "c.parquet"
    path.write_bytes(b"PAR1" + b"\x00garbage" * 10)
    with pytest.raises(CaptionFileError, match="not a readable parquet file"):
        read_captions(path)


def test_parquet_without_pyarrow_names_the_extra(tmp_path, monkeypatch):
    path = tmp_path / "c.parquet"
    path.write_bytes(b"PAR1")
    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError("no pyarrow")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    with pytest.raises(CaptionFileError, match=r"pip install sdstack\[parquet\]"):
        read_captions(path)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("c.json", b"[]", r"unknown suffix '\.json'; expected one of \.txt, \.csv, \.parquet"),
        ("c.txt", b"", "holds no caption"),
        ("c.txt", b"\n \n\t\n", "holds no caption"),
        ("c.txt", b"ok\nbad \x00 line\n", "line 2: NUL byte"),
        ("c.txt", b"ok\nfine\n\xff\xfe caption\n", "line 3: not UTF-8"),
        ("c.csv", b"caption\n", "holds no caption"),
    ],
)
def test_bad_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CaptionFileError, match=message):
        read_captions(path)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_captions(tmp_path / "nope.txt")
    (tmp_path / "dir.txt").mkdir()
    with pytest.raises(CaptionFileError, match="is not a regular file"):
        read_captions(tmp_path / "dir.txt")


def test_limits(tmp_path, monkeypatch):
    path = tmp_path / "c.txt"
    path.write_text("short\n" + "x" * 50 + "\n")
    monkeypatch.setattr(captions_module, "MAX_CAPTION_CHARS", 20)
    with pytest.raises(CaptionFileError, match="caption 2 has 50 characters; at most 20"):
        read_captions(path)
    monkeypatch.setattr(captions_module, "MAX_FILE_BYTES", 10)
    with pytest.raises(CaptionFileError, match="at most 10 are read"):
        read_captions(path)
    monkeypatch.setattr(captions_module, "MAX_CAPTIONS", 2)
    with pytest.raises(CaptionFileError, match="more than 2 captions"):
        clean_captions(["a", "b", "c"])


def test_huge_csv_field_is_a_clear_error(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text('caption\n"' + "y" * 200_000 + '"\n')
    with pytest.raises(CaptionFileError, match=r"row .*: bad CSV"):
        read_captions(path)


def test_the_test_caption_set():
    captions = read_captions(DATA)
    assert len(captions) >= 250
    assert len(set(captions)) == len(captions)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".txt", ".csv"]))
def test_any_bytes_read_or_clear_error(tmp_path, data, suffix):
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(data)
    try:
        result = read_captions(path)
    except SdstackError:
        return
    assert result and all(isinstance(c, str) and c == c.strip() and c for c in result)
