"""A corpus of hostile model files, written into tmp_path: storage and zip bombs, pickles
that want to run code, corrupt safetensors headers, shard indexes that point out of their
folder. Each gets a ``CheckpointError`` with a pinned message, and the bombs are opened
under an address-space cap that an allocation of their declared size could not pass.

The builders here are also used by ``tests/text/test_hostile_embeddings.py``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import pickle
import resource
import struct
import sys
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from sdstack.models import CheckpointError, load_model, torch_file
from sdstack.models.safetensors_header import SafetensorsHeaderError, check_safetensors_layout
from sdstack.models.single_file import open_tensor_file

GIB = 2**30


# --- builders ---------------------------------------------------------------------------


class StorageRef:
    """A storage as ``torch.save`` references it: ``('storage', type, key, 'cpu', numel)``."""

    def __init__(self, key: str, numel: int, storage_type: object = torch.FloatStorage):
        self.key, self.numel, self.storage_type = key, numel, storage_type


class TensorRef:
    """Pickles as ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)``."""

    def __init__(self, storage: StorageRef, size: tuple, stride: tuple, offset: int = 0):
        self.args = (storage, offset, tuple(size), tuple(stride), False, OrderedDict())

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args)


class Call:
    """Pickles as a call ``func(*args)`` (what a malicious pickle does)."""

    def __init__(self, func: object, *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


class _Pickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, legacy: bool) -> None:
        super().__init__(file, protocol=2)
        self.legacy = legacy

    def persistent_id(self, obj: object) -> object:
        if not isinstance(obj, StorageRef):
            return None
        pid = ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
        return (*pid, None) if self.legacy else pid


def pickle_bytes(obj: object, legacy: bool = False) -> bytes:
    buffer = io.BytesIO()
    _Pickler(buffer, legacy).dump(obj)
    return buffer.getvalue()


def write_zip_torch(
    path: Path, obj: object, records: dict[str, bytes], compress: int = zipfile.ZIP_STORED
) -> Path:
    """The zip layout of ``torch.save``: ``archive/data.pkl`` + ``archive/data/<key>``."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle_bytes(obj))
        for key, blob in records.items():
            archive.writestr(f"archive/data/{key}", blob, compress_type=compress)
        archive.writestr("archive/version", b"3\n")
        archive.writestr("archive/byteorder", b"little")
    return path


def write_legacy_torch(path: Path, obj: object, data: list[tuple[str, int, bytes]]) -> Path:
    """The legacy layout: magic, protocol, system info, the object, the storage keys, then
    per key an int64 count and the bytes (``data`` = (key, count written, bytes))."""
    system = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"int": 4}}
    parts = [pickle.dumps(v, protocol=2) for v in (0x1950A86A20F9469CFC6C, 1001, system)]
    parts += [pickle_bytes(obj, legacy=True), pickle.dumps([key for key, _, _ in data], 2)]
    parts += [struct.pack("<q", count) + blob for _, count, blob in data]
    path.write_bytes(b"".join(parts))
    return path


def write_safetensors(path: Path, header: dict | bytes, data: bytes = b"") -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def f32(name: str, shape: list, begin: int, end: int) -> dict:
    return {name: {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}}


def _vm_size() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmSize:"))
    return int(line.split()[1]) * 1024


@contextlib.contextmanager
def address_space_cap(headroom: int = 512 * 2**20) -> Iterator[None]:
    """Cap this process's address space at its current size + ``headroom``: inside, any
    allocation (or mapping) bigger than that fails, so a bomb that allocated what it
    declares could not finish with the expected error."""
    if not sys.platform.startswith("linux"):
        pytest.skip("address-space cap needs Linux /proc")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _vm_size() + headroom
    if hard != resource.RLIM_INFINITY and hard < cap:
        pytest.skip("hard address-space limit too low for the cap")
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def test_the_cap_stops_a_real_allocation():
    """The truth the bomb tests rely on: 1 GiB cannot be allocated under the cap."""
    with address_space_cap(), pytest.raises(RuntimeError, match="can't allocate memory"):
        torch.empty(GIB, dtype=torch.uint8)
    assert torch.empty(GIB, dtype=torch.uint8).numel() == GIB  # and the cap is lifted


