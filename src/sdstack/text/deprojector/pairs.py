"""Teacher pairs for deprojector training: caption -> (pooled, states at the clip skip, EOS).

The teacher CLIP encodes each caption (77 tokens, padded and truncated as SD1 does) into

- ``pooled`` (W,): ``last_hidden_state`` at the first EOS token (CLIP's ``pooler_output``);
  the deprojector's input embedding is ``Deprojector.embedding_from_pooled(pooled)``;
- ``states`` (77, W): ``last_hidden_state`` (clip skip 1) or
  ``final_layer_norm(hidden_states[-N])`` (clip skip N), the target;
- ``eos`` (int): the position of the first EOS token (real tokens are ``1..eos``), which
  the per-position loss weights need.

Pairs are cached on disk in shards (``shard_size`` captions each, safetensors, float32):
one file per shard, named by the sha256 of (CLIP fingerprint, clip skip, the shard's
captions), so a later run over the same captions with the same CLIP reads them back
instead of running the teacher, and a changed caption only recomputes its own shard. A
shard file that is corrupt or does not match its name is recomputed and replaced (with a
:class:`~sdstack.errors.SdstackWarning`). At SD1 width a pair is 237 KB (10,000 captions:
2.4 GB).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sdstack.errors import SdstackWarning

SHARD_SIZE = 1024
CACHE_FORMAT = "sdstack.deproject.pairs/1"


@dataclasses.dataclass
class PairSet:
    """Teacher pairs, float32 on the CPU: ``pooled`` (N, W), ``states`` (N, 77, W),
    ``eos`` (N,) int64 (position of the first EOS token)."""

    pooled: torch.Tensor
    states: torch.Tensor
    eos: torch.Tensor

    def __len__(self) -> int:
        return int(self.pooled.shape[0])

    def select(self, index: torch.Tensor | list[int]) -> PairSet:
        """The pairs at ``index`` (a new PairSet)."""
        index = torch.as_tensor(index, dtype=torch.long)
        return PairSet(self.pooled[index], self.states[index], self.eos[index])

    @staticmethod
    def cat(parts: list[PairSet]) -> PairSet:
        """The pairs of ``parts`` in order."""
        return PairSet(
            torch.cat([p.pooled for p in parts]),
            torch.cat([p.states for p in parts]),
            torch.cat([p.eos for p in parts]),
        )


def eos_positions(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """Position of the first EOS token of each text in its 77-token SD1 encoding (N,)."""
    ids = tokenizer(
        list(texts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    is_eos = ids == tokenizer.eos_token_id
    return is_eos.int().argmax(dim=1).to(torch.int64)


def teacher_pairs(
    text_encoder: Any,
    tokenizer: Any,
    texts: list[str],
    *,
    clip_skip: int = 1,
    batch_size: int = 64,
) -> PairSet:
    """Run the teacher CLIP over ``texts`` in batches (no cache); see the module docstring."""
    from sdstack.text.deprojector.model import clip_outputs

    pooled, states = [], []
    for start in range(0, len(texts), batch_size):
        batch = texts[start : start + batch_size]
        p, s = clip_outputs(text_encoder, tokenizer, batch, clip_skip)
        pooled.append(p.detach().to("cpu", torch.float32))
        states.append(s.detach().to("cpu", torch.float32))
    width = int(text_encoder.config.hidden_size)
    if not texts:
        return PairSet(torch.zeros(0, width), torch.zeros(0, 77, width), torch.zeros(0).long())
    return PairSet(torch.cat(pooled), torch.cat(states), eos_positions(tokenizer, texts))


def shard_key(fingerprint: str, clip_skip: int, texts: list[str]) -> str:
    """sha256 (hex) over the format, the CLIP fingerprint, the clip skip and the texts."""
    digest = hashlib.sha256()
    digest.update(f"{CACHE_FORMAT}\0{fingerprint}\0{clip_skip}\0".encode())
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()


def cached_pairs(
    text_encoder: Any,
    tokenizer: Any,
    texts: list[str],
    *,
    clip_skip: int,
    cache_dir: str | Path | None,
    fingerprint: str,
    shard_size: int = SHARD_SIZE,
    on_shard: Callable[[int, int], None] | None = None,
) -> PairSet:
    """Teacher pairs of ``texts``, read from ``cache_dir`` shards where present.

    Args:
        cache_dir: shard folder (created if needed); None: no cache.
        fingerprint: ``clip_fingerprint(text_encoder)``, part of every shard's key.
        on_shard: progress, called as ``on_shard(done, total)`` after each shard.

    Returns:
        The pairs in ``texts`` order. Shards are float32 safetensors, which round-trip
        exactly, so a first run and a cached run give the same tensors.
    """
    shards = [texts[i : i + shard_size] for i in range(0, len(texts), shard_size)]
    parts = []
    for number, shard in enumerate(shards):
        if cache_dir is None:
            parts.append(teacher_pairs(text_encoder, tokenizer, shard, clip_skip=clip_skip))
        else:
            key = shard_key(fingerprint, clip_skip, shard)
            path = Path(cache_dir) / f"pairs-{key[:40]}.safetensors"
            found = _read_shard(path, key, len(shard), int(text_encoder.config.hidden_size))
            if found is None:
                computed = teacher_pairs(text_encoder, tokenizer, shard, clip_skip=clip_skip)
                _write_shard(path, key, computed)
                found = computed
            parts.append(found)
        if on_shard is not None:
            on_shard(number + 1, len(shards))
    if not parts:
        return teacher_pairs(text_encoder, tokenizer, [], clip_skip=clip_skip)
    return PairSet.cat(parts)


def _read_shard(path: Path, key: str, count: int, width: int) -> PairSet | None:
    """The shard at ``path`` if it holds ``count`` pairs of ``width`` under ``key``."""
    if not path.is_file():
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            if meta.get("key") != key or meta.get("format") != CACHE_FORMAT:
                raise ValueError("its key does not match its captions")
            tensors = {name: handle.get_tensor(name) for name in ("pooled", "states", "eos")}
    except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as error:
        warnings.warn(
            f"pairs cache {str(path)!r} is unreadable ({error}); recomputing it",
            SdstackWarning,
            stacklevel=3,
        )
        return None
    pairs = PairSet(tensors["pooled"], tensors["states"], tensors["eos"])
    shapes = (tuple(pairs.pooled.shape), tuple(pairs.states.shape), tuple(pairs.eos.shape))
    if shapes != ((count, width), (count, 77, width), (count,)):
        warnings.warn(
            f"pairs cache {str(path)!r} holds shapes {shapes}, expected {count} pairs of "
            f"width {width}; recomputing it",
            SdstackWarning,
            stacklevel=3,
        )
        return None
    return pairs


def _write_shard(path: Path, key: str, pairs: PairSet) -> None:
    """Save one shard atomically (temporary file, then rename)."""
    from safetensors.torch import save_file

    from sdstack.atomic_files import replace, temporary_file

    tensors = {
        "pooled": pairs.pooled.contiguous(),
        "states": pairs.states.contiguous(),
        "eos": pairs.eos.contiguous(),
    }
    meta = {"format": CACHE_FORMAT, "key": key, "count": json.dumps(len(pairs))}
    with temporary_file(path.parent, suffix=".safetensors") as temporary:
        save_file(tensors, str(temporary), metadata=meta)
        replace(temporary, path)


AUGMENT_SHARES = {"normal": 0.4, "split": 0.3, "combine": 0.3}
"""The reference's later augmentation mix (spec "Training")."""


