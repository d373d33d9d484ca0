"""One layer of an SD1.x model under every name in use, and the map from those names to it.

A :class:`Layer` is a module that holds parameters itself (a ``Linear``, ``Conv2d``, norm or
embedding). Its identity is :attr:`Layer.key`, ``"<component>:<module>"``; the other names
are derived from the module path and the LDM path:

==========  ========================================================================
scheme      example (``unet:down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``)
==========  ========================================================================
diffusers   ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``
LDM         ``model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q``
kohya       ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``
compvis     ``lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q``
webui       ``diffusion_model_input_blocks_1_1_transformer_blocks_0_attn1_to_q``
PEFT        ``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``
==========  ========================================================================

The text encoder's module path always carries ``text_model.`` (as checkpoints and kohya
spell it: ``text_model.encoder.layers.0.self_attn.q_proj``); :meth:`KeyMap.find` also takes
the transformers-5 spellings without it (``text_encoder.encoder.layers.0...``). The
reference UI's ``network_layer_mapping`` names (webui) are the LDM path without its leading
``model.`` / ``cond_stage_model.``, dots as underscores; compvis names are kohya's prefix
over the LDM UNet path.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from sdstack.models.key_map.blocks import COMPONENTS, KeyMapError, lbw_index
from sdstack.models.key_map.ldm import TEXT_MODEL, TEXT_PREFIX, UNET_PREFIX

KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_", "vae": "lora_vae_"}
PEFT_PREFIXES = {"unet": "unet.", "text_encoder": "text_encoder.", "vae": "vae."}
LDM_PREFIXES = {"unet": UNET_PREFIX, "text_encoder": TEXT_PREFIX, "vae": "first_stage_model."}
KINDS = ("linear", "conv", "norm", "embedding", "other")


def _underscored(name: str) -> str:
    return name.replace(".", "_")


@dataclass(frozen=True)
class Layer:
    """One module of the model that holds parameters, named in every scheme.

    Attributes:
        component: ``"unet"``, ``"text_encoder"`` or ``"vae"``.
        module: the diffusers/transformers module path in the component (text encoder with
            ``text_model.`` first).
        ldm: the module path in an SD1 single-file checkpoint, with its prefix.
        params: ``(leaf, shape)`` of each parameter, diffusers layout (``("weight", (320,
            320))``).
        kind: ``"linear"``, ``"conv"``, ``"norm"``, ``"embedding"`` or ``"other"``.
        block: the merge block (``MERGE_BLOCKS``): ``BASE`` outside the UNet.
        conv1x1: LDM stores the weight as ``[C, C, 1, 1]`` (VAE mid-block attention).
    """

    component: str
    module: str
    ldm: str
    params: tuple[tuple[str, tuple[int, ...]], ...]
    kind: str
    block: str
    conv1x1: bool = False

    @property
    def key(self) -> str:
        """``"<component>:<module>"``: the identity patcher, caches and LoRA modules use."""
        return f"{self.component}:{self.module}"

    @property
    def kohya(self) -> str:
        """kohya-ss name: ``lora_unet_``/``lora_te_``/``lora_vae_`` + module, ``_`` for ``.``."""
        return KOHYA_PREFIXES[self.component] + _underscored(self.module)

    @property
    def compvis(self) -> str:
        """The reference UI's ``lora_unet_<LDM path>`` name (UNet); kohya's name otherwise."""
        if self.component != "unet":
            return self.kohya
        return KOHYA_PREFIXES["unet"] + _underscored(self.ldm[len(UNET_PREFIX) :])

    @property
    def webui(self) -> str:
        """The reference UI's ``network_layer_mapping`` name (LDM path after ``model.`` or
        ``cond_stage_model.``, ``_`` for ``.``)."""
        name = self.ldm
        for prefix in ("model.", "cond_stage_model."):
            if name.startswith(prefix):
                name = name[len(prefix) :]
                break
        return _underscored(name)

    @property
    def peft(self) -> str:
        """diffusers/PEFT name: ``unet.`` / ``text_encoder.`` / ``vae.`` + module."""
        return PEFT_PREFIXES[self.component] + self.module

    @property
    def lbw_block(self) -> str | None:
        """``block`` if it is one of the 17 ``LBW_BLOCKS``, else None."""
        return self.block if lbw_index(self.block) is not None else None

    @property
    def lbw_index(self) -> int | None:
        """The position of ``block`` in ``LBW_BLOCKS`` (0 = BASE), None if LBW skips it."""
        return lbw_index(self.block)

    @property
    def param_names(self) -> tuple[str, ...]:
        """The parameter leaves, ``("weight", "bias")`` or ``("weight",)``."""
        return tuple(leaf for leaf, _ in self.params)

    def shape(self, leaf: str) -> tuple[int, ...]:
        """The diffusers-layout shape of parameter ``leaf`` (KeyError if it has none)."""
        return dict(self.params)[leaf]

    def ldm_shape(self, leaf: str) -> tuple[int, ...]:
        """The shape of ``leaf`` in a single-file checkpoint (``[C, C, 1, 1]`` when conv1x1)."""
        shape = self.shape(leaf)
        return (*shape, 1, 1) if self.conv1x1 and leaf == "weight" else shape

    def aliases(self) -> tuple[str, ...]:
        """Every name :meth:`KeyMap.find` accepts for this layer (the key first)."""
        names = [self.key, self.module, self.peft, self.kohya, self.compvis, self.webui]
        names += [self.ldm, self.ldm[len(LDM_PREFIXES[self.component]) :]]
        if self.component == "text_encoder" and self.module.startswith(TEXT_MODEL):
            short = self.module[len(TEXT_MODEL) :]  # transformers 5 spelling
            names += [f"text_encoder:{short}", short, PEFT_PREFIXES["text_encoder"] + short]
            names += [TEXT_PREFIX + short, "transformer_" + _underscored(short)]
        return tuple(dict.fromkeys(names))


class UnknownLayerError(KeyMapError, KeyError):
    """``KeyMap[key]`` for a key that is no layer's (a ``KeyError`` and an SdstackError)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class KeyMap:
    """All layers of one architecture, found by any of their names in O(1).

    Raises (on construction):
        KeyMapError: two layers with one key, or one name that would mean two layers.
    """

    def __init__(self, layers: Iterable[Layer]) -> None:
        self.layers: tuple[Layer, ...] = tuple(layers)
        self._by_key: dict[str, Layer] = {}
        self._names: dict[str, Layer] = {}
        self._components: dict[str, list[Layer]] = {name: [] for name in COMPONENTS}
        for layer in self.layers:
            if layer.key in self._by_key:
                raise KeyMapError(f"key map: layer {layer.key!r} appears twice")
            self._by_key[layer.key] = layer
            self._components[layer.component].append(layer)
            for name in layer.aliases():
                other = self._names.setdefault(name, layer)
                if other is not layer:
                    raise KeyMapError(
                        f"key map: name {name!r} would mean both {other.key!r} and {layer.key!r}"
                    )

    def find(self, name: str) -> Layer | None:
        """The layer any of whose names (:meth:`Layer.aliases`) is ``name``, else None."""
        return self._names.get(name)

    def find_tensor(self, key: str) -> tuple[Layer, str] | None:
        """``(layer, leaf)`` for a parameter name in any scheme (``"<name>.<leaf>"``), else
        None: ``model.diffusion_model.out.2.weight`` -> (the ``conv_out`` layer, "weight")."""
        name, _, leaf = key.rpartition(".")
        layer = self._names.get(name)
        if layer is None or leaf not in layer.param_names:
            return None
        return layer, leaf

    def __getitem__(self, key: str) -> Layer:
        """The layer whose :attr:`Layer.key` is ``key``.

        Raises:
            UnknownLayerError: (a KeyError) no such layer; names the nearest keys.
        """
        try:
            return self._by_key[key]
        except KeyError:
            near = difflib.get_close_matches(str(key), list(self._by_key), n=3)
            hint = f"; did you mean {', '.join(map(repr, near))}?" if near else ""
            raise UnknownLayerError(
                f"layer {key!r:.120}: not in this key map; expected a layer key "
                f"'<component>:<module>' such as 'unet:conv_in'{hint}"
            ) from None

    def component(self, name: str) -> list[Layer]:
        """The layers of ``"unet"``, ``"text_encoder"`` or ``"vae"``, in module order.

        Raises:
            KeyMapError: another component name.
        """
        if name not in self._components:
            raise KeyMapError(f"component {name!r}: expected one of {', '.join(COMPONENTS)}")
        return list(self._components[name])

    def __contains__(self, key: object) -> bool:
        return key in self._by_key

    def __iter__(self) -> Iterator[Layer]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        counts = ", ".join(f"{name} {len(self._components[name])}" for name in COMPONENTS)
        return f"KeyMap({len(self.layers)} layers: {counts})"