# --- pickle bombs -----------------------------------------------------------------------

EMBEDDING = (GIB // 768, 768)


def _reason(path: Path) -> str:
    with pytest.raises(CheckpointError) as caught, address_space_cap():
        open_tensor_file(path)
    message = str(caught.value)
    prefix = f"{path}: corrupt or truncated pickle checkpoint: "
    assert message.startswith(prefix), message
    return message[len(prefix) :]


@pytest.mark.timeout(20)
def test_legacy_storage_bomb_is_refused_before_allocating(tmp_path):
    # ~350 bytes declaring a 4 GiB float32 storage (the probe's file).
    storage = StorageRef("0", GIB)
    path = write_legacy_torch(
        tmp_path / "bomb.pt",
        {"emb_params": TensorRef(storage, EMBEDDING, (768, 1))},
        [("0", GIB, b"")],
    )
    size = path.stat().st_size
    assert size < 400
    assert _reason(path) == (
        f"truncated: storage '0' needs {4 * GIB} bytes from byte {size} but the file has "
        f"{size} bytes"
    )


@pytest.mark.timeout(20)
def test_legacy_count_disagreeing_with_the_pickle(tmp_path):
    storage = StorageRef("0", 6)
    path = write_legacy_torch(
        tmp_path / "count.pt", {"w": TensorRef(storage, (6,), (1,))}, [("0", 2**40, bytes(24))]
    )
    assert _reason(path) == (
        "storage '0' declares 6 elements but its data section holds a count of 1099511627776"
    )


@pytest.mark.timeout(20)
def test_zip_record_smaller_than_its_storage(tmp_path):
    storage = StorageRef("0", GIB)
    path = write_zip_torch(
        tmp_path / "short.ckpt", {"w": TensorRef(storage, EMBEDDING, (768, 1))}, {"0": bytes(12)}
    )
    assert _reason(path) == (
        f"storage '0' declares {GIB} elements of 4 bytes ({4 * GIB} bytes) but its record "
        "archive/data/0 holds 12 bytes"
    )


@pytest.mark.timeout(20)
def test_deflated_tensor_record_is_never_inflated(tmp_path):
    # 4 MiB of zeros deflate to a few KiB: the record must be refused, not inflated.
    numel = 2**20
    storage = StorageRef("0", numel)
    path = write_zip_torch(
        tmp_path / "zipbomb.pt",
        {"w": TensorRef(storage, (numel,), (1,))},
        {"0": bytes(4 * numel)},
        compress=zipfile.ZIP_DEFLATED,
    )
    assert path.stat().st_size < 100_000
    assert _reason(path) == (
        "record archive/data/0 is compressed (zip method 8); torch.save stores tensor data "
        "uncompressed, and a compressed record could inflate to any size, so it is not read"
    )


@pytest.mark.timeout(20)
def test_deflated_pickle_larger_than_the_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(torch_file, "MAX_PICKLE_BYTES", 1024)
    path = tmp_path / "bigpickle.pt"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", pickle.dumps(["x" * 100] * 1000, protocol=2))
    assert _reason(path) == "record archive/data.pkl is larger than 1024 bytes"


@pytest.mark.parametrize(
    ("size", "stride", "needs"),
    [
        ((1000, 768), (768, 1), 768000),  # a view past the end of its storage
        ((2**20, 768), (0, 1), 805306368),  # a broadcast view: more elements than stored
    ],
)
@pytest.mark.timeout(20)
def test_tensor_bigger_than_its_storage(tmp_path, size, stride, needs):
    storage = StorageRef("0", 768)
    path = write_zip_torch(
        tmp_path / "view.pt", {"w": TensorRef(storage, size, stride)}, {"0": bytes(4 * 768)}
    )
    assert _reason(path) == (
        f"a tensor of shape {list(size)} (stride {list(stride)}, offset 0) needs {needs} "
        "elements but its storage holds 768"
    )


@pytest.mark.timeout(20)
def test_records_sharing_their_bytes_cannot_multiply_the_data(tmp_path):
    # Two directory entries for one 300 KiB record, and a pickle using it as both.
    numel = 768 * 100
    first, second = StorageRef("0", numel), StorageRef("1", numel)
    obj = {"a": TensorRef(first, (numel,), (1,)), "b": TensorRef(second, (numel,), (1,))}
    path = tmp_path / "shared.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle_bytes(obj))
        archive.writestr("archive/data/0", bytes(4 * numel))
        twin = copy.copy(archive.getinfo("archive/data/0"))
        twin.filename = "archive/data/1"
        archive.filelist.append(twin)
        archive.NameToInfo[twin.filename] = twin
    size = path.stat().st_size
    assert _reason(path) == (
        f"the storages declare {8 * numel} bytes in all, more than the file's {size} "
        "(records that share their bytes)"
    )


def test_junk_and_truncated_pickles(tmp_path):
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"\x07" * 300)
    start = repr(b"\x07" * 8)
    assert _reason(junk) == f"neither a zip archive nor a pickle (starts with {start})"
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    assert _reason(empty) == "empty file"
    cut = tmp_path / "cut.ckpt"
    storage = StorageRef("0", 4)
    write_zip_torch(cut, {"w": TensorRef(storage, (4,), (1,))}, {"0": bytes(16)})
    cut.write_bytes(cut.read_bytes()[:-30])
    assert _reason(cut) == "File is not a zip file"


