"""Exact result cache and single-flight, in Redis, shared by every worker.

`join()` decides, atomically in one Lua call, what a message does:
- `hit`: an answer for its request key is cached → answer from it, no call, no charge;
- `follow`: an identical message is in flight → the message is added to the leader's
  followers and its task ends; the leader stores the answer for every follower when it
  finishes (no polling, no worker slot held while waiting);
- `lead`: nothing cached or in flight → it leads, holding a lease with a fencing token.

`finish()`, also one Lua call, stores the answer (unless the leader's message said
no_store, or the answer is an error or truncated), ends the lease if it is still the
leader's own, and hands back the followers to be answered. A leader whose lease ran out
(its worker died and the message was not redelivered in time) is replaced by its first
follower (`sweep_orphans`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from aimesh_tasks import keys
from aimesh_tasks.redis_batch import Batch, Reader, registered_script, run
from aimesh_tasks.redis_client import get_redis

# KEYS: entry, flight, followers, counters, tokens, handoff.
# ARGV: follower_json, lease_ms, mode, task_id. The flight holds 'token|task_id'.
# mode: 'follow' (cache, then an identical call in flight, then lead), 'cache' (cache,
# then lead: never wait on another call), 'lead' (no lookup at all). First of all, a
# message already handed to its call (a duplicate delivery or publish of the same id)
# gets that hand-off back, and touches neither the cache counters nor the flight.
_JOIN = """
local handed = redis.call('GET', KEYS[6])
if handed then return {'handed', handed} end
if ARGV[3] ~= 'lead' then
  local cached = redis.call('GET', KEYS[1])
  if cached then
    redis.call('HINCRBY', KEYS[4], 'hits', 1)
    return {'hit', cached}
  end
  local leader = redis.call('GET', KEYS[2])
  if leader and ARGV[3] == 'follow' then
    local sep = string.find(leader, '|', 1, true)
    if string.sub(leader, sep + 1) == ARGV[4] then
      return {'lead', leader}
    end
    redis.call('RPUSH', KEYS[3], ARGV[1])
    redis.call('PEXPIRE', KEYS[3], tonumber(ARGV[2]) * 4)
    redis.call('HINCRBY', KEYS[4], 'joins', 1)
    return {'follow', leader}
  end
  redis.call('HINCRBY', KEYS[4], 'misses', 1)
end
local token = redis.call('INCR', KEYS[5]) .. '|' .. ARGV[4]
redis.call('SET', KEYS[2], token, 'PX', ARGV[2])
return {'lead', token}
"""

# KEYS: entry, flight, followers. ARGV: token, result_json ('' = nothing to store), ttl_s
_FINISH = """
if ARGV[2] ~= '' then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
end
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('DEL', KEYS[2])
end
local followers = redis.call('LRANGE', KEYS[3], 0, -1)
redis.call('DEL', KEYS[3])
return followers
"""

# KEYS: flight, followers, tokens. ARGV: lease_ms. Promote the first follower of an
# orphaned flight (no leader lease left) to leader.
_ADOPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local first = redis.call('LPOP', KEYS[2])
if not first then return false end
local token = redis.call('INCR', KEYS[3]) .. '|' .. cjson.decode(first)['task_id']
redis.call('SET', KEYS[1], token, 'PX', ARGV[1])
return {first, token}
"""

# KEYS: key. ARGV: value, ttl_s. Keep the value unless one is kept; the kept one or false.
_KEEP_FIRST = """
local kept = redis.call('GET', KEYS[1])
if kept then return kept end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return false
"""

Decision = Literal["hit", "follow", "lead", "handed"]
Mode = Literal["follow", "cache", "lead"]


@dataclass(frozen=True, slots=True)
class Joined:
    """What join() decided; `cached` is the cached AiResult dict on a hit, `token` the
    leader's fencing token when leading, `handed` the envelope (JSON) of a message that
    was already handed to its call."""

    decision: Decision
    cached: dict[str, Any] | None = None
    token: str | None = None
    handed: dict[str, Any] | None = None


