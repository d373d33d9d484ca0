"""Textual-inversion embeddings: files read the way the reference web UI reads them.

Recognised contents (spec "Textual inversion files"):

- ``{"string_to_param": {"*": T}}``: the reference UI's own ``.pt`` layout (its other
  keys, ``string_to_token``, ``name``, ``step``, ``sd_checkpoint``..., are ignored);
  the original textual-inversion code's ``nn.ParameterDict`` in place of the dict too;
- any dict holding exactly one tensor: diffusers ``{token: T}``, ``{"emb_params": T}``;
- SDXL ``{"clip_l": T, "clip_g": T}``: recognised and refused (SD1 only);

``T`` is ``(n, width)`` (n vectors, 1 <= n <= 75: one prompt chunk) or ``(width,)`` (one
vector), floating point. A file is never trusted: ``.pt``/``.bin`` go through
``sdstack.models.torch_file.load_torch_file`` (a weights-only unpickler that refuses any
Python object but tensors and plain containers, and checks every storage against the
file's size before allocating); ``.safetensors`` headers are checked first
(``check_safetensors_layout``) and only the chosen tensor is read. Shape and width are
checked before the tensor is converted to float32. The name is the file stem.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from sdstack.errors import SdstackError, SdstackWarning
from sdstack.models.hashes import short_hash12
from sdstack.models.library import iter_model_files
from sdstack.models.safetensors_header import SafetensorsHeaderError, check_safetensors_layout
from sdstack.models.torch_file import RefusedPickleError, TorchFileError, load_torch_file
from sdstack.prompt.chunks import CHUNK_LENGTH

EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")
KNOWN_WIDTHS = {768: "SD1.x", 1024: "SD2.x", 1280: "SDXL clip_g", 2048: "SDXL"}
MAX_VECTORS = CHUNK_LENGTH
"""An embedding fills at most one prompt chunk (75 tokens)."""
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class EmbeddingError(SdstackError):
    """An embedding file that cannot be used: unreadable, unknown layout or wrong width."""


class EmbeddingWarning(SdstackWarning):
    """An embedding file skipped while loading a folder (the others still load)."""


@dataclass(frozen=True, eq=False)
class Embedding:
    """One textual-inversion embedding: ``vectors`` (n, width) float32 replace n tokens."""

    name: str
    vectors: torch.Tensor
    path: Path | None = None
    short_hash: str | None = None

    @property
    def num_vectors(self) -> int:
        """How many token positions the embedding fills (rows of ``vectors``)."""
        return int(self.vectors.shape[0])

    @property
    def width(self) -> int:
        """Width of each vector (768 for SD1.x)."""
        return int(self.vectors.shape[1])


def _read_torch_file(path: Path) -> object:
    """``load_torch_file`` (storages mapped, not read), failures as EmbeddingError."""
    try:
        return load_torch_file(path, mapped=True)
    except RefusedPickleError as error:
        raise EmbeddingError(
            f"{path}: refused to unpickle: {error.reason} (nothing from the file was run; "
            "an embedding holds only tensors); re-save it as .safetensors from a trusted source"
        ) from error
    except TorchFileError as error:
        raise EmbeddingError(f"{path}: not a readable torch file ({error.reason})") from error


def _read_safetensors_file(path: Path) -> dict[str, torch.Tensor]:
    """A checked safetensors header as meta tensors (shape and dtype, no data)."""
    try:
        entries, _ = check_safetensors_layout(path)
    except SafetensorsHeaderError as error:
        reason = str(error).removeprefix(f"{path}: ")
        raise EmbeddingError(f"{path}: not a readable safetensors file ({reason})") from error
    tensors = {}
    for key, entry in entries.items():
        if entry.dtype not in SAFETENSORS_DTYPES:
            raise EmbeddingError(
                f"{path}: tensor {key!r:.60} has dtype {entry.dtype}, which an embedding "
                "cannot have (expected F32, F16 or BF16)"
            )
        dtype = SAFETENSORS_DTYPES[entry.dtype]
        tensors[key] = torch.empty(entry.shape, dtype=dtype, device="meta")
    return tensors


def _read_safetensors_tensor(path: Path, key: str) -> torch.Tensor:
    """One tensor of a (checked) safetensors file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return handle.get_tensor(key)
    except (SafetensorError, OSError, TypeError, ValueError) as error:
        raise EmbeddingError(f"{path}: not a readable safetensors file ({error})") from error


