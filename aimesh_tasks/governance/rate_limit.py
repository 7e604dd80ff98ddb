"""Rate limits shared by every worker: requests and tokens per agent, in moving windows.

Each agent's window (a minute, a day) is a sorted set of the messages admitted in it,
scored by admission time, beside a hash of the tokens each is charged and their total. One
Lua script checks every window and admits the message into all of them, or none: exact
under any number of workers, and idempotent by message id (a redelivered routing task is
not counted twice). Tokens are charged at admission from the estimate (input bound plus
max_tokens) and corrected from the settled usage when the call finishes (`call_finished`),
or to 0 when a cache hit or a single-flight join answers the message without a call.

The script rides routing's one round trip (`queue_route_reads`). That is why this is not
the `limits` package: its Redis moving window runs each `hit` on its own client (one round
trip each, outside our batch), stores one list entry per unit of cost (a 4,000-token
message would push 4,000 timestamps), counts a redelivered message again, cannot check
requests and tokens together (one may pass and the other fail, half consumed), and cannot
correct a cost after the call. The window's clock is Redis's (TIME), so pods with skewed
clocks agree; tests inject one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aimesh_tasks import events, keys
from aimesh_tasks.errors import RateLimited
from aimesh_tasks.estimation import estimate_input_tokens
from aimesh_tasks.governance.limits import MINUTE_S, RateLimit
from aimesh_tasks.governance.table import TABLE, GovernanceTable, queue_table
from aimesh_tasks.messages import AiMessage
from aimesh_tasks.policies.base import Policy, RouteContext
from aimesh_tasks.redis_batch import Batch, Reader, run, send
from aimesh_tasks.redis_client import get_redis

logger = logging.getLogger(__name__)
# A call worker sees a limit added at most this late (a missed correction leaves the
# estimate, which is an upper bound: the count errs on the side of the limit).
CORRECTION_TABLE_AGE_S = 1.0

# KEYS: per window, its log (sorted set) and tokens (hash). ARGV: now_ms (0: Redis TIME),
# message id, tokens; then per window: window_ms, max_requests, max_tokens (-1: none).
# Returns {admitted, retry_after_ms (-1: never fits), window, kind, current, limit}.
ADMIT_LUA = """
local now = tonumber(ARGV[1])
if now <= 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local member, need, n = ARGV[2], tonumber(ARGV[3]), #KEYS / 2
local seen = false
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
  if redis.call('ZSCORE', log, member) then seen = true end
end
if seen then return {1, 0, 0, '', 0, 0} end
for i = 1, n do
  local log, tok = KEYS[2 * i - 1], KEYS[2 * i]
  local window = tonumber(ARGV[1 + 3 * i])
  local max_requests, max_tokens = tonumber(ARGV[2 + 3 * i]), tonumber(ARGV[3 + 3 * i])
  local count = redis.call('ZCARD', log)
  if max_requests >= 0 and count + 1 > max_requests then
    local oldest = redis.call('ZRANGE', log, 0, 0, 'WITHSCORES')
    return {0, tonumber(oldest[2]) + window - now, i, 'requests', count, max_requests}
  end
  local total = tonumber(redis.call('HGET', tok, '_total')) or 0
  if max_tokens >= 0 and total + need > max_tokens then
    if need > max_tokens then return {0, -1, i, 'tokens', total, max_tokens} end
    local entries = redis.call('ZRANGE', log, 0, -1, 'WITHSCORES')
    local freed = 0
    for j = 1, #entries, 2 do
      freed = freed + (tonumber(redis.call('HGET', tok, 'm:' .. entries[j])) or 0)
      if total - freed + need <= max_tokens then
        return {0, tonumber(entries[j + 1]) + window - now, i, 'tokens', total, max_tokens}
      end
    end
    return {0, window, i, 'tokens', total, max_tokens}
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
return {1, 0, 0, '', 0, 0}
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


def subject(agent_id: str) -> str:
    """Whose counters: an agent's (an API key's would be 'key:<id>')."""
    return f"agent:{agent_id}"


def _window_keys(limit: RateLimit) -> list[str]:
    who = subject(limit.agent_id)
    return [k for w in limit.windows
            for k in (keys.rate_log(who, w.window_s), keys.rate_tokens(who, w.window_s))]


