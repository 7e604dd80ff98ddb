"""Rate limits shared by every worker: requests and tokens per agent and per API key,
in moving windows.

Each subject's window (a second, a minute, a day; the subject is 'agent:<id>' or
'key:<prefix>') is a sorted set of the messages admitted in it, scored by admission time,
beside a hash of the tokens each is charged and their total. One Lua script checks every
window of both scopes, the agent's and the key's the message was sent with (metadata
'aimesh.api_key', stamped by the ingress), and admits the message into all of them or
none: exact under any number of workers, and idempotent by message id (a redelivered or
re-queued routing task is not counted twice). Tokens are charged at admission from the
estimate (input bound plus max_tokens) and corrected from the settled usage when the call
finishes (`call_finished`), or to 0 when a cache hit or a single-flight join answers the
message without a call.

Over a limit, the limit's `on_excess` decides: `refuse` raises RateLimited (with
`retry_after_s`); `queue` has `before_route` return the wait until the window frees
enough, and routing publishes the routing task again after it (capped at half the
visibility timeout, checked again on arrival). A queued message holds nothing meanwhile:
it was not admitted into any window, and the budget and the hand-off come after this
policy. A message whose slot frees only after its deadline, or never, is refused.

The script rides routing's one round trip (`queue_route_reads`). That is why this is not
the `limits` package: its Redis moving window runs each `hit` on its own client (one round
trip each, outside our batch), stores one list entry per unit of cost (a 4,000-token
message would push 4,000 timestamps), counts a redelivered message again, cannot check
requests and tokens together (one may pass and the other fail, half consumed), and cannot
correct a cost after the call. The window's clock is Redis's (TIME), so pods with skewed
clocks agree; tests inject one. The admission time is recorded with the routing decision
(the `routed` audit record's `rate_limits.admitted_at_ms`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from aimesh_tasks import events, keys
from aimesh_tasks.errors import RateLimited
from aimesh_tasks.estimation import estimate_input_tokens
from aimesh_tasks.governance.limits import DAY_S, MINUTE_S, SECOND_S, RateLimit
from aimesh_tasks.governance.table import TABLE, GovernanceTable, queue_table
from aimesh_tasks.messages import API_KEY_KEY, AiMessage, utcnow
from aimesh_tasks.policies.base import Policy, RouteContext
from aimesh_tasks.redis_batch import Batch, Reader, run, send
from aimesh_tasks.redis_client import get_redis

logger = logging.getLogger(__name__)
# A call worker sees a limit added at most this late (a missed correction leaves the
# estimate, which is an upper bound: the count errs on the side of the limit).
CORRECTION_TABLE_AGE_S = 1.0

# KEYS: per window (of every scope, in order), its log (sorted set) and tokens (hash).
# ARGV: now_ms (0: Redis TIME), message id, tokens; then per window: window_ms,
# max_requests, max_tokens (-1: none). Returns {admitted, retry_after_ms (-1: never
# fits), window (1-based, 0: admitted), kind, current, limit, admitted_at_ms}; a message
# already admitted gets its first admission's time.
ADMIT_LUA = """
local now = tonumber(ARGV[1])
if now <= 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local member, need, n = ARGV[2], tonumber(ARGV[3]), #KEYS / 2
local seen = nil
for i = 1, n do
  local log, tok = KEYS[2 * i - 1], KEYS[2 * i]
  local cutoff = now - tonumber(ARGV[1 + 3 * i])
  local old = redis.call('ZRANGEBYSCORE', log, '-inf', cutoff)
  if #old > 0 then
    local freed = 0
    for _, m in ipairs(old) do
      freed = freed + (tonumber(redis.call('HGET', tok, 'm:' .. m)) or 0)
      redis.call('HDEL', tok, 'm:' .. m, 'n:' .. m)
    end
    redis.call('HINCRBY', tok, '_total', -freed)
    redis.call('ZREMRANGEBYSCORE', log, '-inf', cutoff)
  end
  seen = seen or redis.call('ZSCORE', log, member)
end
if seen then return {1, 0, 0, '', 0, 0, tonumber(seen)} end
for i = 1, n do
  local log, tok = KEYS[2 * i - 1], KEYS[2 * i]
  local window = tonumber(ARGV[1 + 3 * i])
  local max_requests, max_tokens = tonumber(ARGV[2 + 3 * i]), tonumber(ARGV[3 + 3 * i])
  local count = redis.call('ZCARD', log)
  if max_requests >= 0 and count + 1 > max_requests then
    local oldest = redis.call('ZRANGE', log, 0, 0, 'WITHSCORES')
    return {0, tonumber(oldest[2]) + window - now, i, 'requests', count, max_requests, 0}
  end
  local total = tonumber(redis.call('HGET', tok, '_total')) or 0
  if max_tokens >= 0 and total + need > max_tokens then
    if need > max_tokens then return {0, -1, i, 'tokens', total, max_tokens, 0} end
    local entries = redis.call('ZRANGE', log, 0, -1, 'WITHSCORES')
    local freed = 0
    for j = 1, #entries, 2 do
      freed = freed + (tonumber(redis.call('HGET', tok, 'm:' .. entries[j])) or 0)
      if total - freed + need <= max_tokens then
        return {0, tonumber(entries[j + 1]) + window - now, i, 'tokens', total, max_tokens, 0}
      end
    end
    return {0, window, i, 'tokens', total, max_tokens, 0}
  end
