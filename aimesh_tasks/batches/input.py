"""A batch input file (OpenAI's JSONL), checked line by line (pure: no I/O).

Each line: {"custom_id": "...", "method": "POST", "url": "/v1/chat/completions",
"body": {...}}; custom ids are unique. The first bad line is named with its number.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from aimesh_tasks.errors import InvalidInput

CHAT_URL = "/v1/chat/completions"
MAX_LINES = 50_000
MAX_CUSTOM_ID = 512


@dataclass(frozen=True, slots=True)
class BatchLine:
    """One request of a batch."""

    custom_id: str
    body: dict[str, Any]


def _bad(number: int, reason: str) -> InvalidInput:
    return InvalidInput(f"input_file_id: line {number}: {reason}", field="input_file_id",
                        line=number, errors=[])


def _line(number: int, raw: str, url: str) -> BatchLine:
    try:
        item = json.loads(raw)
    except (ValueError, RecursionError):
        raise _bad(number, "not a JSON object") from None
    if not isinstance(item, dict):
        raise _bad(number, "not a JSON object")
    custom_id, body = item.get("custom_id"), item.get("body")
    if not isinstance(custom_id, str) or not 0 < len(custom_id) <= MAX_CUSTOM_ID:
        raise _bad(number, f"custom_id must be a string of 1..{MAX_CUSTOM_ID} characters")
    if item.get("method", "POST") != "POST" or item.get("url", url) != url:
        raise _bad(number, f"method must be POST and url {url}")
    if not isinstance(body, dict):
        raise _bad(number, "body must be a JSON object (a chat completion request)")
    return BatchLine(custom_id=custom_id, body=body)


def parse_input(text: str, url: str = CHAT_URL) -> list[BatchLine]:
    """The lines of a batch input file; InvalidInput names the first bad line."""
    lines: list[BatchLine] = []
    seen: set[str] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        line = _line(number, raw, url)
        if line.custom_id in seen:
            raise _bad(number, f"custom_id '{line.custom_id[:64]}' is used twice")
        seen.add(line.custom_id)
        lines.append(line)
        if len(lines) > MAX_LINES:
            raise _bad(number, f"a batch holds at most {MAX_LINES} requests")
    if not lines:
        raise InvalidInput("input_file_id: the file holds no request", field="input_file_id",
                           errors=[])
    return lines
