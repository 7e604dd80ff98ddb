"""A worker consumer step that follows the endpoint registry and checks endpoint keys.

A worker started with `aimesh worker --endpoints all`, or any worker given
AIMESH_WORKER_FOLLOW_ENDPOINTS=1, and the embedded worker consume
the queue of every enabled endpoint an operator added: when the registry changes, it
starts consuming new endpoints' queues and stops consuming removed or disabled ones, with
no restart. A self-registered endpoint's queue is its servers' (`aimesh worker --serve`):
followers and router workers consume it only while none of its servers lives, to drain
it: each message there is refused at the call (resilience/servers.py, never called) and
falls back by the normal rules. They stop once a server beats again.

Every worker that consumes endpoint queues (following or not) also checks, every
AIMESH_FOLLOW_INTERVAL_S, that it has the API key of each endpoint it serves (the
variable or file the endpoint names, providers/credentials.py). An endpoint whose key
is missing gets one WARNING line when that is first seen (at start-up, or when the
endpoint arrives) and one INFO line when the key is found again; the worker reports it in
Redis (registry/key_reports.py, with a TTL this step refreshes), which
`aimesh endpoints list` shows as "key missing on <worker>".
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from celery import bootsteps

if TYPE_CHECKING:
    from aimesh_tasks.registry.endpoints import Endpoint

logger = logging.getLogger(__name__)

FOLLOW_SETTING = "aimesh_follow_endpoints"
# A key report outlives a few missed refreshes; a stopped worker's report ages out.
KEY_REPORT_TTL_S = 60.0


class KeyCheck:
    """Which served endpoints this worker lacks the key of: logged on change, reported."""

    def __init__(self, worker: str) -> None:
        self.worker = worker
        self.missing: dict[str, str] = {}
        self.reported_at = 0.0

    def check(self, served: list[Endpoint]) -> None:
        """Check every served endpoint's key; log what changed; report (refreshed well
        within the report's TTL)."""
        from aimesh_tasks.providers.credentials import missing_reason
        from aimesh_tasks.registry.key_reports import report_missing_keys

        now = {e.id: why for e in served if (why := missing_reason(e)) is not None}
        for endpoint_id, why in sorted(now.items()):
            if self.missing.get(endpoint_id) != why:
                logger.warning(
                    "endpoint '%s': API key missing on this worker: %s; its calls here fail "
                    "with key_missing and fall back to the next endpoint (set it where this "
                    "worker runs, or `aimesh endpoints update %s --api-key-env NAME` or "
                    "`--api-key-file PATH`)", endpoint_id, why, endpoint_id)
        for endpoint_id in sorted(self.missing.keys() - now.keys()):
            logger.info("endpoint '%s': API key found on this worker", endpoint_id)
        changed = now.keys() != self.missing.keys()
        self.missing = now
        if changed or time.monotonic() - self.reported_at > KEY_REPORT_TTL_S / 4:
            report_missing_keys(self.worker, sorted(now),
                                [e.id for e in served if e.id not in now], KEY_REPORT_TTL_S)
            self.reported_at = time.monotonic()

    def withdraw(self) -> None:
        """Take this worker's reports back (it stops serving)."""
        from aimesh_tasks.registry.key_reports import report_missing_keys

        if self.missing:
            report_missing_keys(self.worker, [], sorted(self.missing), KEY_REPORT_TTL_S)
            self.missing = {}


