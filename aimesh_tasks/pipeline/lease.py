"""One provider call per call key: a lease in Redis that one delivery holds while it calls.

Redelivery (a killed worker, a visibility timeout, a producer that published twice) can
put two deliveries of the same call task in two workers at once. Before calling, a
delivery takes the call key's lease (atomic, with a fencing token, expiring after the
task's hard time limit so a holder that died is replaced). A delivery that finds the
lease held waits for the holder's journalled answer and returns it; it takes over only
when the lease is gone, or when the holder is a process on this host that no longer
exists (a killed prefork child: no need to wait for the expiry).

`begin()` is one Lua call that, in this order: finds the journalled outcome of the call
(under the key it is charged under), or finds the lease held by another delivery, or
takes the lease.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Literal

from aimesh_tasks import keys
from aimesh_tasks.redis_batch import Batch, Reader

# KEYS: charged pointer, lease, token counter.
# ARGV: base call key, journal key prefix, holder ('host|pid'), lease_ms, stale holder
# ('' or the lease value of a holder known dead, which may be replaced).
# The journal key is built here from its prefix: one Redis, not a cluster (keys.py).
_BEGIN = """
local charged = redis.call('GET', KEYS[1]) or ARGV[1]
local journal = redis.call('GET', ARGV[2] .. charged)
if journal then return {'journalled', journal, charged} end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[5] then return {'held', holder, charged} end
local token = redis.call('INCR', KEYS[3]) .. '|' .. ARGV[3]
redis.call('SET', KEYS[2], token, 'PX', ARGV[4])
return {'acquired', token, charged}
"""

# KEYS: lease. ARGV: token. Release the lease only if it is still this holder's.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

State = Literal["journalled", "held", "acquired"]


@dataclass(frozen=True, slots=True)
class Began:
    """What `begin` found: the journal entry (JSON) when `journalled`, the holder's
    lease value when `held`, this delivery's own lease token when `acquired`; and the
    call key the call is charged under."""

    state: State
    value: str
    charged_key: str


def holder_identity() -> str:
    """This process, as a lease holder: 'host|pid'."""
    return f"{socket.gethostname()}|{os.getpid()}"


def holder_is_dead(lease_value: str) -> bool:
    """The holder is a process of this host that no longer exists."""
    _token, _, where = lease_value.partition("|")
    host, _, pid = where.rpartition("|")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def queue_begin(batch: Batch, call_key: str, lease_s: float, stale: str = "") -> Reader[Began]:
    """Queue `begin` for `call_key` on a batch (see the module docstring)."""
    index = batch.script(
        _BEGIN,
        keys=[keys.call_charged(call_key), keys.call_lease(call_key), keys.call_lease_tokens()],
        args=[call_key, keys.call_journal(""), holder_identity(), int(lease_s * 1000), stale],
    )

    def read() -> Began:
        state, value, charged = batch[index]
        return Began(state, str(value), str(charged))

    return read


def queue_release(batch: Batch, call_key: str, token: str) -> None:
    """Queue giving the lease back (only if it is still `token`'s)."""
    batch.script(_RELEASE, keys=[keys.call_lease(call_key)], args=[token])


def queue_charge_under(batch: Batch, call_key: str, charged_key: str, ttl_s: int) -> None:
    """Queue noting that the call is now charged under `charged_key` (after a takeover
    whose predecessor may have reached the provider)."""
    batch.call("SET", keys.call_charged(call_key), charged_key, "EX", ttl_s)
