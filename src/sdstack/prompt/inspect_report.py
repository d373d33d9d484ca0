"""What ``sdstack prompt inspect`` shows: the reference pipeline's stages as a dict or a table.

The pipeline is the reference (A1111 v1.10) order: extract network tags, split on AND,
schedule each part, then parse emphasis and tokenize each distinct resolved text.
``inspect_prompt`` builds a JSON-ready dict; ``format_report`` renders it as aligned text.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sdstack.prompt.chunks import (
    CHUNK_LENGTH,
    PromptChunk,
    PromptChunks,
    check_comma_backtrack,
    tokenize_prompt,
)
from sdstack.prompt.limits import MAX_STEPS
from sdstack.prompt.networks import NetworkTag
from sdstack.prompt.plan import plan_prompt
from sdstack.prompt.tokenizer import EOS_ID
from sdstack.validate import check_int

REPORT_SHAPE = """\
JSON shape:
  {"prompt": str, "steps": int, "comma_backtrack": int,
   "networks": [{"kind", "name", "items": [str], "te", "unet", "named": {str: str}}],
   "parts": [{"text", "weight", "schedule": [{"end_step", "text"}]}],
   "texts": [{"text", "token_count", "target", "chunks": [
       {"ids": [77 ints], "weights": [77 floats],
        "embeddings": [{"position", "name", "vectors"}],
        "tokens": [{"position", "id", "token", "weight", "embedding": str | null}]}]}]}
  "texts" holds each distinct scheduled text once; "tokens" lists a chunk's body tokens
  (BOS, EOS and padding left out); "position" indexes the chunk's 77 ids (BOS is 0)."""


def inspect_prompt(
    prompt: str,
    tokenizer: Any,
    *,
    steps: int = 20,
    embeddings: Mapping[str, int] | None = None,
    comma_backtrack: int = 20,
) -> dict[str, Any]:
    """The reference pipeline's stages for ``prompt``, as a JSON-ready dict (``REPORT_SHAPE``).

    Raises:
        SettingError: ``steps`` outside 1..``MAX_STEPS`` (1000).
        ValueError: ``comma_backtrack`` outside 0..74.
        PromptSyntaxError: the prompt does not parse (e.g. ``(a:1.2.3)``), or is not
            valid UTF-8 (``PromptEncodingError``).
        PromptLimitError: the schedule would expand past ``sdstack.prompt.limits``.
    """
    # 1. Check inputs.
    check_int("steps", steps, 1, MAX_STEPS)
    check_comma_backtrack(comma_backtrack)
    # 2. Network tags, AND parts and their schedules (limits checked before expanding).
    plan = plan_prompt(prompt, steps)
    parts = [
        {
            "text": part.text,
            "weight": part.weight,
            "schedule": [{"end_step": end, "text": text} for end, text in part.schedule],
        }
        for part in plan.parts
    ]
    # 3. Emphasis and tokens, once per distinct text.
    texts = []
    for resolved in plan.texts():
        chunks = tokenize_prompt(resolved, tokenizer, embeddings, comma_backtrack=comma_backtrack)
        texts.append(_text_entry(resolved, chunks, tokenizer.convert_ids_to_tokens))
    return {
        "prompt": prompt,
        "steps": steps,
        "comma_backtrack": comma_backtrack,
        "networks": [_network_entry(tag) for tag in plan.networks],
        "parts": parts,
        "texts": texts,
    }


def _network_entry(tag: NetworkTag) -> dict[str, Any]:
    return {
        "kind": tag.kind,
        "name": tag.name,
        "items": list(tag.items),
        "te": tag.te,
        "unet": tag.unet,
        "named": dict(tag.named),
    }


def _text_entry(
    text: str, chunks: PromptChunks, id_to_token: Callable[[list[int]], list[str]]
) -> dict[str, Any]:
    return {
        "text": text,
        "token_count": chunks.token_count,
        "target": chunks.target,
        "chunks": [_chunk_entry(chunk, id_to_token) for chunk in chunks.chunks],
    }


