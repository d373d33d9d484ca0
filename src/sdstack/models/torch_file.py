"""Read ``torch.save`` files without ``torch.load``, every size checked against the file
before anything is allocated.

Formats (what ``torch.save`` writes):

- zip (torch >= 1.6): ``<archive>/data.pkl`` is the pickle; each storage is a record
  ``<archive>/data/<key>``, stored uncompressed, that becomes a slice of a private memory
  map of the file (nothing is read until a tensor is used).
- legacy (``_use_new_zipfile_serialization=False``): five pickles in a row (magic number
  ``0x1950a86a20f9469cfc6c``, protocol 1001, system info, the object, the storage keys),
  then for each key an int64 element count and the storage's bytes.

Checks, before allocating: a storage of ``numel`` elements of ``itemsize`` bytes needs an
uncompressed zip record of at least ``numel * itemsize`` bytes inside the file (a deflated
record could inflate to any size, so it is refused), or, in the legacy format, an int64
count equal to ``numel`` followed by that many elements inside the file. All storages
together may not declare more bytes than the file has (records that share bytes could
otherwise multiply what is read). The legacy object pickle is read twice: once to collect
and check the storages it declares, once after their data is read. A pickle may be at
most ``MAX_PICKLE_BYTES`` long; it goes through ``torch_pickle.WeightsUnpickler``.
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import torch

from sdstack.errors import SdstackError
from sdstack.models.torch_pickle import (
    Refused,
    Storage,
    Unreadable,
    WeightsUnpickler,
    no_storages,
    storage_reference,
)

MAX_PICKLE_BYTES = 64 * 2**20
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001


class TorchFileError(SdstackError):
    """A ``torch.save`` file that is corrupt, truncated or declares more than it holds.

    ``reason`` is the message without the leading ``"<path>: "``.
    """

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class RefusedPickleError(TorchFileError):
    """A pickle that wants a Python global outside the weights-only allow-list or an
    opcode it never needs: ``wanted`` is ``"posix.system"`` or ``"opcode BYTEARRAY8"``,
    the reason ``the weights-only unpickler refuses to call posix.system``. Nothing from
    the file was run."""

    def __init__(self, path: Path, wanted: str, action: str | None = None) -> None:
        action = action or f"call {wanted}"
        super().__init__(path, f"the weights-only unpickler refuses to {action}")
        self.wanted = wanted


def _read_bytes(raw: BinaryIO, offset: int, nbytes: int) -> torch.UntypedStorage:
    """``nbytes`` bytes of the file from ``offset`` (already checked to lie in the file)."""
    if nbytes == 0:
        return torch.UntypedStorage(0)
    raw.seek(offset)
    buffer = bytearray(nbytes)
    if raw.readinto(buffer) != nbytes:
        raise Unreadable(f"truncated: {nbytes} bytes of tensor data at byte {offset} are missing")
    return torch.frombuffer(buffer, dtype=torch.uint8).untyped_storage()


class _ZipStorages:
    """``persistent_load`` of the zip format: each storage a checked, uncompressed record."""

    def __init__(self, archive: zipfile.ZipFile, raw: BinaryIO, prefix: str, mapped: bool):
        self.archive, self.raw, self.prefix, self.mapped = archive, raw, prefix, mapped
        self.size = Path(raw.name).stat().st_size
        self.loaded: dict[str, Storage] = {}
        self.whole: torch.UntypedStorage | None = None
        self.declared = 0  # bytes of all storages so far: records are disjoint parts of the file

    def __call__(self, pid: object) -> Storage:
        dtype, key, numel = storage_reference(pid, 5)
        if key not in self.loaded:
            self.loaded[key] = Storage(dtype, numel, self._record(key, numel, dtype.itemsize))
        storage = self.loaded[key]
        if (storage.dtype, storage.numel) != (dtype, numel):
            raise Unreadable(f"corrupt pickle: storage {key!r} is referenced with two dtypes/sizes")
        return storage

    def _record(self, key: str, numel: int, itemsize: int) -> torch.UntypedStorage:
        """The storage's bytes: a slice of the file's map (or read when not aligned)."""
        name, nbytes = f"{self.prefix}data/{key}", numel * itemsize
        try:
            info = self.archive.getinfo(name)
        except KeyError:
            raise Unreadable(f"the pickle references storage {key!r}; {name} is missing") from None
        if info.compress_type != zipfile.ZIP_STORED:
            raise Unreadable(
                f"record {name} is compressed (zip method {info.compress_type}); torch.save "
                "stores tensor data uncompressed, and a compressed record could inflate to any "
                "size, so it is not read"
            )
        if info.file_size < nbytes:
            raise Unreadable(
                f"storage {key!r} declares {numel} elements of {itemsize} bytes ({nbytes} bytes) "
                f"but its record {name} holds {info.file_size} bytes"
            )
        self.raw.seek(info.header_offset)
        local = self.raw.read(30)
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            raise Unreadable(f"corrupt zip: no local header for {name}")
        start = info.header_offset + 30 + sum(struct.unpack("<HH", local[26:30]))
        if start + info.file_size > self.size:
            raise Unreadable(
                f"truncated: record {name} ends at byte {start + info.file_size} but the file "
                f"has {self.size} bytes"
            )
        self.declared += nbytes
        if self.declared > self.size:
            raise Unreadable(
                f"the storages declare {self.declared} bytes in all, more than the file's "
                f"{self.size} (records that share their bytes)"
            )
        if not self.mapped or nbytes == 0 or start % 16:
            return _read_bytes(self.raw, start, nbytes)
        if self.whole is None:
            self.whole = torch.UntypedStorage.from_file(str(self.raw.name), False, self.size)
        return self.whole[start : start + nbytes]


def _read_record(archive: zipfile.ZipFile, name: str, limit: int) -> bytes:
    """A small record (at most ``limit`` bytes once inflated: read no further)."""
    with archive.open(name) as record:
        data = record.read(limit + 1)
    if len(data) > limit:
        raise Unreadable(f"record {name} is larger than {limit} bytes")
    return data


def _load_zip(path: Path, mapped: bool) -> Any:
    with zipfile.ZipFile(path) as archive, path.open("rb") as raw:
        names = archive.namelist()
        prefix = names[0].split("/", 1)[0] + "/" if names else ""
        if prefix + "data.pkl" not in names:
            raise Unreadable(f"a zip archive without {prefix}data.pkl: not a torch.save file")
        if prefix + "byteorder" in names:
            order = _read_record(archive, prefix + "byteorder", 16).strip()
            if order != b"little":
                raise Unreadable(f"byte order {order!r:.20} is not supported (only little-endian)")
        pickled = _read_record(archive, prefix + "data.pkl", MAX_PICKLE_BYTES)
        storages = _ZipStorages(archive, raw, prefix, mapped)
        return WeightsUnpickler(io.BytesIO(pickled), storages).load()


class _BoundedReader:
    """A file as the pickle module reads it: never past the end of the file, and never
    more than ``MAX_PICKLE_BYTES`` for one pickle (from ``begin()``)."""

    def __init__(self, raw: BinaryIO, size: int) -> None:
        self.raw, self.size, self.stop = raw, size, 0

    def begin(self) -> _BoundedReader:
        self.stop = min(self.size, self.raw.tell() + MAX_PICKLE_BYTES)
        return self

    def _room(self, wanted: int) -> int:
        room = self.stop - self.raw.tell()
        if wanted > room and self.stop < self.size:
            raise Unreadable(f"a pickle longer than {MAX_PICKLE_BYTES} bytes")
        return max(0, min(wanted, room))

    def read(self, n: int = -1) -> bytes:
        return self.raw.read(self._room(self.size if n < 0 else n))

    def readline(self) -> bytes:
        return self.raw.readline(max(0, self.stop - self.raw.tell()))


class _LegacyStorages:
    """``persistent_load`` of the legacy format; ``data`` (key -> bytes) is empty in the
    first pass, which only collects and checks the declared storages."""

    def __init__(self, data: dict[str, torch.UntypedStorage]) -> None:
        self.data = data
        self.roots: dict[str, Storage] = {}

    def __call__(self, pid: object) -> Any:
        if isinstance(pid, tuple) and len(pid) == 4 and pid[0] in ("module", b"module"):
            return pid[1]  # a saved nn.Module's class (an allowed stand-in), source ignored
        dtype, key, numel = storage_reference(pid, 6)
        root = self.roots.setdefault(key, Storage(dtype, numel, self.data.get(key)))
        if (root.dtype, root.numel) != (dtype, numel):
            raise Unreadable(f"corrupt pickle: storage {key!r} is referenced with two dtypes/sizes")
        view = pid[5]
        if view is None:
            return root
        if not (isinstance(view, tuple) and len(view) == 3):
            raise Unreadable(f"corrupt pickle: storage view {view!r:.60}")
        _, offset, count = view
        if type(offset) is not int or type(count) is not int or not 0 <= offset <= numel - count:
            raise Unreadable(f"storage view {view!r:.60} lies outside its storage of {numel}")
        size = dtype.itemsize
        data = None if root.data is None else root.data[offset * size : (offset + count) * size]
        return Storage(dtype, count, data)


def _legacy_data(raw: BinaryIO, offset: int, size: int, keys: object, roots: dict) -> dict:
    """key -> storage bytes of the legacy data section, every count checked first."""
    if not isinstance(keys, list) or set(keys) != set(roots) or len(keys) != len(roots):
        raise Unreadable(f"corrupt torch file: storage keys {keys!r:.80} do not match the pickle")
    places = {}
    for key in keys:
        nbytes = roots[key].numel * roots[key].dtype.itemsize
        raw.seek(offset)
        count = raw.read(8)
        if len(count) < 8 or struct.unpack("<q", count)[0] != roots[key].numel:
            found = struct.unpack("<q", count)[0] if len(count) == 8 else "no"
            raise Unreadable(
                f"storage {key!r} declares {roots[key].numel} elements but its data section "
                f"holds a count of {found}"
            )
        if offset + 8 + nbytes > size:
            raise Unreadable(
                f"truncated: storage {key!r} needs {nbytes} bytes from byte {offset + 8} but "
                f"the file has {size} bytes"
            )
        places[key] = (offset + 8, nbytes)
        offset += 8 + nbytes
    return {key: _read_bytes(raw, start, nbytes) for key, (start, nbytes) in places.items()}


def _load_legacy(path: Path, size: int) -> Any:
    with path.open("rb") as raw:
        reader = _BoundedReader(raw, size)
        magic = WeightsUnpickler(reader.begin(), no_storages).load()
        if magic != LEGACY_MAGIC:
            raise Unreadable("a pickle without torch's magic number: not a torch.save file")
        if WeightsUnpickler(reader.begin(), no_storages).load() != LEGACY_PROTOCOL:
            raise Unreadable("unknown legacy torch protocol version")
        system = WeightsUnpickler(reader.begin(), no_storages).load()
        if not isinstance(system, dict) or system.get("little_endian") is not True:
            raise Unreadable("saved on a big-endian machine: not supported")
        start = raw.tell()
        declared = _LegacyStorages({})
        WeightsUnpickler(reader.begin(), declared).load()  # 1. check every size, read nothing
        end = raw.tell()
        keys = WeightsUnpickler(reader.begin(), no_storages).load()
        data = _legacy_data(raw, raw.tell(), size, keys, declared.roots)  # 2. read the data
        raw.seek(start)
        pickled = raw.read(end - start)
    return WeightsUnpickler(io.BytesIO(pickled), _LegacyStorages(data)).load()  # 3. the object


def _not_torch(path: Path) -> str:
    with path.open("rb") as file:
        head = file.read(262)
    if head[257:262] == b"ustar":
        return "a tar-format torch file (PyTorch < 0.4), which is not supported"
    return f"neither a zip archive nor a pickle (starts with {head[:8]!r})"


_CORRUPT = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    struct.error,
    OverflowError,
    RuntimeError,
    NotImplementedError,
    OSError,
    zipfile.BadZipFile,
)


def load_torch_file(path: str | Path, *, mapped: bool = True) -> Any:
    """The object of a ``torch.save`` file, read as the module docstring says.

    Args:
        path: the file (zip or legacy format).
        mapped: zip-format storages are slices of a private memory map of the file
            (nothing read until used); False reads them into memory. Legacy files are
            always read into memory (their data is not aligned).

    Returns:
        What was saved, with CPU tensors (``nn.Parameter`` as plain tensors) and
        placeholders for the allowed metadata objects.

    Raises:
        FileNotFoundError: no such file.
        RefusedPickleError: the pickle names a global outside ``ALLOWED_GLOBALS``.
        TorchFileError: empty, corrupt or truncated, a compressed tensor record, a storage
            or tensor larger than the data the file holds.
    """
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise TorchFileError(path, "empty file")
    try:
        with path.open("rb") as file:
            head = file.read(4)
        if head == b"PK\x03\x04":
            return _load_zip(path, mapped)
        if head[:1] != pickle.PROTO:
            raise Unreadable(_not_torch(path))
        return _load_legacy(path, size)
    except Refused as refusal:
        raise RefusedPickleError(path, refusal.wanted, refusal.action) from refusal
    except Unreadable as problem:
        raise TorchFileError(path, str(problem)) from problem
    except _CORRUPT as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TorchFileError(path, first) from error
