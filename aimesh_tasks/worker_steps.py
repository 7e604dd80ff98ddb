"""Worker bootsteps: the background jobs every worker process runs."""

from __future__ import annotations

from typing import Any

from celery import bootsteps

from aimesh_tasks.periodic import Periodic


class BackgroundJobsStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """For the life of the worker: flush the outbox to the database, reap budget
    reservations whose task died, delete closed ones (and the answers kept with them)
    past the journal's retention, give orphaned single-flights a new leader, and
    publish again accepted messages the broker lost (delivery/reconciler.py). Each job
    takes a lock, or is atomic, or idempotent, so any number of workers may run them.

    It starts after the pool, so prefork children are forked before these threads exist
    (forking while a thread holds a lock can leave the child waiting on it forever).
    """

    requires = {"celery.worker.components:Pool"}

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.jobs: list[Periodic] = []

    def start(self, parent: Any) -> None:
        from aimesh_tasks.budgets.reaper import forget_old, reap
        from aimesh_tasks.delivery import accepted
        from aimesh_tasks.delivery.reconciler import reconcile
        from aimesh_tasks.outbox import flush
        from aimesh_tasks.pipeline.flight import adopt_orphans
        from aimesh_tasks.settings import get_settings

        settings = get_settings()
        self.jobs = [
            Periodic("aimesh-outbox", settings.outbox_flush_interval_s, flush),
            Periodic("aimesh-reaper", settings.reaper_interval_s, reap),
            Periodic("aimesh-closed", settings.reaper_interval_s, forget_old),
            Periodic("aimesh-flights", min(5.0, settings.single_flight_lease_s / 4),
                     lambda: adopt_orphans(parent.app)),
        ]
        if accepted.enabled():
            self.jobs.append(Periodic("aimesh-reconciler", settings.reconcile_interval_s,
                                      lambda: reconcile(parent.app)))
        for job in self.jobs:
            job.start()

    def stop(self, parent: Any) -> None:
        for job in self.jobs:
            job.stop()
        self.jobs = []
