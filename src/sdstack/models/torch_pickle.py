"""A weights-only unpickler: tensors and plain containers out, nothing else run.

The pickle may name only the globals of ``ALLOWED_GLOBALS``: tensor rebuilders, storage
types, dtypes, plain containers, and inert stand-ins for metadata that checkpoints carry
(numpy scalars, Lightning's ``ModelCheckpoint``, ``nn.ParameterDict``): those unpickle to
placeholders (a ParameterDict to a dict of its parameters), never to the real class. Any
other global is refused when the pickle names it, before anything runs (``Refused`` with
the global's name, e.g. ``posix.system``). REDUCE/NEWOBJ/BUILD accept only these
stand-ins; SETITEM(S) only dicts, APPEND(S) only lists; opcodes a weights-only load never
needs are refused (BYTEARRAY8 among them: it allocates before it reads).

Built on ``pickle._Unpickler``, the pure-Python unpickler: its memo is a dict (a huge PUT
index costs nothing) and every length it reads is read from the file object, so a reader
bounded by the file bounds every string. A tensor ``(offset, size, stride)`` is checked
against its storage before it is made: extent ``offset + sum((size_i - 1) * stride_i) + 1``
and element count ``prod(size)`` must both fit, so no tensor holds more elements than its
storage (and the storage no more than the file, see ``torch_file``).
"""

from __future__ import annotations

import math
import pickle
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch


class Unreadable(Exception):
    """Internal: why the file is unreadable (gets the path added by ``load_torch_file``)."""


class Refused(Exception):
    """Internal: what the pickle wanted, ``wanted`` (a global's name such as
    ``posix.system``, or ``opcode BYTEARRAY8``), and ``action`` (``call posix.system``)."""

    def __init__(self, wanted: str, action: str | None = None) -> None:
        super().__init__(wanted)
        self.wanted = wanted
        self.action = action or f"call {wanted}"


class _Standin:
    """Base of the classes the unpickler may instantiate (NEWOBJ) and BUILD."""

    global_name = "?"

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        pass

    def __repr__(self) -> str:
        return f"<{self.global_name} placeholder>"


def _opaque(global_name: str) -> type[_Standin]:
    """An inert placeholder class named after ``global_name``: takes any arguments/state."""
    return type(global_name.rsplit(".", 1)[-1], (_Standin,), {"global_name": global_name})


class _ParameterDict(dict, _Standin):
    """``torch.nn.ParameterDict`` (original textual-inversion files) as a plain dict of
    its ``_parameters``."""

    global_name = "torch.nn.modules.container.ParameterDict"

    def __setstate__(self, state: object) -> None:
        if isinstance(state, tuple) and len(state) == 2:
            state = state[0]
        params = state.get("_parameters") if isinstance(state, dict) else None
        if isinstance(params, dict):
            self.update(params)


class _StorageType:
    """``torch.FloatStorage`` and friends: only their dtype is used; calling is refused."""

    def __init__(self, global_name: str, dtype: torch.dtype) -> None:
        self.global_name = global_name
        self.dtype = dtype

    def __call__(self, *args: object) -> None:
        raise Refused(self.global_name)


class Storage:
    """A storage the pickle referenced: ``numel`` elements of ``dtype``; ``data`` is the
    ``torch.UntypedStorage`` holding them, or None in the legacy format's first pass."""

    def __init__(self, dtype: torch.dtype, numel: int, data: torch.UntypedStorage | None):
        self.dtype = dtype
        self.numel = numel
        self.data = data


_PENDING = object()  # a tensor of the legacy first pass (storages not read yet)


def _ints(value: object, what: str) -> tuple[int, ...]:
    """``value`` if it is a tuple (or ``torch.Size``) of ints >= 0."""
    if not isinstance(value, tuple) or not all(type(n) is int and n >= 0 for n in value):
        raise Unreadable(f"corrupt pickle: tensor {what} {value!r:.80} is not a tuple of ints >= 0")
    return value


def _tensor_in(storage: object, offset: object, size: object, stride: object, dtype: Any) -> Any:
    """The tensor ``(offset, size, stride)`` of ``storage``, after checking it fits."""
    if not isinstance(storage, Storage):
        raise Unreadable(f"corrupt pickle: a tensor's storage is a {type(storage).__name__}")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if type(offset) is not int or offset < 0 or len(size) != len(stride) or len(size) > 64:
        raise Unreadable(
            f"corrupt pickle: tensor offset {offset!r:.40}, size {size}, stride {stride}"
        )
    available = storage.numel * storage.dtype.itemsize // dtype.itemsize
    numel = math.prod(size)
    last = sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    extent = offset + last + 1 if numel else offset
    if extent > available or numel > available:
        raise Unreadable(
            f"a tensor of shape {list(size)} (stride {list(stride)}, offset {offset}) needs "
            f"{max(extent, numel)} elements but its storage holds {available}"
        )
    if storage.data is None:
        return _PENDING
    return torch.empty((0,), dtype=dtype).set_(storage.data, offset, size, stride)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> Any:
    """``torch._utils._rebuild_tensor(_v2)``: (storage, offset, size, stride, ...)."""
    dtype = storage.dtype if isinstance(storage, Storage) else torch.uint8
    return _tensor_in(storage, offset, size, stride, dtype)


