"""``sdstack lora inspect``: what a LoRA file holds, as a report dict and as text.

- From the metadata (no torch; :func:`training_report`, :func:`tag_report`): the kohya
  training fields (network module, dim, alpha, arguments, clip skip by
  ``trained_clip_skip``, resolution, output name, learning rates...), the
  ``ss_tag_frequency`` tags summed over datasets (top N), the stored ``sshs_model_hash``
  against the file's addnet hash.
- From key names and shapes: the base model guess (SD1 / SD2 / SDXL / unknown; the rules
  of ``formats_foreign`` against the SD1.5 widths).
- From the file read for one architecture (``read_lora``): the format, each module's
  algorithm, rank and alpha (summarised), modules per component, merge block and LoRA
  Block Weight block, bundled embeddings, the keys that matched no layer.

Metadata is untrusted: a value of the wrong type or shape, JSON that does not parse or
is too big to parse, becomes a note in ``report["notes"]``, never an exception."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sdstack.errors import SdstackError
from sdstack.lora.trained_clip_skip import trained_clip_skip

TOP_TAGS = 20
MAX_JSON_CHARS = 16_000_000
"""Metadata JSON values longer than this (16 MB) are not parsed (a note says so)."""
MAX_VALUE_CHARS = 2000
"""Longer metadata strings are cut in the report (a note says so)."""
TRAINING_FIELDS = (
    ("output_name", "ss_output_name"), ("title", "modelspec.title"),
    ("network_module", "ss_network_module"), ("base_model_version", "ss_base_model_version"),
    ("architecture", "modelspec.architecture"), ("sd_model_name", "ss_sd_model_name"),
    ("sd_model_hash", "ss_new_sd_model_hash"), ("learning_rate", "ss_learning_rate"),
    ("unet_lr", "ss_unet_lr"), ("text_encoder_lr", "ss_text_encoder_lr"),
    ("optimizer", "ss_optimizer"), ("epochs", "ss_num_epochs"), ("steps", "ss_steps"),
    ("train_images", "ss_num_train_images"), ("batch_size", "ss_total_batch_size"),
    ("mixed_precision", "ss_mixed_precision"), ("noise_offset", "ss_noise_offset"),
    ("seed", "ss_seed"), ("training_comment", "ss_training_comment"),
    ("trigger_phrase", "modelspec.trigger_phrase"),
)  # fmt: skip
"""(report name, metadata key) of the training fields reported as written."""
_NUMBERS = re.compile(r"-?\d+(?:\.\d+)?")
_HEX64 = re.compile(r"^(0x)?[0-9a-fA-F]{64}$")


class InspectError(SdstackError):
    """A file ``lora inspect`` cannot read at all (missing, not a LoRA file type)."""


def inspect_lora(
    path: str | Path, *, key_map: Any = None, top_tags: int = TOP_TAGS, hashes: bool = True
) -> dict[str, Any]:
    """The report of one LoRA file (see the module docstring), JSON-serialisable.

    Args:
        path: a ``.safetensors`` (or ``.pt``/``.ckpt``/``.bin``) LoRA file.
        key_map: the architecture its modules are matched against (default: SD1.5).
        top_tags: how many of the most frequent training tags to list.
        hashes: compute the file's addnet hash (reads the whole file once, cached).

    Raises:
        InspectError: no such file. LoraFileError: a file that is not a readable LoRA
            (an SDXL or SD2 LoRA is reported, not refused).
    """
    path = Path(path)
    if not path.is_file():
        raise InspectError(f"{path}: no such file; expected a LoRA file (.safetensors, .pt)")
    notes: list[str] = []
    metadata, shapes = _header(path)
    report: dict[str, Any] = {"file": str(path), "size": path.stat().st_size}
    report["base_model"] = guess_base_model(path, metadata, shapes)
    report.update(module_report(path, key_map, report["base_model"], notes))
    report["training"] = training_report(metadata, notes)
    report["tags"] = tag_report(metadata.get("ss_tag_frequency"), top_tags, notes)
    report["hashes"] = hash_report(path, metadata, notes) if hashes else None
    report["metadata_keys"] = len(metadata)
    report["notes"] = notes
    return report


def _header(path: Path) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """(metadata, key -> shape): the safetensors header only; a pickle has no metadata
    and its shapes need it loaded (weights-only)."""
    if path.suffix.lower() != ".safetensors":
        from sdstack.models.single_file import open_tensor_file

        with open_tensor_file(path) as source:
            return {}, {key: tuple(shape) for key, shape in source.items()}
    from sdstack.models.safetensors_header import read_safetensors_header, safetensors_metadata

    header, _ = read_safetensors_header(path)
    shapes = {}
    for key, entry in header.items():
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if key != "__metadata__" and isinstance(shape, list):
            shapes[key] = tuple(v for v in shape if isinstance(v, int))
    return safetensors_metadata(path), shapes


def guess_base_model(
    path: Path, metadata: Mapping[str, str], shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, str]:
    """``{"guess": "SD1" | "SD2" | "SDXL" | ... | "unknown", "evidence": ...}``.

    Another family first (``formats_foreign.check_not_foreign`` against the SD1.5 widths:
    metadata, SDXL key names, context and text widths, text-layer count); else SD1 from
    ``ss_base_model_version`` ``sd_v1*``, ``modelspec.architecture``
    ``stable-diffusion-v1*`` or a 768-wide context/text projection; else unknown.
    """
    from sdstack.lora.formats_foreign import check_not_foreign
    from sdstack.lora.network import ForeignLoraError
    from sdstack.models.key_map import sd1_key_map

    try:
        check_not_foreign(path, metadata, shapes, sd1_key_map())
    except ForeignLoraError as error:
        return {"guess": error.kind.replace("SD 2.x", "SD2"), "evidence": error.evidence}
    version = str(metadata.get("ss_base_model_version", "")).strip().lower()
    if version.startswith("sd_v1"):
        return {"guess": "SD1", "evidence": f"ss_base_model_version {version!r}"}
    architecture = str(metadata.get("modelspec.architecture", "")).strip().lower()
    if architecture.startswith("stable-diffusion-v1"):
        return {"guess": "SD1", "evidence": f"modelspec.architecture {architecture!r}"}
    for key, shape in shapes.items():
        down = key.endswith(("lora_down.weight", "lora_A.weight"))
        wide = len(shape) == 2 and shape[1] == 768
        if down and wide and re.search(r"attn2[._]to_[kv]|q_proj|k_proj|v_proj", key):
            return {"guess": "SD1", "evidence": f"{key!r:.100} is 768 wide"}
    return {"guess": "unknown", "evidence": "no metadata or width that names a model family"}


def module_report(
    path: Path, key_map: Any, base: Mapping[str, str], notes: list[str]
) -> dict[str, Any]:
    """Format, algorithms, rank/alpha summary, blocks, embeddings, unmatched keys."""
    from sdstack.lora.formats import read_lora
    from sdstack.lora.network import ForeignLoraError

    if key_map is None:
        from sdstack.models.key_map import sd1_key_map

        key_map = sd1_key_map()
    try:
        file = read_lora(path, key_map)
    except ForeignLoraError as error:
        notes.append(f"modules not matched: {error}")
        return {"format": None, "modules": None, "foreign": base.get("guess")}
    from sdstack.models.key_map import COMPONENTS, LBW_BLOCKS, MERGE_BLOCKS

    modules = list(file.modules.values())
    layers = [module.layer for module in modules]
    return {
        "format": file.format,
        "modules": len(modules),
        "algorithms": file.algorithms(),
        "rank_alpha": _rank_alpha(modules),
        "components": _counted([layer.component for layer in layers], COMPONENTS),
        "blocks": _counted([layer.block for layer in layers], MERGE_BLOCKS),
        "lbw_blocks": _counted([layer.lbw_block for layer in layers], LBW_BLOCKS),
        "outside_lbw": sum(x.component == "unet" and x.lbw_block is None for x in layers),
        "module_list": [_module_row(module) for module in modules],
        "embeddings": {name: int(vectors.shape[0]) for name, vectors in file.embeddings.items()},
        "unmatched": list(file.unmatched),
    }


def _module_row(module: Any) -> dict[str, Any]:
    layer = module.layer
    return {
        "layer": layer.key, "kohya": layer.kohya, "algorithm": module.algorithm,
        "rank": module.rank, "alpha": module.alpha, "scale": module.effective_scale,
        "block": layer.block, "dora": module.dora_scale is not None,
    }  # fmt: skip


def _rank_alpha(modules: list[Any]) -> list[dict[str, Any]]:
    """One row per (algorithm, rank, alpha, scale), most modules first."""
    counts = Counter(
        (module.algorithm, module.rank, module.alpha, module.effective_scale) for module in modules
    )
    return [
        {"algorithm": a, "rank": r, "alpha": alpha, "scale": s, "modules": n}
        for (a, r, alpha, s), n in sorted(counts.items(), key=lambda item: (-item[1], str(item[0])))
    ]


def _counted(names: list[Any], order: tuple[str, ...]) -> dict[str, int]:
    """How many of ``names`` are each of ``order`` (in that order, zeros left out)."""
    counts = Counter(names)
    return {name: counts[name] for name in order if counts[name]}


def _cut(key: str, value: str, notes: list[str]) -> str:
    if len(value) <= MAX_VALUE_CHARS:
        return value
    notes.append(f"{key}: {len(value)} characters; shown cut to {MAX_VALUE_CHARS}")
    return value[:MAX_VALUE_CHARS] + "..."


def _load_json(key: str, value: str | None, notes: list[str]) -> Any:
    """``json.loads(value)``, or None with a note (too long, not JSON, nested too deep)."""
    if value is None or value.strip() in ("", "None"):
        return None
    if len(value) > MAX_JSON_CHARS:
        notes.append(
            f"{key}: {len(value)} characters of JSON; not parsed (at most {MAX_JSON_CHARS})"
        )
        return None
    try:
        return json.loads(value)
    except (json.JSONDecodeError, RecursionError) as error:
        notes.append(f"{key}: not JSON ({str(error)[:80]}); ignored")
        return None


def _number(key: str, value: str | None, notes: list[str]) -> float | int | None:
    """A metadata number (``"None"`` and absent: None); anything else: None and a note."""
    if value is None or value.strip() in ("", "None"):
        return None
    try:
        number = float(value)
    except ValueError:
        notes.append(f"{key}: {value[:60]!r} is not a number; ignored")
        return None
    return int(number) if number.is_integer() and abs(number) < 2**53 else number


def parse_resolution(value: str | None) -> list[int] | None:
    """kohya's ``ss_resolution`` (``"(512, 768)"``, ``"512,768"``, ``"512"``) -> [w, h]."""
    if value is None or len(value) > 100:
        return None
    found = [float(v) for v in _NUMBERS.findall(value)]
    if len(found) == 1:
        found *= 2
    if len(found) != 2 or not all(v.is_integer() and 0 < v < 1e6 for v in found):
        return None
    return [int(v) for v in found]


