"""Saving images with their infotext, and reading images back (PNG, JPEG, WebP).

PNG: text chunk ``parameters`` (tEXt when the text is Latin-1, else iTXt), as the
reference UI writes. JPEG/WebP: EXIF UserComment = ``b"UNICODE\\0" + UTF-16BE``.
Files are written to a temporary name in the output folder, then claimed as
``NNNNN-<seed>.<ext>`` by an exclusive create (:func:`sdstack.atomic_files.publish_new`),
the index one more than the highest already there, counting up while a name is taken:
concurrent savers (threads, processes) never overwrite each other or anything else.
Reading maps every failure (missing, a folder, not an image, truncated, a decompression
bomb) to an :class:`ImageFileError` that names the file and the reason.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sdstack.atomic_files import publish_new, temporary_file
from sdstack.errors import SdstackError
from sdstack.generate.outputs import OutputError, os_error_reason

EXIF_IFD = 0x8769
USER_COMMENT = 0x9286
NAME_PATTERN = re.compile(r"^(\d{5,})-")
FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}
# What Pillow raises on broken data besides OSError (plugins parse headers by hand).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)


class ImageFileError(SdstackError):
    """An image file that cannot be read: missing, a folder, not an image, truncated,
    or declaring more pixels than Pillow's decompression-bomb limit."""


class InfotextError(ImageFileError):
    """An image file that cannot be read for infotext."""


def next_index(out_dir: Path, prefix: str = "") -> int:
    """One more than the largest ``NNNNN-`` prefix in ``out_dir`` (0 when none); with
    ``prefix`` (``"grid-"``), the largest ``<prefix>NNNNN``."""
    pattern = NAME_PATTERN if not prefix else re.compile(rf"^{re.escape(prefix)}(\d{{5,}})\b")
    indices = [int(m.group(1)) for p in out_dir.iterdir() if (m := pattern.match(p.name))]
    return max(indices, default=-1) + 1


def _user_comment(text: str) -> bytes:
    return b"UNICODE\0" + text.encode("utf-16-be")


def _save_kwargs(image: Any, infotext: str, fmt: str) -> dict[str, Any]:
    if fmt == "PNG":
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        info.add_text("parameters", infotext)  # Pillow writes iTXt if not Latin-1
        return {"pnginfo": info}
    exif = image.getexif()
    exif.get_ifd(EXIF_IFD)[USER_COMMENT] = _user_comment(infotext)
    kwargs: dict[str, Any] = {"exif": exif.tobytes(), "quality": 95}
    return kwargs


def save_image(
    image: Any,
    infotext: str | None,
    out_dir: str | Path,
    *,
    seed: int | None = None,
    fmt: str = "png",
    prefix: str = "",
) -> Path:
    """Write ``image`` with its infotext as ``out_dir/NNNNN-<seed>.<fmt>``; never overwrites.

    ``prefix`` names another series counted on its own: ``prefix="grid-"`` writes
    ``grid-NNNNN.<fmt>`` (no seed).

    The image goes to a temporary file in ``out_dir`` (created if needed) first, then
    :func:`~sdstack.atomic_files.publish_new` claims the first free name, counting up
    from :func:`next_index`; a name another saver took meanwhile is skipped. On failure
    nothing is left behind and images saved before are untouched. The file's mode is
    what ``open()`` gives under the umask.

    Raises:
        OutputError: ``fmt`` is not png, jpg/jpeg or webp; or the image cannot be
            written (``out_dir`` is a file, read-only, the disk is full, ...).
    """
    extension = fmt.lower()
    if extension not in FORMATS:
        raise OutputError(f"image format {fmt!r} is not supported; use one of: png, jpg, webp")
    pil_format = FORMATS[extension]
    out = Path(out_dir)
    kwargs = _save_kwargs(image, infotext, pil_format) if infotext else {}
    tail = f"-{seed}.{extension}" if seed is not None else f".{extension}"
    try:
        with temporary_file(out, suffix=f".{extension}") as temporary:
            image.save(temporary, format=pil_format, **kwargs)
            return _publish_numbered(temporary, out, tail, prefix)
    except OSError as error:
        raise _output_error(out, error) from error


def _publish_numbered(temporary: Path, out: Path, tail: str, prefix: str = "") -> Path:
    """Claim ``out/<prefix>NNNNN<tail>`` for ``temporary``, the first free index from the scan."""
    index = next_index(out, prefix)
    while True:
        target = out / f"{prefix}{index:05d}{tail}"
        try:
            publish_new(temporary, target)
        except FileExistsError:
            index += 1
            continue
        return target


