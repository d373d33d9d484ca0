"""A pre-LN CLIP text encoder layer with a key/value cache, for the deprojector's decoders.

Same computation and parameter names as ``transformers``' ``CLIPEncoderLayer``, so a
CLIP layer's ``state_dict`` loads into it unchanged::

    x = x + out_proj(attention(q_proj(LN1(x)), k_proj(LN1(x)), v_proj(LN1(x))))
    x = x + fc2(act(fc1(LN2(x))))

with ``attention(q, k, v) = softmax(q k^T / sqrt(d_head) + mask) v`` per head (causal mask
on a full pass). A :class:`KeyValueCache` keeps each layer's keys and values of the
positions seen so far, so an autoregressive decoder runs one position per step instead
of re-running the whole prefix (the original deprojector's 76 full passes).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional

from sdstack.registry import Registry
from sdstack.text.deprojector import DeprojectorError


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's quick GELU: ``x * sigmoid(1.702 x)``."""
    return x * torch.sigmoid(1.702 * x)


def _gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact GELU: ``x * Phi(x)``."""
    return functional.gelu(x)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation."""
    return functional.gelu(x, approximate="tanh")


ACTIVATIONS: Registry[Callable[[torch.Tensor], torch.Tensor]] = Registry("activation")
ACTIVATIONS.register("quick_gelu", quick_gelu)
ACTIVATIONS.register("gelu", _gelu)
ACTIVATIONS.register("gelu_new", _gelu_tanh, aliases=("gelu_pytorch_tanh",))


class KeyValueCache:
    """Keys and values of one layer for the first ``length`` positions (preallocated).

    ``keys``/``values``: ``(batch, heads, capacity, head_dim)``.
    """

    def __init__(self, batch: int, heads: int, capacity: int, head_dim: int, like: torch.Tensor):
        shape = (batch, heads, capacity, head_dim)
        self.keys = torch.empty(shape, dtype=like.dtype, device=like.device)
        self.values = torch.empty(shape, dtype=like.dtype, device=like.device)
        self.length = 0

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``(batch, heads, n, head_dim)`` new keys/values; all stored ones so far."""
        end = self.length + keys.shape[2]
        if end > self.keys.shape[2]:
            raise DeprojectorError(
                f"key/value cache holds {self.keys.shape[2]} positions, asked for {end}"
            )
        self.keys[:, :, self.length : end] = keys
        self.values[:, :, self.length : end] = values
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class SelfAttention(torch.nn.Module):
    """CLIP multi-head self-attention (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = width // heads
        self.q_proj = torch.nn.Linear(width, width)
        self.k_proj = torch.nn.Linear(width, width)
        self.v_proj = torch.nn.Linear(width, width)
        self.out_proj = torch.nn.Linear(width, width)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.heads, self.head_dim).transpose(1, 2)

    def forward(
        self, x: torch.Tensor, cache: KeyValueCache | None = None, causal: bool = True
    ) -> torch.Tensor:
        """Attention of ``x`` (B, n, W) over itself, or over the cache plus itself.

        With a cache, ``x`` holds the next position(s); each attends to every cached
        position and, causally, to the new ones before it.
        """
        batch, length, width = x.shape
        q = self._split(self.q_proj(x))
        k = self._split(self.k_proj(x))
        v = self._split(self.v_proj(x))
        if cache is not None:
            start = cache.length
            k, v = cache.append(k, v)
            # written out: torch's CPU flash kernel takes ~5 ms for one query over a
            # cache slice at CLIP-L shapes, these three small products ~0.1 ms
            scores = (q @ k.transpose(-2, -1)) * (self.head_dim**-0.5)
            if length > 1 and causal:
                scores = scores.masked_fill(~_causal_mask(start, length, x), float("-inf"))
            out = torch.softmax(scores, dim=-1) @ v
        else:
            out = functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))


def _causal_mask(start: int, length: int, like: torch.Tensor) -> torch.Tensor:
    """Boolean (length, start + length) mask: new position i sees positions <= start + i."""
    rows = torch.arange(length, device=like.device)[:, None] + start
    cols = torch.arange(start + length, device=like.device)[None, :]
    return cols <= rows


class FeedForward(torch.nn.Module):
    """CLIP MLP: ``fc2(act(fc1(x)))``."""

    def __init__(self, width: int, intermediate: int, activation: str) -> None:
        super().__init__()
        self.activation = ACTIVATIONS.get(activation)
        self.fc1 = torch.nn.Linear(width, intermediate)
        self.fc2 = torch.nn.Linear(intermediate, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class DeprojectorLayer(torch.nn.Module):
    """One pre-LN CLIP encoder layer (``CLIPEncoderLayer``'s parameter names)."""

    def __init__(
        self, width: int, heads: int, intermediate: int, eps: float, activation: str
    ) -> None:
        super().__init__()
        self.self_attn = SelfAttention(width, heads)
        self.layer_norm1 = torch.nn.LayerNorm(width, eps=eps)
        self.mlp = FeedForward(width, intermediate, activation)
        self.layer_norm2 = torch.nn.LayerNorm(width, eps=eps)

    def forward(
        self, x: torch.Tensor, cache: KeyValueCache | None = None, causal: bool = True
    ) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), cache, causal)
        return x + self.mlp(self.layer_norm2(x))


class LayerStack(torch.nn.Module):
    """``layers`` DeprojectorLayers run in order (one member of an ensemble)."""

    def __init__(
        self, layers: int, width: int, heads: int, intermediate: int, eps: float, act: str
    ) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(
            DeprojectorLayer(width, heads, intermediate, eps, act) for _ in range(layers)
        )

    def new_caches(self, batch: int, capacity: int, like: torch.Tensor) -> list[KeyValueCache]:
        """One empty cache per layer for ``batch`` sequences of up to ``capacity`` positions."""
        caches = []
        for layer in self.layers:
            attention = layer.self_attn
            caches.append(KeyValueCache(batch, attention.heads, capacity, attention.head_dim, like))
        return caches

    @torch.no_grad()
    def perturb(self, seed: int, scale: float) -> None:
        """Add ``scale * std(w) * N(0, 1)`` (generator seeded by ``seed``) to each weight matrix."""
        generator = torch.Generator().manual_seed(seed)
        for parameter in self.parameters():
            if parameter.ndim == 2:
                noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
                parameter.add_(noise.to(parameter.device) * (scale * float(parameter.std())))

    def forward(
        self,
        x: torch.Tensor,
        caches: list[KeyValueCache] | None = None,
        causal: bool = True,
    ) -> torch.Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x, None if caches is None else caches[index], causal)
        return x
