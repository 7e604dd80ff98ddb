"""Endpoints in the database: create, list, change, disable, remove.

Every change bumps a version counter in Redis, so routers on every worker reload their
cached copy on their next message. An endpoint names where its API key is (an
environment variable or a file on its workers, see providers/credentials.py), never the
key; workers that cannot find it report so (registry/key_reports.py). Its base URL passes
the upstream URL policy (registry/upstream.py). Its `origin` says who made it: an
operator, or a worker that announced it (registry/announce.py).

A base URL is the server's, without the API path the adapter adds: one ending in the
adapter's version prefix (`http://host/v1` for OpenAI, the SDKs' habit) is stored without
it, since the meaning is plain and the adapter would call `/v1/v1/...`; one ending in a
different version, or in a full API path, is refused with the URL to give instead.
"""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass
from decimal import Decimal
from functools import cache
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from sqlalchemy import select

from aimesh_tasks import keys
from aimesh_tasks.db import EndpointRow, session_scope
from aimesh_tasks.errors import InvalidInput, NotFound
from aimesh_tasks.messages import AGENT_ID_PATTERN, AiMessage
from aimesh_tasks.money import nusd_to_usd, usd_to_nusd
from aimesh_tasks.providers import PROVIDERS
from aimesh_tasks.providers.credentials import ENV_NAME, looks_like_key
from aimesh_tasks.redis_client import get_redis
from aimesh_tasks.registry.upstream import check_operator_url

Origin = Literal["operator", "announced"]
_VERSION_SEGMENT = re.compile(r"^v\d+(?:(?:alpha|beta)\d*)?$")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """An endpoint as routers and callers see it (prices in nano-USD per 1k tokens)."""

    id: str
    provider: str
    base_url: str
    model: str
    api_key_env: str | None
    input_nusd_per_1k: int
    output_nusd_per_1k: int
    capacity: int
    tags: frozenset[str]
    enabled: bool
    max_output_tokens: int | None = None
    api_key_file: str | None = None
    origin: Origin = "operator"  # 'announced': a worker's --serve made it (registry/announce.py)

    @property
    def announced(self) -> bool:
        """Made by a worker that serves it: routed to only while one of them lives."""
        return self.origin == "announced"

    @property
    def queue(self) -> str:
        """The Celery queue of this endpoint."""
        return keys.endpoint_queue(self.id)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict with prices in USD per 1k tokens as decimal strings."""
        return {
            "id": self.id,
            "provider": self.provider,
            "base_url": self.base_url,
            "model": self.model,
            "api_key_env": self.api_key_env,
            "api_key_file": self.api_key_file,
            "input_usd_per_1k": str(nusd_to_usd(self.input_nusd_per_1k)),
            "output_usd_per_1k": str(nusd_to_usd(self.output_nusd_per_1k)),
            "capacity": self.capacity,
            "max_output_tokens": self.max_output_tokens,
            "tags": sorted(self.tags),
            "enabled": self.enabled,
            "origin": self.origin,
        }


def validate_base_url(url: str) -> str:
    """An http(s) URL with a host, no credentials, query or fragment; trailing '/' dropped."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"'{url}' is not an http:// or https:// URL with a host")
    if parts.username or parts.password:
        raise ValueError("must not carry credentials; give API keys through the environment")
    if parts.query or parts.fragment:
        raise ValueError("must not have a query string or fragment")
    return url.rstrip("/")


@cache
def api_path(provider: str) -> str:
    """The path an adapter calls under a base URL (for Gemini, with model 'MODEL')."""
    probe = AiMessage(agent_id="url-check", prompt="x", max_tokens=1)
    return PROVIDERS[provider].build_request("MODEL", probe, None).path


def normalise_base_url(url: str, provider: str) -> str:
    """`url` without a trailing API version prefix the adapter adds itself; ValueError
    when it ends in another version or carries the API path (module docstring)."""
    parts = urlsplit(url)
    path = api_path(provider)
    adapter = [s for s in path.split("/") if s]
    segments = [s for s in parts.path.split("/") if s]
    base = urlunsplit((parts.scheme, parts.netloc, "", "", ""))
    if adapter[0] in segments:
        at = segments.index(adapter[0])
        keep = base + "".join("/" + s for s in segments[:at])
        if at == len(segments) - 1:
            return keep
        if segments[at + 1] == adapter[1]:
            raise ValueError(f"'{url}' includes the API path; give the server's base URL "
                             f"'{keep}' (the {provider} adapter calls {keep}{path})")
    elif segments and _VERSION_SEGMENT.match(segments[-1]):
        keep = base + "".join("/" + s for s in segments[:-1])
        raise ValueError(f"'{url}' ends in API version '/{segments[-1]}', but the {provider} "
                         f"adapter calls {keep}{path}; give '{keep}'")
    return url