def _tensor_from_contents(data: object, path: Path) -> torch.Tensor:
    """The embedding tensor inside a loaded file (layouts in the module docstring)."""
    if isinstance(data, torch.Tensor):
        return data
    if not isinstance(data, dict):
        raise EmbeddingError(
            f"{path}: unrecognised embedding file: expected a dict of tensors, got "
            f"{type(data).__name__}"
        )
    if "string_to_param" in data:
        params = data["string_to_param"]
        # (an nn.ParameterDict is read as the dict of its parameters)
        tensors = list(params.values()) if isinstance(params, dict) else []
        if len(tensors) != 1 or not isinstance(tensors[0], torch.Tensor):
            raise EmbeddingError(
                f"{path}: string_to_param must hold exactly one tensor, got {_describe(params)}"
            )
        return tensors[0]
    if "clip_l" in data and "clip_g" in data:
        raise EmbeddingError(
            f"{path}: this is an SDXL embedding (clip_l + clip_g vectors); it cannot be "
            "used with an SD1.x model"
        )
    tensors = {key: value for key, value in data.items() if isinstance(value, torch.Tensor)}
    if len(tensors) != 1:
        raise EmbeddingError(
            f"{path}: unrecognised embedding file: expected 'string_to_param' or exactly "
            f"one tensor, got {_describe(data)}"
        )
    return next(iter(tensors.values()))


def _describe(value: object) -> str:
    """Short description of a loaded value for error messages: keys and types."""
    if isinstance(value, dict):
        items = [f"{key!r:.40}: {type(item).__name__}" for key, item in list(value.items())[:8]]
        more = f", ... {len(value) - 8} more" if len(value) > 8 else ""
        return "{" + ", ".join(items) + more + "}"
    return type(value).__name__


def _check_vectors(tensor: torch.Tensor, path: Path, width: int | None) -> None:
    """A floating (width,) or (n, width) tensor, 1 <= n <= MAX_VECTORS, of the model's
    width: checked on the shape alone, before any data is read or converted."""
    if not tensor.is_floating_point():
        raise EmbeddingError(f"{path}: embedding tensor must be floating point, got {tensor.dtype}")
    shape = tuple(tensor.shape)
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[0] == 0):
        raise EmbeddingError(
            f"{path}: embedding tensor must have shape (vectors, width) or (width,), got {shape}"
        )
    found = shape[-1]
    if width is not None and found != width:
        guess = KNOWN_WIDTHS.get(found)
        hint = f" (a {guess} embedding?)" if guess else ""
        raise EmbeddingError(
            f"{path}: embedding width {found}{hint} does not match the model's token "
            f"embedding width {width}"
        )
    if len(shape) == 2 and shape[0] > MAX_VECTORS:
        raise EmbeddingError(
            f"{path}: embedding has {shape[0]} vectors; at most {MAX_VECTORS} fit in a "
            f"prompt (one chunk of {CHUNK_LENGTH} tokens)"
        )


def _as_vectors(tensor: torch.Tensor, path: Path, width: int | None) -> torch.Tensor:
    """(n, width) float32 from a (width,) or (n, width) floating tensor (``_check_vectors``),
    copied out of the file."""
    _check_vectors(tensor, path, width)
    if tensor.ndim == 1:
        tensor = tensor.unsqueeze(0)
    return tensor.detach().to(device="cpu", dtype=torch.float32, copy=True).contiguous()


