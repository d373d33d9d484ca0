"""Infotext: the reference UI's "parameters" text stored with every image.

Format (reference ``create_infotext`` / ``parse_generation_parameters``)::

    <prompt>
    Negative prompt: <negative>          (only when non-empty)
    Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, ...

Values holding ``,``, ``:`` or a newline are written as JSON strings.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from sdstack.validate import SettingError

FIELD_ORDER = (
    "Steps",
    "Sampler",
    "Schedule type",
    "CFG scale",
    "Image CFG scale",
    "Seed",
    "Face restoration",
    "Size",
    "Model hash",
    "Model",
    "VAE hash",
    "VAE",
    "Variation seed",
    "Variation seed strength",
    "Seed resize from",
    "Denoising strength",
    "Clip skip",
    "ENSD",
    "RNG",
    "Tiling",
)
"""Reference order of the leading fields; other fields follow in insertion order,
``Version`` last."""

PARAM_PATTERN = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
"""The reference's params regex; :func:`find_params` gives ``PARAM_PATTERN.findall`` in
linear time (the regex itself is quadratic on a long line without ``:``)."""
_SPACES = re.compile(r"\s*")
_WORD = re.compile(r"\w")
_KEY_CHARS = re.compile(r"[\w \-/]*")
_QUOTED_BODY = re.compile(r'(?:\\.|[^\\"])*')
SIZE_PATTERN = re.compile(r"^(\d+)x(\d+)$")
DEFAULTS = {"Clip skip": "1", "Schedule type": "Automatic", "RNG": "GPU"}

# Reference labels of the emphasis modes (its option values) <-> ours.
EMPHASIS_LABELS = {
    "original": "Original",
    "no-norm": "No norm",
    "ignore": "Ignore",
    "comfy": "Comfy",
}


def quote(value: Any) -> str:
    """Reference ``quote``: ``json.dumps(text, ensure_ascii=False)`` if the text holds
    ``,``, ``:`` or a newline, else the text itself. Also quoted here (the reference
    does not): text starting with ``"``, which a reader would otherwise JSON-decode."""
    text = format_value(value)
    if any(ch in text for ch in ",:\n") or text.startswith('"'):
        return json.dumps(text, ensure_ascii=False)
    return text


def unquote(text: str) -> str:
    """Reference ``unquote``: JSON-decode a ``"..."`` value; undecodable text stays as is."""
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        decoded = json.loads(text)
    except json.JSONDecodeError:
        return text
    return decoded if isinstance(decoded, str) else text


