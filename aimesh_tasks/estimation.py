"""Upper-bound token estimates, before a call is made.

Input: every byte-level BPE tokenizer in use (GPT, Llama, Claude, Gemini with byte
fallback) emits at least one UTF-8 byte per token, so a message's UTF-8 length is an
upper bound on its content tokens; each chat message adds a few framing tokens
(role, separators), bounded by MESSAGE_OVERHEAD_TOKENS, plus REPLY_PRIMING_TOKENS once.
The estimate overcounts English text about fourfold; it never undercounts.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

MESSAGE_OVERHEAD_TOKENS = 8
REPLY_PRIMING_TOKENS = 3


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(str(part.get("text", "")) for part in content)


def estimate_input_tokens(chat: Iterable[dict[str, Any]]) -> int:
    """An upper bound on the input tokens of a chat, for any byte-level BPE tokenizer."""
    total = REPLY_PRIMING_TOKENS
    for message in chat:
        text = _content_text(message.get("content", "")) + str(message.get("name") or "")
        total += len(text.encode("utf-8")) + MESSAGE_OVERHEAD_TOKENS
    return total
