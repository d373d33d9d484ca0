"""The CLIP text deprojector: rebuild SD1's 77 x W conditioning from one sentence embedding.

After nanashi161382's "CLIP Text Deprojector" (2023; spec: ``shared/spec/deprojector.md``).

- :mod:`~sdstack.text.deprojector.model`: :class:`DeprojectorConfig` and the
  :class:`Deprojector` module (frozen inverse projection, CLIP-initialised causal layers,
  BOS state fixed, autoregressive and parallel decoders, input MLP, ensembles).
- :mod:`~sdstack.text.deprojector.decoding`: the pre-LN CLIP encoder layer with a
  key/value cache that the decoders run.
- :mod:`~sdstack.text.deprojector.files`: ``save_deprojector`` / ``load_deprojector``
  (``model.safetensors`` + ``config.json``) and ``clip_fingerprint``.
- :mod:`~sdstack.text.deprojector.v1_layout`: the author's published v1 layout
  (``config.json`` + ``pytorch_model.bin``).

Names are imported on first use. :class:`DeprojectorError` is the base of every
deprojector error.
"""

from __future__ import annotations

from sdstack.errors import SdstackError
from sdstack.lazy import lazy_exports


class DeprojectorError(SdstackError):
    """A deprojector that cannot be built, loaded or run as asked."""


_EXPORTS = {
    "DECODERS": "model",
    "Deprojector": "model",
    "DeprojectorConfig": "model",
    "clip_outputs": "model",
    "DeprojectorLayer": "decoding",
    "DeprojectorFileError": "files",
    "clip_fingerprint": "files",
    "load_deprojector": "files",
    "save_deprojector": "files",
    "is_v1_layout": "v1_layout",
    "load_v1_layout": "v1_layout",
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())

__all__ = ["DeprojectorError", *_EXPORTS]
