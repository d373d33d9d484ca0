"""File hashes against hashlib on the same bytes, and the hash cache's behaviour."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import warnings

import pytest

from sdstack.models import hash_cache, hashes
from sdstack.models.safetensors_header import (
    SafetensorsHeaderError,
    read_safetensors_header,
    safetensors_metadata,
)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """Every test gets its own empty cache folder and a fresh default cache object."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("SDSTACK_CACHE_DIR", str(folder))
    monkeypatch.setattr(hash_cache, "_default_cache", hash_cache.HashCache())
    return folder


@pytest.fixture
def read_counter(monkeypatch):
    """Counts calls to the function that actually reads and hashes file bytes."""
    calls = []
    original = hashes._sha256_from

    def spy(path, offset, progress):
        calls.append(path)
        return original(path, offset, progress)

    monkeypatch.setattr(hashes, "_sha256_from", spy)
    return calls


def write_safetensors(path, header: dict, data: bytes) -> bytes:
    """A safetensors file written by hand: 8-byte LE length, JSON header, data."""
    raw = json.dumps(header).encode()
    blob = struct.pack("<Q", len(raw)) + raw + data
    path.write_bytes(blob)
    return blob


def raw_header(raw: bytes) -> bytes:
    """A header-only safetensors blob with exactly these JSON bytes."""
    return struct.pack("<Q", len(raw)) + raw


def test_file_sha256_equals_hashlib_over_several_blocks(tmp_path):
    data = os.urandom(2 * hashes.BLOCK_SIZE + 12345)
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    seen = []
    digest = hashes.file_sha256(path, progress=seen.append)
    assert digest == hashlib.sha256(data).hexdigest()
    assert seen == [hashes.BLOCK_SIZE, hashes.BLOCK_SIZE, 12345]
    assert hashes.short_hash(path) == digest[:10]
    assert hashes.short_hash12(path) == digest[:12]


def test_cache_hit_does_not_read_the_file_again(tmp_path, read_counter, cache_dir):
    path = tmp_path / "a.ckpt"
    path.write_bytes(b"abc" * 1000)
    first = hashes.file_sha256(path)
    second = hashes.file_sha256(path)
    assert first == second == hashlib.sha256(b"abc" * 1000).hexdigest()
    assert len(read_counter) == 1
    assert hashes.cached_file_sha256(path) == first
    assert not (cache_dir / "hashes.json").exists()  # written once, by flush
    hashes.flush()
    assert hashes.cached_file_sha256(path, cache=hashes.HashCache()) == first  # a new run


def test_cache_invalidated_when_size_or_mtime_changes(tmp_path, read_counter):
    path = tmp_path / "a.ckpt"
    path.write_bytes(b"one")
    stat = path.stat()
    assert hashes.file_sha256(path) == hashlib.sha256(b"one").hexdigest()

    path.write_bytes(b"two")  # same size; force the same mtime, then a different one
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert hashes.file_sha256(path) == hashlib.sha256(b"one").hexdigest()  # stale key: trusted
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert hashes.file_sha256(path) == hashlib.sha256(b"two").hexdigest()

    path.write_bytes(b"three")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # same mtime, new size
    assert hashes.file_sha256(path) == hashlib.sha256(b"three").hexdigest()
    assert len(read_counter) == 3


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"{not json", r"Expecting property name enclosed in double quotes: line 1 column 2"),
        (b"\xff\xfe\x00", r"'utf-8' codec can't decode byte 0xff in position 0"),
        (b"[1, 2]", r"expected a JSON object, got list"),
        (b'{"version": 99}', r"version 99, expected 1"),
        (b"", r"Expecting value: line 1 column 1 \(char 0\)"),
    ],
)
def test_corrupt_cache_is_kept_aside_and_rewritten(tmp_path, cache_dir, content, reason):
    cache_dir.mkdir()
    cache = cache_dir / "hashes.json"
    cache.write_bytes(content)
    path = tmp_path / "x.pt"
    path.write_bytes(b"payload")
    message = (
        rf"the hash cache .*hashes\.json is corrupt \({reason}.*\); kept it as "
        r".*hashes\.json\.bad and started an empty cache \(hashes will be recomputed\)"
    )
    with pytest.warns(hashes.HashCacheWarning, match=message):
        assert hashes.file_sha256(path) == hashlib.sha256(b"payload").hexdigest()
    assert (cache_dir / "hashes.json.bad").read_bytes() == content  # not lost silently
    hashes.flush()
    data = json.loads(cache.read_text())
    assert data["version"] == hashes.CACHE_VERSION
    assert [v["sha256"] for v in data["sections"]["sha256"].values()] == [
        hashlib.sha256(b"payload").hexdigest()
    ]
    assert not [p.name for p in cache_dir.iterdir() if p.name.startswith(".tmp")]


