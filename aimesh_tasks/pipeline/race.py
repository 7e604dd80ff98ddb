"""The race of a hedged message: which of its calls answers it, once, and who fails it.

A hedged message (resilience/hedging.py) has lanes: lane 0 is the primary (its retries
and fallbacks included), lanes 1.. the hedges, each one call at one endpoint under its own
call key (`keys.hedge_call_key`). Their calls run on different workers; these atomic
scripts on two keys beside the hand-off record decide between them:

| step            | script                                                          |
|-----------------|-----------------------------------------------------------------|
| a call answered | `claim`: SET NX the winner key with its lane, and on winning    |
|                 | PUBLISH on the race's channel; only the winner's answer becomes |
|                 | the message's result (a redelivered winner finds its own lane)  |
| a hedge fires   | `start_hedge`: refused once the race is won or closed; else the |
|                 | lane is noted started                                           |
| a hedge failed  | `hedge_failed`: noted finished; if the primary failed already   |
|                 | and no other hedge runs, the race closes and this hedge delivers|
|                 | the primary's error (kept by `primary_failed`)                  |
| the primary     | `primary_failed`: 'lost' if a lane won; 'wait' (its error kept) |
| failed for good | while a hedge that started has not finished; else 'deliver',    |
|                 | and the race closes: a hedge not yet started will not fire      |

So the producer's AsyncResult resolves once: with the first answer, or with the primary's
error once every started call failed. A hedge that was never published or never started
cannot hold the race open: only a started one counts, and a started call ends (answer,
error, timeout, or its redelivery after a worker died); a hedge's task that is
dead-lettered ends its lane as failed (`bury_hedge`, from delivery/terminal.py).

The win is announced on `keys.race_channel(message_id)`; `RACE_WATCH`, one subscriber
thread per worker process (aimesh_tasks/flag_watch.py), sets the cancel event of the
race's calls in flight here, and the provider call is aborted (its connection closed: the
provider sees the disconnect).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from celery import states

from aimesh_tasks import keys
from aimesh_tasks.errors import error_from_dict
from aimesh_tasks.flag_watch import FlagWatch
from aimesh_tasks.redis_batch import Batch, Reader
from aimesh_tasks.settings import get_settings

# KEYS: winner, race. ARGV: lane, ttl_s, channel, message_id
_CLAIM = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  redis.call('PUBLISH', ARGV[3], ARGV[4])
  return 1
end
return redis.call('GET', KEYS[1]) == ARGV[1] and 1 or 0
"""

# KEYS: winner, race. ARGV: lane, ttl_s
_START_HEDGE = """
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('HEXISTS', KEYS[2], 'closed') == 1 then
  return 0
end
redis.call('HSET', KEYS[2], 's' .. ARGV[1], 1)
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 1
"""

_RUNNING = """
local function running(race)
  local fields = redis.call('HKEYS', race)
  for _, name in ipairs(fields) do
    if string.sub(name, 1, 1) == 's' and
       redis.call('HEXISTS', race, 'd' .. string.sub(name, 2)) == 0 then
      return true
    end
  end
  return false
end
"""

# KEYS: winner, race. ARGV: lane, ttl_s. Returns the primary's error to deliver, or false.
_HEDGE_FAILED = _RUNNING + """
redis.call('HSET', KEYS[2], 'd' .. ARGV[1], 1)
redis.call('EXPIRE', KEYS[2], ARGV[2])
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('HEXISTS', KEYS[2], 'closed') == 1 then
  return false
end
local error = redis.call('HGET', KEYS[2], 'error')
if not error or running(KEYS[2]) then
  return false
end
redis.call('HSET', KEYS[2], 'closed', 1)
return error
"""

# KEYS: winner, race. ARGV: error JSON, ttl_s
_PRIMARY_FAILED = _RUNNING + """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 'lost'
end
redis.call('EXPIRE', KEYS[2], ARGV[2])
if running(KEYS[2]) then
  redis.call('HSET', KEYS[2], 'error', ARGV[1])
  return 'wait'
end
redis.call('HSET', KEYS[2], 'closed', 1)
return 'deliver'
"""

Verdict = Literal["lost", "wait", "deliver"]
RACE_WATCH = FlagWatch("race", keys.RACE_CHANNEL_PATTERN, keys.race_winner, pattern=True)


@dataclass(frozen=True, slots=True)
class RaceState:
    """What a call of a raced message reads in its begin round trip: the winning lane
    (None: no call answered yet), whether the primary's failure closed the race, and the
    hedge lanes already started (a redelivered hedge finds its own lane among them)."""

    winner: int | None = None
    closed: bool = False
    started: frozenset[int] = frozenset()


def _ttl_s() -> int:
    """As long as the hand-off record: every redelivery of a call finds its race."""
    return int(get_settings().reservation_timeout_s) + 86400


def queue_read(batch: Batch, message_id: str) -> Reader[RaceState]:
    """Queue reading the race of `message_id` on a batch."""
    winner = batch.call("GET", keys.race_winner(message_id))
    fields = batch.call("HKEYS", keys.race(message_id))  # a few: s<lane>, d<lane>, closed

    def read() -> RaceState:
        won = batch[winner]
        names: list[str] = batch[fields]
        started = frozenset(int(n[1:]) for n in names if n[:1] == "s" and n[1:].isdigit())
        return RaceState(int(won) if won is not None else None, "closed" in names, started)

    return read


def read(message_id: str) -> RaceState:
    """The race of `message_id` now (its own round trip)."""
    batch = Batch()
    reader = queue_read(batch, message_id)
    batch.send()
    return reader()


def _run(source: str, message_id: str, args: list[Any]) -> Any:
    """One race script on its own round trip, on the race's two keys."""
    batch = Batch()
    index = batch.script(source, [keys.race_winner(message_id), keys.race(message_id)], args)
    batch.send()
    return batch[index]


def claim(message_id: str, lane: int) -> bool:
    """Claim the race for `lane`'s answer; True if it is the message's result (it was
    first, or this lane had claimed it before a redelivery)."""
    won = _run(_CLAIM, message_id, [lane, _ttl_s(), keys.race_channel(message_id),
                                    message_id])
    return bool(int(won))


def start_hedge(message_id: str, lane: int) -> bool:
    """Note hedge `lane` started; False if the race was won or closed meanwhile."""
    return bool(int(_run(_START_HEDGE, message_id, [lane, _ttl_s()])))


def hedge_failed(message_id: str, lane: int) -> dict[str, Any] | None:
    """Note hedge `lane` failed; the primary's error if this hedge must deliver it."""
    kept = _run(_HEDGE_FAILED, message_id, [lane, _ttl_s()])
    return json.loads(kept) if kept else None


def primary_failed(message_id: str, error: dict[str, Any]) -> Verdict:
    """The primary lane failed for good: 'lost' (a lane won), 'wait' (a hedge runs: it
    delivers `error` if it fails too) or 'deliver' (the primary delivers its error)."""
    verdict = _run(_PRIMARY_FAILED, message_id, [json.dumps(error), _ttl_s()])
    return str(verdict)  # type: ignore[return-value]


def bury_hedge(app: Any, task_id: str) -> bool:
    """A dead-lettered task that is a hedge's (its id is its call key) ends its lane as
    failed; if the race's failure is then this lane's to deliver, it is stored under the
    message's id. False if `task_id` is no hedge's."""
    found = keys.hedge_of_call_key(task_id)
    if found is None:
        return False
    message_id, lane = found
    kept = hedge_failed(message_id, lane)
    if kept is not None:
        app.backend.store_result(message_id, error_from_dict(kept), states.FAILURE)
    return True
