"""The retry policy: the same endpoint again after a short overload, with backoff.

| the adapter's class of the error               | this policy                              |
|------------------------------------------------|------------------------------------------|
| retry: 429, 503, Anthropic 529, Gemini         | the same endpoint again, after the       |
| RESOURCE_EXHAUSTED / UNAVAILABLE               | longer of Retry-After and the backoff    |
| fallback: 5xx, transport error, bad key, ...   | nothing: the path falls back at once     |
| fail: the request's own fault                  | nothing: the message fails               |

A retry is a new call: a new attempt number, so its own call key and reservation, and
each call that reached the provider is charged once. It is bounded: at most
AIMESH_RETRY_MAX_ATTEMPTS retries at one endpoint in a row; no wait longer than
AIMESH_RETRY_MAX_DELAY_S (a Retry-After beyond it falls back now: the provider said it
will not take the call soon); all of a message's waits within
AIMESH_RETRY_MAX_TOTAL_DELAY_S; and no retry that cannot finish before the message's
deadline (its wait plus the endpoint's live p50). When a retry is not made, the path
falls back to the next endpoint, or fails naming every attempt. Waits up to
AIMESH_RETRY_SLEEP_MAX_S sleep in the worker; longer ones re-publish the call with a
countdown (tasks/shell.py), never longer than half the broker's visibility timeout
(checked at start-up, aimesh_tasks/app.py).

The backoff arithmetic is tenacity's `wait_random_exponential`: AWS's "full jitter",
uniform(0, min(cap, base * 2^(n-1))) for the n-th retry. tenacity is typed, maintained and
its wait strategies are plain callables of an attempt number, which is what a retry loop
spread over task hops needs; the `backoff` package offers the same curve only as
generators driving a decorated loop, and is no longer released.

"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tenacity import RetryCallState, Retrying
from tenacity.wait import wait_random_exponential

from aimesh_tasks import keys
from aimesh_tasks.envelope import AttemptRecord
from aimesh_tasks.errors import ProviderError
from aimesh_tasks.messages import utcnow
from aimesh_tasks.policies import AfterCall, CallContext, Policy
from aimesh_tasks.redis_batch import Batch, Reader
from aimesh_tasks.settings import Settings, get_settings

# The attempt record of a call that was retried says how long the path waited after it.
WAITED_FIELD = "retried_after_s"


@dataclass(frozen=True, slots=True)
class RetryLimits:
    """The bounds of the retry policy (AIMESH_RETRY_*)."""

    max_attempts: int = 2
    base_s: float = 0.5
    max_delay_s: float = 30.0
    max_total_delay_s: float = 60.0

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> RetryLimits:
        s = settings or get_settings()
        return cls(max_attempts=s.retry_max_attempts, base_s=s.retry_base_s,
                   max_delay_s=s.retry_max_delay_s,
                   max_total_delay_s=s.retry_max_total_delay_s)


def backoff_s(retry_no: int, limits: RetryLimits) -> float:
    """The full-jitter wait before retry number `retry_no` (1 for the first)."""
    state = RetryCallState(Retrying(), None, (), {})
    state.attempt_number = retry_no
    wait = wait_random_exponential(multiplier=limits.base_s, max=limits.max_delay_s)
    return float(wait(state))


def retry_delay_s(*, retry_after_s: float | None, retries_so_far: int, waited_s: float,
                  remaining_s: float | None, p50_s: float, limits: RetryLimits
                  ) -> float | None:
    """How long to wait before retrying the same endpoint, or None not to retry it.

    `retries_so_far` counts the retries already made at this endpoint in a row,
    `waited_s` the message's retry waits so far, `remaining_s` the time to its deadline
    (None: no deadline), `p50_s` the endpoint's typical call."""
    if retries_so_far >= limits.max_attempts:
        return None
    if retry_after_s is not None and retry_after_s > limits.max_delay_s:
        return None
    delay_s = max(retry_after_s or 0.0, backoff_s(retries_so_far + 1, limits))
    if waited_s + delay_s > limits.max_total_delay_s:
        return None
    if remaining_s is not None and delay_s + p50_s >= remaining_s:
        return None
    return round(delay_s, 3)


def retries_in_a_row(attempts: list[AttemptRecord], endpoint_id: str) -> int:
    """How many of the last attempts were at `endpoint_id`, one after another."""
    count = 0
    for attempt in reversed(attempts):
        if attempt.get("endpoint_id") != endpoint_id:
            break
        count += 1
    return count


def waited_s(attempts: list[AttemptRecord]) -> float:
    """The retry waits a message has had so far."""
    return sum(float((a.get("error") or {}).get(WAITED_FIELD) or 0.0) for a in attempts)


class RetryPolicy(Policy):
    """Ask for the same endpoint again after a short overload, within the bounds."""

    name = "retry"

    def __init__(self, limits: RetryLimits | None = None) -> None:
        self.limits = limits or RetryLimits.from_settings()

    def queue_call_reads(self, batch: Batch, ctx: CallContext) -> Reader[Any]:
        index = batch.call("HGET", keys.live_stats(ctx.endpoint.id), "p50_ms")
        return lambda: batch[index]

    def after_call(self, ctx: CallContext, error: ProviderError | None) -> AfterCall | None:
        if error is None or error.action != "retry":
            return None
        deadline = ctx.message.deadline
        p50_ms = ctx.reads.get(self.name)
        delay_s = retry_delay_s(
            retry_after_s=error.retry_after_s,
            retries_so_far=retries_in_a_row(ctx.envelope.attempts, ctx.endpoint.id),
            waited_s=waited_s(ctx.envelope.attempts),
            remaining_s=(deadline - utcnow()).total_seconds() if deadline else None,
            p50_s=float(p50_ms) / 1000 if p50_ms else 0.0,
            limits=self.limits,
        )
        return None if delay_s is None else AfterCall("retry", delay_s)