def join_captions(first: str, second: str) -> str:
    """The caption of a split/combine example: the two joined by ``", "`` (a prompt's
    comma, the separator the "pooled encoding" sums over)."""
    return f"{first}, {second}"


@dataclasses.dataclass
class AugmentationPlan:
    """Per training caption ``i``: its kind and partner (``-1`` for ``normal``).

    - ``normal``: input ``e(a_i)``, target ``states(a_i)``;
    - ``split``: input ``e(a_i) + e(a_j) - e("")``, target ``states(join(a_i, a_j))``;
    - ``combine``: input ``e(join(a_i, a_j))``, target ``states(join(a_i, a_j))``.
    """

    kinds: list[str]
    partners: list[int]

    def joined(self, captions: list[str]) -> list[str]:
        """The joined texts the plan needs the teacher for (one per non-normal example)."""
        return [
            join_captions(captions[i], captions[j]) for i, j in enumerate(self.partners) if j >= 0
        ]


def plan_augmentation(count: int, seed: int) -> AugmentationPlan:
    """Seeded plan: ``round(0.4 n)`` normal, ``round(0.3 n)`` split, the rest combine.

    Which caption gets which kind is a seeded permutation; the partner of ``i`` is
    ``(i + r) mod n`` with ``r`` uniform in ``1..n-1`` (never itself). One caption: normal.
    """
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(count, generator=generator).tolist()
    normal = round(AUGMENT_SHARES["normal"] * count) if count > 1 else count
    split = round(AUGMENT_SHARES["split"] * count) if count > 1 else 0
    kinds = ["combine"] * count
    for rank, index in enumerate(order):
        kinds[index] = (
            "normal" if rank < normal else "split" if rank < normal + split else kinds[index]
        )
    offsets = torch.randint(1, max(count, 2), (count,), generator=generator).tolist()
    partners = [
        -1 if kind == "normal" else (i + offsets[i]) % count for i, kind in enumerate(kinds)
    ]
    return AugmentationPlan(kinds, partners)