def test_unwritable_cache_warns_and_still_hashes(tmp_path, monkeypatch):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("SDSTACK_CACHE_DIR", str(blocker / "sub"))
    path = tmp_path / "x.pt"
    path.write_bytes(b"payload")
    digest = hashes.file_sha256(path)
    assert digest == hashlib.sha256(b"payload").hexdigest()
    with pytest.warns(hashes.HashCacheWarning, match="could not write the hash cache"):
        hashes.flush()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hashes.flush()  # dropped after the warning: not retried at every flush


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("SDSTACK_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hashes.hash_cache_path() == tmp_path / "xdg" / "sdstack" / "hashes.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hashes.cache_dir() == tmp_path / "home" / ".cache" / "sdstack"


def test_legacy_model_hash_on_a_large_file(tmp_path):
    data = os.urandom(0x100000 + 0x10000 + 5000)
    path = tmp_path / "big.ckpt"
    path.write_bytes(data)
    expected = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert hashes.legacy_model_hash(path) == expected


def test_legacy_model_hash_on_small_files_hashes_what_is_there(tmp_path):
    small = tmp_path / "small.ckpt"
    small.write_bytes(b"x" * 1000)
    assert hashes.legacy_model_hash(small) == "e3b0c442"  # sha256(b"")
    partial = tmp_path / "partial.ckpt"
    tail = os.urandom(100)
    partial.write_bytes(b"\0" * 0x100000 + tail)
    assert hashes.legacy_model_hash(partial) == hashlib.sha256(tail).hexdigest()[:8]


def test_addnet_hash_skips_the_safetensors_header(tmp_path):
    data = os.urandom(64)
    header = {"w": {"dtype": "F32", "shape": [16], "data_offsets": [0, 64]}}
    first = tmp_path / "lora.safetensors"
    write_safetensors(first, {**header, "__metadata__": {"ss_output_name": "a"}}, data)
    second = tmp_path / "renamed.safetensors"
    write_safetensors(second, {**header, "__metadata__": {"ss_output_name": "bbbbbb"}}, data)
    expected = hashlib.sha256(data).hexdigest()
    assert hashes.addnet_hash(first) == hashes.addnet_hash(second) == expected
    assert hashes.addnet_short_hash(first) == expected[:12]
    assert hashes.file_sha256(first) != hashes.file_sha256(second)

    pt = tmp_path / "lora.pt"
    pt.write_bytes(b"pickle bytes")
    assert hashes.addnet_hash(pt) == hashlib.sha256(b"pickle bytes").hexdigest()


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.ckpt"):
        hashes.file_sha256(tmp_path / "nope.ckpt")


def test_safetensors_metadata_reads_only_the_header(tmp_path):
    path = tmp_path / "m.safetensors"
    blob = write_safetensors(
        path,
        {"__metadata__": {"ss_output_name": "x", "format": "pt"}, "t": {"dtype": "F32"}},
        b"\0" * 8,
    )
    assert safetensors_metadata(path) == {"ss_output_name": "x", "format": "pt"}
    header, offset = read_safetensors_header(path)
    assert offset == len(blob) - 8 and set(header) == {"__metadata__", "t"}
    bare = tmp_path / "bare.safetensors"
    write_safetensors(bare, {}, b"")
    assert safetensors_metadata(bare) == {}


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"\x05\0", r"not a safetensors file: 2 bytes, expected at least 8"),
        (struct.pack("<Q", 500) + b"{}", r"header length 500 bytes, but the file has 10 bytes"),
        (struct.pack("<Q", 2) + b"\xff\xfe", r"are not UTF-8 JSON"),
        (raw_header(b"[1]"), r"expected a JSON object, got list"),
        (
            raw_header(b'{"__metadata__": [1]}'),
            r"__metadata__ must be an object of strings, got list",
        ),
        (
            raw_header(b'{"__metadata__": {"a": 1}}'),
            r"__metadata__\['a'\] must be a string, got int 1",
        ),
    ],
)
def test_corrupt_safetensors_headers_are_clear_errors(tmp_path, blob, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(blob)
    with pytest.raises(SafetensorsHeaderError, match=message):
        safetensors_metadata(path)


def test_concurrent_hashing_keeps_every_entry(tmp_path, cache_dir):
    import threading

    paths = []
    for index in range(8):
        path = tmp_path / f"f{index}.bin"
        path.write_bytes(bytes([index]) * 100)
        paths.append(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        threads = [threading.Thread(target=hashes.file_sha256, args=(p,)) for p in paths]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        hashes.flush()
    entries = json.loads((cache_dir / "hashes.json").read_text())["sections"]["sha256"]
    assert len(entries) == 8


@pytest.fixture
def cache_io(monkeypatch):
    """Counts opens of the cache file (by hashes.py) and cache writes."""
    counts = {"open": 0, "write": 0}

    def counting_open(file, *args, **kwargs):
        if os.fspath(file).endswith("hashes.json"):
            counts["open"] += 1
        return open(file, *args, **kwargs)

    def counting_write(path, sections):
        counts["write"] += 1
        original_write(path, sections)

    original_write = hash_cache._write_cache
    monkeypatch.setattr(hash_cache, "open", counting_open, raising=False)
    monkeypatch.setattr(hash_cache, "_write_cache", counting_write)
    return counts


@pytest.mark.timeout(60)
def test_4000_lookups_read_the_cache_file_once(tmp_path, cache_dir, cache_io, read_counter):
    folder = tmp_path / "models"
    folder.mkdir()
    paths = [folder / f"m{index}.pt" for index in range(4000)]
    for index, path in enumerate(paths):
        path.write_bytes(index.to_bytes(2, "little"))
    expected = [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]

    # a first run hashes everything: one read of the (missing) file, one re-read + write
    assert [hashes.file_sha256(p) for p in paths] == expected
    assert cache_io == {"open": 1, "write": 0}
    hashes.flush()
    assert cache_io == {"open": 2, "write": 1}
    assert len(read_counter) == 4000

    # a second run (a new cache object) finds them all with one read and no writes
    run = hashes.HashCache()
    assert [hashes.file_sha256(p, cache=run) for p in paths] == expected
    run.flush()
    assert cache_io == {"open": 3, "write": 1}
    assert len(read_counter) == 4000  # no model file read again


def test_two_cache_objects_merge_their_entries(tmp_path, cache_dir):
    """Two writers that both loaded the file before either wrote keep both entries."""
    first, second = tmp_path / "a.pt", tmp_path / "b.pt"
    first.write_bytes(b"a")
    second.write_bytes(b"b")
    one, two = hashes.HashCache(), hashes.HashCache()
    assert one.get("sha256", hashes._file_key(first)) is None  # both loaded: empty
    assert two.get("sha256", hashes._file_key(first)) is None
    hashes.file_sha256(first, cache=one)
    hashes.file_sha256(second, cache=two)
    one.flush()
    two.flush()
    fresh = hashes.HashCache()
    assert hashes.cached_file_sha256(first, cache=fresh) == hashlib.sha256(b"a").hexdigest()
    assert hashes.cached_file_sha256(second, cache=fresh) == hashlib.sha256(b"b").hexdigest()


WRITER = """
import sys, time
from pathlib import Path
from sdstack.models import hashes
folder, me, other = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
for path in sorted(folder.glob(me + "-*.bin")):
    hashes.file_sha256(path)
(folder / (me + ".ready")).touch()
deadline = time.monotonic() + 30
while not (folder / (other + ".ready")).exists() and time.monotonic() < deadline:
    time.sleep(0.01)
# both processes have read the cache; each writes at exit (atexit flush)
"""


@pytest.mark.timeout(60)
def test_two_processes_writing_concurrently_keep_both_sets(tmp_path, cache_dir):
    import subprocess
    import sys

    expected = {}
    for name in ("left", "right"):
        for index in range(50):
            path = tmp_path / f"{name}-{index:02d}.bin"
            path.write_bytes(f"{name}{index}".encode())
            expected[str(path.resolve())] = hashlib.sha256(path.read_bytes()).hexdigest()
    env = {**os.environ, "SDSTACK_CACHE_DIR": str(cache_dir)}
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(tmp_path), me, other],
            env=env,
            stderr=subprocess.PIPE,
        )
        for me, other in (("left", "right"), ("right", "left"))
    ]
    for writer in writers:
        _, err = writer.communicate(timeout=50)
        assert writer.returncode == 0, err.decode()
    stored = json.loads((cache_dir / "hashes.json").read_text())["sections"]["sha256"]
    assert {name: entry["sha256"] for name, entry in stored.items()} == expected


