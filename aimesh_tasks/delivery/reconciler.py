"""The reconciler: accepted messages that the broker lost are published again.

Every worker runs it (`worker_steps.BackgroundJobsStep`) every
AIMESH_RECONCILE_INTERVAL_S, one worker at a time (a lock in Redis; every step is
idempotent, so a lock that expires mid-pass costs nothing but a duplicate). One pass:

1. the seen and finished marks move from Redis to Postgres (`accepted.apply_marks`);
2. it picks the unfinished messages that have been quiet too long: accepted and not seen
   for AIMESH_REPUBLISH_AFTER_S (lost before any worker ran their routing task: a broker
   restart without AOF, a worker main process killed between its BRPOP and its unacked
   record), or seen and not finished for that long plus the hard time limit (a later hop
   was lost the same ways; a hop may run that long). Each start of the routing task counts
   as seen again, so a message that waits in the routing queue for a rate limit (at most
   half the visibility timeout at a time) never looks lost. Waiting for the visibility timeout
   instead would make a lost hop wait for the very thing that is slow, and a message the
   broker redelivers later anyway is only a duplicate;
3. a message whose result is in the result backend is only marked finished (a follower
   its leader answered, a dead letter, a finished mark lost with Redis);
4. the others are published again under their own task id; after AIMESH_MAX_DELIVERIES
   re-publishes, the message fails with UndeliverableMessage instead, so its producer
   gets a result rather than waiting for ever.

Publishing again is safe because a duplicate of a message is the same message: its
routing task reuses the hand-off kept under the message id (same envelope, same
reservation), the call-key lease lets one delivery call while a concurrent duplicate waits
for its journalled answer, and a later duplicate is answered from the journal; the ledger
holds one row per call key. A message whose deadline passed is answered with
DeadlineExceeded by its routing task. This holds while the live-figures Redis
(AIMESH_REDIS_URL, where hand-offs, leases and journals live) keeps its data: the broker
is what may lose it.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from celery import states

from aimesh_tasks import keys
from aimesh_tasks.delivery import accepted
from aimesh_tasks.errors import UndeliverableMessage
from aimesh_tasks.keys import ROUTE_QUEUE
from aimesh_tasks.pipeline.flight import route_again
from aimesh_tasks.redis_client import get_redis
from aimesh_tasks.settings import get_settings

logger = logging.getLogger(__name__)
LIMIT = 500  # messages looked at per pass; the oldest first, the rest on the next pass
RETENTION_S = 86400  # finished records are kept as long as Celery keeps results
LOCK_TTL_MS = 60_000


def reconcile(app: Any) -> dict[str, int]:
    """One pass, unless another worker holds the lock; how many messages went each way."""
    client = get_redis()
    token = uuid.uuid4().hex
    if not client.set(keys.reconcile_lock(), token, nx=True, px=LOCK_TTL_MS):
        return {}
    try:
        counts = _pass(app)
    finally:
        if client.get(keys.reconcile_lock()) == token:
            client.delete(keys.reconcile_lock())
    if any(counts[k] for k in ("answered", "republished", "failed")):
        logger.info("accepted.reconciled", extra=counts)
    return counts


def _pass(app: Any) -> dict[str, int]:
    settings = get_settings()
    seen, finished = accepted.apply_marks()
    after_s = settings.republish_after_s
    stalled_s = after_s + settings.task_time_limit_s
    quiet = accepted.quiet(after_s, stalled_s, LIMIT)
    answered = {q.message_id for q in quiet if _has_result(app, q.message_id)}
    lost = [q for q in quiet if q.message_id not in answered]
    failed = [q for q in lost if q.republished >= settings.max_deliveries]
    for each in failed:
        _fail(app, each)
    accepted.mark_finished([*answered, *(q.message_id for q in failed)])
    again = [q for q in lost if q.republished < settings.max_deliveries]
    for each in again:
        route_again(app, each.message, each.message_id)
    accepted.mark_republished([q.message_id for q in again])
    return {"seen": seen, "finished": finished, "answered": len(answered),
            "republished": len(again), "failed": len(failed),
            "purged": accepted.purge(RETENTION_S)}


def _has_result(app: Any, message_id: str) -> bool:
    return app.backend.get_state(message_id) in states.READY_STATES


def _fail(app: Any, quiet: accepted.Quiet) -> None:
    error = UndeliverableMessage(
        f"message '{quiet.message_id}' was accepted but never finished: published again "
        f"{quiet.republished} times (AIMESH_MAX_DELIVERIES) and lost each time; submit it "
        "again once the broker keeps its messages",
        queue=ROUTE_QUEUE, reason="never_finished", task_id=quiet.message_id,
        republished=quiet.republished)
    app.backend.store_result(quiet.message_id, error, states.FAILURE)
