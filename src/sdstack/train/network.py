"""A trainable kohya LoRA / LoCon over a loaded SD1.x model (kohya sd-scripts ``networks.lora``).

:class:`TrainableLora` finds the layers kohya's ``networks.lora`` wraps and adds one
:class:`LoraModule` to each through a forward hook (the model's own modules and weights are
never touched, so gradient checkpointing recomputes the hooked forward and :meth:`remove`
leaves the model bit for bit as it was):

- UNet: every ``Linear`` / ``Conv2d`` child of a ``Transformer2DModel`` (attention
  ``to_q/k/v/out.0``, ``proj_in``/``proj_out``, ``ff``); with ``network="locon"`` also the
  children of ``ResnetBlock2D`` / ``Downsample2D`` / ``Upsample2D`` (3x3 convs at
  ``conv_rank``/``conv_alpha``; their ``Linear`` and 1x1 convs at ``rank``/``alpha``).
- Text encoder: every ``Linear`` child of ``CLIPAttention`` / ``CLIPSdpaAttention`` /
  ``CLIPMLP``.

Names are the key map's kohya names (``lora_unet_..._attn1_to_q``,
``lora_te_text_model_encoder_layers_0_self_attn_q_proj``). Each module computes
``org(x) + up(down(x)) * multiplier * alpha / rank``, initialised with
``kaiming_uniform_(down, a=sqrt(5))`` and ``zeros_(up)`` so the network starts as the
identity.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from sdstack.errors import SdstackError, UnknownNameError
from sdstack.registry import Registry

UNET_TARGETS = ("Transformer2DModel",)
UNET_CONV_TARGETS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_ENCODER_TARGETS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")
NETWORK_MODULE = "networks.lora"
"""What kohya writes as ``ss_network_module`` for both kinds (LoCon = ``conv_dim`` set)."""


class TrainNetworkError(SdstackError):
    """A LoRA network that cannot be built or loaded: a bad rank/alpha, a state dict whose
    keys, shapes or alphas do not match the network."""


class UnknownNetworkError(UnknownNameError, TrainNetworkError):
    """A ``network`` name that is not registered (lists the nearest)."""


@dataclass(frozen=True)
class NetworkKind:
    """One kind of trainable network.

    Attributes:
        name: the registered name ("lora", "locon").
        unet_targets: class names of the UNet modules whose children are wrapped.
        convs: 3x3 convs are wrapped (at ``conv_rank``/``conv_alpha``).
    """

    name: str
    unet_targets: tuple[str, ...]
    convs: bool


NETWORKS: Registry[NetworkKind] = Registry("network", UnknownNetworkError)
NETWORKS.register("lora", NetworkKind("lora", UNET_TARGETS, False))
NETWORKS.register("locon", NetworkKind("locon", UNET_TARGETS + UNET_CONV_TARGETS, True))


class LoraModule(torch.nn.Module):
    """kohya's ``LoRAModule``: ``delta(x) = up(down(x)) * multiplier * alpha / rank``.

    Linear: down ``Linear(in, r)``, up ``Linear(r, out)``, no bias. Conv: down
    ``Conv2d(in, r, k, stride, padding)``, up ``Conv2d(r, out, 1x1)``, no bias. ``alpha`` is
    a Python float (saved as the scalar ``<name>.alpha``), never rounded to the LoRA dtype.

    Attributes:
        name: the kohya name.
        layer: the key-map ``Layer`` it wraps.
        rank, alpha, scale: ``r``, ``alpha`` and ``alpha / r``.
    """

    def __init__(self, name: str, layer: Any, org: Any, rank: int, alpha: float) -> None:
        super().__init__()
        self.name = name
        self.layer = layer
        self.rank = rank
        if isinstance(org, torch.nn.Conv2d):
            self.lora_down = torch.nn.Conv2d(
                org.in_channels, rank, org.kernel_size, org.stride, org.padding, bias=False
            )
            self.lora_up = torch.nn.Conv2d(rank, org.out_channels, (1, 1), (1, 1), bias=False)
        else:
            self.lora_down = torch.nn.Linear(org.in_features, rank, bias=False)
            self.lora_up = torch.nn.Linear(rank, org.out_features, bias=False)
        self.alpha = float(alpha)
        self.scale = self.alpha / rank

    def reset(self, generator: torch.Generator | None = None) -> None:
        """kohya's init: ``kaiming_uniform_(down, a=sqrt(5))``, ``zeros_(up)``."""
        with torch.no_grad():
            down = torch.empty(self.lora_down.weight.shape, dtype=torch.float32)
            torch.nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)
            self.lora_down.weight.copy_(down)
            torch.nn.init.zeros_(self.lora_up.weight)

    def delta(self, x: torch.Tensor, multiplier: float) -> torch.Tensor:
        """``up(down(x)) * multiplier * scale`` in the LoRA's dtype."""
        lx = self.lora_up(self.lora_down(x.to(self.lora_down.weight.dtype)))
        return lx * multiplier * self.scale