def training_report(metadata: Mapping[str, str], notes: list[str]) -> dict[str, Any]:
    """The kohya / model-spec training fields present (strings cut to MAX_VALUE_CHARS)."""
    fields: dict[str, Any] = {
        name: _cut(key, metadata[key], notes) for name, key in TRAINING_FIELDS if key in metadata
    }
    fields["network_dim"] = _number("ss_network_dim", metadata.get("ss_network_dim"), notes)
    fields["network_alpha"] = _number("ss_network_alpha", metadata.get("ss_network_alpha"), notes)
    args = _load_json("ss_network_args", metadata.get("ss_network_args"), notes)
    if args is not None and not isinstance(args, dict):
        notes.append(f"ss_network_args: a JSON {type(args).__name__}; expected an object")
        args = None
    fields["network_args"] = (
        None if args is None else {str(k): str(v)[:200] for k, v in args.items()}
    )
    fields["clip_skip"] = trained_clip_skip(metadata)
    for key in ("ss_clip_skip", "modelspec.encoder_layer"):
        raw = metadata.get(key)
        if raw is not None and fields["clip_skip"] is None and raw.strip().lower() != "none":
            notes.append(f"{key}: {raw[:60]!r} is not a clip skip (expected 1 to 12); unknown")
    raw_resolution = metadata.get("ss_resolution")
    fields["resolution"] = parse_resolution(raw_resolution)
    if raw_resolution is not None and fields["resolution"] is None:
        notes.append(f"ss_resolution: {raw_resolution[:60]!r} is not a resolution; ignored")
    return {name: value for name, value in fields.items() if value is not None}