def test_context_manager_and_environment_change_flush(tmp_path, monkeypatch):
    path = tmp_path / "m.pt"
    path.write_bytes(b"m")
    with hashes.HashCache(tmp_path / "explicit.json") as cache:
        hashes.file_sha256(path, cache=cache)
        assert not (tmp_path / "explicit.json").exists()
    assert (tmp_path / "explicit.json").is_file()

    hashes.file_sha256(path)  # the default cache, in $SDSTACK_CACHE_DIR
    monkeypatch.setenv("SDSTACK_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert hashes.cached_file_sha256(path) is None  # a new file: the old one is written
    assert (tmp_path / "cache" / "hashes.json").is_file()


@pytest.mark.timeout(10)
def test_special_files_are_refused_before_any_open(tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)  # opening it for reading would block forever
    zero = tmp_path / "zero.ckpt"
    zero.symlink_to("/dev/zero")  # reading it would never end
    for function in (hashes.file_sha256, hashes.addnet_hash, hashes.legacy_model_hash):
        with pytest.raises(hashes.HashError, match=r"pipe\.safetensors: a FIFO \(named pipe\), "):
            function(fifo)
    message = r"zero\.ckpt: a character device, not a regular file; only model files can be hashed"
    with pytest.raises(hashes.HashError, match=message):
        hashes.file_sha256(zero)
    with pytest.raises(hashes.HashError, match=r": a folder, not a regular file"):
        hashes.file_sha256(tmp_path)
