"""The one base class of the message tasks: map an outcome to Celery; retry outages.

A message task is a shell: decode its argument, call one plain function of
`aimesh_tasks.pipeline` that returns an outcome, and hand that outcome to `deliver`.
Only here does an outcome become a return value, a hand-off, a retry or an exception,
and only here does an envelope that asks for errors as results (workflow steps) get
its error returned instead of raised.

A transient Redis, Postgres or broker error (aimesh_tasks/outages.py) makes the task run
again after an exponential backoff with "equal jitter" (half of each wait fixed, half
random, so the default 8 retries always span at least a minute of outage), up to
AIMESH_TRANSIENT_RETRIES times, then fail with ServiceUnavailable. Running again is
safe: every step is idempotent by message id and call key, and a call that was already
made is finished from its journal. When not even the retry (or the hand-off to the next
hop) can be published, the broker is away: the message is given back to its queue
(Reject, requeue) rather than failed, since Celery would store a terminal failure for a
retry it could not publish.

A message that ends here (a result stored, or an error raised) is noted as finished in
the accepted-messages record (`delivery.accepted`), after Celery stored its result.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import kombu.exceptions
from celery import Signature, Task, states
from celery.exceptions import Reject
from celery.exceptions import Retry as CeleryRetry

from aimesh_tasks.delivery import accepted
from aimesh_tasks.envelope import Reply
from aimesh_tasks.errors import AimeshError, ServiceUnavailable
from aimesh_tasks.outages import TRANSIENT, service_of
from aimesh_tasks.pipeline.outcomes import (
    AnswerFor,
    CallOutcome,
    Done,
    Failed,
    Fallback,
    HandOff,
    Hedge,
    Hit,
    Joined,
    Lost,
    Refused,
    Requeue,
    Retry,
    RouteOutcome,
)
from aimesh_tasks.settings import get_settings
from aimesh_tasks.tasks.handoff import discard_result, hand_off, in_canvas, run_inline_callbacks

T = TypeVar("T")
BACKOFF_MAX_S = 30


def backoff_s(retries: int) -> float:
    """The wait before retry number `retries` + 1: 2**retries capped at BACKOFF_MAX_S and
    at half the visibility timeout (a longer countdown waits unacked past it, and the
    broker delivers it twice), half of it fixed and half random."""
    cap = min(BACKOFF_MAX_S, get_settings().visibility_timeout_s / 2)
    base = float(min(cap, 2 ** min(retries, 16)))
    return base / 2 + random.uniform(0, base / 2)


def _after_wait(signature: Signature, outcome: HandOff | Fallback) -> Signature:
    """The next call after a Fallback's wait (a retry's backoff): a short wait is slept
    here, a longer one is a countdown on the published call, so no worker slot is pinned
    for long (a countdown never exceeds half the visibility timeout: aimesh_tasks/app.py)."""
    wait_s = outcome.countdown_s if isinstance(outcome, Fallback) else 0.0
    if wait_s <= 0:
        return signature
    if wait_s <= get_settings().retry_sleep_max_s:
        time.sleep(wait_s)
        return signature
    return signature.set(countdown=wait_s)


def retry_after(task: Task, countdown_s: float, exc: BaseException | None = None) -> NoReturn:
    """Run `task` again in `countdown_s`; when not even the retry can be published (the
    broker is away), give its message back to the queue."""
    try:
        raise task.retry(countdown=countdown_s, exc=exc, max_retries=None)
    except Reject as failed:
        raise Reject(failed.reason, requeue=True) from exc


def retry_transient(task: Task, exc: BaseException, then: str) -> NoReturn:
    """Retry `task` after a transient outage (`exc`, one of TRANSIENT) with backoff; past
    AIMESH_TRANSIENT_RETRIES raise ServiceUnavailable, whose message ends with `then`."""
    retries = int(task.request.retries or 0)
    if retries >= get_settings().transient_retries:
        service = service_of(exc)
        raise ServiceUnavailable(
            f"{service} stayed unreachable through {retries} retries "
            f"({type(exc).__name__}); {then}", service=service.lower(),
            retries=retries) from exc
    retry_after(task, backoff_s(retries), exc)


def error_result(error: AimeshError) -> dict[str, Any]:
    """A failure as a task result, {"error": {code, message, ...fields}}, for callers that
    ask for errors as results (workflow steps: their record takes a failure like an answer)."""
    return {"error": error.to_dict()}


def _publish_hedges(hedges: tuple[Hedge, ...], next_call: Callable[[Any], Signature]
                    ) -> None:
    """Publish a handed-off message's hedges, each on its endpoint's queue after its
    countdown, under its call key as task id (its own result is never stored)."""
    for hedge in hedges:
        options: dict[str, Any] = {"task_id": hedge.envelope.call_key}
        if hedge.countdown_s > 0:
            options["countdown"] = hedge.countdown_s
        next_call(hedge.envelope).apply_async(**options)


class MessageTask(Task):  # type: ignore[misc]
    """Base of `aimesh.route` and `aimesh.call`."""

    throws = (AimeshError,)
    # No Celery cap on retries: `self.retry(max_retries=None)` means "the task's
    # max_retries" (3 by default), not "unbounded"; guarded() counts its own retries.
    max_retries = None
    # Celery renders every result (saferepr, 1024 characters by default) for its success
    # log line and Flower, at WARNING log level too: ~3.5 % of an endpoint worker's CPU at
    # 0 ms provider latency (py-spy, issue 18). A result holds the answer's text, so logs
    # and Flower get a preview; producers read the whole result from the backend.
    resultrepr_maxsize = 160

    def guarded(self, step: Callable[[], T]) -> T:
        """Run one pipeline step; a transient outage becomes a retry with backoff."""
        try:
            return step()
        except TRANSIENT as exc:
            retry_transient(self, exc, "the message can be submitted again")

    def _retry(self, countdown_s: float) -> NoReturn:
        retry_after(self, countdown_s)

    def _requeue(self, countdown_s: float) -> NoReturn:
        """Publish this task again after `countdown_s`, as a retry does (same id, same
        canvas options), without counting it as one: the transient-outage retries and
        their backoff stay whole for a message that waited in the queue."""
        again = self.signature_from_request(self.request, countdown=countdown_s,
                                            retries=int(self.request.retries or 0))
        try:
            again.apply_async()
        except kombu.exceptions.OperationalError as exc:  # the broker is away
            raise Reject(exc, requeue=True) from exc
        raise CeleryRetry(when=countdown_s, sig=again)

    def deliver(self, outcome: RouteOutcome | CallOutcome, reply: Reply,
                next_call: Callable[[Any], Signature]) -> Any:
        """Map an outcome to what the task returns, publishes or raises."""
        if isinstance(outcome, Hit | Done):
            run_inline_callbacks(self, outcome.result)
            return outcome.result
        if isinstance(outcome, Joined):
            discard_result(self)  # the leader stores this task's result
            return None
        if isinstance(outcome, HandOff | Fallback):
            try:
                hand_off(self, _after_wait(next_call(outcome.envelope), outcome))
                if isinstance(outcome, HandOff):
                    _publish_hedges(outcome.hedges, next_call)
            except kombu.exceptions.OperationalError as exc:  # past the publish retries
                raise Reject(exc, requeue=True) from exc
            return None
        if isinstance(outcome, Lost):
            discard_result(self)  # another call of the race answers the message
            return None
        if isinstance(outcome, AnswerFor):
            self._answer_for(outcome)
            return None
        if isinstance(outcome, Retry):
            self._retry(outcome.countdown_s)
        if isinstance(outcome, Requeue):
            self._requeue(outcome.countdown_s)
        assert isinstance(outcome, Refused | Failed)
        if reply == "result":
            result = error_result(outcome.error)
            run_inline_callbacks(self, result)
            return result
        raise outcome.error

    def _answer_for(self, outcome: AnswerFor) -> None:
        """Store a hedge's answer (or its race's failure) as its message's result, once:
        the race let only this call end the message."""
        if outcome.error is not None:
            self.app.backend.store_result(outcome.task_id, outcome.error, states.FAILURE)
        else:
            self.app.backend.store_result(outcome.task_id, outcome.result, states.SUCCESS)
        discard_result(self)
        self._finished(outcome.task_id)

    def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
        """A returned value is the message's result (None: a hand-off or a follower)."""
        if retval is not None:
            self._finished(task_id)

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any,
                   einfo: Any) -> None:
        """A raised error is the message's result."""
        self._finished(task_id)

    def _finished(self, task_id: str) -> None:
        if accepted.enabled() and not in_canvas(self.request):
            accepted.note_finished(task_id)