def queue_join(batch: Batch, request_key: str, follower: dict[str, Any], *, lease_s: float,
               mode: Mode = "follow") -> Reader[Joined]:
    """Queue `join` on a batch; the reader gives the decision after the batch is sent.
    `follower` is {"task_id", "message"}; the task id is the message id."""
    index = batch.script(
        _JOIN,
        keys=[keys.cache_entry(request_key), keys.flight(request_key),
              keys.flight_followers(request_key), keys.dedup_counters(), keys.flight_tokens(),
              keys.handoff(follower["task_id"])],
        args=[json.dumps(follower), int(lease_s * 1000), mode, follower["task_id"]],
    )

    def read() -> Joined:
        decision, value = batch[index]
        if decision == "handed":
            return Joined("handed", handed=json.loads(value))
        if decision == "hit":
            return Joined("hit", cached=json.loads(value))
        if decision == "follow":
            return Joined("follow")
        return Joined("lead", token=str(value))

    return read


def join(request_key: str, follower: dict[str, Any], *, lease_s: float,
         mode: Mode = "follow") -> Joined:
    """Hit the cache, follow the leader, or lead (see Mode). `follower` is
    {"task_id", "message"}; a redelivered leader finds its own lease."""
    return run(lambda batch: queue_join(batch, request_key, follower, lease_s=lease_s,
                                        mode=mode))


def entry(request_key: str) -> dict[str, Any] | None:
    """The cached answer for a request key, without counting a lookup."""
    cached = get_redis().get(keys.cache_entry(request_key))
    return None if cached is None else dict(json.loads(cached))


def queue_remember_handoff(batch: Batch, message_id: str, envelope: dict[str, Any],
                           ttl_s: int) -> Reader[dict[str, Any]]:
    """Queue keeping the envelope a message is handed off with, unless a concurrent
    delivery of the same message kept one first; the reader gives the one to use."""
    index = batch.script(_KEEP_FIRST, keys=[keys.handoff(message_id)],
                         args=[json.dumps(envelope), ttl_s])

    def read() -> dict[str, Any]:
        earlier = batch[index]
        return envelope if earlier is None else dict(json.loads(earlier))

    return read


def queue_finish(batch: Batch, request_key: str, token: str, result: dict[str, Any] | None,
                 ttl_s: int) -> Reader[list[dict[str, Any]]]:
    """Queue `finish` on a batch; the reader gives the followers after the batch is sent."""
    index = batch.script(
        _FINISH,
        keys=[keys.cache_entry(request_key), keys.flight(request_key),
              keys.flight_followers(request_key)],
        args=[token, json.dumps(result) if result is not None else "", ttl_s],
    )
    return lambda: [json.loads(f) for f in batch[index]]


def finish(request_key: str, token: str, result: dict[str, Any] | None, ttl_s: int
           ) -> list[dict[str, Any]]:
    """Store `result` (None: store nothing), end the lease, return the followers."""
    return run(lambda batch: queue_finish(batch, request_key, token, result, ttl_s))


def adopt_orphan(request_key: str, lease_s: float) -> tuple[dict[str, Any], str] | None:
    """If the flight has followers but no leader, make the first follower leader."""
    client = get_redis()
    adopted = registered_script(client, _ADOPT)(
        keys=[keys.flight(request_key), keys.flight_followers(request_key), keys.flight_tokens()],
        args=[int(lease_s * 1000)],
    )
    if not adopted:
        return None
    return json.loads(adopted[0]), str(adopted[1])


def orphaned_flights() -> list[str]:
    """Request keys with waiting followers whose leader's lease is gone."""
    client = get_redis()
    found = []
    for name in client.scan_iter(match=keys.flight_followers("*"), count=500):
        request_key = name[len(keys.flight("")):-len(":followers")]
        if not client.exists(keys.flight(request_key)):
            found.append(request_key)
    return found


def counters() -> dict[str, int]:
    """Dedup counters since Redis started: hits, misses, joins, semantic_hits."""
    raw = get_redis().hgetall(keys.dedup_counters())
    return {name: int(raw.get(name, 0)) for name in ("hits", "misses", "joins", "semantic_hits")}