def tag_report(raw: str | None, top: int, notes: list[str]) -> dict[str, Any] | None:
    """``ss_tag_frequency`` (``{dataset: {tag: count}}``): counts summed over datasets
    per tag (whitespace stripped), the ``top`` most frequent; None when absent."""
    data = _load_json("ss_tag_frequency", raw, notes)
    if data is None:
        return None
    if not isinstance(data, dict):
        notes.append(f"ss_tag_frequency: a JSON {type(data).__name__}; expected an object")
        return None
    totals: Counter[str] = Counter()
    skipped = 0
    for tags in data.values():
        if not isinstance(tags, dict):
            skipped += 1
            continue
        for tag, count in tags.items():
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                skipped += 1
                continue
            totals[str(tag).strip()[:200]] += count
    if skipped:
        notes.append(f"ss_tag_frequency: {skipped} entries that are not tag counts; skipped")
    ranked = sorted(totals.items(), key=lambda item: (-item[1], item[0]))
    return {
        "datasets": len(data),
        "unique_tags": len(totals),
        "top": [[tag, count] for tag, count in ranked[: max(0, top)]],
    }


def hash_report(path: Path, metadata: Mapping[str, str], notes: list[str]) -> dict[str, Any]:
    """The LoRA hash the reference writes (``lora_sha256``), the stored
    ``sshs_model_hash`` and whether it is the file's addnet hash (tensor bytes)."""
    from sdstack.models.hashes import addnet_hash
    from sdstack.models.library import lora_sha256

    stored = metadata.get("sshs_model_hash")
    computed = addnet_hash(path)
    result: dict[str, Any] = {
        "lora_hash": lora_sha256(path),
        "addnet_hash": computed,
        "sshs_model_hash": None if stored is None else stored[:80],
        "sshs_matches": None,
    }
    result["short_hash"] = result["lora_hash"][:12]
    if stored is not None and not _HEX64.match(stored):
        notes.append(f"sshs_model_hash: {stored[:80]!r} is not 64 hex; the addnet hash is used")
    elif stored is not None:
        result["sshs_matches"] = stored.lower().removeprefix("0x") == computed
        if not result["sshs_matches"]:
            notes.append(
                "sshs_model_hash differs from the file's tensor hash (edited after training?); "
                "infotexts use the stored one"
            )
    return result


