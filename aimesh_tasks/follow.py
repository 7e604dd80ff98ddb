"""A worker consumer step that follows the endpoint registry.

A worker started with `aimesh worker --endpoints all`, or any worker given
AIMESH_WORKER_FOLLOW_ENDPOINTS=1, and the embedded worker consume
the queue of every enabled endpoint: when the registry changes, it starts consuming new
endpoints' queues and stops consuming removed or disabled ones, with no restart.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps

logger = logging.getLogger(__name__)

FOLLOW_SETTING = "aimesh_follow_endpoints"


class FollowEndpoints(bootsteps.StartStopStep):  # type: ignore[misc]
    """Every AIMESH_FOLLOW_INTERVAL_S, align the consumed endpoint queues with the registry."""

    requires = {"celery.worker.consumer.tasks:Tasks"}

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.version: str | None = None
        self.timer_entry: Any = None

    def start(self, consumer: Any) -> None:
        from aimesh_tasks.settings import get_settings

        if not (consumer.app.conf.get(FOLLOW_SETTING)
                or get_settings().worker_follow_endpoints):
            return

        self.sync(consumer)
        self.timer_entry = consumer.timer.call_repeatedly(
            get_settings().follow_interval_s, self.sync, (consumer,)
        )

    def stop(self, consumer: Any) -> None:
        if self.timer_entry is not None:
            self.timer_entry.cancel()
            self.timer_entry = None

    def sync(self, consumer: Any) -> None:
        """Consume exactly the queues of the enabled endpoints (others are left alone)."""
        from aimesh_tasks.keys import endpoint_id_of_queue, endpoint_queue
        from aimesh_tasks.registry.endpoints import list_endpoints
        from aimesh_tasks.registry.live import registry_version

        try:
            version = registry_version()
            if version == self.version:
                return
            wanted = {endpoint_queue(e.id) for e in list_endpoints(include_disabled=False)}
        except Exception:  # a broken Redis/DB must not kill the consumer; retried next tick
            logger.exception("could not read the endpoint registry; retrying")
            return
        consuming = {q.name for q in consumer.task_consumer.queues}
        for queue in sorted(wanted - consuming):
            consumer.add_task_queue(queue)
        for queue in sorted(consuming - wanted):
            if endpoint_id_of_queue(queue) is not None:
                consumer.cancel_task_queue(queue)
        self.version = version
