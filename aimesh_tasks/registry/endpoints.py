"""Endpoints in the database: create, list, change, disable, remove.

Every change bumps a version counter in Redis, so routers on every worker reload their
cached copy on their next message.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy import select

from aimesh_tasks import keys
from aimesh_tasks.db import EndpointRow, session_scope
from aimesh_tasks.errors import InvalidInput, NotFound
from aimesh_tasks.messages import AGENT_ID_PATTERN
from aimesh_tasks.money import nusd_to_usd, usd_to_nusd
from aimesh_tasks.providers import PROVIDERS
from aimesh_tasks.redis_client import get_redis


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
            "input_usd_per_1k": str(nusd_to_usd(self.input_nusd_per_1k)),
            "output_usd_per_1k": str(nusd_to_usd(self.output_nusd_per_1k)),
            "capacity": self.capacity,
            "max_output_tokens": self.max_output_tokens,
            "tags": sorted(self.tags),
            "enabled": self.enabled,
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


class EndpointSpec(BaseModel):
    """What a caller gives to create an endpoint; prices are USD per 1k tokens."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(max_length=64)
    provider: str = "openai"
    base_url: str
    model: str = Field(min_length=1, max_length=128)
    api_key_env: str | None = Field(None, pattern=r"^[A-Z_][A-Z0-9_]*$", max_length=128)
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
    field = ".".join(str(p) for p in first["loc"]) or "endpoint"
    reason = str(first["msg"]).removeprefix("Value error, ")
    return InvalidInput(f"{field}: {reason}", field=field, errors=[])


def _to_endpoint(row: EndpointRow) -> Endpoint:
    return Endpoint(
        id=row.id,
        provider=row.provider,
        base_url=row.base_url,
        model=row.model,
        api_key_env=row.api_key_env,
        input_nusd_per_1k=row.input_nusd_per_1k,
        output_nusd_per_1k=row.output_nusd_per_1k,
        capacity=row.capacity,
        tags=frozenset(row.tags or ()),
        enabled=row.enabled,
        max_output_tokens=row.max_output_tokens,
    )


def bump_version() -> None:
    """Tell every router and worker that the registry changed (a fresh random token, so a
    flushed Redis can never make an old cached version look current)."""
    get_redis().set(keys.registry_version(), uuid.uuid4().hex)


def add_endpoint(**fields: Any) -> Endpoint:
    """Create an endpoint; InvalidInput names a bad field, an existing id is refused."""
    try:
        spec = EndpointSpec(**fields)
    except ValidationError as exc:
        raise _invalid(exc) from None
    with session_scope() as session:
        if session.get(EndpointRow, spec.id) is not None:
            raise InvalidInput(
                f"id: endpoint '{spec.id}' already exists; use update_endpoint to change it",
                field="id",
                errors=[],
            )
        row = EndpointRow(
            id=spec.id,
            provider=spec.provider,
            base_url=spec.base_url,
            model=spec.model,
            api_key_env=spec.api_key_env,
            input_nusd_per_1k=usd_to_nusd(spec.input_usd_per_1k),
            output_nusd_per_1k=usd_to_nusd(spec.output_usd_per_1k),
            capacity=spec.capacity,
            max_output_tokens=spec.max_output_tokens,
            tags=sorted(set(spec.tags)),
            enabled=spec.enabled,
        )
        session.add(row)
        endpoint = _to_endpoint(row)
    bump_version()
    return endpoint


def update_endpoint(endpoint_id: str, **changes: Any) -> Endpoint:
    """Change some fields of an endpoint (same names and rules as add_endpoint)."""
    current = get_endpoint(endpoint_id).to_dict()
    try:
        spec = EndpointSpec(**{**current, **changes})
    except ValidationError as exc:
        raise _invalid(exc) from None
    if spec.id != endpoint_id:
        raise InvalidInput("id: an endpoint's id cannot change", field="id", errors=[])
    with session_scope() as session:
        row = session.get(EndpointRow, endpoint_id)
        if row is None:
            raise NotFound(f"endpoint '{endpoint_id}' not found", kind="endpoint", id=endpoint_id)
        row.provider, row.base_url, row.model = spec.provider, spec.base_url, spec.model
        row.api_key_env = spec.api_key_env
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
