"""Training folders in the kohya sd-scripts DreamBooth layout: ``N_concept`` subfolders.

Reference: sd-scripts ``config_util.generate_dreambooth_subsets_config_by_subdirs`` and
``train_util.DreamBoothDataset``. Each subfolder of the data folder is named ``N_rest``:
``N = int(first "_"-token)`` is the number of repeats per epoch, ``rest`` the class
tokens; a folder whose first token is not an integer, or with N < 1, is skipped. A folder
of images without such subfolders is one subset with 1 repeat. An image's caption is the
first line (stripped) of ``<stem><ext>`` for the first caption extension that exists;
without one the class tokens are used (or ""), with a warning naming the file.

    num_train_images = sum(repeats * len(images))
    tag_frequency[folder][tag.strip().lower()] += 1   for each ","-split tag, per image
    dataset_dirs[folder] = {"n_repeats": repeats, "img_count": len(images)}

Pixels are decoded once while scanning (``verify=True``), so an unreadable image is a
warning here and never a failure in the middle of a run.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sdstack.errors import SdstackError, SdstackWarning

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_REPEATS = 100_000  # beyond this an epoch would be a list of billions of entries
MAX_CAPTION_BYTES = 1 << 20  # the first line of a caption is all that is read
_REPEATS = re.compile(r"[+-]?[0-9]+")  # ASCII digits only (int() takes others)


class DatasetError(SdstackError):
    """A training data folder that cannot be used: missing, not a folder, no images."""


@dataclass(frozen=True)
class ImageItem:
    """One training image: its file, raw caption (before shuffling) and pixel size."""

    path: Path
    caption: str
    width: int
    height: int


@dataclass(frozen=True)
class Subset:
    """One ``N_concept`` folder: ``repeats`` = N, ``class_tokens`` = concept (or None)."""

    folder: Path
    name: str
    repeats: int
    class_tokens: str | None
    images: list[ImageItem] = field(default_factory=list)


@dataclass(frozen=True)
class TrainingData:
    """A scanned training folder: its subsets in name order, each with its images."""

    folder: Path
    subsets: list[Subset]

    @property
    def num_train_images(self) -> int:
        """``sum(repeats * len(images))`` -- kohya's ``ss_num_train_images``."""
        return sum(subset.repeats * len(subset.images) for subset in self.subsets)

    @property
    def num_images(self) -> int:
        """Distinct image files (without repeats)."""
        return sum(len(subset.images) for subset in self.subsets)

    @property
    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """kohya's ``set_tag_frequency``: per folder name, ``tag.strip().lower()`` counts
        over the ","-split raw captions, one count per image (not per repeat)."""
        frequency: dict[str, dict[str, int]] = {}
        for subset in self.subsets:
            counts = frequency.setdefault(subset.name, {})
            for item in subset.images:
                for tag in item.caption.split(","):
                    tag = tag.strip()
                    if tag:
                        counts[tag.lower()] = counts.get(tag.lower(), 0) + 1
        return frequency

    @property
    def dataset_dirs(self) -> dict[str, dict[str, int]]:
        """kohya's ``ss_dataset_dirs``: ``{"10_x": {"n_repeats": 10, "img_count": N}}``."""
        return {
            subset.name: {"n_repeats": subset.repeats, "img_count": len(subset.images)}
            for subset in self.subsets
        }

    def items(self) -> Iterator[tuple[Subset, ImageItem]]:
        """Every (subset, image) pair, once each, in scan order."""
        for subset in self.subsets:
            for item in subset.images:
                yield subset, item


