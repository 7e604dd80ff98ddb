"""The reaper: close reservations whose task died or whose message expired in the queue.

A reservation still held after AIMESH_RESERVATION_TIMEOUT_S (longer than the broker's
visibility timeout plus the hard time limit, so any redelivery has happened) is decided:
- the call journal has its answer   → settle at the provider's actual usage (the
  settlement keeps the journal entry, as every settlement does: pipeline/durable.py);
- it was claimed (called_at is set) → the provider may have been called: settle at the
  estimate, an upper bound, so the budget is never under-charged;
- never claimed                     → the call was certainly not made: release it.

And a closed reservation is deleted once no delivery of its call can come again, when
the journal forgets the call (`forget_old`); its ledger row stays.
"""

from __future__ import annotations

from collections import Counter

from aimesh_tasks.budgets.ledger import forget_closed, reap_one, stale_reservations
from aimesh_tasks.pipeline import durable, journal
from aimesh_tasks.settings import get_settings


def reap(older_than_s: float | None = None) -> dict[str, int]:
    """Close every stale reservation; how many went each way."""
    if older_than_s is None:
        older_than_s = get_settings().reservation_timeout_s
    outcomes: Counter[str] = Counter()
    for call_key in stale_reservations(older_than_s):
        entry = journal.entry_of(call_key)
        usage = journal.usage(entry) if entry is not None else None
        outcomes[reap_one(call_key, usage, durable.to_keep(entry))] += 1
    return dict(outcomes)


def forget_old() -> int:
    """Delete the reservations closed longer ago than the journal keeps their calls'
    entries (the reservation timeout plus a day), with the answers kept with them; how
    many."""
    return forget_closed(journal.retention_s())
