"""Textual-inversion embeddings: files read the way the reference web UI reads them.

Recognised contents (spec "Textual inversion files"):

- ``{"string_to_param": {"*": T}}``: the reference UI's own ``.pt`` layout (its other
  keys, ``string_to_token``, ``name``, ``step``, ``sd_checkpoint``..., are ignored);
  the original textual-inversion code's ``nn.ParameterDict`` in place of the dict too;
- any dict holding exactly one tensor: diffusers ``{token: T}``, ``{"emb_params": T}``;
- SDXL ``{"clip_l": T, "clip_g": T}``: recognised and refused (SD1 only);

``T`` is ``(n, width)`` (n vectors) or ``(width,)`` (one vector). ``.pt``/``.bin`` are
loaded with ``torch.load(weights_only=True)`` (``nn.ParameterDict`` allow-listed): a
pickle that needs any other Python object is refused, never executed. The name is the file stem.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from sdstack.errors import SdstackError
from sdstack.models.hashes import short_hash12
from sdstack.models.library import iter_model_files

EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")
KNOWN_WIDTHS = {768: "SD1.x", 1024: "SD2.x", 1280: "SDXL clip_g", 2048: "SDXL"}


class EmbeddingError(SdstackError):
    """An embedding file that cannot be used: unreadable, unknown layout or wrong width."""


class EmbeddingWarning(UserWarning):
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
    """``torch.load(weights_only=True)``, its failures turned into EmbeddingError."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.")
            # The original textual-inversion code saved string_to_param as an
            # nn.ParameterDict: a plain torch container, allowed; nothing else is.
            with torch.serialization.safe_globals([torch.nn.ParameterDict]):
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        text = str(error)
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found:
            raise EmbeddingError(
                f"{path}: refused to unpickle: the file needs the Python object "
                f"{found.group(1)}, which weights-only loading does not allow (loading it "
                "could run arbitrary code); re-save it as .safetensors from a trusted source"
            ) from error
        raise EmbeddingError(
            f"{path}: not a readable torch file (corrupt or a different format)"
        ) from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else "empty file"
        raise EmbeddingError(f"{path}: not a readable torch file ({first_line})") from error


def _read_safetensors_file(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, its failures turned into EmbeddingError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError) as error:
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
        is_mapping = isinstance(params, (dict, torch.nn.ParameterDict))
        tensors = list(params.values()) if is_mapping else []
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
        items = [f"{key!r}: {type(item).__name__}" for key, item in list(value.items())[:8]]
        more = ", ..." if len(value) > 8 else ""
        return "{" + ", ".join(items) + more + "}"
    return type(value).__name__


def _as_vectors(tensor: torch.Tensor, path: Path, width: int | None) -> torch.Tensor:
    """(n, width) float32 from a (width,) or (n, width) floating tensor; width checked."""
    if not tensor.is_floating_point():
        raise EmbeddingError(f"{path}: embedding tensor must be floating point, got {tensor.dtype}")
    if tensor.ndim == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 2 or tensor.shape[0] == 0:
        raise EmbeddingError(
            f"{path}: embedding tensor must have shape (vectors, width) or (width,), got "
            f"{tuple(tensor.shape)}"
        )
    found = int(tensor.shape[1])
    if width is not None and found != width:
        guess = KNOWN_WIDTHS.get(found)
        hint = f" (a {guess} embedding?)" if guess else ""
        raise EmbeddingError(
            f"{path}: embedding width {found}{hint} does not match the model's token "
            f"embedding width {width}"
        )
    return tensor.detach().to(device="cpu", dtype=torch.float32).contiguous()


def load_embedding_file(
    path: str | os.PathLike[str], *, width: int | None = None, hash_file: bool = True
) -> Embedding:
    """Read one textual-inversion file (.pt/.bin weights-only, .safetensors).

    Name = file stem. ``width``: the model's token-embedding width (768 for SD1.x);
    None skips the check. ``short_hash`` = first 12 hex of the file's sha256 (cached),
    None when ``hash_file`` is false.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        EmbeddingError: unknown suffix, unreadable/corrupt/refused file, unknown layout,
            SDXL file, bad shape or width.
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
    # 1. read the file (never executing pickled code)
    if suffix == ".safetensors":
        data: object = _read_safetensors_file(path)
    else:
        data = _read_torch_file(path)
    # 2. find the tensor, check shape and width
    vectors = _as_vectors(_tensor_from_contents(data, path), path, width)
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
            except (EmbeddingError, OSError) as error:
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