def format_value(value: Any) -> str:
    """Numbers as the reference writes them: ``7.0`` -> ``7``, ``7.5`` -> ``7.5``."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def order_fields(fields: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """``fields`` in reference order (FIELD_ORDER, then the rest, Version last); None
    values dropped."""
    present = {k: v for k, v in fields.items() if v is not None}
    ordered = [(k, present[k]) for k in FIELD_ORDER if k in present]
    ordered += [(k, v) for k, v in present.items() if k not in FIELD_ORDER and k != "Version"]
    if "Version" in present:
        ordered.append(("Version", present["Version"]))
    return ordered


def build_infotext(prompt: str, negative: str, fields: Mapping[str, Any]) -> str:
    """Reference ``create_infotext`` text: prompt, ``Negative prompt:`` line, params line.

    ``(prompt + "\\nNegative prompt: " + negative + "\\n" + params).strip()`` with params
    ``Key: quote(value)`` joined by ``", "`` in :data:`FIELD_ORDER`.
    """
    params = ", ".join(f"{key}: {quote(value)}" for key, value in order_fields(fields))
    negative_text = f"\nNegative prompt: {negative}" if negative else ""
    return f"{prompt}{negative_text}\n{params}".strip()


def find_params(line: str) -> list[tuple[str, str]]:
    """``PARAM_PATTERN.findall(line)``: the ``(key, raw value)`` pairs, in linear time.

    At each position the regex skips whitespace; the key is then the whole run of
    ``[\\w \\-/]`` starting with a word character (backtracking cannot end it earlier, as
    ``:`` is not in the run), at least 2 long and followed by ``:``. After ``:`` and
    whitespace the value is a ``"..."`` (escapes allowed) followed by ``,`` or the end,
    else everything up to the next ``,``. A failed position moves on by one, as findall
    does, and a run of key characters is scanned once for all the starts inside it.
    Quoted scans never overlap: a quote opening a value follows ``:`` or a space, so an
    earlier scan stops at it (it can only pass over a quote escaped by a backslash).
    """
    pairs: list[tuple[str, str]] = []
    size = len(line)
    run = (-1, -1)  # a run of key characters: (start, end)
    position = 0
    while position < size:
        key_start = _SPACES.match(line, position).end()
        if key_start >= size or not _WORD.match(line, key_start):
            position = key_start + 1
            continue
        if not run[0] <= key_start < run[1]:
            run = (key_start, _KEY_CHARS.match(line, key_start).end())
        key_end = run[1]
        if key_end >= size or line[key_end] != ":":
            position = key_end  # every start inside the run fails the same way
            continue
        if key_end - key_start < 2:
            position = key_start + 1
            continue
        value_start = _SPACES.match(line, key_end + 1).end()
        value_end, position = _value_end(line, value_start)
        pairs.append((line[key_start:key_end], line[value_start:value_end]))
    return pairs


def _value_end(line: str, start: int) -> tuple[int, int]:
    """(end of the value, where the search goes on) for a value starting at ``start``."""
    size = len(line)
    if line.startswith('"', start):
        close = _QUOTED_BODY.match(line, start + 1).end()  # the closing quote, if any
        if close > start + 1 and line.startswith('"', close):
            after = close + 1
            if after == size or (after == size - 1 and line[after] == "\n"):  # '$'
                return after, after
            if line[after] == ",":
                return after, after + 1
    comma = line.find(",", start)
    return (size, size) if comma < 0 else (comma, comma + 1)


def _split_lines(text: str) -> tuple[list[str], list[tuple[str, str]]]:
    *lines, last = text.strip().split("\n")
    params = find_params(last)
    if len(params) < 3:
        return [*lines, last], []
    return lines, params


def parse_infotext(text: str) -> dict[str, str]:
    """Reference ``parse_generation_parameters``: infotext -> ``{"Prompt", "Negative
    prompt", field: value}``.

    The last line holds the params only if :data:`PARAM_PATTERN` matches it at least 3
    times; lines from the first one starting ``Negative prompt:`` form the negative
    prompt (each line stripped); quoted values are JSON-decoded; ``WxH`` values also give
    ``<key>-1`` and ``<key>-2``. Missing: ``Clip skip`` 1, ``Schedule type`` Automatic,
    ``RNG`` GPU. Values stay strings, as in the reference.
    """
    lines, params = _split_lines(text)
    prompt: list[str] = []
    negative: list[str] = []
    for raw in lines:
        line = raw.strip()
        if not negative and line.startswith("Negative prompt:"):
            negative.append(line[len("Negative prompt:") :].strip())
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)
    result = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in params:
        value = unquote(value.strip())
        result[key] = value
        size = SIZE_PATTERN.match(value)
        if size is not None:
            result[f"{key}-1"], result[f"{key}-2"] = size.group(1), size.group(2)
    for key, value in DEFAULTS.items():
        result.setdefault(key, value)
    return result


def ti_hashes(names: Iterable[str], embeddings: Mapping[str, Any] | None) -> str | None:
    """Reference ``TI hashes`` value: ``"name: hash, ..."`` for embeddings used that have
    a hash; None when there are none."""
    if embeddings is None:
        return None
    pairs = []
    for name in names:
        digest = getattr(embeddings.get(name), "short_hash", None)
        if digest:
            pairs.append(f"{name}: {digest}")
    return ", ".join(pairs) or None


def file_short_hash(path: str | Path | None) -> str | None:
    """Reference "Model hash"/"VAE hash": first 10 hex of the file's sha256; None when
    ``path`` is None or not a file (diffusers folder, in-memory model)."""
    if path is None or not Path(path).is_file():
        return None
    from sdstack.models.hashes import short_hash

    return short_hash(path)


def generation_fields(
    params: Any,
    *,
    components: Any,
    embeddings: Mapping[str, Any] | None = None,
    used_embeddings: Iterable[str] = (),
    loras: Any = None,
) -> dict[str, Any]:
    """The infotext fields of a job (``Seed`` is the job's base; set it per image).

    ``loras`` (the applied ``sdstack.lora.LoraStack``) gives ``Lora hashes``.

    Model hash: ``short_hash`` of ``components.path`` when it is a file (omitted for
    folders and in-memory models); ``VAE hash``/``VAE`` for a separate VAE file;
    ``Denoising strength`` for img2img; ``Clip skip`` when > 1; ``RNG: CPU`` (our noise
    is always drawn on the CPU); ``Emphasis`` when not original and the prompt has
    ``(`` or ``[``; ``Encoding: deprojected`` for the deprojected encoding (``prepare``
    adds ``Deprojector``); ``Version: sdstack <version>``.
    """
    from sdstack import __version__
    from sdstack.generate.samplers import resolve_sampler

    spec, schedule = resolve_sampler(params.sampler, params.schedule_type)
    vae_path = getattr(components, "vae_path", None)
    text = params.prompt + params.negative
    emphasis = None
    if params.emphasis != "original" and ("(" in text or "[" in text):
        emphasis = EMPHASIS_LABELS.get(params.emphasis, params.emphasis)
    return {
        "Steps": params.steps,
        "Sampler": spec.name,
        "Schedule type": None if schedule == "Automatic" else schedule,
        "CFG scale": params.cfg_scale,
        "Seed": params.seed,
        "Size": f"{params.width}x{params.height}",
        "Model hash": file_short_hash(getattr(components, "path", None)),
        "Model": getattr(components, "name", None),
        "VAE hash": file_short_hash(vae_path),
        "VAE": Path(vae_path).name if vae_path is not None else None,
        "Denoising strength": params.denoising_strength if params.is_img2img else None,
        "Clip skip": _clip_skip_field(params.clip_skip),
        "Token merging ratio": params.token_merging or None,
        "RNG": "CPU",
        "Lora hashes": loras.hashes_field() if loras is not None else None,
        "TI hashes": ti_hashes(used_embeddings, embeddings),
        "Emphasis": emphasis,
        "Encoding": "deprojected" if getattr(params, "encoding", None) == "deprojected" else None,
        "Version": f"sdstack {__version__}",
    }


def _clip_skip_field(clip_skip: Any) -> str | None:
    """``Clip skip`` when > 1 (the reference omits 1); ``auto`` not yet resolved -> None."""
    if isinstance(clip_skip, str) or clip_skip <= 1:
        return None
    return plain_number(clip_skip)


def params_from_infotext(info: Mapping[str, str]) -> dict[str, Any]:
    """``GenerationParams`` keyword arguments from :func:`parse_infotext` output.

    Reads Prompt, Negative prompt, Steps, Sampler (old "DPM++ 2M Karras" names split into
    sampler + schedule type), Schedule type, CFG scale, Seed, Size, Clip skip, Emphasis,
    Denoising strength, Pad conds (``True``/``False``), Token merging ratio, Encoding.
    Fields absent from the text are absent from the result.

    Raises:
        SettingError: a numeric or boolean field that does not parse, naming field and value.
    """
    from sdstack.generate.samplers import resolve_sampler

    converters = {
        "Steps": ("steps", int, "an integer"),
        "CFG scale": ("cfg_scale", float, "a number"),
        "Seed": ("seed", int, "an integer"),
        "Clip skip": ("clip_skip", read_number, "a number"),
        "Denoising strength": ("denoising_strength", float, "a number"),
    }
    result: dict[str, Any] = {
        "prompt": info.get("Prompt", ""),
        "negative": info.get("Negative prompt", ""),
    }
    for key, (name, kind, expected) in converters.items():
        if key in info:
            try:
                result[name] = kind(info[key])
            except ValueError as error:
                raise SettingError(
                    f"infotext field {key!r}: cannot read {info[key]!r} as {expected}"
                ) from error
    if "Size-1" in info and "Size-2" in info:
        result["width"], result["height"] = int(info["Size-1"]), int(info["Size-2"])
    if "Sampler" in info:
        spec, schedule = resolve_sampler(info["Sampler"], info.get("Schedule type", "Automatic"))
        result["sampler"], result["schedule_type"] = spec.name, schedule
    if "Emphasis" in info:
        labels = {label.lower(): mode for mode, label in EMPHASIS_LABELS.items()}
        labels.update({mode: mode for mode in EMPHASIS_LABELS})
        result["emphasis"] = labels.get(info["Emphasis"].strip().lower(), info["Emphasis"])
    if "Pad conds" in info:
        result["pad_conds"] = read_bool("Pad conds", info["Pad conds"])
    if "Token merging ratio" in info:
        result["token_merging"] = read_number(info["Token merging ratio"])
    if "Encoding" in info:
        result["encoding"] = info["Encoding"]  # checked with the other settings
    return result


def plain_number(value: float) -> float:
    """``2.0`` -> ``2`` (the reference writes whole numbers without a decimal point)."""
    return int(value) if float(value).is_integer() else value


def read_number(text: str) -> float:
    """An int when the text is a whole number ("2"), else a float ("1.5")."""
    value = float(text)
    return plain_number(value)


def read_bool(key: str, text: str) -> bool:
    """Reference boolean infotext value: ``True``/``False`` (any case).

    Raises:
        SettingError: anything else, naming the field and value.
    """
    value = text.strip().lower()
    if value not in ("true", "false"):
        raise SettingError(f"infotext field {key!r}: cannot read {text!r} as True or False")
    return value == "true"