def _rebuild_tensor_v3(
    storage: Any, offset: Any, size: Any, stride: Any, grad: Any, hooks: Any, dtype: Any, *_: Any
) -> Any:
    """``torch._utils._rebuild_tensor_v3``: an untyped storage viewed as ``dtype``."""
    if not isinstance(dtype, torch.dtype):
        raise Unreadable(f"corrupt pickle: tensor dtype {dtype!r:.40}")
    return _tensor_in(storage, offset, size, stride, dtype)


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    """``nn.Parameter`` -> its tensor (loading is for inference)."""
    return data


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    """A tensor subclass: rebuilt as its plain tensor (``func`` must be a stand-in)."""
    _check_callable(func)
    return func(*args)


def _encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """``_codecs.encode`` for the text encodings pickles use for bytes."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "ascii"):
        raise Refused(f"_codecs.encode with {encoding!r:.20}")
    return text.encode(encoding)


_DTYPE_NAMES = (
    *("float32", "float16", "bfloat16", "float64", "complex64", "complex128", "bool"),
    *("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"),
    *("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"),
)
_STORAGE_NAMES = {
    "Float": torch.float32,
    "Half": torch.float16,
    "BFloat16": torch.bfloat16,
    "Double": torch.float64,
    "Long": torch.int64,
    "Int": torch.int32,
    "Short": torch.int16,
    "Char": torch.int8,
    "Byte": torch.uint8,
    "Bool": torch.bool,
    "ComplexFloat": torch.complex64,
    "ComplexDouble": torch.complex128,
}
_METADATA_GLOBALS = (
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.dtype",
    "numpy.ndarray",
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
)


def _allowed_globals() -> dict[str, Any]:
    allowed: dict[str, Any] = {
        "collections.OrderedDict": OrderedDict,
        "builtins.set": set,
        "builtins.frozenset": frozenset,
        "torch.Size": torch.Size,
        "torch.device": torch.device,
        "_codecs.encode": _encode,
        "torch._utils._rebuild_tensor": _rebuild_tensor,
        "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
        "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
        "torch._utils._rebuild_parameter": _rebuild_parameter,
        "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
        "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
        "torch.Tensor": _opaque("torch.Tensor"),
        "torch.nn.parameter.Parameter": _opaque("torch.nn.parameter.Parameter"),
        _ParameterDict.global_name: _ParameterDict,
        "torch.storage.UntypedStorage": _StorageType("torch.storage.UntypedStorage", torch.uint8),
    }
    for prefix in ("torch.", "torch.cuda."):
        for name, dtype in _STORAGE_NAMES.items():
            allowed[f"{prefix}{name}Storage"] = _StorageType(f"{prefix}{name}Storage", dtype)
    allowed.update({f"torch.{name}": getattr(torch, name) for name in _DTYPE_NAMES})
    allowed.update({name: _opaque(name) for name in _METADATA_GLOBALS})
    return allowed


ALLOWED_GLOBALS = _allowed_globals()
_CALLABLE = {id(v) for v in ALLOWED_GLOBALS.values() if callable(v)}
_CALLABLE -= {id(v) for v in ALLOWED_GLOBALS.values() if isinstance(v, _StorageType)}


_NAMES = {id(v): k for k, v in ALLOWED_GLOBALS.items()}


def _name_of(obj: object) -> str:
    return _NAMES.get(id(obj)) or f"an object of type {type(obj).__name__}"


def _check_callable(func: object) -> None:
    if id(func) not in _CALLABLE:
        raise Refused(_name_of(func))


def _refuse_opcode(name: str) -> Callable[[Any], None]:
    def refuse(self: Any) -> None:
        raise Refused(f"opcode {name}", f"run pickle opcode {name}")

    return refuse


def _unknown_opcode(self: Any) -> None:
    raise Unreadable("corrupt pickle: unknown opcode")


def _load_reduce(self: Any) -> None:
    args = self.stack.pop()
    func = self.stack[-1]
    _check_callable(func)
    if not isinstance(args, tuple):
        raise Unreadable("corrupt pickle: REDUCE arguments are not a tuple")
    self.stack[-1] = func(*args)


def _load_newobj(self: Any, with_kwargs: bool = False) -> None:
    if with_kwargs:
        self.stack.pop()
    self.stack.pop()  # the arguments: stand-ins take none
    cls = self.stack.pop()
    if cls is OrderedDict:
        self.append(OrderedDict())
        return
    if not (isinstance(cls, type) and issubclass(cls, _Standin)):
        raise Refused(f"{_name_of(cls)}.__new__")
    self.append(cls.__new__(cls))


def _load_build(self: Any) -> None:
    state = self.stack.pop()
    inst = self.stack[-1]
    if isinstance(inst, _Standin):
        inst.__setstate__(state)
    elif type(inst) is OrderedDict and isinstance(state, dict):
        inst.__dict__.update({str(k): v for k, v in state.items()})  # state_dict._metadata
    else:
        raise Unreadable(f"corrupt pickle: BUILD on a {type(inst).__name__}")


def _target(self: Any, kinds: tuple[type, ...], opcode: str) -> Any:
    target = self.stack[-1]
    if type(target) not in kinds:
        raise Unreadable(f"corrupt pickle: {opcode} on a {type(target).__name__}")
    return target


def _load_setitem(self: Any) -> None:
    value = self.stack.pop()
    key = self.stack.pop()
    _target(self, (dict, OrderedDict), "SETITEM")[key] = value


def _load_setitems(self: Any) -> None:
    items = self.pop_mark()
    target = _target(self, (dict, OrderedDict), "SETITEMS")
    for index in range(0, len(items) - 1, 2):
        target[items[index]] = items[index + 1]


def _load_append(self: Any) -> None:
    item = self.stack.pop()
    _target(self, (list,), "APPEND").append(item)


def _load_appends(self: Any) -> None:
    items = self.pop_mark()
    _target(self, (list,), "APPENDS").extend(items)


def _load_additems(self: Any) -> None:
    items = self.pop_mark()
    _target(self, (set,), "ADDITEMS").update(items)


def _dispatch() -> dict[int, Callable[[Any], None]]:
    """pickle's opcodes, with every call-like one replaced by a checked version and those
    a weights-only load never needs (protocol 0/1 instances, extension codes, protocol-5
    buffers, BYTEARRAY8, which allocates before reading) refused."""
    table: dict[int, Callable[[Any], None]] = dict.fromkeys(range(256), _unknown_opcode)
    table.update(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]
    refused = ("INST", "OBJ", "EXT1", "EXT2", "EXT4", "BYTEARRAY8")
    refused += ("NEXT_BUFFER", "READONLY_BUFFER")
    table.update({getattr(pickle, name)[0]: _refuse_opcode(name) for name in refused})
    table[pickle.REDUCE[0]] = _load_reduce
    table[pickle.NEWOBJ[0]] = _load_newobj
    table[pickle.NEWOBJ_EX[0]] = lambda self: _load_newobj(self, with_kwargs=True)
    table[pickle.BUILD[0]] = _load_build
    table[pickle.SETITEM[0]] = _load_setitem
    table[pickle.SETITEMS[0]] = _load_setitems
    table[pickle.APPEND[0]] = _load_append
    table[pickle.APPENDS[0]] = _load_appends
    table[pickle.ADDITEMS[0]] = _load_additems
    return table


class WeightsUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """The pure-Python unpickler (dict memo, reads bounded by the file object) restricted
    to ``ALLOWED_GLOBALS`` and the checked opcodes of ``_dispatch``."""

    dispatch = _dispatch()

    def __init__(self, file: Any, storages: Callable[[object], Any]) -> None:
        super().__init__(file, encoding="utf-8")
        self._storages = storages

    def find_class(self, module: str, name: str) -> Any:
        module = {"__builtin__": "builtins", "copy_reg": "copyreg"}.get(module, module)
        full_name = f"{module}.{name}"
        if full_name not in ALLOWED_GLOBALS:
            raise Refused(full_name)
        return ALLOWED_GLOBALS[full_name]

    def persistent_load(self, pid: object) -> Any:
        return self._storages(pid)


def no_storages(pid: object) -> Any:
    raise Unreadable("corrupt torch file: a storage reference outside the object pickle")


def storage_reference(pid: object, length: int) -> tuple[torch.dtype, str, int]:
    """(dtype, key, numel) of a ``('storage', storage_type, key, location, numel, ...)`` id."""
    if not isinstance(pid, tuple) or len(pid) != length or pid[0] not in ("storage", b"storage"):
        raise Unreadable(f"corrupt pickle: persistent id {pid!r:.80} is not a storage reference")
    storage_type, key, numel = pid[1], pid[2], pid[4]
    if isinstance(key, bytes):
        key = key.decode("ascii", "replace")
    if not isinstance(storage_type, _StorageType) or type(key) is not str:
        raise Unreadable(f"corrupt pickle: storage reference {pid!r:.80}")
    if type(numel) is not int or numel < 0:
        raise Unreadable(f"corrupt pickle: storage {key!r:.40} has {numel!r:.40} elements")
    return storage_type.dtype, key, numel
