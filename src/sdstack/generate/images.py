"""Saving images with their infotext, and reading it back (PNG, JPEG, WebP).

PNG: text chunk ``parameters`` (tEXt when the text is Latin-1, else iTXt), as the
reference UI writes. JPEG/WebP: EXIF UserComment = ``b"UNICODE\\0" + UTF-16BE``.
Files are written to a temporary name in the output folder, then ``os.replace``d to
``NNNNN-<seed>.<ext>``, the index one more than the highest already there.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from sdstack.atomic_files import temporary_file
from sdstack.errors import SdstackError

EXIF_IFD = 0x8769
USER_COMMENT = 0x9286
NAME_PATTERN = re.compile(r"^(\d{5,})-")
FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}


class InfotextError(SdstackError):
    """An image file that cannot be read for infotext."""


def next_index(out_dir: Path) -> int:
    """One more than the largest ``NNNNN-`` prefix in ``out_dir`` (0 when none)."""
    indices = [int(m.group(1)) for p in out_dir.iterdir() if (m := NAME_PATTERN.match(p.name))]
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
) -> Path:
    """Write ``image`` with its infotext as ``out_dir/NNNNN-<seed>.<fmt>``; never overwrites.

    The image goes to a temporary file in ``out_dir`` first, then ``os.replace`` moves it
    to the first free name (index counting up from :func:`next_index`).

    Raises:
        ValueError: ``fmt`` is not png, jpg/jpeg or webp.
    """
    if fmt.lower() not in FORMATS:
        raise ValueError(f"image format {fmt!r} is not supported; use one of: png, jpg, webp")
    pil_format = FORMATS[fmt.lower()]
    out = Path(out_dir)
    kwargs = _save_kwargs(image, infotext, pil_format) if infotext else {}
    with temporary_file(out, suffix=f".{fmt}") as temporary:
        image.save(temporary, format=pil_format, **kwargs)
        index = next_index(out)
        suffix = f"-{seed}" if seed is not None else ""
        while True:
            target = out / f"{index:05d}{suffix}.{fmt.lower()}"
            if not target.exists():
                break
            index += 1
        os.replace(temporary, target)
    return target


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


def read_infotext(path: str | Path) -> str | None:
    """The infotext stored in an image: PNG ``parameters`` text chunk, or the EXIF
    UserComment of JPEG/WebP; None when the image has none.

    Raises:
        FileNotFoundError: no such file.
        InfotextError: the file is not an image Pillow can open.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {str(path)!r} does not exist")
    try:
        with Image.open(path) as image:
            text = image.info.get("parameters")
            if isinstance(text, str):
                return text
            comment = image.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
    except UnidentifiedImageError as error:
        raise InfotextError(f"{str(path)!r} is not an image file Pillow can read") from error
    return _decode_user_comment(comment)