# --- pickles that want more than tensors -------------------------------------------------

REFUSED = "refused to load this pickle checkpoint: the weights-only unpickler refuses to "


@pytest.mark.parametrize(
    ("payload", "action"),
    [
        (Call(os.system, "touch {marker}"), "call posix.system"),
        (Call(bytearray, 2**40), "call builtins.bytearray"),  # torch.load allows this one
        (Call(torch.FloatStorage, 2**40), "call torch.FloatStorage"),  # and this one
        (Call(getattr, "text", "upper"), "call builtins.getattr"),
    ],
)
@pytest.mark.timeout(20)
def test_refusal_names_what_the_pickle_wanted(tmp_path, payload, action):
    marker = tmp_path / "executed"
    payload.args = tuple(a.format(marker=marker) if isinstance(a, str) else a for a in payload.args)
    for name, write in [
        ("evil.ckpt", lambda p: write_zip_torch(p, {"state_dict": {}, "x": payload}, {})),
        ("evil-legacy.ckpt", lambda p: write_legacy_torch(p, {"x": payload}, [])),
    ]:
        path = write(tmp_path / name)
        with pytest.raises(CheckpointError) as caught, address_space_cap():
            open_tensor_file(path)
        assert str(caught.value) == (
            f"{path}: {REFUSED}{action} (a weights-only load rebuilds only tensors and plain "
            "containers and never runs code from the file); use a .safetensors version of the "
            "model (or convert this file with a tool you trust)"
        )
    assert not marker.exists()


def test_opcode_that_allocates_before_reading_is_refused(tmp_path):
    path = tmp_path / "bytearray8.ckpt"
    # protocol 5 BYTEARRAY8 of 2**40 bytes: the stock unpickler allocates that up front.
    blob = b"\x80\x05\x96" + struct.pack("<Q", 2**40) + b"."
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", blob)
    expected = f"{REFUSED}run pickle opcode BYTEARRAY8"
    with pytest.raises(CheckpointError, match=expected), address_space_cap():
        open_tensor_file(path)


