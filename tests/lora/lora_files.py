"""Deterministic LoRA / LyCORIS test files for a given model, in every format sdstack reads.

Every tensor comes from a ``torch.Generator`` seeded from ``seed`` and the layer's place
in the list, so the same call writes the same bytes. The layers are named by
``Layer.key`` and exist in the tiny models (``sdstack.models.tiny``) and in SD 1.5, so the
files fit any SD1-shaped model; shapes come from ``key_map_of(components)``.

Writers return the path written (``.safetensors``; ``.pt``/``.bin`` through ``torch.save``
when the path says so). ``lora_state`` and friends return the state dict instead, for
tests that edit a file before writing it (``save``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

LINEAR_LAYERS = (
    "unet:down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "unet:down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "unet:down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
    "unet:down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "unet:up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_v",
    "unet:mid_block.attentions.0.transformer_blocks.0.attn1.to_k",
    "text_encoder:text_model.encoder.layers.0.self_attn.q_proj",
    "text_encoder:text_model.encoder.layers.1.self_attn.out_proj",
    "text_encoder:text_model.encoder.layers.2.mlp.fc1",
)
"""Linear layers: attention, cross-attention (context width), feed-forward, CLIP."""
CONV1X1_LAYERS = (
    "unet:down_blocks.1.attentions.0.proj_in",
    "unet:down_blocks.1.resnets.0.conv_shortcut",
)
CONV3X3_LAYERS = (
    "unet:down_blocks.0.resnets.0.conv1",
    "unet:mid_block.resnets.0.conv2",
    "unet:up_blocks.1.resnets.2.conv1",
)
NORM_LAYERS = (
    "unet:down_blocks.1.attentions.0.norm",
    "unet:down_blocks.1.attentions.0.transformer_blocks.0.norm1",
    "text_encoder:text_model.encoder.layers.0.layer_norm1",
)
ATTENTION_PROJECTIONS = (  # attn-procs form: these four of one UNet block and one CLIP layer
    "unet:down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "unet:down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k",
    "unet:down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v",
    "unet:down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0",
    "text_encoder:text_model.encoder.layers.0.self_attn.q_proj",
    "text_encoder:text_model.encoder.layers.0.self_attn.out_proj",
)
KOHYA_LAYERS = LINEAR_LAYERS + CONV1X1_LAYERS + CONV3X3_LAYERS


def key_map(components: Any) -> Any:
    from sdstack.models.key_map import key_map_of

    return key_map_of(components)


def generator(seed: int, index: int) -> torch.Generator:
    """The generator of layer ``index`` of a file written with ``seed``."""
    return torch.Generator().manual_seed(1000 * seed + index)


def randn(shape: Iterable[int], gen: torch.Generator, std: float = 0.2) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=gen) * std


def save(
    path: Path, state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``state`` to ``path``: safetensors (with ``metadata``) or ``torch.save``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in state.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(path), metadata=dict(metadata or {}))
    else:
        torch.save(tensors, path)
    return path


def lora_parts(
    weight: tuple[int, ...], rank: int, gen: torch.Generator, tucker: bool = False
) -> dict[str, torch.Tensor]:
    """kohya LoRA/LoCon parts for a layer: down ``[r, in(, k, k)]``, up ``[out, r(, 1, 1)]``;
    Tucker: down ``[r, in, 1, 1]``, mid ``[r, r, k, k]``, up ``[out, r, 1, 1]``."""
    out, inp, *kernel = weight
    conv = bool(kernel)
    if tucker:
        return {
            "lora_down.weight": randn((rank, inp, 1, 1), gen),
            "lora_mid.weight": randn((rank, rank, *kernel), gen),
            "lora_up.weight": randn((out, rank, 1, 1), gen),
        }
    return {
        "lora_down.weight": randn((rank, inp, *kernel), gen),
        "lora_up.weight": randn((out, rank, 1, 1) if conv else (out, rank), gen),
    }


def layer_name(layer: Any, naming: str) -> str:
    """The module name of ``layer`` in a naming: kohya, compvis, webui or peft."""
    return getattr(layer, naming)


def lora_state(
    components: Any,
    *,
    layers: Iterable[str] = KOHYA_LAYERS,
    rank: int = 4,
    alpha: float | None = 2.0,
    seed: int = 0,
    naming: str = "kohya",
    tucker: bool = False,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """A kohya-style LoRA state dict (``naming``: kohya, compvis or webui module names).

    ``tucker`` writes 3x3 conv layers with ``lora_mid``; ``alpha`` None writes no alpha.
    """
    keys = key_map(components)
    state: dict[str, torch.Tensor] = {}
    for index, key in enumerate(layers):
        layer = keys[key]
        weight = layer.shape("weight")
        conv3 = len(weight) == 4 and weight[2:] != (1, 1)
        parts = lora_parts(weight, rank, generator(seed, index), tucker=tucker and conv3)
        name = layer_name(layer, naming)
        for part, tensor in parts.items():
            state[f"{name}.{part}"] = tensor.to(dtype)
        if alpha is not None:
            state[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    return state


def write_kohya(
    path: Path, components: Any, metadata: Mapping[str, str] | None = None, **options: Any
) -> Path:
    """A kohya LoRA/LoCon file (linear, 1x1 and 3x3 conv layers; see ``lora_state``)."""
    return save(path, lora_state(components, **options), metadata)


def peft_state(
    components: Any,
    *,
    layers: Iterable[str] = KOHYA_LAYERS,
    rank: int = 4,
    seed: int = 0,
    prefixed: bool = True,
    ranks: Mapping[str, int] | None = None,
) -> dict[str, torch.Tensor]:
    """diffusers/PEFT keys ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` (the text
    encoder spelled ``text_encoder.text_model.encoder...``); the same tensors as
    ``lora_state`` with the same seed. ``prefixed`` False drops ``unet.``/``text_encoder.``
    (a single model's ``save_lora_adapter``); ``ranks`` gives some layers another rank."""
    keys = key_map(components)
    state: dict[str, torch.Tensor] = {}
    for index, key in enumerate(layers):
        layer = keys[key]
        parts = lora_parts(
            layer.shape("weight"), (ranks or {}).get(key, rank), generator(seed, index)
        )
        name = layer.peft if prefixed else layer.module
        state[f"{name}.lora_A.weight"] = parts["lora_down.weight"]
        state[f"{name}.lora_B.weight"] = parts["lora_up.weight"]
    return state


def peft_module_name(layer: Any) -> str:
    """The module path PEFT sees inside the component (transformers 5: no ``text_model.``)."""
    return layer.module.removeprefix("text_model.")


def adapter_metadata(
    components: Any,
    *,
    layers: Iterable[str] = KOHYA_LAYERS,
    rank: int = 4,
    lora_alpha: float = 8.0,
    alpha_pattern: Mapping[str, float] | None = None,
    rank_pattern: Mapping[str, int] | None = None,
    use_rslora: bool = False,
) -> dict[str, str]:
    """The ``lora_adapter_metadata`` diffusers writes for a pipeline (fields prefixed by
    component). ``alpha_pattern``/``rank_pattern`` are keyed by ``Layer.key``."""
    keys = key_map(components)
    chosen = [keys[key] for key in layers]
    fields: dict[str, Any] = {}
    for component in ("unet", "text_encoder"):
        mine = [layer for layer in chosen if layer.component == component]
        if not mine:
            continue
        by_name = {layer.key: peft_module_name(layer) for layer in mine}
        config = {
            "r": rank,
            "lora_alpha": lora_alpha,
            "target_modules": sorted(by_name.values()),
            "alpha_pattern": {
                by_name[k]: v for k, v in (alpha_pattern or {}).items() if k in by_name
            },
            "rank_pattern": {
                by_name[k]: v for k, v in (rank_pattern or {}).items() if k in by_name
            },
            "use_rslora": use_rslora,
            "use_dora": False,
            "lora_dropout": 0.0,
            "init_lora_weights": True,
            "bias": "none",
        }
        fields.update({f"{component}.{name}": value for name, value in config.items()})
    return {"format": "pt", "lora_adapter_metadata": json.dumps(fields, indent=2, sort_keys=True)}


def write_peft(
    path: Path, components: Any, *, metadata: bool = True, prefixed: bool = True, **options: Any
) -> Path:
    """A diffusers/PEFT LoRA: ``peft_state`` plus, when ``metadata``, the adapter metadata
    (``adapter_metadata``'s options: lora_alpha, alpha_pattern, rank_pattern, use_rslora)."""
    state_options = {k: options.pop(k) for k in ("layers", "rank", "seed") if k in options}
    ranks = options.get("rank_pattern")
    state = peft_state(components, prefixed=prefixed, ranks=ranks, **state_options)
    meta = None
    if metadata:
        meta = adapter_metadata(
            components, **{k: v for k, v in state_options.items() if k != "seed"}, **options
        )
    return save(path, state, meta)


def attn_procs_state(components: Any, *, rank: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """The older diffusers attention-processor form, ``...attn1.processor.to_q_lora.down
    .weight`` (UNet, no prefix) and ``text_encoder...self_attn.to_q_lora.down.weight``;
    same tensors as ``lora_state(layers=ATTENTION_PROJECTIONS)``."""
    keys = key_map(components)
    state: dict[str, torch.Tensor] = {}
    for index, key in enumerate(ATTENTION_PROJECTIONS):
        layer = keys[key]
        parts = lora_parts(layer.shape("weight"), rank, generator(seed, index))
        parent, _, leaf = layer.module.rpartition(".")
        if leaf == "0":  # to_out.0
            parent, _, leaf = parent.rpartition(".")
        proj = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out"}.get(
            leaf, leaf
        )
        if layer.component == "unet":
            name = f"{parent}.processor.{proj}_lora"
        else:
            name = f"text_encoder.{parent}.{proj}_lora"
        state[f"{name}.down.weight"] = parts["lora_down.weight"]
        state[f"{name}.up.weight"] = parts["lora_up.weight"]
    return state


LOHA_LAYERS = (
    LINEAR_LAYERS[0],
    LINEAR_LAYERS[2],
    LINEAR_LAYERS[6],
    CONV3X3_LAYERS[0],
    CONV1X1_LAYERS[0],
)


def loha_state(
    components: Any, *, rank: int = 4, alpha: float = 2.0, seed: int = 0, tucker: bool = False
) -> dict[str, torch.Tensor]:
    """LoHa (``hada_w1_a``...); ``tucker`` writes 3x3 convs with ``hada_t1``/``hada_t2``."""
    keys = key_map(components)
    state: dict[str, torch.Tensor] = {}
    for index, key in enumerate(LOHA_LAYERS):
        layer, gen = keys[key], generator(seed, index)
        out, inp, *kernel = layer.shape("weight")
        use_tucker = tucker and kernel not in ([], [1, 1])
        for i in (1, 2):
            if use_tucker:
                state[f"{layer.kohya}.hada_w{i}_a"] = randn((rank, out), gen)
                state[f"{layer.kohya}.hada_w{i}_b"] = randn((rank, inp), gen)
                state[f"{layer.kohya}.hada_t{i}"] = randn((rank, rank, *kernel), gen)
            else:
                state[f"{layer.kohya}.hada_w{i}_a"] = randn((out, rank), gen)
                state[f"{layer.kohya}.hada_w{i}_b"] = randn((rank, inp * math.prod(kernel)), gen)
        state[f"{layer.kohya}.alpha"] = torch.tensor(alpha)
    return state


LOKR_LAYERS = (LINEAR_LAYERS[0], LINEAR_LAYERS[2], LINEAR_LAYERS[6], CONV3X3_LAYERS[1])


def _lokr_split(size: int) -> tuple[int, int]:
    factor = next(f for f in (8, 4, 2, 1) if size % f == 0)
    return factor, size // factor


def lokr_state(
    components: Any,
    *,
    rank: int = 2,
    alpha: float = 1.0,
    seed: int = 0,
    decomposed: bool = False,
    tucker: bool = False,
) -> dict[str, torch.Tensor]:
    """LoKr: full ``lokr_w1``/``lokr_w2``, or (``decomposed``) ``lokr_w1`` full with
    ``lokr_w2_a @ lokr_w2_b`` (and ``lokr_w1_a @ lokr_w1_b`` on linear layers);
    ``tucker`` writes the conv layer's ``w2`` as ``lokr_t2`` + factors."""
    keys = key_map(components)
    state: dict[str, torch.Tensor] = {}
    for index, key in enumerate(LOKR_LAYERS):
        layer, gen = keys[key], generator(seed, index)
        out, inp, *kernel = layer.shape("weight")
        (a, c), (b, d) = _lokr_split(out), _lokr_split(inp)
        name = layer.kohya
        if decomposed and not kernel:
            state[f"{name}.lokr_w1_a"] = randn((a, 1), gen)
            state[f"{name}.lokr_w1_b"] = randn((1, b), gen)
        else:
            state[f"{name}.lokr_w1"] = randn((a, b), gen)
        if kernel and tucker:
            state[f"{name}.lokr_t2"] = randn((rank, rank, *kernel), gen)
            state[f"{name}.lokr_w2_a"] = randn((rank, c), gen)
            state[f"{name}.lokr_w2_b"] = randn((rank, d), gen)
        elif decomposed:
            state[f"{name}.lokr_w2_a"] = randn((c, rank), gen)
            state[f"{name}.lokr_w2_b"] = randn((rank, d * math.prod(kernel)), gen)
        else:
            state[f"{name}.lokr_w2"] = randn((c, d, *kernel), gen)
        state[f"{name}.alpha"] = torch.tensor(alpha)
    return state


def full_state(components: Any, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """LyCORIS full: ``diff`` (and ``diff_b`` where the layer has a bias)."""
    keys = key_map(components)
    state: dict[str, torch.Tensor] = {}
    for index, key in enumerate(
        (LINEAR_LAYERS[0], LINEAR_LAYERS[1], LINEAR_LAYERS[7], CONV3X3_LAYERS[0])
    ):
        layer, gen = keys[key], generator(seed, index)
        state[f"{layer.kohya}.diff"] = randn(layer.shape("weight"), gen, 0.05)
        if "bias" in layer.param_names:
            state[f"{layer.kohya}.diff_b"] = randn(layer.shape("bias"), gen, 0.05)
    return state


def norm_state(components: Any, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """LyCORIS norm: ``w_norm`` + ``b_norm`` on GroupNorm and LayerNorm layers."""
    keys = key_map(components)
    state: dict[str, torch.Tensor] = {}
    for index, key in enumerate(NORM_LAYERS):
        layer, gen = keys[key], generator(seed, index)
        state[f"{layer.kohya}.w_norm"] = randn(layer.shape("weight"), gen, 0.05)
        state[f"{layer.kohya}.b_norm"] = randn(layer.shape("bias"), gen, 0.05)
    return state


def ia3_state(components: Any, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """IA3: ``weight`` per output row (attn2.to_k, CLIP q_proj) or per input column
    (``on_input`` true: ff.net.0.proj, a 3x3 conv)."""
    keys = key_map(components)
    state: dict[str, torch.Tensor] = {}
    chosen = (
        (LINEAR_LAYERS[2], False),
        (LINEAR_LAYERS[6], False),
        (LINEAR_LAYERS[3], True),
        (CONV3X3_LAYERS[0], True),
    )
    for index, (key, on_input) in enumerate(chosen):
        layer, gen = keys[key], generator(seed, index)
        weight = layer.shape("weight")
        state[f"{layer.kohya}.weight"] = randn((weight[1] if on_input else weight[0],), gen)
        state[f"{layer.kohya}.on_input"] = torch.tensor(on_input)
    return state


DORA_LAYERS = (
    LINEAR_LAYERS[0],
    LINEAR_LAYERS[2],
    LINEAR_LAYERS[6],
    CONV3X3_LAYERS[0],
    CONV1X1_LAYERS[0],
)


def dora_state(
    components: Any, *, rank: int = 4, alpha: float = 2.0, seed: int = 0, wd_on_output: bool = False
) -> dict[str, torch.Tensor]:
    """LoRA + ``dora_scale``: ``(1, in, 1...)`` magnitudes (per input column, the
    reference UI's form), or ``(out, 1, 1...)`` with ``wd_on_output`` (LyCORIS)."""
    keys = key_map(components)
    state = lora_state(components, layers=DORA_LAYERS, rank=rank, alpha=alpha, seed=seed)
    for index, key in enumerate(DORA_LAYERS):
        layer, gen = keys[key], generator(seed + 1, index)
        out, inp, *kernel = layer.shape("weight")
        ones = (1,) * len(kernel)
        shape = (out, 1, *ones) if wd_on_output else (1, inp, *ones)
        state[f"{layer.kohya}.dora_scale"] = 1 + randn(shape, gen, 0.1)
    return state


def bundle_state(components: Any, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Embeddings in every ``bundle_emb`` form: ``string_to_param.*`` (3 vectors),
    ``emb_params`` (2), one other key (1), a ``(width,)`` vector."""
    width = key_map(components)["text_encoder:text_model.embeddings.token_embedding"].shape(
        "weight"
    )[1]
    gen = generator(seed, 99)
    return {
        "bundle_emb.starry.string_to_param.*": randn((3, width), gen),
        "bundle_emb.paramed.emb_params": randn((2, width), gen),
        "bundle_emb.concept.<concept>": randn((1, width), gen),
        "bundle_emb.vector.emb_params": randn((width,), gen),
    }


def sdxl_like_state(
    *, with_text: bool = True, rank: int = 4, seed: int = 0
) -> dict[str, torch.Tensor]:
    """An SDXL kohya LoRA's keys: ``lora_te1_``/``lora_te2_`` (768 and 1280 wide) and a
    cross-attention fed 2048-wide context (``with_text`` False: the UNet part only)."""
    gen = generator(seed, 0)
    state = {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": randn(
            (rank, 2048), gen
        ),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight": randn(
            (640, rank), gen
        ),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.alpha": torch.tensor(1.0),
    }
    if with_text:
        for prefix, width in (("lora_te1_", 768), ("lora_te2_", 1280)):
            name = f"{prefix}text_model_encoder_layers_0_self_attn_q_proj"
            state[f"{name}.lora_down.weight"] = randn((rank, width), gen)
            state[f"{name}.lora_up.weight"] = randn((width, rank), gen)
    return dict(sorted(state.items()))


def sd2_like_state(*, rank: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """An SD 2.x kohya LoRA's keys: text-encoder layers 0..22, 1024 wide (OpenCLIP
    ViT-H), cross-attention fed 1024-wide context."""
    gen = generator(seed, 0)
    state = {}
    for index in (0, 22):
        name = f"lora_te_text_model_encoder_layers_{index}_self_attn_q_proj"
        state[f"{name}.lora_down.weight"] = randn((rank, 1024), gen)
        state[f"{name}.lora_up.weight"] = randn((1024, rank), gen)
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    state[f"{name}.lora_down.weight"] = randn((rank, 1024), gen)
    state[f"{name}.lora_up.weight"] = randn((640, rank), gen)
    return state
