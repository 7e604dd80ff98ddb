"""Who is calling: an API key in `Authorization: Bearer`, checked against its hash (or,
when configured, a JWT: see jwt_auth.py).

Identity comes only from the key. `X-Source-Agent` (the AIMux convention) picks one of
the agents the key may act for; naming any other agent is a 403, and the header alone
never identifies anyone. A check is trusted for AIMESH_INGRESS_KEY_CACHE_S (at most 1 s),
so a key revoked with `aimesh keys revoke` is refused by every ingress process within
that time, while a busy key costs one database read per process per interval.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from aimesh_tasks.api_keys import AgentNotAllowed, InvalidApiKey, KeyInfo, find_key, key_hash
from aimesh_tasks.messages import KEY_PREFIX_PATTERN
from aimesh_tasks.settings import get_settings

SOURCE_AGENT_HEADER = "x-source-agent"
CACHE_MAX_ENTRIES = 10_000
bearer = HTTPBearer(auto_error=False, description="An aimesh API key (`aimesh keys create`).")


@dataclass(frozen=True, slots=True)
class Caller:
    """A verified caller: the agent it acts as now, and its key."""

    agent_id: str
    key: KeyInfo

    @property
    def admin(self) -> bool:
        return self.key.admin

    @property
    def api_key(self) -> str | None:
        """The prefix of the API key this caller used (None: a JWT): the messages it sends
        count against that key's own rate limits."""
        return self.key.prefix if KEY_PREFIX_PATTERN.match(self.key.prefix) else None


class KeyCache:
    """Key checks of this process, each trusted for `ttl_s` (unknown keys too)."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._seen: dict[str, tuple[float, KeyInfo | None]] = {}

    async def lookup(self, key: str) -> KeyInfo | None:
        """The key's record (None: unknown), read again once the cached one is stale."""
        digest = key_hash(key)
        now = time.monotonic()
        cached = self._seen.get(digest)
        if cached is not None and now - cached[0] < self.ttl_s:
            return cached[1]
        info = await run_in_threadpool(find_key, key)
        if len(self._seen) >= CACHE_MAX_ENTRIES:
            self._seen.clear()  # bounded memory; a flood of bad keys only costs reads
        self._seen[digest] = (now, info)
        return info


_caches: dict[float, KeyCache] = {}


def key_cache() -> KeyCache:
    """This process's key cache."""
    ttl_s = get_settings().ingress_key_cache_s
    return _caches.setdefault(ttl_s, KeyCache(ttl_s))


REFUSED = "invalid API key: give a valid key as 'Authorization: Bearer amk_...'"


async def _credential(token: str) -> KeyInfo | None:
    """An API key's record, or a verified JWT's (when JWTs are on); None: unknown key."""
    from aimesh_tasks.ingress.jwt_auth import jwt_config, looks_like_jwt, verify_jwt

    config = jwt_config()
    if config is not None and looks_like_jwt(token):
        return verify_jwt(token, config)
    return await key_cache().lookup(token)


async def caller(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Caller:
    """The verified caller of a request, or InvalidApiKey (401) / AgentNotAllowed (403)."""
    if credentials is None or not credentials.credentials:
        raise InvalidApiKey("missing API key: send 'Authorization: Bearer amk_...' "
                            "(create one with `aimesh keys create --agent <id>`)")
    info = await _credential(credentials.credentials)
    # One message for unknown, revoked and expired keys: the client learns nothing more.
    if info is None or not info.usable(datetime.now(UTC)):
        raise InvalidApiKey(REFUSED)
    asked = request.headers.get(SOURCE_AGENT_HEADER)
    if asked is None or asked == info.agent_id:
        return Caller(agent_id=info.agent_id, key=info)
    if asked not in info.acts_for:
        raise AgentNotAllowed(f"X-Source-Agent: this key may act for {', '.join(info.agents)}"
                              f", not '{asked[:64]}'", field="X-Source-Agent",
                              agent_id=asked[:64])
    return Caller(agent_id=asked, key=info)


async def admin_caller(who: Annotated[Caller, Depends(caller)]) -> Caller:
    """The caller, when its key is an admin key; else AgentNotAllowed (403)."""
    if not who.admin:
        raise AgentNotAllowed("this route needs an admin key (`aimesh keys create --admin`)")
    return who


CallerDep = Annotated[Caller, Depends(caller)]
AdminDep = Annotated[Caller, Depends(admin_caller)]
