"""The deprojector's configuration (``config.json``) and its frozen inverse projection.

``DeprojectorConfig`` is a dataclass with a JSON round trip (``to_dict``/``from_dict``);
``from_dict`` checks every field's type and range (a hostile ``config.json`` must not
make the loader build a huge model), so it raises :class:`DeprojectorError` naming the
field, the value and what was expected.

Inverse projection: CLIP's ``text_embeds = W pooled`` (``W = text_projection.weight``,
E x W). A square ``W`` whose 2-norm condition number ``kappa = s_max / s_min`` is at most
:data:`MAX_CONDITION` is inverted exactly (``torch.linalg.inv`` in float64); otherwise
(not square, or ill-conditioned) the Moore-Penrose pseudo-inverse with singular values
below ``PINV_RTOL * s_max`` dropped. ``kappa`` is recorded in the config.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from sdstack.errors import UnknownNameError
from sdstack.registry import Registry
from sdstack.text.deprojector import DeprojectorError

FORMAT_VERSION = 1
MAX_CONDITION = 1e4
PINV_RTOL = 1e-6
MAX_PARAMETERS = 1_000_000_000

EMBEDDINGS = ("text_embeds", "pooled")
DECODER_NAMES = ("autoregressive", "parallel")
ACTIVATION_NAMES = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh")

DECODER_KINDS: Registry[str] = Registry("deprojector decoder")
DECODER_KINDS.register("autoregressive", "autoregressive", aliases=("ar", "causal"))
DECODER_KINDS.register("parallel", "parallel")

# integer field -> (lowest, highest) accepted
_INTS = {
    "width": (1, 16384),
    "heads": (1, 1024),
    "intermediate_size": (1, 65536),
    "layers": (1, 64),
    "positions": (2, 1024),
    "clip_skip": (1, 64),
    "ensemble": (1, 16),
    "embedding_dim": (1, 16384),
    "query_rank": (0, 16384),
    "version": (1, FORMAT_VERSION),
}


@dataclasses.dataclass
class DeprojectorConfig:
    """Shapes and options of a :class:`~sdstack.text.deprojector.model.Deprojector`.

    ``clip_skip`` N: the target is ``last_hidden_state`` (1) or
    ``final_layer_norm(hidden_states[-N])``. ``embedding``: which vector the input is
    (``"text_embeds"`` or ``"pooled"``), ``embedding_dim`` its width E. ``clip_hash``:
    :func:`~sdstack.text.deprojector.files.clip_fingerprint` of the teacher CLIP;
    ``condition_number``: of the text projection (None without one). ``query_rank`` r:
    the rank of the parallel decoder's per-position input term ``(s V) U_k`` (model
    docstring); 0, the default, is the decoder without it (configs saved before the field
    existed), and it must be 0 for the autoregressive decoder.
    """

    width: int = 768
    heads: int = 12
    intermediate_size: int = 3072
    layers: int = 1
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    positions: int = 77
    clip_skip: int = 1
    decoder: str = "autoregressive"
    input_mlp: bool = False
    ensemble: int = 1
    relative_to_null: bool = True
    embedding: str = "pooled"
    embedding_dim: int = 768
    clip_hash: str | None = None
    condition_number: float | None = None
    query_rank: int = 0
    version: int = FORMAT_VERSION

    def check(self) -> DeprojectorConfig:
        """``self`` if every field has the right type and range, with the decoder
        name canonical.

        Raises:
            DeprojectorError: naming the field, the value and what was expected.
        """
        for name, (low, high) in _INTS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise DeprojectorError(
                    f"deprojector config {name} must be an integer in [{low}, {high}], "
                    f"got {value!r}"
                )
        for name in ("input_mlp", "relative_to_null"):
            if not isinstance(getattr(self, name), bool):
                raise DeprojectorError(
                    f"deprojector config {name} must be true or false, got {getattr(self, name)!r}"
                )
        _check_choice("hidden_act", self.hidden_act, ACTIVATION_NAMES)
        _check_choice("embedding", self.embedding, EMBEDDINGS)
        if not isinstance(self.decoder, str):
            _check_choice("decoder", self.decoder, DECODER_NAMES)
        try:
            self.decoder = DECODER_KINDS.canonical(self.decoder)
        except UnknownNameError as error:  # with "did you mean"
            raise DeprojectorError(f"deprojector config decoder: {error}") from None
        self._check_numbers()
        self._check_shapes()
        return self

    def _check_numbers(self) -> None:
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
            raise DeprojectorError(
                f"deprojector config layer_norm_eps must be a number in (0, 1), got {eps!r}"
            )
        self.layer_norm_eps = float(eps)
        kappa = self.condition_number
        if kappa is not None and (
            isinstance(kappa, bool)
            or not isinstance(kappa, (int, float))
            or not (kappa >= 1 or math.isinf(kappa))
        ):
            raise DeprojectorError(
                f"deprojector config condition_number must be a number >= 1 or null, got {kappa!r}"
            )
        if self.clip_hash is not None and (
            not isinstance(self.clip_hash, str) or len(self.clip_hash) > 128
        ):
            raise DeprojectorError(
                f"deprojector config clip_hash must be a hex string or null, got "
                f"{str(self.clip_hash)[:80]!r}"
            )

    def _check_shapes(self) -> None:
        if self.width % self.heads:
            raise DeprojectorError(
                f"deprojector config width {self.width} is not a multiple of heads {self.heads}"
            )
        if self.embedding == "pooled" and self.embedding_dim != self.width:
            raise DeprojectorError(
                f"deprojector config embedding_dim must equal width {self.width} for a "
                f"pooled input, got {self.embedding_dim}"
            )
        if self.query_rank and self.decoder != "parallel":
            raise DeprojectorError(
                f"deprojector config query_rank must be 0 for the {self.decoder} decoder "
                f"(it is a parallel decoder option), got {self.query_rank}"
            )
        if self.query_rank > self.width:
            raise DeprojectorError(
                f"deprojector config query_rank must be at most width {self.width} (a "
                f"larger rank adds nothing), got {self.query_rank}"
            )
        w, i = self.width, self.intermediate_size
        per_layer = 4 * w * w + 2 * w * i
        total = self.ensemble * self.layers * per_layer + 2 * self.embedding_dim * w
        total += (self.positions * 2 + 2 * i) * w
        total += self.query_rank * (w + self.positions * w)
        if total > MAX_PARAMETERS:
            raise DeprojectorError(
                f"deprojector config describes about {total:,} parameters, more than the "
                f"{MAX_PARAMETERS:,} allowed (width {w}, intermediate_size {i}, layers "
                f"{self.layers}, ensemble {self.ensemble})"
            )

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> DeprojectorConfig:
        """The config in ``data`` (a parsed ``config.json``), checked.

        Raises:
            DeprojectorError: not an object, an unknown field, a bad value.
        """
        if not isinstance(data, dict):
            raise DeprojectorError(
                f"deprojector config must be a JSON object, got {type(data).__name__}"
            )
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise DeprojectorError(
                f"deprojector config has unknown field(s) {', '.join(unknown[:5])}; "
                f"expected only {', '.join(sorted(known))}"
            )
        version = data.get("version", FORMAT_VERSION)
        if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
            raise DeprojectorError(
                f"deprojector config version {version} is newer than this sdstack "
                f"understands ({FORMAT_VERSION}); upgrade sdstack"
            )
        return cls(**data).check()


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise DeprojectorError(
            f"deprojector config {name} must be one of {', '.join(choices)}, "
            f"got {str(value)[:80]!r}"
        )


def inverse_projection(weight: Any, width: int) -> tuple[Any, float]:
    """The frozen inverse of ``text_embeds = weight @ pooled`` and ``weight``'s condition number.

    ``weight`` (E x W, float64). Exact ``inv(weight)`` when square and
    ``kappa <= MAX_CONDITION``, else ``pinv(weight, rtol=PINV_RTOL)`` (W x E).

    Raises:
        DeprojectorError: not a finite 2-D matrix with W columns.
    """
    import torch

    if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or weight.shape[1] != width:
        got = tuple(getattr(weight, "shape", ()))
        raise DeprojectorError(
            f"projection must be the text projection weight (E x {width}), got shape {got}"
        )
    if not bool(torch.isfinite(weight).all()):
        raise DeprojectorError("projection holds NaN or infinite values")
    singular = torch.linalg.svdvals(weight)
    smallest = float(singular[-1]) if weight.shape[0] >= weight.shape[1] else 0.0
    kappa = float(singular[0]) / smallest if smallest > 0 else math.inf
    if weight.shape[0] == weight.shape[1] and kappa <= MAX_CONDITION:
        return torch.linalg.inv(weight), kappa
    return torch.linalg.pinv(weight, rtol=PINV_RTOL), kappa
