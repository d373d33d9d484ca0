"""The author's published v1 deprojector folder (``config.json`` + ``pytorch_model.bin``).

nanashi161382's ``CLIPTextDeprojector`` (a ``transformers`` ``CLIPPreTrainedModel``
saved with ``save_pretrained``). Key names are those of its training code in
github.com/nanashi161382/unstable_diffusion (``train_deprojector.py``): this reader was
written from them, not tested against the published file itself (not available here).

``config.json`` is a ``CLIPTextConfig``; read: ``hidden_size`` (W),
``num_attention_heads``, ``intermediate_size``, ``max_position_embeddings`` (77),
``layer_norm_eps``, ``hidden_act``, ``projection_dim`` (E). The author's later flags
are refused unless at their v1 value: ``ensemble_size`` 1, ``relative_to_null`` /
``relative_to_prev`` / ``apply_mlp_to_input`` false (those layouts differ from sdstack's).

``pytorch_model.bin`` (read weights-only by ``sdstack.models.torch_file``), what maps where:

===========================================  ==========================================
v1 key (shape)                               sdstack Deprojector
===========================================  ==========================================
``projection.weight`` (W, E)                 ``inverse_projection`` (pooled = e P^T;
                                             the frozen inverse of ``text_projection``);
                                             ``projection`` = its inverse (or pinv)
``position_embedding.weight`` (77, W)        ``position_embedding``
``encoder_layer.<name>`` (CLIPEncoderLayer)  ``stacks.0.layers.0.<name>`` (same names:
                                             ``self_attn.{q,k,v,out}_proj``,
                                             ``layer_norm1``, ``mlp.fc1``, ``mlp.fc2``,
                                             ``layer_norm2``)
``final_layer_norm.{weight,bias}``           ``final_layer_norm``
``sos_embed`` (W,)                           ``bos`` (the fixed output at position 0)
``null_embed`` (W,), optional, pooled space  ``null = projection @ null_embed``
``position_ids``                             ignored (always 0..76)
===========================================  ==========================================

Caveat: the training code's ``ConstructInput`` defaults (``diff=True,
embed_second=True``) build the author's later, relative layout ``[null, e - null,
h_1 - null, ...]``, and its config records no flag for it. This reader follows the
spec's v1 layout ``[e, h_0, ..., h_75]``; a file whose ``null_embed`` is not zero may come
from the relative training, so that case is warned about (the weights still load).

The result: ``embedding = "text_embeds"``, one layer, autoregressive,
``relative_to_null = False`` (v1 feeds ``[W^-1 e, h_0, ..., h_75]``), clip skip 1, no
CLIP hash (so no mismatch warning). Without a ``null_embed``, ``null`` is computed from
``text_encoder``/``tokenizer`` when given, else left at zero with a warning (embedding
arithmetic centres on it).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from sdstack.errors import SdstackWarning
from sdstack.text.deprojector.files import (
    CONFIG_NAME,
    DeprojectorFileError,
    check_tensor_names,
    read_json_file,
)

WEIGHTS_NAME = "pytorch_model.bin"
_LAYER_PREFIX = "encoder_layer."
_OFF_FLAGS = ("relative_to_null", "relative_to_prev", "apply_mlp_to_input")


def is_v1_layout(folder: str | Path) -> bool:
    """True when ``folder`` holds ``pytorch_model.bin`` and no ``model.safetensors``."""
    folder = Path(folder)
    return (folder / WEIGHTS_NAME).is_file() and not (folder / "model.safetensors").exists()


def _int_field(path: Path, data: dict, name: str, default: int | None = None) -> int:
    value = data.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise DeprojectorFileError(f"{path}: {name} must be an integer, got {value!r:.60}")
    return value


def v1_config(path: Path, data: Any) -> Any:
    """The :class:`DeprojectorConfig` a v1 ``config.json`` (a CLIPTextConfig) describes.

    Raises:
        DeprojectorFileError: not an object, a missing/bad field, a later-version flag.
    """
    from sdstack.text.deprojector import DeprojectorError
    from sdstack.text.deprojector.model import DeprojectorConfig

    if not isinstance(data, dict):
        raise DeprojectorFileError(f"{path}: expected a JSON object (a CLIPTextConfig)")
    ensemble = _int_field(path, data, "ensemble_size", 1)
    if ensemble != 1:
        raise DeprojectorFileError(
            f"{path}: ensemble_size {ensemble}: only the v1 layout (one layer) can be read"
        )
    for flag in _OFF_FLAGS:
        if data.get(flag, False) is not False:
            raise DeprojectorFileError(
                f"{path}: {flag} is {data[flag]!r:.40}; only the v1 layout ({flag} false) "
                "can be read"
            )
    eps = data.get("layer_norm_eps", 1e-5)
    width = _int_field(path, data, "hidden_size")
    try:
        return DeprojectorConfig(
            width=width,
            heads=_int_field(path, data, "num_attention_heads"),
            intermediate_size=_int_field(path, data, "intermediate_size"),
            layers=1,
            layer_norm_eps=eps,
            hidden_act=data.get("hidden_act", "quick_gelu"),
            positions=_int_field(path, data, "max_position_embeddings", 77),
            clip_skip=1,
            decoder="autoregressive",
            relative_to_null=False,
            embedding="text_embeds",
            embedding_dim=_int_field(path, data, "projection_dim", width),
        ).check()
    except DeprojectorError as error:
        raise DeprojectorFileError(f"{path}: {error}") from None


def _expected_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """v1 key -> shape for ``config`` (``null_embed`` and ``position_ids`` not included)."""
    w, e, i, p = config.width, config.embedding_dim, config.intermediate_size, config.positions
    shapes: dict[str, tuple[int, ...]] = {
        "projection.weight": (w, e),
        "position_embedding.weight": (p, w),
        "final_layer_norm.weight": (w,),
        "final_layer_norm.bias": (w,),
        "sos_embed": (w,),
    }
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        shapes[f"{_LAYER_PREFIX}self_attn.{name}.weight"] = (w, w)
        shapes[f"{_LAYER_PREFIX}self_attn.{name}.bias"] = (w,)
    for name in ("layer_norm1", "layer_norm2"):
        shapes[f"{_LAYER_PREFIX}{name}.weight"] = (w,)
        shapes[f"{_LAYER_PREFIX}{name}.bias"] = (w,)
    shapes[f"{_LAYER_PREFIX}mlp.fc1.weight"] = (i, w)
    shapes[f"{_LAYER_PREFIX}mlp.fc1.bias"] = (i,)
    shapes[f"{_LAYER_PREFIX}mlp.fc2.weight"] = (w, i)
    shapes[f"{_LAYER_PREFIX}mlp.fc2.bias"] = (w,)
    return shapes


def _read_weights(path: Path, config: Any) -> dict[str, Any]:
    """The v1 tensors, float32, names and shapes checked, values finite."""
    import torch

    from sdstack.models.torch_file import TorchFileError, load_torch_file

    try:
        state = load_torch_file(path, mapped=False)
    except FileNotFoundError:
        raise DeprojectorFileError(f"{path}: missing (expected the v1 weights)") from None
    except TorchFileError as error:
        raise DeprojectorFileError(str(error)) from None
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise DeprojectorFileError(f"{path}: expected a state dict of named tensors")
    expected = _expected_shapes(config)
    optional = {"null_embed": (config.width,), "position_ids": None}
    found = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise DeprojectorFileError(f"{path}: {key!r:.80} is not a tensor")
        if key in optional:
            continue
        dtype = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
        found[key] = (dtype.get(value.dtype, str(value.dtype)), tuple(value.shape))
    check_tensor_names(path, found, expected)
    out = {}
    for key in [*expected, "null_embed"]:
        if key not in state:
            continue
        tensor = state[key].to(torch.float32)
        if key == "null_embed" and tuple(tensor.shape) != (config.width,):
            raise DeprojectorFileError(
                f"{path}: null_embed has shape {list(tensor.shape)}, expected [{config.width}]"
            )
        if not bool(torch.isfinite(tensor).all()):
            raise DeprojectorFileError(f"{path}: tensor {key!r} holds NaN or infinite values")
        out[key] = tensor
    return out


def load_v1_layout(folder: str | Path, *, text_encoder: Any = None, tokenizer: Any = None) -> Any:
    """A :class:`~sdstack.text.deprojector.model.Deprojector` from a v1 folder (see above).

    Raises:
        DeprojectorFileError: missing, corrupt or hostile files; a later-version layout.
    """
    import torch

    from sdstack.text.deprojector.config import inverse_projection
    from sdstack.text.deprojector.model import Deprojector, clip_outputs

    folder = Path(folder)
    # 1. config and weights, checked
    config = v1_config(folder / CONFIG_NAME, read_json_file(folder / CONFIG_NAME, "v1 config"))
    weights = _read_weights(folder / WEIGHTS_NAME, config)
    # 2. the frozen projection pair: the file holds the inverse; invert it back
    inverse = weights["projection.weight"].double()
    projection, condition = inverse_projection(inverse, config.embedding_dim)
    config.condition_number = condition
    model = Deprojector(config)
    state = {
        "position_embedding": weights["position_embedding.weight"],
        "final_layer_norm.weight": weights["final_layer_norm.weight"],
        "final_layer_norm.bias": weights["final_layer_norm.bias"],
        "bos": weights["sos_embed"],
        "inverse_projection": weights["projection.weight"],
        "projection": projection.float(),
        "null": torch.zeros(config.embedding_dim),
    }
    for key, tensor in weights.items():
        if key.startswith(_LAYER_PREFIX):
            state["stacks.0.layers.0." + key.removeprefix(_LAYER_PREFIX)] = tensor
    model.load_state_dict(state, strict=True)
    # 3. the null embedding: from the file, else from the CLIP, else zero (warned)
    with torch.no_grad():
        if "null_embed" in weights and bool(weights["null_embed"].any()):
            model.null.copy_(model.embedding_from_pooled(weights["null_embed"]))
            warnings.warn(
                f"v1 deprojector {folder} stores a null embedding: it may have been trained "
                "on the author's relative layout [null, e - null, h_1 - null, ...], which "
                "sdstack does not run; it is read as the v1 layout [e, h_0, ...]",
                SdstackWarning,
                stacklevel=2,
            )
        elif text_encoder is not None and tokenizer is not None:
            pooled, _ = clip_outputs(text_encoder, tokenizer, [""], 1)
            model.null.copy_(model.embedding_from_pooled(pooled[0].float().cpu()))
        else:
            warnings.warn(
                f"v1 deprojector {folder} stores no null embedding; embedding arithmetic "
                "centres on zero instead of the empty prompt (pass text_encoder and "
                "tokenizer to compute it)",
                SdstackWarning,
                stacklevel=2,
            )
    return model.eval()