end
for i = 1, n do
  local log, tok = KEYS[2 * i - 1], KEYS[2 * i]
  local window = tonumber(ARGV[1 + 3 * i])
  redis.call('ZADD', log, now, member)
  redis.call('HSET', tok, 'm:' .. member, need)
  redis.call('HINCRBY', tok, '_total', need)
  redis.call('PEXPIRE', log, window)
  redis.call('PEXPIRE', tok, window)
end
return {1, 0, 0, '', 0, 0, now}
"""

# KEYS: per window, log and tokens. ARGV: message id, a call's settled tokens. The first
# settled call replaces the admission estimate; a fallback's call adds to it.
CORRECT_LUA = """
local member, tokens = ARGV[1], tonumber(ARGV[2])
for i = 1, #KEYS / 2 do
  local log, tok = KEYS[2 * i - 1], KEYS[2 * i]
  if redis.call('ZSCORE', log, member) then
    local old = tonumber(redis.call('HGET', tok, 'm:' .. member)) or 0
    local new = tokens
    if redis.call('HINCRBY', tok, 'n:' .. member, 1) > 1 then new = old + tokens end
    redis.call('HSET', tok, 'm:' .. member, new)
    redis.call('HINCRBY', tok, '_total', new - old)
  end
end
return 1
"""


def limits_of(table: GovernanceTable, message: AiMessage) -> list[RateLimit]:
    """The limits a message is counted against: its agent's, then its API key's."""
    found = [table.limits.get(message.agent_id)]
    key = message.metadata.get(API_KEY_KEY)
    if key is not None:
        found.append(table.key_limits.get(str(key)))
    return [limit for limit in found if limit is not None]


def _window_keys(limits: list[RateLimit]) -> list[str]:
    return [k for limit in limits for w in limit.windows
            for k in (keys.rate_log(limit.subject, w.window_s),
                      keys.rate_tokens(limit.subject, w.window_s))]


def admission_tokens(message: AiMessage) -> int:
    """What a message is charged at admission: its input estimate plus max_tokens."""
    return (message.token_estimate or estimate_input_tokens(message.chat())) + message.max_tokens


_PER = {SECOND_S: "second", MINUTE_S: "minute", DAY_S: "day"}


@dataclass(frozen=True, slots=True)
class Admission:
    """The script's answer for one message: admitted (at `admitted_at_ms`, the limiter's
    clock), or refused by one window of `limit`, which frees enough in `retry_after_ms`
    (-1: never, the message alone is over it)."""

    admitted: bool
    retry_after_ms: int
    window_s: int
    kind: str
    current: int
    limit_value: int
    admitted_at_ms: int = 0
    limit: RateLimit | None = None

    def refusal(self, agent_id: str) -> RateLimited:
        """The RateLimited error for a refused message."""
        per = _PER.get(self.window_s, f"{self.window_s} s")
        name = f"{self.kind}_per_{per}"
        never = self.retry_after_ms < 0
        retry_after_s = None if never else max(self.retry_after_ms, 1) / 1000
        why = (f"this message's estimate alone is over the limit of {self.limit_value} "
               f"{self.kind} per {per}; lower max_tokens or shorten the prompt" if never
               else f"retry after {retry_after_s:.3f} s")
        key = self.limit.api_key if self.limit is not None else None
        who = f"API key {key} (agent '{agent_id}')" if key else f"agent '{agent_id}'"
        return RateLimited(
            f"{who} is at its rate limit {name} = {self.limit_value} ({self.current} in the "
            f"last {per}); {why}", policy="rate_limits", agent_id=agent_id, api_key=key,
            limit=name, limit_value=self.limit_value, current=self.current,
            window_s=self.window_s, retry_after_s=retry_after_s)


def queue_admit(batch: Batch, message: AiMessage, limits: list[RateLimit], now_ms: int = 0
                ) -> Reader[Admission]:
    """Queue admitting `message` into every window of `limits` (all or none; now_ms 0:
    Redis's clock)."""
    windows = [(limit, w) for limit in limits for w in limit.windows]
    args: list[Any] = [now_ms, message.id, admission_tokens(message)]
    for _, w in windows:
        args += [w.window_s * 1000, -1 if w.max_requests is None else w.max_requests,
                 -1 if w.max_tokens is None else w.max_tokens]
    index = batch.script(ADMIT_LUA, _window_keys(limits), args)

    def read() -> Admission:
        admitted, retry_ms, window, kind, current, value, at_ms = batch[index]
        limit, refused_by = windows[int(window) - 1] if int(window) else (None, None)
        return Admission(bool(admitted), int(retry_ms),
                         refused_by.window_s if refused_by is not None else 0, str(kind),
                         int(current), int(value), int(at_ms), limit)

    return read


def correct(message: AiMessage, tokens: int) -> None:
    """Charge a message's window entries what its call really used (no-op if neither its
    agent nor its key limits tokens, or the message is not in their windows)."""
    table = TABLE.current(max_age_s=CORRECTION_TABLE_AGE_S)
    limits = [limit for limit in limits_of(table, message) if limit.limits_tokens]
    if limits:
        send(lambda batch: batch.script(CORRECT_LUA, _window_keys(limits),
                                        [message.id, tokens]))


def usage(agent_id: str, window_s: int, now_s: float | None = None, *,
          api_key: str | None = None) -> tuple[int, int]:
    """(messages, tokens) an agent (or, given `api_key`, that key) is counted in a window
    (read-only; for views and tests)."""
    client = get_redis()
    who = RateLimit(agent_id, api_key=api_key).subject
    low = "-inf" if now_s is None else f"({int(now_s * 1000) - window_s * 1000}"
    members = [str(m) for m in client.zrangebyscore(keys.rate_log(who, window_s), low, "+inf")]
    if not members:
        return 0, 0
    charged = client.hmget(keys.rate_tokens(who, window_s), [f"m:{m}" for m in members])
    return len(members), sum(int(t or 0) for t in charged)


def _on_call_finished(sender: Any, message: AiMessage, completion: Any = None, **_: Any
                      ) -> None:
    tokens = completion.input_tokens + completion.output_tokens if completion else 0
    _safely(message, tokens)


def _on_deduplicated(sender: Any, message: AiMessage, outcome: str = "", **_: Any) -> None:
    if outcome in ("hit", "join"):  # answered without a call of its own
        _safely(message, 0)


def _safely(message: AiMessage, tokens: int) -> None:
    try:
        correct(message, tokens)
    except Exception as exc:  # an observer must not fail the message; the estimate stays
        logger.warning("rate_limit.correction_failed", extra={
            "message_id": message.id, "agent_id": message.agent_id, "error": repr(exc)})


def connect_corrections() -> None:
    """Correct token counts from settled calls in this process (once, however often)."""
    events.call_finished.connect(_on_call_finished, dispatch_uid="aimesh.rate_limit.settled")
    events.message_deduplicated.connect(_on_deduplicated,
                                        dispatch_uid="aimesh.rate_limit.deduplicated")


@dataclass(frozen=True, slots=True)
class _Read:
    table: GovernanceTable
    limits: list[RateLimit]
    admission: Admission | None


class RateLimits(Policy):
    """Admit a message into its agent's and its API key's windows; over a limit, refuse
    it with RateLimited or, when that limit says `queue`, have it wait for the next slot."""

    name = "rate_limits"

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self._clock = clock  # None: Redis's clock
        connect_corrections()

    def _now_ms(self) -> int:
        return int(self._clock() * 1000) if self._clock is not None else 0

    def queue_route_reads(self, batch: Batch, message: AiMessage) -> Reader[Any]:
        # The limits as this process last knew them; before_route checks them against the
        # version read in this same batch and admits again in the rare case they moved.
        limits = limits_of(TABLE.current(), message)
        read_table = queue_table(batch)
        read_admission = queue_admit(batch, message, limits, self._now_ms()) if limits else None
        return lambda: _Read(read_table(), limits,
                             read_admission() if read_admission is not None else None)

    def before_route(self, ctx: RouteContext) -> float | None:
        read: _Read = ctx.reads[self.name]
        message = ctx.message
        limits = limits_of(read.table, message)
        admission = read.admission
        if limits != read.limits:
            admission = (run(lambda batch: queue_admit(batch, message, limits, self._now_ms()))
                         if limits else None)
        if admission is None:
            return None
        if admission.admitted:
            ctx.notes[self.name] = {"admitted_at_ms": admission.admitted_at_ms,
                                    "scopes": [limit.subject for limit in limits]}
            return None
        refusal = admission.refusal(message.agent_id)
        wait_s = queue_wait_s(admission, message)
        if wait_s is None:
            raise refusal
        ctx.notes[self.name] = {k: refusal.fields.get(k)
                                for k in ("limit", "limit_value", "current", "api_key")}
        return wait_s


def queue_wait_s(admission: Admission, message: AiMessage) -> float | None:
    """How long a refused message waits for its slot, when the limit that refused it
    queues, the slot will ever free, and it frees before the message's deadline; else
    None (the message is refused)."""
    limit = admission.limit
    if limit is None or limit.on_excess != "queue" or admission.retry_after_ms < 0:
        return None
    wait_s = max(admission.retry_after_ms, 1) / 1000
    if message.expired(utcnow() + timedelta(seconds=wait_s)):
        return None
    return wait_s
