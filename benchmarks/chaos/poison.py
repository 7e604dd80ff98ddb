"""A poison task for the chaos `poison` row: it takes its worker process down on every
delivery (what a segfault or the OOM killer does). The row's router worker imports it
with `-I benchmarks.chaos.poison`."""

from __future__ import annotations

import os

from aimesh_tasks.app import app


# Celery ships no type hints: its task decorator is untyped.
@app.task(name="chaos.poison")  # type: ignore[untyped-decorator]
def poison() -> None:
    """Exit the worker process at once, without cleanup."""
    os._exit(1)