def _output_error(out: Path, error: OSError) -> OutputError:
    """The :class:`OutputError` for a failed save into ``out``."""
    if os.path.exists(out) and not os.path.isdir(out):
        reason = "it is a file, expected a folder"
    else:
        reason = os_error_reason(error)
    return OutputError(f"cannot save an image in {str(out)!r}: {reason}")


def _decode_user_comment(raw: Any) -> str | None:
    if isinstance(raw, str):
        return raw
    if not isinstance(raw, bytes) or len(raw) < 8:
        return None
    prefix, body = raw[:8], raw[8:]
    if prefix == b"UNICODE\0":
        if body[:2] == b"\xff\xfe":
            return body[2:].decode("utf-16-le", errors="replace")
        if body[:2] == b"\xfe\xff":
            body = body[2:]
        return body.decode("utf-16-be", errors="replace")
    return body.rstrip(b"\0").decode("utf-8", errors="replace")


def _open_stream(path: Path, prefix: str, error_class: type[ImageFileError]) -> Any:
    """``open(path, "rb")``, a folder or a missing file an ``error_class``."""
    if os.path.isdir(path):
        raise error_class(f"{prefix}is a folder, expected an image file")
    try:
        return open(path, "rb")  # the caller closes it (``with``)
    except FileNotFoundError as error:
        raise error_class(f"{prefix}no such file") from error
    except OSError as error:
        raise error_class(f"{prefix}cannot be read: {error.strerror or error}") from error


@contextmanager
def _open_image(path: Path, prefix: str, error_class: type[ImageFileError]) -> Iterator[Any]:
    """``PIL.Image.open`` on ``path`` (headers only), every failure an ``error_class``."""
    from PIL import Image, UnidentifiedImageError

    with _open_stream(path, prefix, error_class) as stream:
        try:
            image = Image.open(stream)
        except UnidentifiedImageError as error:
            raise error_class(f"{prefix}is not an image file Pillow can read") from error
        except Image.DecompressionBombError as error:
            raise error_class(_too_large(prefix, Image.MAX_IMAGE_PIXELS)) from error
        except DECODE_ERRORS as error:
            raise error_class(f"{prefix}is truncated or corrupt: {error}") from error
        with image:
            yield image


def _too_large(prefix: str, limit: int | None) -> str:
    return (
        f"{prefix}declares more than {limit} pixels (PIL.Image.MAX_IMAGE_PIXELS), which "
        "could be a decompression bomb; raise that limit only for a file you trust"
    )


def read_infotext(path: str | Path, *, option: str = "image") -> str | None:
    """The infotext stored in an image: PNG ``parameters`` text chunk, or the EXIF
    UserComment of JPEG/WebP; None when the image has none. Pixels are not decoded.

    Args:
        path: the image file.
        option: how messages name it, e.g. ``"--from-infotext"``.

    Raises:
        InfotextError: ``<option> '<path>': <reason>`` -- no such file, a folder, not an
            image, truncated or corrupt, a declared size over Pillow's bomb limit.
    """
    path = Path(path)
    prefix = f"{option} {str(path)!r}: "
    with _open_image(path, prefix, InfotextError) as image:
        text = image.info.get("parameters")
        if isinstance(text, str):
            return text
        try:
            comment = image.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
        except DECODE_ERRORS as error:
            raise InfotextError(f"{prefix}has corrupt EXIF data: {error}") from error
    return _decode_user_comment(comment)


def load_init_image(path: str | Path, option: str = "--init-image") -> Any:
    """The image at ``path`` as an RGB ``PIL.Image``, fully decoded, its file closed.

    Pixels are decoded (``.load()``) here, so a truncated file fails now, not in the
    middle of a run; an image over ``PIL.Image.MAX_IMAGE_PIXELS`` (Pillow's
    decompression-bomb limit, about 89 million) is refused before it is decoded.

    Raises:
        ImageFileError: ``<option> '<path>': <reason>`` -- no such file, a folder, not an
            image, truncated or corrupt, too many pixels, a mode without an RGB form.
    """
    from PIL import Image

    path = Path(path)
    prefix = f"{option} {str(path)!r}: "
    with _open_image(path, prefix, ImageFileError) as image:
        limit = Image.MAX_IMAGE_PIXELS
        if limit is not None and image.width * image.height > limit:
            raise ImageFileError(_too_large(prefix, limit))
        try:
            image.load()
        except DECODE_ERRORS as error:
            raise ImageFileError(f"{prefix}is truncated or corrupt: {error}") from error
        try:
            return image.convert("RGB")
        except (ValueError, OSError) as error:
            raise ImageFileError(
                f"{prefix}has mode {image.mode}, which cannot be converted to RGB: {error}"
            ) from error