def _check_key_env(value: str | None) -> str | None:
    if value is None:
        return None
    # A long value is never echoed: it may be a key pasted by mistake.
    if looks_like_key(value) or (len(value) >= 20 and not ENV_NAME.match(value)):
        raise ValueError("this looks like an API key itself; pass the *name* of the "
                         "environment variable that holds it (e.g. OPENAI_API_KEY), set on "
                         "the endpoint's workers: the registry is stored in the database")
    if not ENV_NAME.match(value) or len(value) > 128:
        raise ValueError(f"'{value[:20]}' is not an environment variable name (capital "
                         "letters, digits and '_', not starting with a digit, at most 128)")
    return value


def _check_key_file(value: str | None) -> str | None:
    if value is None:
        return None
    if looks_like_key(value) and not value.startswith("/"):
        raise ValueError("this looks like an API key itself; pass the path of a file that "
                         "holds it (e.g. /var/run/secrets/llm/api-key) on the endpoint's "
                         "workers")
    if not os.path.isabs(value) or any(c in value for c in "\0\n\r") or len(value) > 1024:
        raise ValueError(f"'{value[:80]}' is not an absolute file path (one line, at most "
                         "1024 characters); it is read on the endpoint's workers")
    return value


class EndpointSpec(BaseModel):
    """What a caller gives to create an endpoint; prices are USD per 1k tokens."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(max_length=64)
    provider: str = "openai"
    base_url: str
    model: str = Field(min_length=1, max_length=128)
    api_key_env: str | None = None
    api_key_file: str | None = None
    input_usd_per_1k: Decimal | str
    output_usd_per_1k: Decimal | str
    capacity: int = Field(64, ge=1, le=100_000)
    max_output_tokens: int | None = Field(None, ge=1)
    tags: list[str] = Field(default_factory=list)
    enabled: bool = True

    @field_validator("id")
    @classmethod
    def _id_case(cls, value: str) -> str:
        if not AGENT_ID_PATTERN.match(value):
            raise ValueError(f"'{value}' is not lowercase kebab or snake case")
        return value

    @field_validator("provider")
    @classmethod
    def _known_provider(cls, value: str) -> str:
        if value not in PROVIDERS:
            raise ValueError(f"unknown provider '{value}'; known: {', '.join(sorted(PROVIDERS))}")
        return value

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        return validate_base_url(value)

    @field_validator("api_key_env")
    @classmethod
    def _key_env(cls, value: str | None) -> str | None:
        return _check_key_env(value)

    @field_validator("api_key_file")
    @classmethod
    def _key_file(cls, value: str | None) -> str | None:
        return _check_key_file(value)

    @model_validator(mode="after")
    def _one_key_source_and_a_base_url(self) -> EndpointSpec:
        if self.api_key_env and self.api_key_file:
            raise ValueError("give api_key_env or api_key_file, not both")
        try:
            self.base_url = normalise_base_url(self.base_url, self.provider)
        except ValueError as exc:
            raise ValueError(f"base_url: {exc}") from None
        return self

    @field_validator("input_usd_per_1k", "output_usd_per_1k", mode="before")
    @classmethod
    def _exact_price(cls, value: Any) -> Decimal:
        if value is None:
            raise ValueError("a price is required: an unpriced model would run unmetered, "
                             "so it is refused (give 0 for a free local model)")
        usd_to_nusd(value, field="price")
        return Decimal(str(value)) if not isinstance(value, Decimal) else value


def _invalid(exc: ValidationError) -> InvalidInput:
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first["loc"])
    reason = str(first["msg"]).removeprefix("Value error, ")
    if not field:  # a rule across fields names its field first ("base_url: ...")
        field = reason.split(":", 1)[0] if ":" in reason else "endpoint"
        reason = reason.split(":", 1)[1].strip() if ":" in reason else reason
    return InvalidInput(f"{field}: {reason}", field=field, errors=[])


def _to_endpoint(row: EndpointRow) -> Endpoint:
    return Endpoint(
        id=row.id,
        provider=row.provider,
        base_url=row.base_url,
        model=row.model,
        api_key_env=row.api_key_env,
        api_key_file=row.api_key_file,
        input_nusd_per_1k=row.input_nusd_per_1k,
        output_nusd_per_1k=row.output_nusd_per_1k,
        capacity=row.capacity,
        tags=frozenset(row.tags or ()),
        enabled=row.enabled,
        max_output_tokens=row.max_output_tokens,
        origin="announced" if row.origin == "announced" else "operator",
    )


def bump_version() -> None:
    """Tell every router and worker that the registry changed (a fresh random token, so a
    flushed Redis can never make an old cached version look current)."""
    get_redis().set(keys.registry_version(), uuid.uuid4().hex)


def add_endpoint(**fields: Any) -> Endpoint:
    """Create an endpoint; InvalidInput names a bad field (the base URL passes the
    upstream URL policy, registry/upstream.py), an existing id is refused."""
    spec = parse_spec(fields)
    check_operator_url(spec.base_url)
    endpoint = insert_endpoint(spec, "operator")
    if endpoint is None:
        raise InvalidInput(
            f"id: endpoint '{spec.id}' already exists; change it with `aimesh endpoints "
            f"update {spec.id}` (update_endpoint in Python)",
            field="id",
            errors=[],
        )
    return endpoint


def parse_spec(fields: dict[str, Any]) -> EndpointSpec:
    """The fields as an EndpointSpec, or InvalidInput naming the first bad one."""
    try:
        return EndpointSpec(**fields)
    except ValidationError as exc:
        raise _invalid(exc) from None


def insert_endpoint(spec: EndpointSpec, origin: Origin) -> Endpoint | None:
    """Store a new endpoint (its URL already checked) and tell every router; None if
    the id exists (an IntegrityError when another process inserts it at the same time)."""
    with session_scope() as session:
        if session.get(EndpointRow, spec.id) is not None:
            return None
        row = EndpointRow(
            id=spec.id,
            provider=spec.provider,
            base_url=spec.base_url,
            model=spec.model,
            api_key_env=spec.api_key_env,
            api_key_file=spec.api_key_file,
            input_nusd_per_1k=usd_to_nusd(spec.input_usd_per_1k),
            output_nusd_per_1k=usd_to_nusd(spec.output_usd_per_1k),
            capacity=spec.capacity,
            max_output_tokens=spec.max_output_tokens,
            tags=sorted(set(spec.tags)),
            enabled=spec.enabled,
            origin=origin,
        )
        session.add(row)
        endpoint = _to_endpoint(row)
    bump_version()
    return endpoint


def update_endpoint(endpoint_id: str, **changes: Any) -> Endpoint:
    """Change some fields of an endpoint (same names and rules as add_endpoint). Giving
    one key source replaces the other; None clears one."""
    current = get_endpoint(endpoint_id).to_dict()
    del current["origin"]  # kept: an operator's change does not make it theirs
    if changes.get("api_key_env"):
        changes.setdefault("api_key_file", None)
    if changes.get("api_key_file"):
        changes.setdefault("api_key_env", None)
    try:
        spec = EndpointSpec(**{**current, **changes})
    except ValidationError as exc:
        raise _invalid(exc) from None
    if spec.id != endpoint_id:
        raise InvalidInput("id: an endpoint's id cannot change", field="id", errors=[])
    if "base_url" in changes:
        check_operator_url(spec.base_url)
    with session_scope() as session:
        row = session.get(EndpointRow, endpoint_id)
        if row is None:
            raise NotFound(f"endpoint '{endpoint_id}' not found", kind="endpoint", id=endpoint_id)
        row.provider, row.base_url, row.model = spec.provider, spec.base_url, spec.model
        row.api_key_env, row.api_key_file = spec.api_key_env, spec.api_key_file
        row.input_nusd_per_1k = usd_to_nusd(spec.input_usd_per_1k)
        row.output_nusd_per_1k = usd_to_nusd(spec.output_usd_per_1k)
        row.capacity, row.tags, row.enabled = spec.capacity, sorted(set(spec.tags)), spec.enabled
        row.max_output_tokens = spec.max_output_tokens
        endpoint = _to_endpoint(row)
    bump_version()
    return endpoint


def set_enabled(endpoint_id: str, enabled: bool) -> Endpoint:
    """Enable or disable an endpoint; a disabled one is never routed to."""
    return update_endpoint(endpoint_id, enabled=enabled)


def remove_endpoint(endpoint_id: str) -> None:
    """Delete an endpoint from the registry."""
    with session_scope() as session:
        row = session.get(EndpointRow, endpoint_id)
        if row is None:
            raise NotFound(f"endpoint '{endpoint_id}' not found", kind="endpoint", id=endpoint_id)
        session.delete(row)
    bump_version()


def get_endpoint(endpoint_id: str) -> Endpoint:
    """One endpoint by id, or NotFound."""
    with session_scope() as session:
        row = session.get(EndpointRow, endpoint_id)
        if row is None:
            raise NotFound(
                f"endpoint '{endpoint_id}' not found; `aimesh endpoints list` shows the known ones",
                kind="endpoint",
                id=endpoint_id,
            )
        return _to_endpoint(row)


def list_endpoints(*, include_disabled: bool = True) -> list[Endpoint]:
    """Every endpoint, ordered by id."""
    query = select(EndpointRow).order_by(EndpointRow.id)
    if not include_disabled:
        query = query.where(EndpointRow.enabled.is_(True))
    with session_scope() as session:
        return [_to_endpoint(row) for row in session.scalars(query)]
