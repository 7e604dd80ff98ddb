"""The circuit breaker as a policy: one breaker per endpoint, shared by every worker.

| hook               | what it does                                                          |
|--------------------|-----------------------------------------------------------------------|
| queue_route_reads  | every endpoint's breaker, on routing's one round trip                 |
| choose             | leaves open endpoints out (`breaker_open: ...` in the decision's      |
|                    | excluded); every candidate open: all left out (routing fails fast     |
|                    | naming each), or with AIMESH_BREAKER_ALL_OPEN=soonest the one whose   |
|                    | cooldown ends first is kept                                           |
| queue_call_reads   | the called endpoint's breaker, on the call's first round trip         |
| before_call        | closed: admitted. Open: refused, so the path falls back to the next   |
|                    | endpoint (the last resort under 'soonest' waits for the cooldown      |
|                    | instead). Cooldown over: the admission script takes one of the K      |
|                    | half-open probe slots, cluster-wide, or refuses                       |
| queue_call_records | the admitted call's outcome, on the call's last round trip            |

An answer that is the request's fault (a 400) counts as a success for the endpoint; a
call cut short on our side (cancelled: a hedge or race it lost; or stopped by the
message's own deadline) is not counted, and a probe cut short gives its half-open slot
back, so the next call probes at once rather than after the slot's TTL. State and transitions:
aimesh_tasks/resilience/breaker_store.py.

The live figures' health ("down after AIMESH_UNHEALTHY_AFTER_FAILURES, retried after
AIMESH_HEALTH_RETRY_S") stays as a coarse backstop beside the breaker: it has no
half-open state and lets every router try again at once, so the breaker's defaults open
it no later than the health marks the endpoint down.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from aimesh_tasks.errors import DeadlineExceeded, ProviderError
from aimesh_tasks.messages import AiMessage
from aimesh_tasks.policies import CallContext, Chosen, Policy, RouteContext
from aimesh_tasks.redis_batch import Batch, Reader
from aimesh_tasks.registry.cache import ENDPOINTS
from aimesh_tasks.registry.endpoints import Endpoint
from aimesh_tasks.registry.live import LiveFigures
from aimesh_tasks.resilience.breaker_store import (
    BreakerConfig,
    BreakerState,
    admit,
    queue_record,
    queue_release_probe,
    queue_states,
    read_states,
)
from aimesh_tasks.routing.selection import exclusion_reason

# Under 'soonest', a last-resort call that finds the probe slots taken looks again after:
PROBING_WAIT_S = 1.0


@dataclass
class CallBreaker:
    """The called endpoint's breaker as read, and the epoch this call was admitted in."""

    state: BreakerState
    admitted_epoch: int | None = None


