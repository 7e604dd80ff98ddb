"""Circuit-breaker state per endpoint in Redis, shared by every worker and pod.

    closed ──N consecutive failures, or failure share > X over ≥ M calls in the window──▶ open
    open ──cooldown over (the next admission sees it)──▶ half_open
    half_open ──a probe succeeds──▶ closed (cooldown back to its base)
    half_open ──a probe fails──▶ open, cooldown doubled up to its cap

Every transition is one Lua script, so workers racing on one endpoint see one state.
Each transition bumps the breaker's `epoch`; a call's outcome counts only in the epoch
it was admitted in. A call admitted while closed that answers after the breaker opened
therefore neither closes it (a late success does not reset another state's window) nor
counts twice; a late failure may only lengthen a running cooldown, to the Retry-After it
carries, never shorten it (the re-cool case of BerriAI/litellm#40130). In half-open,
exactly K probes are admitted cluster-wide: the admission script counts them in a sorted
set; a probe whose worker died frees its slot after `probe_ttl_s`.

Times are epoch seconds given by the caller (`now`), so the transitions can be tested
at any instant without waiting.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from aimesh_tasks import keys
from aimesh_tasks.redis_batch import Batch, Reader, run
from aimesh_tasks.redis_client import get_redis
from aimesh_tasks.settings import Settings, get_settings

State = Literal["closed", "open", "half_open"]
STATES: tuple[State, ...] = ("closed", "open", "half_open")
Admitted = Literal["closed", "probe", "open", "probing"]

# KEYS: state, probes. ARGV: call_key, now, probes allowed (K), probe_ttl_s.
# Returns {kind, epoch, open_until}: 'closed' or 'probe' (call it), 'open' or 'probing'
# (do not). Floats travel as strings (Lua numbers become integers in replies).
_ADMIT = """
local now = tonumber(ARGV[2])
local s = redis.call('HMGET', KEYS[1], 'state', 'epoch', 'open_until')
local state, epoch, open_until = s[1] or 'closed', tonumber(s[2] or '0'), s[3] or '0'
if state == 'closed' then return {'closed', epoch, open_until} end
if state == 'open' then
  if now < tonumber(open_until) then return {'open', epoch, open_until} end
  epoch = epoch + 1
  redis.call('HSET', KEYS[1], 'state', 'half_open', 'epoch', epoch)
  redis.call('DEL', KEYS[2])
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[4]))
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then return {'probe', epoch, open_until} end
if redis.call('ZCARD', KEYS[2]) < tonumber(ARGV[3]) then
  redis.call('ZADD', KEYS[2], now, ARGV[1])
  return {'probe', epoch, open_until}
end
return {'probing', epoch, open_until}
"""

# KEYS: state, calls, failures, probes.
# ARGV: call_key, ok (1/0), admitted epoch, now, failures to open, failure rate,
# min calls, window_s, base cooldown_s, cooldown cap_s, retry_after_s ('' if none).
# Returns what it did: opened, reopened, closed, counted, extended, stale, ignored.
_RECORD = """
local now = tonumber(ARGV[4])
local ok = ARGV[2] == '1'
local s = redis.call('HMGET', KEYS[1], 'state', 'epoch', 'cooldown_s', 'open_until')
local state, epoch = s[1] or 'closed', tonumber(s[2] or '0')
local base, cap = tonumber(ARGV[9]), tonumber(ARGV[10])
local asked = 0
if ARGV[11] ~= '' then asked = math.min(tonumber(ARGV[11]), cap) end
local function open(cooldown, what)
  cooldown = math.max(cooldown, asked)
  redis.call('HSET', KEYS[1], 'state', 'open', 'epoch', epoch + 1, 'failures', 0,
             'cooldown_s', tostring(cooldown), 'open_until', tostring(now + cooldown),
             'opened_at', tostring(now))
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
  return what
end
if tonumber(ARGV[3]) ~= epoch then
  if state == 'open' and not ok and asked > 0 and now + asked > tonumber(s[4] or '0') then
    redis.call('HSET', KEYS[1], 'open_until', tostring(now + asked))
    return 'extended'
  end
  return 'stale'
