"""The policy seam: behaviour on the message path that can say no, reshape or redirect.

A policy subclasses `Policy` and overrides only the hooks it needs; every hook is a no-op
here. Policies are listed, in order, in `aimesh_tasks.policies.POLICIES`; the path calls
each hook of each policy in that order (the way dramatiq's middleware works). Observers
(metrics, logs) stay on `aimesh_tasks.events`; deciders go here.

| hook               | when                                       | may                          |
|--------------------|--------------------------------------------|------------------------------|
| queue_route_reads  | before routing's one Redis round trip      | add reads to it (no new trip)|
| before_route       | after the dedup decision, before routing   | refuse, or wait (seconds)    |
| choose             | before candidates are scored               | filter or reorder them       |
| admit              | after the winner is known, before hand-off | refuse (budget), note state, |
|                    |                                            | ask for extra calls (hedges) |
| queue_call_reads   | before the call's first Redis round trip   | add reads to it              |
| before_call        | holding the call's lease, before the call  | refuse, or delay (seconds)   |
| after_call         | after the provider answered or failed      | ask for retry/fallback/fail  |

A refusal is an `AimeshError` raised from the hook; raised from `before_route` it is
audited as `denied` with the policy's name and reason, and nothing is reserved or queued.
Seconds returned from `before_route` send the message back to the routing queue for that
long (at most half the visibility timeout; it is checked again on arrival), audited as
`queued`: the later policies' `before_route`, the budget and the hand-off wait with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from aimesh_tasks.envelope import Envelope
from aimesh_tasks.errors import AimeshError, ProviderError
from aimesh_tasks.messages import AiMessage
from aimesh_tasks.redis_batch import Batch, Reader
from aimesh_tasks.registry.endpoints import Endpoint
from aimesh_tasks.routing.selection import RoutingDecision


@dataclass(frozen=True, slots=True)
class ExtraCall:
    """A call a policy's `admit` asks for beside the first (a hedge, resilience/hedging.py):
    at `endpoint`, as lane `lane` of the message's race, `countdown_s` after the hand-off."""

    endpoint: Endpoint
    countdown_s: float
    lane: int


@dataclass
class RouteContext:
    """One message being routed: what the policies read, and what they decided."""

    message: AiMessage
    metered_hint: bool | None = None  # the metered-agents mirror's answer (None: unsure)
    reads: dict[str, Any] = field(default_factory=dict)
    metered: bool = False  # set by the budget policy's admit
    # What policies want kept with the routing decision, by policy name (in the `routed`
    # audit record's detail).
    notes: dict[str, Any] = field(default_factory=dict)
    # Part of a canvas (a workflow step): its result must be its own task's return, so
    # nothing may answer it from another task (no hedges).
    in_canvas: bool = False
    # Calls policies asked for beside the first (hedges), published with the hand-off.
    extra_calls: list[ExtraCall] = field(default_factory=list)


@dataclass
class CallContext:
    """One call about to be made (or just made) for an envelope."""

    message: AiMessage
    envelope: Envelope
    endpoint: Endpoint
    call_key: str
    reads: dict[str, Any] = field(default_factory=dict)


Verdict = Literal["retry", "fallback", "fail"]


@dataclass(frozen=True, slots=True)
class AfterCall:
    """What a policy asks for after a call: `verdict`, and a delay for a retry."""

    verdict: Verdict
    delay_s: float = 0.0


class Policy:
    """Base class of every policy; each hook is a documented no-op."""

    name: ClassVar[str] = "policy"

    def queue_route_reads(self, batch: Batch, message: AiMessage) -> Reader[Any] | None:
        """Queue Redis reads on routing's batch; the reader's value lands in
        `ctx.reads[self.name]` before `before_route`."""
        return None

    def before_route(self, ctx: RouteContext) -> float | None:
        """Raise an AimeshError to refuse the message before budget and dispatch; return
        seconds to have it wait in the routing queue and be routed again after them."""
        return None

    def choose(self, ctx: RouteContext, candidates: list[Endpoint]) -> list[Endpoint]:
        """The candidates routing may score (filter or reorder)."""
        return candidates

    def admit(self, ctx: RouteContext, decision: RoutingDecision) -> None:
        """Raise an AimeshError to refuse the routed message (nothing is queued)."""

    def queue_call_reads(self, batch: Batch, ctx: CallContext) -> Reader[Any] | None:
        """Queue Redis reads on the call's first batch (value in `ctx.reads[self.name]`)."""
        return None

    def before_call(self, ctx: CallContext) -> float | None:
        """Raise an AimeshError to refuse the call; return seconds to delay it."""
        return None

    def after_call(self, ctx: CallContext, error: ProviderError | None) -> AfterCall | None:
        """After the call (error None: it answered); None leaves the path's own choice."""
        return None


def refusal_reason(error: AimeshError) -> str:
    """The reason recorded when a policy refuses."""
    return error.message