class CircuitBreaker(Policy):
    """Leave open endpoints out; admit exactly K probes when half-open; record outcomes."""

    name = "breaker"

    def __init__(self, config: BreakerConfig | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config or BreakerConfig.from_settings()
        self.clock = clock

    def queue_route_reads(self, batch: Batch, message: AiMessage
                          ) -> Reader[dict[str, BreakerState]]:
        return queue_states(batch, ENDPOINTS.ids(), self.clock(), self.config.probe_ttl_s)

    def choose(self, ctx: RouteContext, candidates: list[Endpoint]) -> list[Endpoint]:
        now = self.clock()
        states: dict[str, BreakerState] = dict(ctx.reads.get(self.name) or {})
        missing = [e.id for e in candidates if e.id not in states]
        if missing:  # the registry moved since this process last loaded it
            states.update(read_states(missing, now, self.config.probe_ttl_s))
        kept: list[Endpoint] = []
        excluded: dict[str, str] = {}
        for endpoint in candidates:
            why = states[endpoint.id].exclusion(now, self.config.probes)
            if why is None:
                kept.append(endpoint)
            else:
                excluded[endpoint.id] = why
        if excluded and self.config.all_open == "soonest":
            kept = self._soonest(ctx.message, candidates, kept, excluded, states, now)
        return Chosen(kept, excluded)

    def _soonest(self, message: AiMessage, candidates: list[Endpoint], kept: list[Endpoint],
                 excluded: dict[str, str], states: dict[str, BreakerState], now: float
                 ) -> list[Endpoint]:
        """With every endpoint that could take the message open, keep the one whose
        cooldown ends first."""
        def fits(endpoint: Endpoint) -> bool:
            return exclusion_reason(endpoint, LiveFigures(), message, now, 0.0) is None

        if any(fits(e) for e in kept):
            return kept
        shut = [e for e in candidates if e.id in excluded and fits(e)]
        if not shut:
            return kept
        soonest = min(shut, key=lambda e: (states[e.id].open_until, e.id))
        del excluded[soonest.id]
        return [*kept, soonest]

    def queue_call_reads(self, batch: Batch, ctx: CallContext) -> Reader[CallBreaker]:
        read = queue_states(batch, [ctx.endpoint.id], self.clock(), self.config.probe_ttl_s)
        return lambda: CallBreaker(read()[ctx.endpoint.id])

    def before_call(self, ctx: CallContext) -> float | None:
        held: CallBreaker | None = ctx.reads.get(self.name)
        if held is None:
            return None
        now = self.clock()
        if held.state.state == "closed":
            held.admitted_epoch = held.state.epoch
            return None
        if held.state.current(now) == "open":
            return self._refuse_or_wait(ctx, held.state.open_until, now, probing=False)
        admission = admit(ctx.endpoint.id, ctx.call_key, now, self.config)
        if admission.admitted:
            held.admitted_epoch = admission.epoch
            return None
        return self._refuse_or_wait(ctx, admission.open_until, now,
                                    probing=admission.kind == "probing")

    def _refuse_or_wait(self, ctx: CallContext, open_until: float, now: float, *,
                        probing: bool) -> float:
        """Seconds to wait (the last resort under 'soonest'), or raise the refusal."""
        wait_s = PROBING_WAIT_S if probing else max(open_until - now, 0.0) + 0.01
        last_resort = len(ctx.envelope.route) == 1
        if self.config.all_open != "soonest" or not last_resort:
            raise breaker_refusal(ctx.endpoint.id, wait_s, probing)
        deadline = ctx.message.deadline
        if deadline is not None and deadline.timestamp() <= now + wait_s:
            raise DeadlineExceeded(
                f"message '{ctx.message.id}': its deadline {deadline.isoformat()} comes "
                f"before endpoint '{ctx.endpoint.id}' takes calls again (circuit breaker "
                "open); give a later deadline or none", message_id=ctx.message.id,
                agent_id=ctx.message.agent_id, deadline=deadline.isoformat())
        return wait_s

    def queue_call_records(self, batch: Batch, ctx: CallContext,
                           error: ProviderError | None) -> None:
        held: CallBreaker | None = ctx.reads.get(self.name)
        if held is None or held.admitted_epoch is None:
            return  # not admitted by this delivery (journalled by an earlier one)
        if error is not None and says_nothing_of_endpoint(error, ctx.message):
            queue_release_probe(batch, ctx.endpoint.id, ctx.call_key)
            return
        ok = error is None or not error.endpoint_fault
        queue_record(batch, ctx.endpoint.id, ctx.call_key, ok=ok,
                     epoch=held.admitted_epoch, now=self.clock(), config=self.config,
                     retry_after_s=error.retry_after_s if error is not None else None)


def says_nothing_of_endpoint(error: ProviderError, message: AiMessage) -> bool:
    """The call was cut short by our side, so its outcome is not the endpoint's: cancelled
    (a hedge or race it lost, a client gone) or stopped by the message's own deadline."""
    if error.fields.get("reason") == "cancelled":
        return True
    return error.endpoint_fault and error.status is None and message.expired()


def breaker_refusal(endpoint_id: str, wait_s: float, probing: bool) -> ProviderError:
    """The refusal of a call at an endpoint whose breaker is open: no call was made, and
    another endpoint may take it (action 'fallback')."""
    why = ("half-open, its probe calls are in flight" if probing
           else f"open, its cooldown ends in {wait_s:.1f} s")
    return ProviderError(
        f"endpoint '{endpoint_id}' was not called: its circuit breaker is {why}",
        endpoint_id=endpoint_id, action="fallback", reason="breaker_open", retryable=True,
        called=False, retry_after_s=round(wait_s, 3))