def body_length(chunk: PromptChunk) -> int:
    """Tokens before the EOS padding (a literal trailing ``<|endoftext|>`` reads as padding)."""
    end = CHUNK_LENGTH + 1
    while end > 1 and chunk.ids[end - 1] == EOS_ID:
        end -= 1
    return end - 1


def _chunk_entry(
    chunk: PromptChunk, id_to_token: Callable[[list[int]], list[str]]
) -> dict[str, Any]:
    length = body_length(chunk)
    strings = list(id_to_token(list(chunk.ids[1 : length + 1])))
    owner: dict[int, tuple[str, int]] = {}
    for slot in chunk.embeddings:
        for k in range(slot.vectors):
            owner[slot.position + k] = (slot.name, k)
    tokens = []
    for position in range(1, length + 1):
        name, k = owner.get(position, (None, 0))
        tokens.append(
            {
                "position": position,
                "id": chunk.ids[position],
                "token": strings[position - 1] if name is None else f"{name}[{k}]",
                "weight": chunk.weights[position],
                "embedding": name,
            }
        )
    return {
        "ids": list(chunk.ids),
        "weights": list(chunk.weights),
        "embeddings": [
            {"position": s.position, "name": s.name, "vectors": s.vectors} for s in chunk.embeddings
        ],
        "tokens": tokens,
    }


def _table(rows: Sequence[Sequence[str]], right: Sequence[bool], indent: str = "  ") -> list[str]:
    """Rows as aligned columns; ``right[i]`` right-aligns column i."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [
            cell.rjust(width) if align else cell.ljust(width)
            for cell, width, align in zip(row, widths, right, strict=True)
        ]
        lines.append((indent + "  ".join(cells)).rstrip())
    return lines


def _num(value: float) -> str:
    """Five significant digits, always with a decimal point (``1.0``, ``0.90909``)."""
    text = f"{value:.5g}"
    return text if any(c in text for c in ".en") else text + ".0"


def format_report(report: Mapping[str, Any]) -> str:
    """``inspect_prompt``'s dict as readable text: networks, AND parts, schedules, tokens."""
    lines = [f"Prompt: {report['prompt']!r}", ""]
    lines += _format_networks(report["networks"])
    lines += ["", f"AND parts (schedule for {report['steps']} steps):"]
    text_number = {entry["text"]: n for n, entry in enumerate(report["texts"], start=1)}
    for number, part in enumerate(report["parts"], start=1):
        lines.append(f"  part {number}  weight {_num(part['weight'])}  text {part['text']!r}")
        rows = [("end step", "tokens", "text")]
        rows += [
            (str(e["end_step"]), f"Text {text_number[e['text']]}", repr(e["text"]))
            for e in part["schedule"]
        ]
        lines += _table(rows, (True, False, False), indent="    ")
    for number, entry in enumerate(report["texts"], start=1):
        count = f"{entry['token_count']}/{entry['target']}"
        lines += ["", f"Text {number}: {entry['text']!r}  tokens {count}"]
        for index, chunk in enumerate(entry["chunks"], start=1):
            n = len(chunk["tokens"])
            lines.append(f"  chunk {index} ({n} token{'' if n == 1 else 's'})")
            if chunk["tokens"]:
                rows = [("pos", "token", "id", "weight")]
                rows += [
                    (str(t["position"]), t["token"], str(t["id"]), _num(t["weight"]))
                    for t in chunk["tokens"]
                ]
                lines += _table(rows, (True, False, True, True), indent="    ")
    return "\n".join(lines) + "\n"


def _format_networks(networks: Sequence[Mapping[str, Any]]) -> list[str]:
    if not networks:
        return ["Network tags: none"]
    rows = [("kind", "name", "te", "unet", "named")]
    for tag in networks:
        named = " ".join(f"{key}={value}" for key, value in tag["named"].items())
        rows.append((tag["kind"], tag["name"], _num(tag["te"]), _num(tag["unet"]), named))
    return ["Network tags:", *_table(rows, (False, False, True, True, False))]