end
if state == 'half_open' then
  if redis.call('ZREM', KEYS[4], ARGV[1]) == 0 then return 'ignored' end
  if ok then
    redis.call('HSET', KEYS[1], 'state', 'closed', 'epoch', epoch + 1, 'failures', 0,
               'cooldown_s', tostring(base))
    redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
    return 'closed'
  end
  return open(math.min(tonumber(s[3] or ARGV[9]) * 2, cap), 'reopened')
end
if state ~= 'closed' then return 'ignored' end
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then return 'ignored' end
local since = now - tonumber(ARGV[8])
redis.call('ZADD', KEYS[2], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', since)
local failures = 0
if ok then
  redis.call('HSET', KEYS[1], 'failures', 0)
else
  redis.call('ZADD', KEYS[3], now, ARGV[1])
  failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', since)
local window_ms = math.ceil(tonumber(ARGV[8]) * 1000)
redis.call('PEXPIRE', KEYS[2], window_ms)
redis.call('PEXPIRE', KEYS[3], window_ms)
local calls, failed = redis.call('ZCARD', KEYS[2]), redis.call('ZCARD', KEYS[3])
if failures >= tonumber(ARGV[5])
    or (calls >= tonumber(ARGV[7]) and failed / calls > tonumber(ARGV[6])) then
  return open(base, 'opened')
end
return 'counted'
"""


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """The breaker's thresholds (AIMESH_BREAKER_*; see aimesh_tasks/settings.py)."""

    failures: int = 5
    failure_rate: float = 0.5
    min_calls: int = 20
    window_s: float = 60.0
    cooldown_s: float = 30.0
    cooldown_max_s: float = 120.0
    probes: int = 1
    probe_ttl_s: float = 95.0
    all_open: Literal["fail", "soonest"] = "fail"

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> BreakerConfig:
        """The configuration from the settings; a probe's slot outlives its task."""
        s = settings or get_settings()
        return cls(failures=s.breaker_failures, failure_rate=s.breaker_failure_rate,
                   min_calls=s.breaker_min_calls, window_s=s.breaker_window_s,
                   cooldown_s=s.breaker_cooldown_s, cooldown_max_s=s.breaker_cooldown_max_s,
                   probes=s.breaker_probes, probe_ttl_s=s.task_time_limit_s + 5,
                   all_open=s.breaker_all_open)


@dataclass(frozen=True, slots=True)
class BreakerState:
    """An endpoint's breaker as read: `state` as stored (an open breaker whose cooldown
    is over is half-open to the next admission), its epoch, when the cooldown ends, and
    the probes in flight."""

    state: State = "closed"
    epoch: int = 0
    open_until: float = 0.0
    cooldown_s: float = 0.0
    failures: int = 0
    probes: int = 0

    def current(self, now: float) -> State:
        """The state as of `now`."""
        if self.state == "open" and now >= self.open_until:
            return "half_open"
        return self.state

    def exclusion(self, now: float, probes_allowed: int) -> str | None:
        """Why routing leaves the endpoint out now, or None if it may take a call."""
        state = self.current(now)
        if state == "open":
            return (f"breaker_open: cooldown ends in {self.open_until - now:.1f} s "
                    f"(cooldown {self.cooldown_s:g} s)")
        if state == "half_open" and self.state == "half_open" and self.probes >= probes_allowed:
            return f"breaker_open: half-open, {self.probes}/{probes_allowed} probe(s) in flight"
        return None


@dataclass(frozen=True, slots=True)
class Admission:
    """What the admission script said: `kind` 'closed' or 'probe' (make the call) or
    'open' / 'probing' (do not); the epoch the call is admitted in."""

    kind: Admitted
    epoch: int
    open_until: float

    @property
    def admitted(self) -> bool:
        return self.kind in ("closed", "probe")


def _state(values: list[str | None], probes: int) -> BreakerState:
    state, epoch, open_until, cooldown_s, failures = values
    return BreakerState(
        state=state if state in STATES else "closed",
        epoch=int(epoch or 0), open_until=float(open_until or 0.0),
        cooldown_s=float(cooldown_s or 0.0), failures=int(failures or 0), probes=probes)


def queue_states(batch: Batch, endpoint_ids: Iterable[str], now: float, probe_ttl_s: float
                 ) -> Reader[dict[str, BreakerState]]:
    """Queue reading the breakers of `endpoint_ids` (two commands each, no round trip)."""
    ids = list(endpoint_ids)
    first = -1
    for endpoint_id in ids:
        index = batch.call("HMGET", keys.breaker(endpoint_id), "state", "epoch", "open_until",
                           "cooldown_s", "failures")
        batch.call("ZCOUNT", keys.breaker_probes(endpoint_id), now - probe_ttl_s, "+inf")
        first = index if first < 0 else first

    def read() -> dict[str, BreakerState]:
        return {endpoint_id: _state(batch[first + 2 * i], int(batch[first + 2 * i + 1]))
                for i, endpoint_id in enumerate(ids)}

    return read


def read_states(endpoint_ids: Iterable[str], now: float, probe_ttl_s: float = 95.0
                ) -> dict[str, BreakerState]:
    """The breakers of `endpoint_ids`, in one round trip."""
    ids = list(endpoint_ids)
    if not ids:
        return {}
    return run(lambda batch: queue_states(batch, ids, now, probe_ttl_s))


def breaker_states(endpoint_ids: Iterable[str], now: float | None = None) -> dict[str, State]:
    """Each endpoint's breaker state right now (closed, open, half_open): the CLI's column
    and the exporter's aimesh_breaker_state."""
    at = time.time() if now is None else now
    return {eid: state.current(at) for eid, state in read_states(endpoint_ids, at).items()}


def admit(endpoint_id: str, call_key: str, now: float, config: BreakerConfig) -> Admission:
    """Admit a call at an endpoint whose breaker is not plainly closed: turn an open
    breaker whose cooldown is over half-open, and take one of its K probe slots."""
    batch = Batch()
    index = batch.script(_ADMIT, keys=[keys.breaker(endpoint_id), keys.breaker_probes(endpoint_id)],
                         args=[call_key, repr(now), config.probes, repr(config.probe_ttl_s)])
    batch.send()
    kind, epoch, open_until = batch[index]
    return Admission(kind=kind, epoch=int(epoch), open_until=float(open_until))


def queue_record(batch: Batch, endpoint_id: str, call_key: str, *, ok: bool, epoch: int,
                 now: float, config: BreakerConfig, retry_after_s: float | None = None
                 ) -> int:
    """Queue folding one admitted call's outcome into the breaker; the reply's index
    (what the script did: opened, reopened, closed, counted, extended, stale, ignored)."""
    return batch.script(
        _RECORD,
        keys=[keys.breaker(endpoint_id), keys.breaker_calls(endpoint_id),
              keys.breaker_failures(endpoint_id), keys.breaker_probes(endpoint_id)],
        args=[call_key, 1 if ok else 0, epoch, repr(now), config.failures,
              repr(config.failure_rate), config.min_calls, repr(config.window_s),
              repr(config.cooldown_s), repr(config.cooldown_max_s),
              "" if retry_after_s is None else repr(retry_after_s)],
    )


def queue_release_probe(batch: Batch, endpoint_id: str, call_key: str) -> None:
    """Queue giving back the half-open probe slot `call_key` holds, if it holds one (a
    call whose outcome is not counted: another call may probe at once)."""
    batch.call("ZREM", keys.breaker_probes(endpoint_id), call_key)


def record(endpoint_id: str, call_key: str, *, ok: bool, epoch: int, now: float,
           config: BreakerConfig, retry_after_s: float | None = None) -> str:
    """Fold one outcome into the breaker on its own round trip; what the script did."""
    batch = Batch()
    index = queue_record(batch, endpoint_id, call_key, ok=ok, epoch=epoch, now=now,
                         config=config, retry_after_s=retry_after_s)
    batch.send()
    return str(batch[index])


def reset(endpoint_id: str) -> None:
    """Forget an endpoint's breaker (a re-created endpoint; tests)."""
    get_redis().delete(keys.breaker(endpoint_id), keys.breaker_calls(endpoint_id),
                       keys.breaker_failures(endpoint_id), keys.breaker_probes(endpoint_id))
