"""When the VAE works in tiles: the modes ``auto``, ``on``, ``off`` (no torch, so settings
are checked before anything heavy is imported). The tiling itself is
:mod:`sdstack.generate.vae_tiling`."""

from __future__ import annotations

from typing import Any

from sdstack.errors import UnknownNameError
from sdstack.registry import Registry
from sdstack.validate import SettingError

AUTO_TILE_PIXELS = 1024 * 1024
"""``auto`` tiles images with more pixels than this: up to 1024x1024 an untiled fp32
decode fits in 4 GB (measured 3.9 GB) and runs twice as fast as tiles; above it the
memory grows with the pixel count (2048x2048: about 15.5 GB), tiles stay near 1 GB."""


class UnknownTilingModeError(UnknownNameError, SettingError):
    """A VAE tiling mode other than auto, on, off."""


VAE_TILING = Registry[str]("VAE tiling mode", UnknownTilingModeError)
for _mode in ("auto", "on", "off"):
    VAE_TILING.register(_mode, _mode)
VAE_TILING_MODES = VAE_TILING.names()


def check_tiling_mode(mode: Any, name: str = "VAE tiling") -> str:
    """The canonical VAE tiling mode of ``mode`` (auto, on, off).

    Raises:
        UnknownTilingModeError: ``<name>: unknown VAE tiling mode 'x'; did you mean ...``.
    """
    if not isinstance(mode, str):
        raise UnknownTilingModeError(f"{name} must be auto, on or off, got {mode!r}")
    return VAE_TILING.checked(mode, name)


def should_tile(
    height: int, width: int, mode: str = "auto", threshold: int = AUTO_TILE_PIXELS
) -> bool:
    """Whether a ``width x height`` image (pixels) is decoded in tiles.

    ``"on"``: always; ``"off"``: never; ``"auto"``: when ``width * height > threshold``
    (:data:`AUTO_TILE_PIXELS`, one megapixel, by default).

    Raises:
        UnknownTilingModeError: ``mode`` is not auto, on or off (nearest names given).
    """
    mode = VAE_TILING.canonical(mode)
    if mode == "auto":
        return height * width > threshold
    return mode == "on"
