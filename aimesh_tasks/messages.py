"""AiMessage and AiResult: validation, canonical JSON and the error mapping.

A message is validated in full where it enters (`parse_message`: `submit()`,
`apply_async`, the ingress); every failure becomes one `InvalidMessage` naming the field,
the rule and, where it helps, the fix. Inside tasks a message is only decoded
(`AiMessage.decode`): its shape is checked, but not the clock or the caps of settings that
may have changed since it was accepted, so a message that grew late is answered with a
`DeadlineExceeded`, never a validation crash.
"""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)

from aimesh_tasks.errors import InvalidMessage
from aimesh_tasks.settings import get_settings

AGENT_ID_PATTERN = re.compile(r"^[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*$")
Role = Literal["system", "developer", "user", "assistant", "tool"]
MetadataValue = str | int | float | bool | None
# Metadata the message path reads (governance): the route a message names, the message
# whose output it was fed from, the hops it carries from outside this cluster, and the
# ingress API key it came with (stamped by the ingress from the verified key; its rate
# limits apply beside the agent's, never instead of them).
ROUTE_KEY, PARENT_KEY, HOPS_KEY = "aimesh.route", "aimesh.parent_id", "aimesh.hops"
API_KEY_KEY = "aimesh.api_key"
# An ingress API key's public prefix (aimesh_tasks/api_keys.py): 'amk_' and 12 hex.
KEY_PREFIX_PATTERN = re.compile(r"^amk_[0-9a-f]{12}$")


