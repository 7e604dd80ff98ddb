"""Single-flight jobs run by workers (see aimesh_tasks.pipeline.flight)."""

from __future__ import annotations

from aimesh_tasks.app import app
from aimesh_tasks.pipeline import flight


def adopt_orphans() -> int:
    """Give every orphaned flight a new leader (pipeline.flight.adopt_orphans)."""
    return flight.adopt_orphans(app)