def load_embedding_file(
    path: str | os.PathLike[str], *, width: int | None = None, hash_file: bool = True
) -> Embedding:
    """Read one textual-inversion file (.pt/.bin weights-only, .safetensors).

    Name = file stem. ``width``: the model's token-embedding width (768 for SD1.x);
    None skips the check. ``short_hash`` = first 12 hex of the file's sha256 (cached),
    None when ``hash_file`` is false.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        EmbeddingError: unknown suffix, unreadable/corrupt/truncated/refused file (a
            storage or header declaring more data than the file holds among them),
            unknown layout, SDXL file, bad shape, more than 75 vectors, wrong width.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in EMBEDDING_SUFFIXES:
        raise EmbeddingError(
            f"{path}: unsupported embedding file type {suffix!r}; expected one of "
            f"{', '.join(EMBEDDING_SUFFIXES)}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"embedding file not found: {path}")
    # 1. read the structure, no tensor data (never executing pickled code)
    if suffix == ".safetensors":
        data: object = _read_safetensors_file(path)
    else:
        data = _read_torch_file(path)
    # 2. find the tensor, check shape and width, only then read and convert it
    tensor = _tensor_from_contents(data, path)
    _check_vectors(tensor, path, width)
    if tensor.is_meta:
        key = next(k for k, v in data.items() if v is tensor)  # type: ignore[union-attr]
        tensor = _read_safetensors_tensor(path, key)
    vectors = _as_vectors(tensor, path, width)
    # 3. hash for infotext "TI hashes"
    digest = short_hash12(path) if hash_file else None
    return Embedding(name=path.stem, vectors=vectors, path=path, short_hash=digest)


class EmbeddingLibrary(Mapping[str, Embedding]):
    """Embeddings by name (file stem), as the reference UI's embeddings folder.

    ``skipped`` lists ``(path, reason)`` for the files that were not loaded.
    """

    def __init__(
        self,
        embeddings: Iterable[Embedding] = (),
        *,
        skipped: Iterable[tuple[Path, str]] = (),
    ) -> None:
        self._by_name: dict[str, Embedding] = {}
        for embedding in embeddings:
            if embedding.name in self._by_name:
                raise EmbeddingError(
                    f"duplicate embedding name {embedding.name!r}: "
                    f"{self._by_name[embedding.name].path} and {embedding.path}"
                )
            self._by_name[embedding.name] = embedding
        self.skipped: tuple[tuple[Path, str], ...] = tuple(skipped)

    @classmethod
    def from_dir(
        cls, path: str | os.PathLike[str], *, width: int = 768, hash_files: bool = True
    ) -> EmbeddingLibrary:
        """Load every embedding under ``path`` (recursive, like the reference UI).

        Order: a folder's files sorted by name, then its subfolders; when two files share
        a stem the first one found wins (so a top-level file beats one in a subfolder) and
        the other is skipped with a warning. Each unusable file gives exactly one
        ``EmbeddingWarning`` naming it and the reason; the rest still load.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            EmbeddingError: ``path`` is not a folder.
        """
        root = Path(path)
        if not root.exists():
            raise FileNotFoundError(f"embeddings folder not found: {root}")
        if not root.is_dir():
            raise EmbeddingError(f"embeddings path is not a folder: {root}")
        loaded: dict[str, Embedding] = {}
        skipped: list[tuple[Path, str]] = []
        for file in iter_model_files(root, EMBEDDING_SUFFIXES):
            try:
                if file.stem in loaded:
                    raise EmbeddingError(
                        f"{file}: duplicate embedding name {file.stem!r}, already loaded "
                        f"from {loaded[file.stem].path}; keeping the first"
                    )
                embedding = load_embedding_file(file, width=width, hash_file=hash_files)
            except (SdstackError, OSError) as error:
                skipped.append((file, str(error)))
                warnings.warn(f"skipped embedding {error}", EmbeddingWarning, stacklevel=2)
                continue
            loaded[embedding.name] = embedding
        return cls(loaded.values(), skipped=skipped)

    def __getitem__(self, name: str) -> Embedding:
        return self._by_name[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)

    def vector_counts(self) -> dict[str, int]:
        """``{name: number of vectors}``: what ``tokenize_prompt(embeddings=...)`` takes."""
        return {name: embedding.num_vectors for name, embedding in self._by_name.items()}

    def __repr__(self) -> str:
        return f"EmbeddingLibrary({sorted(self._by_name)!r})"
