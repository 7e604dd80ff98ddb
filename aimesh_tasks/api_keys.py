"""API keys of the HTTP ingress: created once, kept only as a hash, found by a prefix.

    amk_<12 hex: the prefix, public>_<40 hex: the secret>

The database keeps the prefix (the lookup key, shown by `aimesh keys list`) and the
SHA-256 of the whole key; the key itself is shown once, when it is created. A plain hash
is enough because the secret is 160 random bits (there is nothing to guess). A key names
one agent, may act for a few more (chosen per request with `X-Source-Agent`), may be an
admin key, may expire, and may have rate limits of its own (`set_key_limits`), enforced
beside its agent's on every message sent with it; a revoked or expired key is refused
like an unknown one.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from aimesh_tasks.db import session_scope
from aimesh_tasks.db.models import IngressKeyRow
from aimesh_tasks.errors import AimeshError, NotFound
from aimesh_tasks.governance.agents import validate_agent_id
from aimesh_tasks.governance.limits import RateLimit, check_limit, key_limit_of, write_key_limit
from aimesh_tasks.governance.version import bump_version

KEY_TAG = "amk"
PREFIX_HEX = 12
SECRET_HEX = 40
MAX_ACTS_FOR = 32


class InvalidApiKey(AimeshError):
    """The credential is missing, unknown, revoked or expired (`reason` says which only in
    the server's view; the client is told the same thing for all four)."""

    code = "invalid_api_key"
    http_status = 401


class AgentNotAllowed(AimeshError):
    """The credential is valid but may not act for the agent asked (`agent_id`)."""

    code = "agent_not_allowed"
    http_status = 403


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What a key stands for (never the key itself)."""

    prefix: str
    agent_id: str
    acts_for: tuple[str, ...]
    admin: bool
    note: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    respond_async: bool = False
    limits: RateLimit | None = None

    @property
    def agents(self) -> tuple[str, ...]:
        """Every agent this key may act for, its own first."""
        return (self.agent_id, *(a for a in self.acts_for if a != self.agent_id))

    def usable(self, now: datetime) -> bool:
        """Neither revoked nor expired at `now`."""
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (no secret, no hash)."""
        def iso(value: datetime | None) -> str | None:
            return value.isoformat() if value is not None else None

        return {"prefix": self.prefix, "agent_id": self.agent_id,
                "acts_for": list(self.acts_for), "admin": self.admin, "note": self.note,
                "created_at": iso(self.created_at), "expires_at": iso(self.expires_at),
                "revoked_at": iso(self.revoked_at), "respond_async": self.respond_async,
                "limits": _limits_dict(self.limits)}


def _limits_dict(limits: RateLimit | None) -> dict[str, Any] | None:
    if limits is None:
        return None
    return {**{k: v for k, v in limits.counts().items() if v is not None},
            "on_excess": limits.on_excess}


@dataclass(frozen=True, slots=True)
class CreatedKey:
    """A new key: `key` is shown once and stored nowhere."""

    key: str
    info: KeyInfo


def key_hash(key: str) -> str:
    """The SHA-256 hex digest kept for a key."""
    return hashlib.sha256(key.encode()).hexdigest()


def prefix_of(key: str) -> str | None:
    """The lookup prefix of a well-formed key ('amk_<12 hex>'), else None."""
    parts = key.split("_")
    if (len(parts) != 3 or parts[0] != KEY_TAG or len(parts[1]) != PREFIX_HEX
            or len(parts[2]) != SECRET_HEX or not _hex(parts[1] + parts[2])):
        return None
    return f"{KEY_TAG}_{parts[1]}"


def _hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


def _info(row: IngressKeyRow) -> KeyInfo:
    return KeyInfo(prefix=row.prefix, agent_id=row.agent_id, acts_for=tuple(row.acts_for or ()),
                   admin=row.admin, note=row.note, created_at=_aware(row.created_at),
                   expires_at=_aware(row.expires_at), revoked_at=_aware(row.revoked_at),
                   respond_async=bool(row.respond_async), limits=key_limit_of(row))


def _aware(value: Any) -> Any:
    """Datetimes read back from SQLite lose their zone; they were written in UTC."""
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def create_key(agent_id: str, *, acts_for: Iterable[str] = (), admin: bool = False,
               expires_at: datetime | None = None, note: str = "",
               respond_async: bool = False, limits: RateLimit | None = None) -> CreatedKey:
    """Create a key for `agent_id`; InvalidInput names a bad agent id or limit. With
    respond_async, the ingress answers the key's chat requests 202 (queued) by default;
    `limits` (its `agent_id` and `api_key` are ignored) are the key's own rate limits."""
    validate_agent_id(agent_id)
    if limits is not None:
        check_limit(limits, "limits")
    others = sorted({validate_agent_id(a) for a in acts_for} - {agent_id})[:MAX_ACTS_FOR]
    prefix = f"{KEY_TAG}_{secrets.token_hex(PREFIX_HEX // 2)}"
    key = f"{prefix}_{secrets.token_hex(SECRET_HEX // 2)}"
    row = IngressKeyRow(prefix=prefix, key_sha256=key_hash(key), agent_id=agent_id,
                        acts_for=others, admin=admin, note=note[:256],
                        respond_async=respond_async,
                        created_at=datetime.now(UTC), expires_at=expires_at, revoked_at=None)
    write_key_limit(row, limits)
    with session_scope() as session:
        session.add(row)
        info = _info(row)
    if limits is not None:
        bump_version()
    return CreatedKey(key=key, info=info)


def find_key(key: str) -> KeyInfo | None:
    """The key's record when the key is well formed and its hash matches, else None
    (revoked and expired keys are returned: the caller decides)."""
    prefix = prefix_of(key)
    if prefix is None:
        return None
    with session_scope() as session:
        row = session.get(IngressKeyRow, prefix)
        if row is None or not hmac.compare_digest(row.key_sha256, key_hash(key)):
            return None
        return _info(row)


def _row_of(session: Any, prefix_or_key: str) -> IngressKeyRow:
    """A key's row by its prefix (or the whole key); NotFound if there is none."""
    prefix = prefix_of(prefix_or_key) or prefix_or_key
    row = session.get(IngressKeyRow, prefix)
    if row is None:
        raise NotFound(f"API key '{prefix}' not found; `aimesh keys list` shows the "
                       "prefixes", kind="api_key", id=prefix)
    assert isinstance(row, IngressKeyRow)
    return row


def revoke_key(prefix_or_key: str) -> KeyInfo:
    """Revoke a key by its prefix (or the whole key); NotFound if there is none."""
    with session_scope() as session:
        row = _row_of(session, prefix_or_key)
        if row.revoked_at is None:
            row.revoked_at = datetime.now(UTC)
        return _info(row)


def set_key_limits(prefix_or_key: str, limits: RateLimit | None) -> KeyInfo:
    """Replace a key's own rate limits (None: remove them); NotFound if there is no such
    key, InvalidInput for a limit that limits nothing. Every router applies them to its
    next message."""
    if limits is not None:
        check_limit(limits, "limits")
    with session_scope() as session:
        row = _row_of(session, prefix_or_key)
        write_key_limit(row, limits)
        info = _info(row)
    bump_version()
    return info


def list_keys(agent_id: str | None = None) -> list[KeyInfo]:
    """Every key (or one agent's), oldest first."""
    query = select(IngressKeyRow).order_by(IngressKeyRow.created_at)
    if agent_id is not None:
        query = query.where(IngressKeyRow.agent_id == agent_id)
    with session_scope() as session:
        return [_info(row) for row in session.scalars(query)]