def canonical_json(value: Any) -> str:
    """Deterministic JSON: sorted keys, no spaces, UTF-8 kept as is."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


# Validation context of `AiMessage.decode`: shape only, no clock, no settings caps.
_DECODE: Final = {"decode": True}


def _decoding(info: ValidationInfo) -> bool:
    return bool(info.context and info.context.get("decode"))


class TextPart(BaseModel):
    """One text part of a multi-part message content (OpenAI `content: [...]`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One OpenAI-style chat message."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    role: Role
    content: str | list[TextPart]
    name: str | None = Field(None, max_length=64)
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _content_not_empty(self) -> ChatMessage:
        if self.role != "assistant" and not self.text().strip():
            raise ValueError(f"content of a '{self.role}' message must not be empty")
        return self

    def text(self) -> str:
        """The content as one string."""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


HEDGE_AFTER_MAX_MS: Final = 600_000
HEDGE_MAX_EXTRA: Final = 3


class Hedge(BaseModel):
    """When to race a slow call with another at the next-ranked endpoint (resilience/
    hedging.py): `after_ms` N (0: race at once) or `after` "p95" (the first endpoint's live
    p95 latency), and at most `max_extra` extra calls (1..3)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    after_ms: int | None = Field(None, ge=0, le=HEDGE_AFTER_MAX_MS, strict=True)
    after: Literal["p95"] | None = None
    max_extra: int = Field(1, ge=1, le=HEDGE_MAX_EXTRA, strict=True)

    @model_validator(mode="after")
    def _one_delay(self) -> Hedge:
        if (self.after_ms is None) == (self.after is None):
            raise ValueError("give either 'after_ms' (milliseconds, 0 races at once) or "
                             "'after': 'p95', not both or neither")
        return self


class AiMessage(BaseModel):
    """A message from an agent: a chat payload plus who sent it, its limits and deadline.

    | field           | meaning                                                        |
    |-----------------|----------------------------------------------------------------|
    | id              | unique message id (generated when absent)                      |
    | agent_id        | sender, lowercase kebab or snake case                          |
    | messages        | OpenAI-style chat messages (or give `prompt` instead)          |
    | prompt          | a plain prompt; becomes one user message                       |
    | model           | model hint: only endpoints serving this model are candidates   |
    | capability      | capability hint: only endpoints tagged with it are candidates  |
    | max_tokens      | most output tokens the answer may use (1..AIMESH_MAX_TOKENS_CAP)|
    | token_estimate  | caller's estimate of input tokens (optional)                   |
    | priority        | 0 (lowest) .. 9 (highest)                                      |
    | deadline        | aware datetime after which the message is dropped (expires)    |
    | idempotency_key | caller's key: the same key is the same request                 |
    | temperature ... | output-affecting parameters passed to the provider             |
    | metadata        | flat dict of caller data, carried to the result and audit      |
    | no_cache        | do not answer from the cache (still stored unless no_store)    |
    | no_store        | do not store this answer in the cache                          |
    | cache_ttl_s     | this answer's cache TTL (default AIMESH_DEDUP_TTL_SECS)        |
    | cache_group     | share cached answers with a group (AIMESH_CACHE_GROUPS member) |
    | stream          | the call streams: its text is forwarded as it arrives (streams/) |
    | hedge           | race a slow call: {"after_ms": N} or {"after": "p95"}, max_extra |
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(default_factory=lambda: uuid.uuid4().hex, min_length=1, max_length=128)
    agent_id: str = Field(max_length=64)
    messages: list[ChatMessage] = Field(default_factory=list)
    prompt: str | None = None
    model: str | None = Field(None, min_length=1, max_length=128)
    capability: str | None = Field(None, min_length=1, max_length=64)
    max_tokens: int = 256
    token_estimate: int | None = Field(None, ge=0)
    priority: int = Field(5, ge=0, le=9)
    deadline: datetime | None = None
    idempotency_key: str | None = Field(None, min_length=1, max_length=256)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: list[str] | None = Field(None, max_length=4)
    metadata: dict[str, MetadataValue] = Field(default_factory=dict, max_length=64)
    no_cache: bool = False
    no_store: bool = False
    cache_ttl_s: int | None = Field(None, ge=1, le=30 * 86400)
    cache_group: str | None = Field(None, min_length=1, max_length=64)
    # Strict: a "yes" or a 1 is a mistake to name, not a truth to guess.
    stream: bool = Field(False, strict=True)
    hedge: Hedge | None = None
    submitted_at: datetime = Field(default_factory=utcnow)

    @field_validator("agent_id")
    @classmethod
    def _agent_id_case(cls, value: str) -> str:
        if not AGENT_ID_PATTERN.match(value):
            raise ValueError(
                f"'{value}' is not lowercase kebab or snake case (e.g. 'research-bot')"
            )
        return value

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens_in_range(cls, value: int, info: ValidationInfo) -> int:
        if _decoding(info):
            return value
        cap = get_settings().max_tokens_cap
        if not 1 <= value <= cap:
            raise ValueError(f"must be between 1 and {cap} (AIMESH_MAX_TOKENS_CAP), got {value}")
        return value

    @field_validator("deadline")
    @classmethod
    def _deadline_in_future(cls, value: datetime | None, info: ValidationInfo
                            ) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("must be timezone-aware (e.g. '2026-01-01T12:00:00Z')")
        if not _decoding(info) and value <= utcnow():
            raise ValueError(f"{value.isoformat()} is already in the past")
        return value

    @field_validator("metadata")
    @classmethod
    def _governance_metadata(cls, value: dict[str, MetadataValue], info: ValidationInfo
                             ) -> dict[str, MetadataValue]:
        route, parent, hops = value.get(ROUTE_KEY), value.get(PARENT_KEY), value.get(HOPS_KEY)
        if route is not None and not (isinstance(route, str) and AGENT_ID_PATTERN.match(route)):
            raise ValueError(f"'{ROUTE_KEY}' must be a route name (lowercase kebab or snake "
                             f"case), got {route!r}")
        if parent is not None and not (isinstance(parent, str) and 0 < len(parent) <= 128):
            raise ValueError(f"'{PARENT_KEY}' must be a message id (1..128 characters)")
        api_key = value.get(API_KEY_KEY)
        if api_key is not None and not (isinstance(api_key, str)
                                        and KEY_PREFIX_PATTERN.match(api_key)):
            raise ValueError(f"'{API_KEY_KEY}' must be an API key's prefix ('amk_' and 12 "
                             f"hex digits, as `aimesh keys list` shows), got {api_key!r}")
        if hops is None:
            return value
        if isinstance(hops, bool) or not isinstance(hops, int) or hops < 0:
            raise ValueError(f"'{HOPS_KEY}' must be a whole number of hops >= 0, got {hops!r}")
        cap = get_settings().max_hops
        if not _decoding(info) and hops > cap:
            raise ValueError(f"'{HOPS_KEY}' is {hops}, past the cap of {cap} agent-to-agent "
                             "hops (AIMESH_MAX_HOPS)")
        return value

    @model_validator(mode="before")
    @classmethod
    def _prompt_becomes_messages(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("prompt") is not None:
            if data.get("messages"):
                raise ValueError("prompt: give either 'messages' or 'prompt', not both")
            data = {**data, "messages": [{"role": "user", "content": data["prompt"]}]}
            data["prompt"] = None
        return data

    @model_validator(mode="after")
    def _payload_present_and_small(self, info: ValidationInfo) -> AiMessage:
        if not self.messages:
            raise ValueError("messages: give at least one chat message (or a 'prompt')")
        if _decoding(info):
            return self
        size = len(canonical_json([m.model_dump(exclude_none=True) for m in self.messages]))
        cap = get_settings().max_payload_bytes
        if size > cap:
            raise ValueError(f"messages: payload is {size} bytes, over the {cap}-byte cap")
        return self

    @model_validator(mode="after")
    def _hedge_not_streamed(self) -> AiMessage:
        if self.hedge is not None and self.stream:
            raise ValueError("hedge: a streaming message is not hedged (two streams cannot "
                             "be one answer); drop 'hedge' or 'stream'")
        return self

    @field_serializer("submitted_at", "deadline")
    def _iso(self, value: datetime | None) -> str | None:
        return value.isoformat() if value is not None else None

    @classmethod
    def decode(cls, data: dict[str, Any]) -> AiMessage:
        """A message that was validated where it entered, read back inside a task: its
        shape is checked, the clock and the settings caps are not."""
        return cls.model_validate(data, context=_DECODE)

    def expired(self, now: datetime | None = None) -> bool:
        """The deadline has passed (never, without a deadline)."""
        return self.deadline is not None and self.deadline <= (now or utcnow())

    def to_json_dict(self) -> dict[str, Any]:
        """The JSON-safe dict that travels in task arguments."""
        return self.model_dump(mode="json", exclude_none=True, exclude={"prompt"})

    def canonical(self) -> str:
        """Canonical JSON of the whole message."""
        return canonical_json(self.to_json_dict())

    def chat(self) -> list[dict[str, Any]]:
        """The chat messages as plain dicts, as providers receive them."""
        return [m.model_dump(exclude_none=True) for m in self.messages]


class Attempt(BaseModel):
    """One endpoint tried for a message, and how it went."""

    model_config = ConfigDict(extra="forbid")
    endpoint_id: str
    ok: bool
    latency_ms: float
    error: dict[str, Any] | None = None


class AiResult(BaseModel):
    """What a producer's AsyncResult resolves to (as a JSON dict)."""

    model_config = ConfigDict(extra="forbid")

    message_id: str
    agent_id: str
    text: str
    finish_reason: str | None = None
    endpoint_id: str
    model: str
    input_tokens: int
    output_tokens: int
    cost_usd: Decimal
    queue_wait_ms: float
    processing_ms: float
    cached: bool = False
    dedup: bool = False
    cost_saved_usd: Decimal = Decimal(0)
    # What the agent was charged for this message, all its calls (lost ones included).
    charged_usd: Decimal = Decimal(0)
    # True when the provider sent no usage: tokens and cost are the reserved worst case.
    usage_estimated: bool = False
    request_id: str | None = None
    submitted_at: datetime
    started_at: datetime
    finished_at: datetime
    attempts: list[Attempt] = Field(default_factory=list)
    metadata: dict[str, MetadataValue] = Field(default_factory=dict)
    # Messages ahead of it in its endpoint's queue when it was handed there with every
    # candidate at capacity (None: an endpoint had room, or the broker is not Redis).
    queue_position: int | None = None

    @field_serializer("cost_usd", "cost_saved_usd", "charged_usd")
    def _exact_cost(self, value: Decimal) -> str:
        return format(value, "f")

    def to_json_dict(self) -> dict[str, Any]:
        """The JSON-safe dict stored in the result backend."""
        return self.model_dump(mode="json")


_MODEL_LEVEL_ERROR = re.compile(r"^(\w+): (.*)$", re.DOTALL)


def _describe(error: Any) -> dict[str, str]:
    """One pydantic error as {field, reason}; model-level errors name their field first."""
    field = ".".join(str(part) for part in error["loc"])
    reason = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        model, name = (Hedge, "hedge") if error["loc"][0] == "hedge" else (AiMessage, "AiMessage")
        reason = f"unknown field; {name} accepts: {', '.join(sorted(model.model_fields))}"
    elif not field and (named := _MODEL_LEVEL_ERROR.match(reason)):
        field, reason = named.group(1), named.group(2)
    return {"field": field or "message", "reason": reason}


def parse_message(data: AiMessage | dict[str, Any]) -> AiMessage:
    """Validate a message dict into an AiMessage, or raise InvalidMessage naming the field."""
    if isinstance(data, AiMessage):
        return data
    if not isinstance(data, dict):
        raise InvalidMessage(
            f"message: expected a JSON object, got {type(data).__name__}",
            field="message",
            errors=[],
        )
    try:
        return AiMessage.model_validate(data)
    except ValidationError as exc:
        errors = [_describe(e) for e in exc.errors()]
        first = errors[0]
        raise InvalidMessage(
            f"{first['field']}: {first['reason']}", field=first["field"], errors=errors
        ) from None
