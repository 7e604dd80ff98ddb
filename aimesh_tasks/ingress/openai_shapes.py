"""OpenAI's chat shapes, in and out: a request becomes an AiMessage dict, an AiResult
becomes a `chat.completion` or a stream of `chat.completion.chunk`s (pure: no I/O).

The request keeps OpenAI's field names; what the message path cannot do (tools, n > 1,
logprobs) is refused with a 400 naming the field instead of being dropped silently.
Parameters that only tune sampling and that no endpoint here uses (seed, penalties) are
accepted and ignored, as OpenAI-compatible servers commonly do.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

FINISH_REASONS = {"stop", "length", "tool_calls", "content_filter", "function_call"}
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "audio", "modalities",
               "prediction", "web_search_options")
CHUNK_WORDS = 4


class StreamOptions(BaseModel):
    """`stream_options`: only include_usage is read."""

    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The body of POST /v1/chat/completions (OpenAI's names)."""

    model_config = ConfigDict(extra="allow")

    model: str = Field("auto", min_length=1, max_length=128,
                       description="An endpoint's model name, an endpoint tag, or 'auto'.")
    messages: list[dict[str, Any]] = Field(min_length=1, max_length=2048)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    logprobs: bool | None = None
    metadata: dict[str, str] | None = Field(None, max_length=16)
    user: str | None = Field(None, max_length=256)
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError("only n=1 is supported (one answer per message)")
        return value

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("logprobs are not supported")
        return value

    def unsupported_field(self) -> str | None:
        """The first extra field given that the message path cannot honour, if any."""
        extra = self.model_extra or {}
        return next((name for name in UNSUPPORTED if extra.get(name) is not None), None)

    def message_fields(self) -> dict[str, Any]:
        """The AiMessage fields this request gives (agent, id and hints come elsewhere)."""
        fields: dict[str, Any] = {"messages": self.messages}
        max_tokens = self.max_completion_tokens or self.max_tokens
        if max_tokens is not None:
            fields["max_tokens"] = max_tokens
        for name in ("temperature", "top_p"):
            if getattr(self, name) is not None:
                fields[name] = getattr(self, name)
        if self.stop is not None:
            fields["stop"] = [self.stop] if isinstance(self.stop, str) else self.stop
        metadata: dict[str, Any] = dict(self.metadata or {})
        if self.user:
            metadata["user"] = self.user
        if metadata:
            fields["metadata"] = metadata
        return fields


def _created(result: dict[str, Any]) -> int:
    try:
        return int(datetime.fromisoformat(str(result["finished_at"])).timestamp())
    except (KeyError, ValueError):
        return 0


def _finish_reason(result: dict[str, Any]) -> str:
    reason = str(result.get("finish_reason") or "stop")
    return reason if reason in FINISH_REASONS else "stop"


def usage(result: dict[str, Any]) -> dict[str, int]:
    """OpenAI's usage object from an AiResult."""
    prompt, completion_ = int(result["input_tokens"]), int(result["output_tokens"])
    return {"prompt_tokens": prompt, "completion_tokens": completion_,
            "total_tokens": prompt + completion_}


def aimesh_extras(result: dict[str, Any]) -> dict[str, Any]:
    """What the message path adds to OpenAI's shape (under `aimesh`; SDKs keep it)."""
    names = ("message_id", "agent_id", "endpoint_id", "cost_usd", "charged_usd", "cached", "dedup",
             "queue_wait_ms", "processing_ms", "usage_estimated", "queue_position")
    return {name: result.get(name) for name in names}


def completion_id(message_id: str) -> str:
    return f"chatcmpl-{message_id}"


def completion(result: dict[str, Any]) -> dict[str, Any]:
    """A `chat.completion` from an AiResult dict."""
    return {
        "id": completion_id(str(result["message_id"])), "object": "chat.completion",
        "created": _created(result), "model": result["model"], "system_fingerprint": None,
        "choices": [{"index": 0, "logprobs": None, "finish_reason": _finish_reason(result),
                     "message": {"role": "assistant", "content": result["text"],
                                 "refusal": None}}],
        "usage": usage(result), "aimesh": aimesh_extras(result),
    }


def text_pieces(text: str) -> list[str]:
    """The text cut into pieces of a few words each (whitespace kept), in order."""
    words = re.findall(r"\s*\S+\s*", text) or ([text] if text else [])
    return ["".join(words[i:i + CHUNK_WORDS]) for i in range(0, len(words), CHUNK_WORDS)]


class Chunks:
    """The `chat.completion.chunk`s of one answer, made one at a time: the role, text
    pieces, the finish reason, then (with include_usage) one chunk with no choices and
    the usage; every chunk carries `usage: null` but that last one."""

    def __init__(self, message_id: str, model: str, created: int, include_usage: bool) -> None:
        self.include_usage = include_usage
        self._base: dict[str, Any] = {
            "id": completion_id(message_id), "object": "chat.completion.chunk",
            "created": created, "model": model, "system_fingerprint": None}
        self._extra: dict[str, Any] = {"usage": None} if include_usage else {}

    def _choice(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**self._base, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                           "finish_reason": finish}], **self._extra}

    def role(self) -> dict[str, Any]:
        """The first chunk: the assistant's role, no text yet."""
        return self._choice({"role": "assistant", "content": ""})

    def text(self, piece: str) -> dict[str, Any]:
        """A chunk of answer text."""
        return self._choice({"content": piece})

    def finish(self, result: dict[str, Any]) -> dict[str, Any]:
        """The chunk with the answer's finish reason."""
        return self._choice({}, _finish_reason(result))

    def usage(self, result: dict[str, Any]) -> dict[str, Any]:
        """The usage chunk (no choices), with what the message path adds."""
        return {**self._base, "choices": [], "usage": usage(result),
                "aimesh": aimesh_extras(result)}

    def ending(self, result: dict[str, Any]) -> list[dict[str, Any]]:
        """The finish chunk, and the usage chunk when include_usage."""
        return [self.finish(result), *([self.usage(result)] if self.include_usage else [])]


def chunks(result: dict[str, Any], include_usage: bool) -> list[dict[str, Any]]:
    """The `chat.completion.chunk`s of a whole answer (a cache or dedup hit): the role,
    the text in pieces of a few words, the finish reason, the usage (see Chunks)."""
    made = Chunks(str(result["message_id"]), str(result["model"]), _created(result),
                  include_usage)
    return [made.role(), *(made.text(piece) for piece in text_pieces(str(result["text"]))),
            *made.ending(result)]


def models_list(names: list[str]) -> dict[str, Any]:
    """OpenAI's model list for the given model names."""
    return {"object": "list",
            "data": [{"id": name, "object": "model", "created": 0, "owned_by": "aimesh"}
                     for name in names]}
