"""Which agents have a budget, mirrored in Redis so unmetered agents skip Postgres.

The set of metered agents is authoritative only while its ready-marker exists; the
marker is written when the set is rebuilt from Postgres. Without it (a new or flushed
Redis) the answer is "unsure" and the caller asks Postgres, never "unmetered". A budget
is committed to Postgres before its agent joins the set, so at worst a message admitted
in that instant runs unmetered, as it would have a moment earlier.
"""

from __future__ import annotations

from sqlalchemy import select

from aimesh_tasks import keys
from aimesh_tasks.db import BudgetRow, session_scope
from aimesh_tasks.redis_batch import Batch, Reader, run
from aimesh_tasks.redis_client import get_redis


def queue_is_metered(batch: Batch, agent_id: str) -> Reader[bool | None]:
    """Queue `is_metered` on a batch."""
    ready = batch.call("EXISTS", keys.metered_agents_ready())
    member = batch.call("SISMEMBER", keys.metered_agents(), agent_id)
    return lambda: bool(batch[member]) if batch[ready] else None


def is_metered(agent_id: str) -> bool | None:
    """True or False from the mirror, or None when the mirror cannot say (ask Postgres)."""
    return run(lambda batch: queue_is_metered(batch, agent_id))


def add_metered(agent_id: str) -> None:
    """Record that the agent now has a budget (after its row is committed)."""
    get_redis().sadd(keys.metered_agents(), agent_id)


def rebuild() -> None:
    """Load the set from Postgres and mark it authoritative."""
    with session_scope() as session:
        agents = list(session.scalars(select(BudgetRow.agent_id)))
    pipe = get_redis().pipeline(transaction=True)
    pipe.delete(keys.metered_agents())
    if agents:
        pipe.sadd(keys.metered_agents(), *agents)
    pipe.set(keys.metered_agents_ready(), "1")
    pipe.execute()