def test_real_torch_save_files_still_load(tmp_path):
    """The allow-list covers what torch.save writes for checkpoints (both formats)."""
    linear = torch.nn.Linear(3, 2)
    state = {
        "state_dict": linear.state_dict(),  # an OrderedDict with _metadata (BUILD)
        "global_step": 7,
        "half": torch.arange(6, dtype=torch.float16).reshape(2, 3),
        "view": torch.arange(10.0)[2:5],
        "param": torch.nn.Parameter(torch.ones(2)),
        "fp8": torch.zeros(3, dtype=torch.float8_e4m3fn),
    }
    for legacy in (False, True):
        path = tmp_path / f"real-{legacy}.ckpt"
        state_legacy = {k: v for k, v in state.items() if k != "fp8" or not legacy}
        torch.save(state_legacy, path, _use_new_zipfile_serialization=not legacy)
        reference = torch.load(path, weights_only=True)
        loaded = torch_file.load_torch_file(path)
        assert loaded["global_step"] == 7
        for key in ("half", "view", "param"):
            assert (
                torch.equal(loaded[key], reference[key])
                and loaded[key].dtype == reference[key].dtype
            )
        assert all(torch.equal(loaded["state_dict"][k], v) for k, v in linear.state_dict().items())
        assert type(loaded["param"]) is torch.Tensor  # parameters come back as plain tensors


# --- safetensors -------------------------------------------------------------------------

CORRUPT = "corrupt safetensors header: "
SAFETENSORS_CASES = [
    (
        "trailing.safetensors",
        lambda: (f32("a", [2], 0, 8), bytes(12)),
        "corrupt safetensors file: 4 bytes after the last tensor (the header accounts for "
        "{covered} of the file's {size} bytes; the format allows no trailing data)",
    ),
    (
        "dtype.safetensors",
        lambda: ({"a": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)),
        CORRUPT + "tensor 'a' has unknown dtype 'F33'; expected one of BOOL, U8, I8, "
        "F8_E5M2, F8_E4M3, F8_E8M0, F8_E4M3FNUZ, F8_E5M2FNUZ, I16, U16, F16, BF16, I32, U32, "
        "F32, C64, F64, I64, U64, F4, F6_E2M3, F6_E3M2",
    ),
    (
        "overlap.safetensors",
        lambda: ({**f32("a", [2], 0, 8), **f32("b", [2], 4, 12)}, bytes(12)),
        CORRUPT + "tensors 'a' and 'b' overlap (data bytes 4-8)",
    ),
    (
        "gap.safetensors",
        lambda: ({**f32("a", [1], 0, 4), **f32("b", [1], 8, 12)}, bytes(12)),
        CORRUPT + "data bytes 4-8 after tensor 'a' belong to no tensor",
    ),
    (
        "late.safetensors",
        lambda: (f32("a", [1], 4, 8), bytes(8)),
        CORRUPT + "data bytes 0-4 before the first tensor belong to no tensor",
    ),
    (
        "beyond.safetensors",
        lambda: (f32("a", [2**40], 0, 2**42), bytes(8)),
        "truncated safetensors file: the header declares {declared} bytes but the file has "
        "{size} ({missing} missing); download it again",
    ),
    (
        "size.safetensors",
        lambda: (f32("a", [3], 0, 8), bytes(8)),
        CORRUPT + "tensor 'a' (F32 [3]) needs 12 bytes but its data_offsets [0, 8] span 8",
    ),
    (
        "backwards.safetensors",
        lambda: (f32("a", [0], 8, 0), bytes(8)),
        CORRUPT + "tensor 'a' has data_offsets [8, 0], which run backwards",
    ),
    (
        "negative.safetensors",
        lambda: (f32("a", [-2], 0, 8), bytes(8)),
        CORRUPT + "entry 'a' is {'dtype': 'F32', 'shape': [-2], 'data_offsets': [0, 8]}, "
        "expected {'dtype': str, 'shape': [int...], 'data_offsets': [begin, end]}",
    ),
    (
        "deep.safetensors",
        lambda: (b"[" * 100_000 + b"]" * 100_000, b""),
        CORRUPT + "the JSON is nested too deeply to be a safetensors header (which is one "
        "object of tensor entries)",
    ),
    (
        "deep-entry.safetensors",
        lambda: (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", b""),
        CORRUPT + "the JSON is nested too deeply to be a safetensors header (which is one "
        "object of tensor entries)",
    ),
    (
        "list.safetensors",
        lambda: (b"[1, 2]", b""),
        CORRUPT + "expected a JSON object, got list",
    ),
    (
        "latin1.safetensors",
        lambda: ('{"é": 1}'.encode("latin-1"), b""),
        CORRUPT + "the 8 header bytes are not UTF-8 JSON (",
    ),
    (
        "metadata.safetensors",
        lambda: ({"__metadata__": {"a": 1}}, b""),
        CORRUPT + "__metadata__['a'] must be a string, got int 1",
    ),
]


def _hostile_safetensors(tmp_path: Path, name: str, build, message: str) -> tuple[Path, str]:
    header, data = build()
    path = write_safetensors(tmp_path / name, header, data)
    size = path.stat().st_size
    start = size - len(data)
    message = message.replace("{covered}", str(start + 8)).replace("{size}", str(size))
    declared = start + 2**42
    message = message.replace("{declared}", str(declared)).replace(
        "{missing}", str(declared - size)
    )
    return path, f"{path}: {message}"


@pytest.mark.parametrize(("name", "build", "message"), SAFETENSORS_CASES)
@pytest.mark.timeout(20)
def test_hostile_safetensors_headers(tmp_path, name, build, message):
    path, expected = _hostile_safetensors(tmp_path, name, build, message)
    with pytest.raises(SafetensorsHeaderError) as header_error:
        check_safetensors_layout(path)
    with pytest.raises(CheckpointError) as checkpoint_error, address_space_cap():
        open_tensor_file(path)
    for error in (header_error.value, checkpoint_error.value):
        assert str(error).startswith(expected), str(error)


def test_huge_header_length(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 2**63) + b"{}")
    with pytest.raises(CheckpointError) as caught:
        open_tensor_file(path)
    assert str(caught.value) == (
        f"{path}: corrupt or truncated safetensors header: header length {2**63} bytes, but "
        "the file has 10 bytes (at most 2 possible)"
    )