def _counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{name} {count}" for name, count in counts.items()) or "none"


def _size(size: int) -> str:
    return f"{size / 1024**2:.1f} MiB" if size >= 1024**2 else f"{size / 1024:.1f} KiB"


def _module_lines(report: Mapping[str, Any]) -> list[str]:
    if report.get("modules") is None:
        return [f"modules: not read (a LoRA for {report.get('foreign')})"]
    lines = [
        f"format: {report['format']}",
        f"modules: {report['modules']} ({_counts(report['algorithms'])}); "
        f"{_counts(report['components'])}",
    ]
    for row in report["rank_alpha"]:
        rank = "-" if row["rank"] is None else row["rank"]
        alpha = "-" if row["alpha"] is None else f"{row['alpha']:g}"
        lines.append(
            f"  {row['algorithm']} rank {rank} alpha {alpha} (scale {row['scale']:g}): "
            f"{row['modules']} modules"
        )
    lines.append(f"merge blocks: {_counts(report['blocks'])}")
    lbw = f"LBW blocks: {_counts(report['lbw_blocks'])}"
    if report["outside_lbw"]:
        lbw += f"; {report['outside_lbw']} UNet modules outside the 17 (lbw= gives them 0)"
    lines.append(lbw)
    if report["embeddings"]:
        lines.append(f"bundled embeddings: {_counts(report['embeddings'])} (vectors)")
    unmatched = report["unmatched"]
    if unmatched:
        more = f" and {len(unmatched) - 10} more" if len(unmatched) > 10 else ""
        lines.append(f"unmatched keys ({len(unmatched)}): {', '.join(unmatched[:10])}{more}")
    return lines


def _training_lines(training: Mapping[str, Any]) -> list[str]:
    lines = []
    for name, value in training.items():
        if name == "resolution":
            value = f"{value[0]}x{value[1]}"
        elif name == "network_args":
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        lines.append(f"  {name.replace('_', ' ')}: {value}")
    return ["training:", *lines] if lines else ["training: no metadata"]


def render_report(report: Mapping[str, Any]) -> str:
    """The report as the text ``sdstack lora inspect`` prints."""
    base = report["base_model"]
    lines = [
        f"file: {report['file']} ({_size(report['size'])})",
        f"base model: {base['guess']} ({base['evidence']})",
        *_module_lines(report),
        *_training_lines(report["training"]),
    ]
    tags = report.get("tags")
    if tags is not None:
        shown = ", ".join(f"{tag} {count}" for tag, count in tags["top"])
        lines.append(
            f"tags: {tags['unique_tags']} in {tags['datasets']} dataset(s); "
            f"most frequent: {shown or 'none'}"
        )
    hashes = report.get("hashes")
    if hashes is not None:
        stored = {True: "sshs_model_hash matches", False: "sshs_model_hash differs"}
        lines.append(
            f"hash: {hashes['short_hash']} (full {hashes['lora_hash']}; "
            f"{stored.get(hashes['sshs_matches'], 'no sshs_model_hash')})"
        )
    lines += [f"note: {note}" for note in report["notes"]]
    return "\n".join(lines)
