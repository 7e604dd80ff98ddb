"""The one base class of the message tasks: map an outcome to Celery; retry outages.

A message task is a shell: decode its argument, call one plain function of
`aimesh_tasks.pipeline` that returns an outcome, and hand that outcome to `deliver`.
Only here does an outcome become a return value, a hand-off, a retry or an exception,
and only here does an envelope that asks for errors as results (workflow steps) get
its error returned instead of raised.

A transient Redis or Postgres error (connection refused, reset, timed out) makes the
task run again after a backoff with full jitter (Celery's own backoff arithmetic), up to
AIMESH_TRANSIENT_RETRIES times, then fail with ServiceUnavailable. Running again is safe:
every step is idempotent by message id and call key, and a call that was already made is
finished from its journal.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import redis.exceptions
import sqlalchemy.exc
from celery import Signature, Task
from celery.utils.time import get_exponential_backoff_interval

from aimesh_tasks.envelope import Reply
from aimesh_tasks.errors import AimeshError, ServiceUnavailable
from aimesh_tasks.pipeline.outcomes import (
    CallOutcome,
    Done,
    Failed,
    Fallback,
    HandOff,
    Hit,
    Joined,
    Refused,
    Retry,
    RouteOutcome,
)
from aimesh_tasks.settings import get_settings
from aimesh_tasks.tasks.handoff import discard_result, hand_off

T = TypeVar("T")
TRANSIENT: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
)
BACKOFF_MAX_S = 30


def error_result(error: AimeshError) -> dict[str, Any]:
    """A failure as a task result, {"error": {code, message, ...fields}}, for callers that
    ask for errors as results (workflow steps: a raised error would fail a whole chord)."""
    return {"error": error.to_dict()}


class MessageTask(Task):  # type: ignore[misc]
    """Base of `aimesh.route` and `aimesh.call`."""

    throws = (AimeshError,)

    def guarded(self, step: Callable[[], T]) -> T:
        """Run one pipeline step; a transient outage becomes a retry with backoff."""
        try:
            return step()
        except TRANSIENT as exc:
            retries = int(self.request.retries or 0)
            if retries >= get_settings().transient_retries:
                service = "Redis" if isinstance(exc, redis.exceptions.RedisError) else "Postgres"
                raise ServiceUnavailable(
                    f"{service} stayed unreachable through {retries} retries "
                    f"({type(exc).__name__}); the message can be submitted again",
                    service=service.lower(), retries=retries) from exc
            countdown = get_exponential_backoff_interval(
                factor=1, retries=retries, maximum=BACKOFF_MAX_S, full_jitter=True)
            raise self.retry(countdown=countdown, exc=exc, max_retries=None) from exc

    def deliver(self, outcome: RouteOutcome | CallOutcome, reply: Reply,
                next_call: Callable[[Any], Signature]) -> Any:
        """Map an outcome to what the task returns, publishes or raises."""
        if isinstance(outcome, Hit | Done):
            return outcome.result
        if isinstance(outcome, Joined):
            discard_result(self)  # the leader stores this task's result
            return None
        if isinstance(outcome, HandOff | Fallback):
            hand_off(self, next_call(outcome.envelope))
            return None
        if isinstance(outcome, Retry):
            raise self.retry(countdown=outcome.countdown_s, max_retries=None)
        assert isinstance(outcome, Refused | Failed)
        if reply == "result":
            return error_result(outcome.error)
        raise outcome.error