def scan_dataset(
    folder: str | os.PathLike[str],
    *,
    caption_extensions: Sequence[str] = (".txt", ".caption"),
    class_tokens_default: str | None = None,
    verify: bool = True,
) -> TrainingData:
    """kohya's folder-mode dataset: ``N_concept`` subfolders (or one flat folder).

    Args:
        folder: the training data folder (``--data``).
        caption_extensions: caption file extensions, tried in order per image.
        class_tokens_default: class tokens of a flat folder (and of ``N`` / ``N_``
            folders with nothing after the number).
        verify: decode every image's pixels now; False reads only the headers.

    Returns:
        The subsets (sorted by folder name) with their images (sorted by file name).

    Warns:
        SdstackWarning: once per skipped subfolder, unreadable image, missing/empty/
            undecodable caption, each naming the folder or file.

    Raises:
        DatasetError: the folder is missing or not a folder, a caption extension is
            malformed, or no usable image was found.
    """
    root = Path(folder)
    extensions = _check_inputs(root, caption_extensions)
    subfolders = _subset_folders(root)
    if subfolders:
        subsets = [
            _scan_subset(path, repeats, tokens or class_tokens_default, extensions, verify)
            for path, repeats, tokens in subfolders
        ]
        _warn_unused_images(root)
    else:
        subsets = [_scan_subset(root, 1, class_tokens_default, extensions, verify)]
    for subset in subsets:
        if not subset.images:
            _warn(f"training data folder {str(subset.folder)!r}: skipped, no readable images")
    subsets = [subset for subset in subsets if subset.images]
    if not subsets:
        raise DatasetError(
            f"training data folder {str(root)!r}: no readable images found; expected "
            f"images ({', '.join(IMAGE_EXTENSIONS)}) in subfolders named N_concept "
            "(N = repeats, e.g. 10_shapes) or directly in the folder"
        )
    return TrainingData(folder=root, subsets=subsets)


def _check_inputs(root: Path, caption_extensions: Sequence[str]) -> tuple[str, ...]:
    """The caption extensions as a tuple; DatasetError for a bad folder or extension."""
    if not root.exists():
        raise DatasetError(f"training data folder {str(root)!r}: no such folder")
    if not root.is_dir():
        raise DatasetError(f"training data folder {str(root)!r}: is a file, expected a folder")
    if isinstance(caption_extensions, str):
        caption_extensions = (caption_extensions,)
    extensions = tuple(caption_extensions)
    for extension in extensions:
        if not isinstance(extension, str) or not re.fullmatch(r"\.[^./\\]+", extension):
            raise DatasetError(
                f"caption extension {extension!r}: expected a dot and a name, e.g. '.txt'"
            )
    if not extensions:
        raise DatasetError("caption extensions: none given; expected e.g. ('.txt',)")
    return extensions


def _entries(folder: Path) -> list[os.DirEntry[str]]:
    """The visible entries of ``folder`` sorted by name (DatasetError if unreadable)."""
    try:
        with os.scandir(folder) as scan:
            entries = [entry for entry in scan if not entry.name.startswith(".")]
    except OSError as error:
        reason = error.strerror or str(error)
        raise DatasetError(f"training data folder {str(folder)!r}: {reason}") from error
    return sorted(entries, key=lambda entry: entry.name)


def _warn_unused_images(root: Path) -> None:
    """One warning when images lie beside ``N_concept`` subfolders (kohya ignores them)."""
    loose = [
        entry.name
        for entry in _entries(root)
        if Path(entry.name).suffix.lower() in IMAGE_EXTENSIONS and entry.is_file()
    ]
    if loose:
        _warn(
            f"training data folder {str(root)!r}: {len(loose)} images directly in it (e.g. "
            f"{loose[0]!r}) are not used; only its N_concept subfolders are (move them into "
            "one, e.g. 1_extra)"
        )


def _subset_folders(root: Path) -> list[tuple[Path, int, str]]:
    """(path, repeats, class tokens) of each ``N_rest`` subfolder; others warned."""
    found: list[tuple[Path, int, str]] = []
    for entry in _entries(root):
        if not entry.is_dir():
            continue
        parsed = parse_subset_name(entry.name)
        if parsed is None:
            _warn(
                f"training data folder {entry.path!r}: skipped, its name does not start "
                "with a number of repeats (expected N_concept, e.g. 10_shapes)"
            )
            continue
        repeats, rest = parsed
        if not 1 <= repeats <= MAX_REPEATS:
            _warn(
                f"training data folder {entry.path!r}: skipped, {repeats} repeats; "
                f"expected 1 to {MAX_REPEATS}"
            )
            continue
        found.append((Path(entry.path), repeats, rest))
    return found