def test_every_safetensors_opener_gives_its_own_error(tmp_path):
    """The same file with trailing bytes through the VAE, text-encoder and model loaders."""
    from sdstack.models.text_encoder import load_text_encoder
    from sdstack.models.vae_file import load_vae_weights

    path = write_safetensors(tmp_path / "bad.safetensors", f32("a", [2], 0, 8), bytes(9))
    expected = f"{path}: corrupt safetensors file: 1 bytes after the last tensor"
    for load in (
        lambda: load_model(path),
        lambda: load_text_encoder(path),
        lambda: load_vae_weights(path, None, torch.float32, torch.device("cpu")),
    ):
        with pytest.raises(CheckpointError) as caught:
            load()
        assert str(caught.value).startswith(expected)


# --- diffusers shard indexes -------------------------------------------------------------


def _folder_with_index(tmp_path: Path, weight_map: object) -> Path:
    folder = tmp_path / "model"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "config.json").write_text(json.dumps({"in_channels": 4}))
    index = folder / "unet" / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "link.safetensors"])
def test_shard_index_naming_a_file_outside_its_folder(tmp_path, name):
    from sdstack.models.diffusers_folder import open_weights_in

    outside = write_safetensors(tmp_path / "outside.safetensors", {})
    index = _folder_with_index(tmp_path, {"w": name})
    (index.parent / "link.safetensors").symlink_to(outside)
    with pytest.raises(CheckpointError) as caught:
        open_weights_in(index.parent, ())
    assert str(caught.value) == (
        f"{index}: shard index names {name!r}, which is outside {index.parent}; a shard "
        "index may only name files in its own folder"
    )


