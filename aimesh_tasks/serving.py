"""A worker consumer step: the heartbeat of a worker serving the endpoints it announced.

`aimesh worker --serve` announces its endpoints before the worker starts
(registry/announce.py) and names them in AIMESH_WORKER_SERVES. Once the worker consumes
their queues, this step beats every AIMESH_SERVE_HEARTBEAT_S (registry/servers.py); from
the first beat routing may choose them. When the consumer stops (a clean shutdown, or a
lost broker connection: it consumes nothing then) the worker withdraws at once, and
routing stops choosing an endpoint none of whose servers is left; a worker killed
outright stops beating, and routing stops choosing it AIMESH_SERVE_DOWN_AFTER_S later.

The beat runs on the consumer's timer, so a worker whose consumer is stuck stops beating
as it stops consuming.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps

logger = logging.getLogger(__name__)


class ServeEndpoints(bootsteps.StartStopStep):  # type: ignore[misc]
    """Beat for the announced endpoints while consuming; withdraw when stopping."""

    requires = {"celery.worker.consumer.tasks:Tasks"}

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.endpoint_ids: list[str] = []
        self.worker = ""
        self.timer_entry: Any = None

    def start(self, consumer: Any) -> None:
        from aimesh_tasks.settings import get_settings

        settings = get_settings()
        self.endpoint_ids = sorted(settings.served_endpoints)
        if not self.endpoint_ids:
            return
        self.worker = str(consumer.hostname)
        self.beat()
        self.timer_entry = consumer.timer.call_repeatedly(settings.serve_heartbeat_s,
                                                          self.beat)
        logger.info("serve.started", extra={"worker": self.worker,
                                            "endpoints": self.endpoint_ids})

    def beat(self) -> None:
        """Say this worker lives; a Redis outage is logged and the next beat tries again."""
        from aimesh_tasks.registry.servers import beat

        try:
            beat(self.worker, self.endpoint_ids)
        except Exception:
            logger.exception("could not beat for the served endpoints; retrying")

    def stop(self, consumer: Any) -> None:
        if self.timer_entry is not None:
            self.timer_entry.cancel()
            self.timer_entry = None
        if not self.endpoint_ids:
            return
        from aimesh_tasks.registry.servers import withdraw

        try:
            withdraw(self.worker, self.endpoint_ids)
            logger.info("serve.withdrawn", extra={"worker": self.worker,
                                                  "endpoints": self.endpoint_ids})
        except Exception:  # stopping: routing drops it once its heartbeat is old
            logger.warning("could not withdraw from the served endpoints", exc_info=True)
