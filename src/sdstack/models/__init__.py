"""SD1.x models: loading checkpoints and diffusers folders into ``ModelComponents``.

``load_model``, the key-map writers, the hash functions and ``ModelLibrary`` are imported
on first use (``load_model`` pulls in torch and diffusers); importing this package stays
cheap.
"""

from __future__ import annotations

from typing import Any

from sdstack.models.components import ModelComponents
from sdstack.models.detect import CheckpointError

_LAZY = {
    "load_model": "sdstack.models.loading",
    "to_ldm_state_dict": "sdstack.models.ldm_file",
    "save_single_file": "sdstack.models.ldm_file",
    "file_sha256": "sdstack.models.hashes",
    "short_hash": "sdstack.models.hashes",
    "legacy_model_hash": "sdstack.models.hashes",
    "ModelLibrary": "sdstack.models.library",
    "HashCache": "sdstack.models.hash_cache",
    "resolve_model_paths": "sdstack.models.root",
}

__all__ = ["CheckpointError", "ModelComponents", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sdstack.models' has no attribute {name!r}")