class FollowEndpoints(bootsteps.StartStopStep):  # type: ignore[misc]
    """Every AIMESH_FOLLOW_INTERVAL_S: align the consumed endpoint queues with the registry
    (when following), drain the queues of self-registered endpoints left without a live
    server (when following or routing), and check the served endpoints' keys. Queues are
    aligned only when the registry or the orphans changed: a queue cancelled from outside
    (`celery control cancel_consumer`) stays cancelled until then."""

    requires = {"celery.worker.consumer.tasks:Tasks"}

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.version: str | None = None
        self.timer_entry: Any = None
        self.follow = False
        self.drains = False
        self.fixed: set[str] = set()  # a router's own endpoint queues (never cancelled)
        self.serves: frozenset[str] = frozenset()
        self.draining: set[str] = set()
        self.endpoints: dict[str, Endpoint] = {}
        self.keys: KeyCheck | None = None

    def start(self, consumer: Any) -> None:
        from aimesh_tasks.keys import ROUTE_QUEUE, endpoint_id_of_queue
        from aimesh_tasks.settings import get_settings

        settings = get_settings()
        self.follow = bool(consumer.app.conf.get(FOLLOW_SETTING)
                           or settings.worker_follow_endpoints)
        consumed = {q.name for q in consumer.task_consumer.queues}
        self.drains = self.follow or ROUTE_QUEUE in consumed
        self.serves = settings.served_endpoints
        if not self.follow:
            self.fixed = {q for q in consumed if endpoint_id_of_queue(q) is not None}
        self.keys = KeyCheck(str(getattr(consumer, "hostname", "") or "worker"))
        self.sync(consumer)
        self.timer_entry = consumer.timer.call_repeatedly(
            settings.follow_interval_s, self.sync, (consumer,)
        )

    def stop(self, consumer: Any) -> None:
        if self.timer_entry is not None:
            self.timer_entry.cancel()
            self.timer_entry = None
        if self.keys is not None:
            try:
                self.keys.withdraw()
            except Exception:  # stopping: a report left behind ages out by its TTL
                logger.debug("could not withdraw key reports", exc_info=True)

    def sync(self, consumer: Any) -> None:
        """Follow the registry and drain orphaned queues (when following or routing), then
        check the served endpoints' keys; a broken Redis or database must not kill the
        consumer: retried next tick."""
        from aimesh_tasks.keys import endpoint_id_of_queue

        try:
            if not self.drains and not self._served_ids(consumer, endpoint_id_of_queue):
                return  # nothing to follow or drain, no key to check
            moved = self._reload()
            if self.drains:
                orphans = self._orphans()
                if moved or orphans != self.draining:  # else leave the consumer as it is
                    self._align(consumer, orphans)
            served = self._served_ids(consumer, endpoint_id_of_queue)
            if self.keys is not None:
                self.keys.check([e for i in sorted(served)
                                 if (e := self.endpoints.get(i)) is not None and self._calls(e)])
        except Exception:
            logger.exception("could not read the endpoint registry; retrying")

    def _calls(self, endpoint: Endpoint) -> bool:
        """This worker calls `endpoint` (a self-registered one only if it serves it)."""
        return not endpoint.announced or endpoint.id in self.serves

    @staticmethod
    def _served_ids(consumer: Any, id_of: Any) -> set[str]:
        names = (q.name for q in consumer.task_consumer.queues)
        return {endpoint_id for name in names if (endpoint_id := id_of(name)) is not None}

    def _reload(self) -> bool:
        """Re-read the registry when its version moved; whether it did."""
        from aimesh_tasks.registry.endpoints import list_endpoints
        from aimesh_tasks.registry.live import registry_version

        version = registry_version()
        if version == self.version:
            return False
        self.endpoints = {e.id: e for e in list_endpoints()}
        self.version = version
        return True

    def _align(self, consumer: Any, orphans: set[str]) -> None:
        """Start and stop consuming endpoint queues: following, exactly those of the
        enabled operator endpoints, the served ones and `orphans`; routing, only the
        orphans' queues come and go (the queues it was started with are left alone)."""
        from aimesh_tasks.keys import endpoint_id_of_queue, endpoint_queue

        for endpoint_id in sorted(orphans ^ self.draining):
            logger.info("serve.draining" if endpoint_id in orphans else "serve.drained",
                        extra={"endpoint_id": endpoint_id})
        consuming = {q.name for q in consumer.task_consumer.queues}
        drained = {endpoint_queue(i) for i in orphans}
        if self.follow:
            wanted = drained | {endpoint_queue(i) for i in self.serves} | {
                endpoint_queue(i) for i, e in self.endpoints.items()
                if e.enabled and not e.announced}
            managed = {q for q in consuming if endpoint_id_of_queue(q) is not None}
        else:
            wanted = drained
            managed = {endpoint_queue(i) for i in self.draining} - self.fixed - {
                endpoint_queue(i) for i in self.serves}
        self.draining = orphans
        for queue in sorted(wanted - consuming):
            consumer.add_task_queue(queue)
        for queue in sorted((consuming & managed) - wanted):
            consumer.cancel_task_queue(queue)

    def _orphans(self) -> set[str]:
        """The enabled self-registered endpoints this worker does not serve and none of
        whose servers lives: their queues are drained here."""
        from aimesh_tasks.registry.servers import newest
        from aimesh_tasks.settings import get_settings

        ids = [i for i, e in self.endpoints.items()
               if e.announced and e.enabled and i not in self.serves]
        if not ids:
            return set()
        down_after_s, now = get_settings().serve_down_after_s, time.time()
        return {i for i, server in newest(ids).items()
                if server is None or not server.live(now, down_after_s)}
