"""A cancelled run refuses its queued steps: the fail_fast policy on the message path.

A step is sent for routing as soon as its own dependencies are done, so when a step
fails under fail_fast, other steps of the run may already wait in the routing queue.
Once the failure is recorded in Postgres, the run's cancellation is set in Redis
(`keys.workflow_cancelled`); a step's message reads it on routing's one round trip (no
trip of its own, and no read at all for a message that is not a workflow step) and is
refused with WorkflowCancelled before any budget is reserved; its record then marks the
step skipped. A step already past routing runs to its end, as a started step always has.
Should the key be lost with Redis, queued steps run and their answers are kept: the run
still ends failed.
"""

from __future__ import annotations

from aimesh_tasks import keys
from aimesh_tasks.errors import WorkflowCancelled
from aimesh_tasks.messages import AiMessage
from aimesh_tasks.policies.base import Policy, RouteContext
from aimesh_tasks.redis_batch import Batch, Reader
from aimesh_tasks.redis_client import get_redis
from aimesh_tasks.workflows.state import CANCELLED
from aimesh_tasks.workflows.steps import run_of

# Long enough for any step queued before the cancellation to reach routing.
CANCELLED_TTL_S = 86400


def cancel(run_id: str) -> None:
    """Refuse the run's steps that reach routing from now on (idempotent)."""
    get_redis().set(keys.workflow_cancelled(run_id), "1", ex=CANCELLED_TTL_S)


class WorkflowCancellation(Policy):
    """Refuse a workflow step whose run fail_fast has cancelled."""

    name = "workflow_cancellation"

    def queue_route_reads(self, batch: Batch, message: AiMessage) -> Reader[bool] | None:
        run_id = run_of(message)
        if run_id is None:
            return None
        index = batch.call("EXISTS", keys.workflow_cancelled(run_id))
        return lambda: bool(batch[index])

    def before_route(self, ctx: RouteContext) -> None:
        if not ctx.reads.get(self.name):
            return
        run_id = run_of(ctx.message)
        raise WorkflowCancelled(f"workflow run '{run_id}' was {CANCELLED}; step message "
                                f"'{ctx.message.id}' is not sent", policy=self.name,
                                run_id=run_id, message_id=ctx.message.id)