def test_shard_index_naming_a_missing_file_or_without_a_weight_map(tmp_path):
    from sdstack.models.diffusers_folder import open_weights_in

    index = _folder_with_index(tmp_path, {"w": "gone.safetensors"})
    with pytest.raises(CheckpointError) as caught:
        open_weights_in(index.parent, ())
    assert str(caught.value) == (
        f"{index}: shard index names 'gone.safetensors', which does not exist in {index.parent}"
    )
    index.write_text(json.dumps({"weight_map": ["w"]}))
    with pytest.raises(CheckpointError) as caught:
        open_weights_in(index.parent, ())
    assert str(caught.value) == (
        f"{index}: corrupt shard index: expected a 'weight_map' object of tensor name -> "
        "shard file name"
    )


# --- configs that would build thousands of modules ------------------------------------------


def test_config_with_huge_layer_counts_is_refused_before_building(tmp_path):
    from sdstack.models.tiny import TINY_UNET_CONFIG

    folder = tmp_path / "model"
    (folder / "unet").mkdir(parents=True)
    config = dict(TINY_UNET_CONFIG, layers_per_block=10**6)
    (folder / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as caught:
        load_model(folder)
    assert str(caught.value) == (
        f"{folder / 'unet' / 'config.json'}: config 'layers_per_block' is 1000000; at most 64 "
        "is accepted (SD1.x models have 2 to 12)"
    )


# --- loading progress (the tiny model) ----------------------------------------------------


def test_load_model_reports_progress_in_tensors(tiny_components, tmp_path):
    from safetensors import safe_open

    from sdstack.models.ldm_file import save_single_file
    from tests.models.test_loading import assert_same_tensors, write_config_folder

    checkpoint = tmp_path / "tiny.safetensors"
    save_single_file(tiny_components, checkpoint)
    config = write_config_folder(tiny_components, tmp_path / "config")
    with safe_open(str(checkpoint), framework="pt") as handle:
        total = len(list(handle.keys()))  # every tensor of the file goes to a network
    calls: list[tuple[int, int]] = []
    model = load_model(checkpoint, config_dir=config, progress=lambda *c: calls.append(c))
    assert calls == [(done, total) for done in range(total + 1)]
    plain = load_model(checkpoint, config_dir=config)  # progress=None: the same model
    for part in ("unet", "vae", "text_encoder"):
        assert_same_tensors(getattr(plain, part), getattr(model, part))


def test_folder_load_reports_progress_in_tensors(tiny_components, tmp_path):
    from safetensors.torch import load_file

    folder = tmp_path / "tiny-diffusers"
    tiny_components.unet.save_pretrained(folder / "unet")
    tiny_components.vae.save_pretrained(folder / "vae")
    tiny_components.text_encoder.save_pretrained(folder / "text_encoder")
    (folder / "model_index.json").write_text("{}")
    total = sum(len(getattr(tiny_components, p).state_dict()) for p in ("unet", "vae"))
    total += len(load_file(folder / "text_encoder" / "model.safetensors"))
    calls: list[tuple[int, int]] = []
    load_model(folder, progress=lambda *c: calls.append(c))
    assert calls == [(done, total) for done in range(total + 1)]


@pytest.mark.parametrize(
    ("key", "message"),
    [
        (
            "model.diffusion_model.out.2.weight",
            "{path}: tensor 'model.diffusion_model.out.2.weight' is torch.int32, expected a "
            "floating-point weight",
        ),
        (
            "cond_stage_model.transformer.text_model.final_layer_norm.weight",
            "{path}: text encoder: text-encoder tensor 'final_layer_norm.weight' is torch.int32, "
            "expected floating point",
        ),
    ],
)
def test_integer_weights_are_refused(tiny_components, tmp_path, key, message):
    from safetensors.torch import save_file

    from sdstack.models.ldm_file import to_ldm_state_dict
    from tests.models.test_loading import write_config_folder

    state = {k: v.contiguous() for k, v in to_ldm_state_dict(tiny_components).items()}
    state[key] = state[key].to(torch.int32)
    path = tmp_path / "ints.safetensors"
    save_file(state, path)
    config = write_config_folder(tiny_components, tmp_path / "config")
    with pytest.raises(CheckpointError) as caught:
        load_model(path, config_dir=config)
    assert str(caught.value).startswith(message.format(path=path))