def split_holdout(count: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded held-out split: ``(train, held_out)`` caption indices, each sorted.

    ``max(1, round(fraction * count))`` captions are held out (a seeded permutation's
    first ones); at least one caption stays for training.
    """
    generator = torch.Generator().manual_seed(seed + 7919)
    order = torch.randperm(count, generator=generator).tolist()
    held = min(max(1, round(fraction * count)), count - 1)
    return sorted(order[held:]), sorted(order[:held])


@dataclasses.dataclass
class TrainingData:
    """Examples ready to train on: ``embeddings`` (N, E) inputs, ``targets`` pairs whose
    row ``target_index[i]`` is example ``i``'s target; ``heldout`` plain held-out pairs
    with their ``heldout_embeddings``."""

    embeddings: torch.Tensor
    target_index: torch.Tensor
    targets: PairSet
    heldout: PairSet
    heldout_embeddings: torch.Tensor


def build_training_data(model: Any, train: PairSet, heldout: PairSet, extra: dict) -> TrainingData:
    """Inputs and target rows from the plain pairs and the augmentation's joined pairs.

    Args:
        train: pairs of the training captions, in caption order.
        extra: ``{"plan": AugmentationPlan, "joined": PairSet (one per non-normal
            example, in order), "null": pooled (W,) of the empty prompt}``.
    """
    plan, joined, null = extra["plan"], extra["joined"], extra["null"]
    with torch.no_grad():
        e_train = model.embedding_from_pooled(train.pooled)
        e_joined = model.embedding_from_pooled(joined.pooled)
        e_null = model.embedding_from_pooled(null[None])[0]
        inputs, index, used = [], [], 0
        for i, (kind, j) in enumerate(zip(plan.kinds, plan.partners, strict=True)):
            if kind == "normal":
                inputs.append(e_train[i])
                index.append(i)
                continue
            inputs.append(e_train[i] + e_train[j] - e_null if kind == "split" else e_joined[used])
            index.append(len(train) + used)
            used += 1
        heldout_embeddings = model.embedding_from_pooled(heldout.pooled)
    return TrainingData(
        embeddings=torch.stack(inputs),
        target_index=torch.tensor(index, dtype=torch.long),
        targets=PairSet.cat([train, joined]),
        heldout=heldout,
        heldout_embeddings=heldout_embeddings,
    )


def prepare_training_data(
    model: Any,
    text_encoder: Any,
    tokenizer: Any,
    captions: list[str],
    *,
    holdout: float,
    seed: int,
    cache_dir: str | Path | None,
    fingerprint: str,
    on_shard: Callable[[int, int], None] | None = None,
) -> tuple[TrainingData, dict[str, Any]]:
    """Split, augment and run (or read) the teacher: the data ``training.fit`` trains on.

    Steps: the seeded held-out split (:func:`split_holdout`); the teacher pairs of every
    caption (cached); the seeded augmentation plan over the training captions
    (:func:`plan_augmentation`) and the pairs of its joined captions (cached); the empty
    prompt's pooled vector.

    Returns:
        ``(data, split)`` with ``split = {"train": [...], "heldout": [...]}`` (indices
        into ``captions``).

    Raises:
        DeprojectorError: fewer than 2 captions.
    """
    from sdstack.text.deprojector import DeprojectorError

    if len(captions) < 2:
        raise DeprojectorError(
            f"training needs at least 2 distinct captions (one held out), got {len(captions)}"
        )
    clip_skip = model.config.clip_skip
    train_index, heldout_index = split_holdout(len(captions), holdout, seed)
    options = {"clip_skip": clip_skip, "cache_dir": cache_dir, "fingerprint": fingerprint}
    pairs = cached_pairs(text_encoder, tokenizer, captions, on_shard=on_shard, **options)
    train_texts = [captions[i] for i in train_index]
    plan = plan_augmentation(len(train_texts), seed)
    joined = cached_pairs(text_encoder, tokenizer, plan.joined(train_texts), **options)
    null = teacher_pairs(text_encoder, tokenizer, [""], clip_skip=clip_skip).pooled[0]
    extra = {"plan": plan, "joined": joined, "null": null}
    data = build_training_data(model, pairs.select(train_index), pairs.select(heldout_index), extra)
    return data, {"train": train_index, "heldout": heldout_index}
