"""Answers that survive a Redis that loses its data: the journal entry kept with the
settlement.

The call journal (journal.py), the call leases and the hand-offs live in Redis. A Redis
restarted without its AOF forgets them; the reconciler publishes the unfinished messages
again (delivery/reconciler.py), and a task retried across the outage runs again. Their
call finds no journal, takes the lease, and its claim finds the reservation already
settled (Postgres): without the journal, the call would be made (and charged) again.

So a metered call's settlement keeps its journal entry: the same JSON, in the reservation
row's `journal_entry`, written by the statement that settles the call (budgets/ledger.py
`settle`: no round trip of its own). A delivery whose claim finds the call settled
`recall`s that entry (pipeline/call.py `_take_over`): it is journalled in Redis again and
the delivery returns it as `recover` returns a journalled one (the answer, or the
failure whose fallback decision is repeated); the provider is not called. Only a call
claimed earlier and kept nowhere is charged `lost` and called again.

Unmetered calls have no reservation, so nothing is kept for them: keeping one would be a
Postgres write per call on a path that makes none today (docs/design-notes.md).

The answer text is user data. It is kept as long as the Redis journal keeps it, the
reservation timeout plus a day after the call settled (`journal.retention_s`), then
deleted with the closed reservation (`budgets/reaper.forget_old`, run by every worker at
the reaper's interval). Off with
AIMESH_DURABLE_ANSWERS=false (nothing is kept, nothing looked up), and always off in
embedded mode (its store and its workers live and die together).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, cast

from aimesh_tasks.budgets.ledger import kept_entry
from aimesh_tasks.errors import NotFound
from aimesh_tasks.pipeline import journal, lease
from aimesh_tasks.pipeline.journal import EntryJson
from aimesh_tasks.redis_batch import Batch
from aimesh_tasks.registry.endpoints import Endpoint, get_endpoint
from aimesh_tasks.registry.live import queue_call_abandoned
from aimesh_tasks.settings import get_settings

logger = logging.getLogger(__name__)


def enabled() -> bool:
    """Settlements keep their journal entry (AIMESH_DURABLE_ANSWERS, not embedded)."""
    settings = get_settings()
    return settings.durable_answers and not settings.embedded


def to_keep(entry: EntryJson | None) -> dict[str, Any] | None:
    """What a settlement keeps of a call's journal entry: the entry, or None when off."""
    return dict(entry) if entry is not None and enabled() else None


@dataclass(frozen=True, slots=True)
class Recalled:
    """A settled call's outcome found with its settlement: as `begin` finds a journalled
    one, the endpoint the call was made at (a routing that ran again may have chosen
    another), and what the call cost the agent in all (nano-USD)."""

    began: lease.Began
    endpoint: Endpoint
    charged_nusd: int


def recall(message_id: str, call_key: str, began: lease.Began, endpoint: Endpoint
           ) -> Recalled | None:
    """Holding the lease of a settled call Redis has no journal of: the entry its
    settlement kept (or its redo's), journalled again, the lease given back and the call
    taken out of the endpoint's calls in flight. None when nothing was kept."""
    kept = kept_entry(message_id, call_key) if enabled() else None
    if kept is None:
        return None
    entry = cast(EntryJson, kept.entry)
    batch = Batch()
    journal.queue_keep(batch, kept.call_key, entry)
    if kept.call_key != call_key:  # answered by a takeover's redo
        lease.queue_charge_under(batch, call_key, kept.call_key, journal.retention_s())
    lease.queue_release(batch, call_key, began.value)
    queue_call_abandoned(batch, endpoint.id, call_key)
    batch.send()
    # A warning: only a Redis that lost its data (or a journal's expiry) brings one here.
    logger.warning("durable.recalled", extra={"message_id": message_id,
                                              "call_key": kept.call_key})
    return Recalled(lease.Began("journalled", json.dumps(entry), kept.call_key),
                    _made_at(kept.endpoint_id, endpoint), kept.charged_nusd)


def _made_at(endpoint_id: str, routed: Endpoint) -> Endpoint:
    """The endpoint a recalled call was made at; the routed one when it is that one, or
    when it has left the registry since (its prices then stand in)."""
    if endpoint_id == routed.id:
        return routed
    try:
        return get_endpoint(endpoint_id)
    except NotFound:
        return routed