def _check_rank(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TrainNetworkError(f"{name} is {value!r}; expected a whole number >= 1")
    return value


def _check_alpha(name: str, value: object, rank: int) -> float:
    """kohya: alpha None or 0 means alpha = rank (scale 1)."""
    if value is None or value == 0:
        return float(rank)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TrainNetworkError(f"{name} is {value!r}; expected a number > 0 (or None: = rank)")
    if not math.isfinite(value) or value < 0:
        raise TrainNetworkError(f"{name} is {value!r}; expected a finite number > 0")
    return float(value)


def _children(root: Any, targets: tuple[str, ...]) -> Iterator[tuple[str, Any]]:
    """``(path, module)`` of each ``Linear``/``Conv2d`` under a module of a target class,
    kohya's walk (class names compared exactly), each path once."""
    seen: set[str] = set()
    for name, module in root.named_modules():
        if type(module).__name__ not in targets:
            continue
        for child_name, child in module.named_modules():
            if type(child).__name__ not in ("Linear", "Conv2d"):
                continue
            path = f"{name}.{child_name}" if name else child_name
            if path not in seen:
                seen.add(path)
                yield path, child


class TrainableLora:
    """A kohya LoRA (or LoCon) network hooked into ``components``' UNet and text encoder.

    Args:
        components: a loaded ``ModelComponents``.
        rank, alpha: ``network_dim`` / ``network_alpha`` of Linear and 1x1-conv modules
            (alpha None or 0: alpha = rank).
        network: "lora" or "locon" (``NETWORKS``).
        conv_rank, conv_alpha: LoCon's 3x3-conv rank and alpha (default: ``rank`` and
            kohya's 1.0); only with ``network="locon"``.
        train_unet, train_text_encoder: make modules for that network (kohya's
            ``--network_train_unet_only`` / ``..._text_encoder_only``).
        multiplier: the delta's multiplier (settable later as ``.multiplier``).
        seed: seeds the down-weight init (CPU generator, same on any device); None uses
            torch's global RNG as kohya does.
        dtype: the LoRA parameters' dtype (float32 for training under autocast).

    Raises:
        TrainNetworkError: a bad rank or alpha, conv settings without LoCon, nothing to
            train, a target layer missing from the key map.
        UnknownNetworkError: an unknown ``network``.
    """

    def __init__(
        self,
        components: Any,
        *,
        rank: int = 16,
        alpha: float | None = 8,
        network: str = "lora",
        conv_rank: int | None = None,
        conv_alpha: float | None = None,
        train_unet: bool = True,
        train_text_encoder: bool = True,
        multiplier: float = 1.0,
        seed: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        # 1. check the settings
        self.kind = NETWORKS[network]
        self.rank = _check_rank("rank", rank)
        self.alpha = _check_alpha("alpha", alpha, self.rank)
        if not self.kind.convs and (conv_rank is not None or conv_alpha is not None):
            raise TrainNetworkError(
                f"conv_rank={conv_rank!r}, conv_alpha={conv_alpha!r} with network "
                f"{self.kind.name!r}: the 3x3 convs are only trained by network 'locon'"
            )
        self.conv_rank = _check_rank("conv_rank", self.rank if conv_rank is None else conv_rank)
        self.conv_alpha = _check_alpha(
            "conv_alpha", 1.0 if conv_alpha is None else conv_alpha, self.conv_rank
        )
        if not (train_unet or train_text_encoder):
            raise TrainNetworkError(
                "train_unet and train_text_encoder are both False; expected at least one"
            )
        self.components = components
        self.multiplier = float(multiplier)
        self.dtype = dtype
        self._handles: list[Any] = []
        # 2. one module per target layer (text encoder first, as kohya creates them)
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        self.text_encoder_loras = self._make("text_encoder", train_text_encoder, generator)
        self.unet_loras = self._make("unet", train_unet, generator)
        # 3. hook them in
        for module in self.loras.values():
            self._hook(module)

    # -- building -------------------------------------------------------------------------

    def _make(self, component: str, wanted: bool, generator: Any) -> torch.nn.ModuleDict:
        from sdstack.models.key_map import key_map_of

        loras = torch.nn.ModuleDict()
        if not wanted:
            return loras
        key_map = key_map_of(self.components)
        root = getattr(self.components, component)
        targets = self.kind.unet_targets if component == "unet" else TEXT_ENCODER_TARGETS
        for path, org in _children(root, targets):
            layer = key_map.find(f"{component}:{path}")
            if layer is None:
                raise TrainNetworkError(
                    f"{component} module {path!r}: not in the key map of this model; "
                    "expected an SD1.x-family network"
                )
            conv3x3 = isinstance(org, torch.nn.Conv2d) and tuple(org.kernel_size) != (1, 1)
            if conv3x3 and not self.kind.convs:
                continue
            rank, alpha = (self.conv_rank, self.conv_alpha) if conv3x3 else (self.rank, self.alpha)
            module = LoraModule(layer.kohya, layer, org, rank, alpha)
            module.reset(generator)
            weight = org.weight
            loras[layer.kohya] = module.to(device=weight.device, dtype=self.dtype)
        return loras

    def _hook(self, module: LoraModule) -> None:
        from sdstack.models.key_map import live_module

        org = live_module(self.components, module.layer)
        self._handles.append(org.register_forward_hook(self._forward_hook(module)))

    def _forward_hook(self, module: LoraModule) -> Callable[..., torch.Tensor]:
        def hook(_org: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            return output + module.delta(inputs[0], self.multiplier).to(output.dtype)

        return hook

    # -- what the training loop uses ------------------------------------------------------

    @property
    def loras(self) -> dict[str, LoraModule]:
        """Every module by kohya name, text encoder first."""
        return {**self.text_encoder_loras, **self.unet_loras}

    def parameters_unet(self) -> list[torch.nn.Parameter]:
        """The UNet modules' ``lora_down``/``lora_up`` weights (``[]`` when not trained)."""
        return list(self.unet_loras.parameters())

    def parameters_text_encoder(self) -> list[torch.nn.Parameter]:
        """The text-encoder modules' weights (``[]`` when not trained)."""
        return list(self.text_encoder_loras.parameters())

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> TrainableLora:
        """Move the LoRA modules (not the model); returns self."""
        for loras in (self.text_encoder_loras, self.unet_loras):
            loras.to(device=device, dtype=dtype)
        if dtype is not None:
            self.dtype = dtype
        return self

    @property
    def network_args(self) -> dict[str, str]:
        """kohya's ``network_args`` for ``ss_network_args`` (``{}`` for plain LoRA): LoCon
        is ``networks.lora`` with ``conv_dim``/``conv_alpha``, values as the CLI gives them."""
        if not self.kind.convs:
            return {}
        return {"conv_dim": str(self.conv_rank), "conv_alpha": f"{self.conv_alpha:g}"}

    @property
    def attached(self) -> bool:
        """The hooks are in the model (False after :meth:`remove`)."""
        return bool(self._handles)

    def remove(self) -> None:
        """Take every hook out: the model computes exactly as before (its weights were never
        changed). Idempotent; :meth:`attach` puts the hooks back."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def attach(self) -> None:
        """Hook the modules in again after :meth:`remove` (no-op when attached)."""
        if not self._handles:
            for module in self.loras.values():
                self._hook(module)

    # -- saving and loading ---------------------------------------------------------------

    def state_dict_kohya(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """kohya's saved keys ``<name>.lora_down.weight``, ``<name>.lora_up.weight``,
        ``<name>.alpha``: detached CPU copies, every one cast to ``dtype`` as kohya's
        ``save_weights`` casts them (None: the weights in the LoRA's dtype, alpha float32)."""
        tensors: dict[str, torch.Tensor] = {}
        for name, module in self.loras.items():
            for key, value in (
                ("lora_down.weight", module.lora_down.weight),
                ("lora_up.weight", module.lora_up.weight),
                ("alpha", torch.tensor(module.alpha, dtype=torch.float32)),
            ):
                copy = value.detach().to("cpu", copy=True)
                tensors[f"{name}.{key}"] = copy if dtype is None else copy.to(dtype)
        return tensors

    def load_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy a :meth:`state_dict_kohya` (or a kohya file's tensors) into the modules.

        Raises:
            TrainNetworkError: a missing or unexpected key, a tensor of another shape, an
                alpha that differs from the network's.
        """
        expected = {f"{n}.{k}" for n in self.loras for k in ("lora_down.weight", "lora_up.weight")}
        expected |= {f"{n}.alpha" for n in self.loras}
        missing = sorted(expected - set(tensors))
        unexpected = sorted(set(tensors) - expected)
        if missing or unexpected:
            raise TrainNetworkError(
                f"LoRA state: {len(missing)} missing keys ({', '.join(missing[:3])}) and "
                f"{len(unexpected)} unexpected keys ({', '.join(unexpected[:3])}); expected "
                f"the {len(expected)} keys of this {self.kind.name} network (rank "
                f"{self.rank}, same model and trained parts)"
            )
        for key in sorted(expected):
            value = tensors[key]
            if not isinstance(value, torch.Tensor) or (
                key.endswith(".alpha") and value.numel() != 1
            ):
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else None
                raise TrainNetworkError(
                    f"LoRA state: {key} is {type(value).__name__} {shape or ''}; expected a "
                    f"{'scalar ' if key.endswith('.alpha') else ''}tensor"
                )
        for name, module in self.loras.items():
            alpha = float(tensors[f"{name}.alpha"].float())
            if not math.isclose(alpha, module.alpha, rel_tol=1e-3):
                raise TrainNetworkError(
                    f"LoRA state: {name}.alpha is {alpha:g}; this network has alpha "
                    f"{module.alpha:g}"
                )
            for key in ("lora_down", "lora_up"):
                target = getattr(module, key).weight
                value = tensors[f"{name}.{key}.weight"]
                if tuple(value.shape) != tuple(target.shape):
                    raise TrainNetworkError(
                        f"LoRA state: {name}.{key}.weight has shape {tuple(value.shape)}; "
                        f"expected {tuple(target.shape)}"
                    )
                with torch.no_grad():
                    target.copy_(value.to(device=target.device, dtype=target.dtype))

    def __repr__(self) -> str:
        return (
            f"TrainableLora({self.kind.name}, rank {self.rank}, alpha {self.alpha:g}, "
            f"{len(self.unet_loras)} UNet + {len(self.text_encoder_loras)} text-encoder modules)"
        )