def parse_subset_name(name: str) -> tuple[int, str] | None:
    """kohya's folder name rule: ``"N_rest"`` -> ``(int(N), "rest")`` (the rest may hold
    more ``_``); None when the first ``_``-token is not an integer. N may be < 1 (the
    caller skips such folders)."""
    first, _, rest = name.partition("_")
    if not _REPEATS.fullmatch(first):
        return None
    return int(first), rest


def _scan_subset(
    folder: Path,
    repeats: int,
    class_tokens: str | None,
    extensions: tuple[str, ...],
    verify: bool,
) -> Subset:
    """One subset: every readable image of ``folder`` with its caption."""
    images = []
    for entry in _entries(folder):
        path = Path(entry.path)
        if path.suffix.lower() not in IMAGE_EXTENSIONS or not entry.is_file():
            continue
        size = _image_size(path, verify)
        if size is None:
            continue
        caption = _caption_for(path, extensions, class_tokens)
        images.append(ImageItem(path=path, caption=caption, width=size[0], height=size[1]))
    return Subset(
        folder=folder,
        name=folder.name,
        repeats=repeats,
        class_tokens=class_tokens,
        images=images,
    )


def _image_size(path: Path, verify: bool) -> tuple[int, int] | None:
    """(width, height) of the image, or None with a warning when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    from sdstack.generate.images import DECODE_ERRORS

    try:
        with Image.open(path) as image:
            size = image.size
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and size[0] * size[1] > limit:
                raise Image.DecompressionBombError(f"{size[0]}x{size[1]} pixels")
            if verify:
                image.load()
    except UnidentifiedImageError:
        reason = "not an image file Pillow can read"
    except Image.DecompressionBombError:
        reason = f"more than {Image.MAX_IMAGE_PIXELS} pixels (PIL.Image.MAX_IMAGE_PIXELS)"
    except DECODE_ERRORS as error:
        reason = f"truncated or corrupt ({error})"
    else:
        return size
    _warn(f"training image {str(path)!r}: skipped, {reason}")
    return None


def _caption_for(path: Path, extensions: tuple[str, ...], class_tokens: str | None) -> str:
    """The first line of the first caption file found, else the class tokens (warned)."""
    for extension in extensions:
        candidate = path.with_suffix(extension)
        if not candidate.is_file():
            continue
        problem, caption = _read_caption(candidate)
        if problem is None:
            return caption
        break
    else:
        names = " or ".join(repr(path.with_suffix(ext).name) for ext in extensions)
        problem = f"no caption file ({names})"
    fallback = f"class tokens {class_tokens!r}" if class_tokens else "an empty caption"
    _warn(f"training image {str(path)!r}: {problem}; using {fallback}")
    return class_tokens or ""


def _read_caption(path: Path) -> tuple[str | None, str]:
    """(problem or None, first line stripped) of a caption file."""
    try:
        with open(path, "rb") as stream:
            data = stream.read(MAX_CAPTION_BYTES)
    except OSError as error:
        return f"caption file {path.name!r} cannot be read ({error.strerror or error})", ""
    first = data.split(b"\n", 1)[0]
    if len(first) == MAX_CAPTION_BYTES:
        return f"caption file {path.name!r} has a first line over {MAX_CAPTION_BYTES} bytes", ""
    try:
        caption = first.decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        return f"caption file {path.name!r} is not UTF-8 text", ""
    if not caption:
        return f"caption file {path.name!r} is empty", ""
    return None, caption


def _warn(message: str) -> None:
    warnings.warn(message, SdstackWarning, stacklevel=4)
