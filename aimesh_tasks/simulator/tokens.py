"""Deterministic token counts and completion text of the simulator, independent of wire format.

Prompt tokens: each message counts ``ceil(len(content) / 4) + 3`` (about four characters per
token plus three tokens of chat framing), summed over all messages. Roles do not count.

Completion: ``n = min(completion_tokens, max_tokens)`` words (one word is one token) drawn
from `VOCABULARY` by a ``random.Random`` seeded with a BLAKE2b digest of the simulator seed
and every message's role and content. The digest is stable across processes, unlike the
salted built-in ``hash``, so the same seed and prompt give the same text everywhere, and a
completion cut by ``max_tokens`` is a prefix of the uncut one. ``finish_reason`` is
"length" when ``max_tokens < completion_tokens``, else "stop".
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

CHARS_PER_TOKEN: Final = 4
TOKENS_PER_MESSAGE: Final = 3

VOCABULARY: Final = tuple(
    """
    agent alpha answer apple batch beta bridge cache cloud cobalt delta design echo engine
    falcon field garden gamma harbor helix index island jade kernel lambda lantern matrix
    meadow nebula network ocean orbit paper pixel quartz queue river router signal silver
    summit task theta timber token union valley vector velvet window yellow zenith zephyr
    amber canyon ember glacier marble prism quiet
    """.split()
)

Message = tuple[str, str]  # (role, content)


@dataclass(frozen=True, slots=True)
class Completion:
    """A simulated answer: its words and token counts."""

    words: list[str]
    prompt_tokens: int
    completion_tokens: int
    truncated: bool

    @property
    def text(self) -> str:
        """The words joined by single spaces."""
        return " ".join(self.words)

    @property
    def finish_reason(self) -> str:
        """"length" when cut by max_tokens, else "stop"."""
        return "length" if self.truncated else "stop"


def count_prompt_tokens(messages: Iterable[Message]) -> int:
    """Sum over messages of ceil(len(content) / 4) + 3."""
    return sum(
        -(-len(content) // CHARS_PER_TOKEN) + TOKENS_PER_MESSAGE for _, content in messages
    )


def prompt_digest(seed: int, messages: Iterable[Message]) -> int:
    """A stable 64-bit digest of the seed and every message's role and content."""
    digest = hashlib.blake2b(f"{seed}\x1f".encode(), digest_size=8)
    for role, content in messages:
        digest.update(role.encode("utf-8", "surrogatepass"))
        digest.update(b"\x00")
        digest.update(content.encode("utf-8", "surrogatepass"))
        digest.update(b"\x1e")
    return int.from_bytes(digest.digest(), "big")


def completion_words(seed: int, messages: Iterable[Message], count: int) -> list[str]:
    """`count` vocabulary words, a pure function of the seed and the messages."""
    return random.Random(prompt_digest(seed, messages)).choices(VOCABULARY, k=count)


def complete(
    seed: int, completion_tokens: int, messages: Sequence[Message], max_tokens: int | None
) -> Completion:
    """The deterministic completion of `messages` under the documented rules."""
    count = completion_tokens if max_tokens is None else min(completion_tokens, max_tokens)
    return Completion(
        words=completion_words(seed, messages, count),
        prompt_tokens=count_prompt_tokens(messages),
        completion_tokens=count,
        truncated=count < completion_tokens,
    )
