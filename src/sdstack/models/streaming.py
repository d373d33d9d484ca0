"""Tensors read for conversion without keeping the file's pages: one read per tensor.

A ``.safetensors`` tensor used as it is stays a view of the memory-mapped file (no copy).
A tensor that must change dtype or device is different: read through the mapping, every
page of the file it touched stays in the process's resident set (``RssFile``) until the
mapping goes, so loading an fp16 file for bf16 would hold the fp16 file and the bf16
model at once (peak RSS = both). Here such a tensor's bytes are read with ``readinto``
into a buffer of its own, converted (``buffer.to(device, dtype)``: fp16 -> bf16
directly, never through fp32) and the buffer freed; the page cache does not count
towards the process. Peak RSS is then the converted model plus the largest tensor.

Other files (pickles, shards) and big-endian machines use ``source.tensor(key)``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import IO, Any

import torch

from sdstack.models.single_file import SafetensorsFile, TensorFile

FLOAT_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
"""safetensors dtype names of the floating tensors read this way."""


class ConvertingReader:
    """``tensor(key, dtype, device)``: a tensor of ``source`` in ``dtype`` on ``device``.

    Floating tensors already in ``dtype`` on the CPU (for a CPU target) come from
    ``source.tensor`` (a view of the mapping); other floating tensors of a
    ``.safetensors`` file are read into a buffer and converted; anything else (integer
    tensors, pickles, shards) comes from ``source.tensor`` unconverted, for the caller's
    own checks. With ``channels_last``, 4-D floating tensors are always read here and
    come out in ``torch.channels_last`` order (one copy, no file pages kept). Use as a
    context manager (closes the file).
    """

    def __init__(self, source: TensorFile, *, channels_last: bool = False) -> None:
        self.source = source
        self.channels_last = channels_last
        self.entries: dict[str, Any] = {}
        self.data_start = 0
        self._file: IO[bytes] | None = None
        if isinstance(source, SafetensorsFile) and sys.byteorder == "little":
            self.entries, self.data_start = source.entries, source.data_start

    def tensor(self, key: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The tensor under ``key``, converted when it was read here (see the class doc)."""
        entry = self.entries.get(key)
        stored = None if entry is None else FLOAT_DTYPES.get(entry.dtype)
        relayout = self.channels_last and entry is not None and len(entry.shape) == 4
        if stored is None or (stored == dtype and device.type == "cpu" and not relayout):
            return self.source.tensor(key)
        buffer = torch.empty(entry.end - entry.begin, dtype=torch.uint8)
        file = self._open()
        file.seek(self.data_start + entry.begin)
        if file.readinto(memoryview(buffer.numpy())) != buffer.numel():
            return self.source.tensor(key)  # the file changed under us: the library decides
        tensor = buffer.view(stored).reshape(entry.shape)
        if relayout:
            return tensor.to(device=device, dtype=dtype, memory_format=torch.channels_last)
        return tensor.to(device=device, dtype=dtype)

    def _open(self) -> IO[bytes]:
        if self._file is None:
            self._file = Path(self.source.path).open("rb")  # noqa: SIM115 closed in close()
        return self._file

    def close(self) -> None:
        """Close the file (the source stays open)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> ConvertingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