def admission_tokens(message: AiMessage) -> int:
    """What a message is charged at admission: its input estimate plus max_tokens."""
    return (message.token_estimate or estimate_input_tokens(message.chat())) + message.max_tokens


@dataclass(frozen=True, slots=True)
class Admission:
    """The script's answer for one message."""

    admitted: bool
    retry_after_ms: int
    window_s: int
    kind: str
    current: int
    limit_value: int

    def refusal(self, agent_id: str) -> RateLimited:
        """The RateLimited error for a refused message."""
        per = "minute" if self.window_s == MINUTE_S else "day"
        name = f"{self.kind}_per_{per}"
        never = self.retry_after_ms < 0
        retry_after_s = None if never else max(self.retry_after_ms, 1) / 1000
        why = (f"this message's estimate alone is over the limit of {self.limit_value} "
               f"{self.kind} per {per}; lower max_tokens or shorten the prompt" if never
               else f"retry after {retry_after_s:.3f} s")
        return RateLimited(
            f"agent '{agent_id}' is at its rate limit {name} = {self.limit_value} "
            f"({self.current} in the last {per}); {why}", policy="rate_limits",
            agent_id=agent_id, limit=name, limit_value=self.limit_value, current=self.current,
            window_s=self.window_s, retry_after_s=retry_after_s)


def queue_admit(batch: Batch, message: AiMessage, limit: RateLimit, now_ms: int = 0
                ) -> Reader[Admission]:
    """Queue admitting `message` under `limit` (now_ms 0: Redis's clock)."""
    args: list[Any] = [now_ms, message.id, admission_tokens(message)]
    for w in limit.windows:
        args += [w.window_s * 1000, -1 if w.max_requests is None else w.max_requests,
                 -1 if w.max_tokens is None else w.max_tokens]
    index = batch.script(ADMIT_LUA, _window_keys(limit), args)

    def read() -> Admission:
        admitted, retry_ms, window, kind, current, value = batch[index]
        window_s = limit.windows[int(window) - 1].window_s if int(window) else 0
        return Admission(bool(admitted), int(retry_ms), window_s, str(kind), int(current),
                         int(value))

    return read


def correct(agent_id: str, message_id: str, tokens: int) -> None:
    """Charge a message's window entries what its call really used (no-op if the agent
    limits no tokens, or the message is not in its windows)."""
    limit = TABLE.current(max_age_s=CORRECTION_TABLE_AGE_S).limits.get(agent_id)
    if limit is None or not limit.limits_tokens:
        return
    send(lambda batch: batch.script(CORRECT_LUA, _window_keys(limit), [message_id, tokens]))


def usage(agent_id: str, window_s: int, now_s: float | None = None) -> tuple[int, int]:
    """(messages, tokens) an agent is counted in a window (read-only; for views and tests)."""
    client = get_redis()
    who = subject(agent_id)
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
        correct(message.agent_id, message.id, tokens)
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
    limit: RateLimit | None
    admission: Admission | None


class RateLimits(Policy):
    """Admit a message into its agent's windows, or refuse it with RateLimited."""

    name = "rate_limits"

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self._clock = clock  # None: Redis's clock
        connect_corrections()

    def _now_ms(self) -> int:
        return int(self._clock() * 1000) if self._clock is not None else 0

    def queue_route_reads(self, batch: Batch, message: AiMessage) -> Reader[Any]:
        # The limits as this process last knew them; before_route checks them against the
        # version read in this same batch and admits again in the rare case they moved.
        limit = TABLE.current().limits.get(message.agent_id)
        read_table = queue_table(batch)
        read_admission = queue_admit(batch, message, limit, self._now_ms()) if limit else None
        return lambda: _Read(read_table(), limit,
                             read_admission() if read_admission is not None else None)

    def before_route(self, ctx: RouteContext) -> None:
        read: _Read = ctx.reads[self.name]
        message = ctx.message
        limit = read.table.limits.get(message.agent_id)
        admission = read.admission
        if limit != read.limit:
            admission = (run(lambda batch: queue_admit(batch, message, limit, self._now_ms()))
                         if limit is not None else None)
        if admission is not None and not admission.admitted:
            raise admission.refusal(message.agent_id)
