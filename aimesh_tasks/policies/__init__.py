"""The policies on the message path, in the order their hooks run (see policies/base.py).

Built in, in this order: a workflow step of a cancelled run is refused
(`workflows/cancellation.py`), governance (loop cap, route, its ACL, rate limits), `budget`
(reserve the first call before dispatch), live servers of self-registered endpoints, the
hedging (AIMESH_HEDGE_ENABLED), the circuit breaker (AIMESH_BREAKER_ENABLED) and the
retry policy (aimesh_tasks/resilience/).
Deployments add their own with AIMESH_POLICIES ('package.module:ClassName,...'), run after
the built-in ones.

A policy's `choose` may return a `Chosen` to say why it left endpoints out (recorded in
the routing decision's `excluded`); a policy that writes what a call did implements
`RecordsCalls.queue_call_records`, queued on the call's last round trip.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol, runtime_checkable

from aimesh_tasks.errors import ConfigError, NoEndpointAvailable, ProviderError
from aimesh_tasks.messages import AiMessage
from aimesh_tasks.policies.base import AfterCall, CallContext, ExtraCall, Policy, RouteContext
from aimesh_tasks.policies.budget import BudgetAdmission
from aimesh_tasks.redis_batch import Batch
from aimesh_tasks.registry.endpoints import Endpoint
from aimesh_tasks.routing.selection import RoutingDecision
from aimesh_tasks.settings import get_settings


def _load(path: str) -> Policy:
    module_name, _, class_name = path.strip().partition(":")
    try:
        policy = getattr(importlib.import_module(module_name), class_name)()
    except (ImportError, AttributeError, TypeError, ValueError) as exc:
        raise ConfigError(f"AIMESH_POLICIES: cannot load '{path}' ({exc}); give "
                          "'package.module:ClassName'", setting="AIMESH_POLICIES") from exc
    if not isinstance(policy, Policy):
        raise ConfigError(f"AIMESH_POLICIES: '{path}' is not an aimesh_tasks Policy",
                          setting="AIMESH_POLICIES")
    return policy


class Chosen(list[Endpoint]):
    """What `choose` returns when a policy leaves endpoints out and says why: the kept
    candidates, and `excluded` (endpoint id -> reason) for the routing decision's record."""

    def __init__(self, kept: list[Endpoint], excluded: dict[str, str] | None = None) -> None:
        super().__init__(kept)
        self.excluded = dict(excluded or {})


@runtime_checkable
class RecordsCalls(Protocol):
    """A policy that writes what a call did: `queue_call_records` queues its writes on the
    call's last round trip (sent whether the call answered or failed)."""

    def queue_call_records(self, batch: Batch, ctx: CallContext,
                           error: ProviderError | None) -> None: ...


def with_exclusions(error: NoEndpointAvailable, excluded: dict[str, str]
                    ) -> NoEndpointAvailable:
    """Routing's NoEndpointAvailable, naming also the endpoints policies left out."""
    if not excluded:
        return error
    merged = {**excluded, **error.excluded}
    reasons = "; ".join(f"{eid}: {why}" for eid, why in sorted(merged.items()))
    return NoEndpointAvailable(f"no endpoint can take this message ({reasons})",
                               {**error.fields, "excluded": merged})


@dataclass(frozen=True, slots=True)
class Wait:
    """A policy's `before_route` asked the message to wait `wait_s` in the routing queue."""

    policy: str
    wait_s: float


class Policies:
    """An ordered list of policies, called hook by hook."""

    def __init__(self, policies: Sequence[Policy]) -> None:
        self.policies = list(policies)
        # Sorted out once: isinstance against a runtime-checkable Protocol inspects the
        # class's members on every call (~2 % of an endpoint worker's CPU, issue 18).
        self.recording = [p for p in self.policies if isinstance(p, RecordsCalls)]

    def queue_route_reads(self, batch: Batch, message: AiMessage
                          ) -> Callable[[], dict[str, Any]]:
        readers = [(p.name, p.queue_route_reads(batch, message)) for p in self.policies]
        return lambda: {name: read() for name, read in readers if read is not None}

    def before_route(self, ctx: RouteContext) -> Wait | None:
        """Each policy's before_route in order, until one refuses (raises) or asks the
        message to wait (the policies after it are not asked)."""
        for policy in self.policies:
            wait_s = policy.before_route(ctx)
            if wait_s is not None:
                return Wait(policy.name, wait_s)
        return None

    def choose(self, ctx: RouteContext, candidates: list[Endpoint]) -> Chosen:
        excluded: dict[str, str] = {}
        for policy in self.policies:
            candidates = policy.choose(ctx, candidates)
            excluded.update(getattr(candidates, "excluded", {}))
        return Chosen(candidates, excluded)

    def admit(self, ctx: RouteContext, decision: RoutingDecision) -> None:
        for policy in self.policies:
            policy.admit(ctx, decision)

    def queue_call_reads(self, batch: Batch, ctx: CallContext
                         ) -> Callable[[], dict[str, Any]]:
        readers = [(p.name, p.queue_call_reads(batch, ctx)) for p in self.policies]
        return lambda: {name: read() for name, read in readers if read is not None}

    def before_call(self, ctx: CallContext) -> float | None:
        delays = [d for p in self.policies if (d := p.before_call(ctx)) is not None]
        return max(delays) if delays else None

    def after_call(self, ctx: CallContext, error: ProviderError | None) -> AfterCall | None:
        for policy in self.policies:
            asked = policy.after_call(ctx, error)
            if asked is not None:
                return asked
        return None

    def queue_call_records(self, batch: Batch, ctx: CallContext,
                           error: ProviderError | None) -> None:
        for policy in self.recording:
            policy.queue_call_records(batch, ctx, error)


def _workflows() -> list[Policy]:
    """Refuse the queued steps of a run that fail_fast cancelled: before everything."""
    # Imported here: workflow state imports the database layer, and policies.base.
    from aimesh_tasks.workflows.cancellation import WorkflowCancellation

    return [WorkflowCancellation()]


def _governance() -> list[Policy]:
    """Loop cap, route (by name or intent), its ACL, rate limits: all before the budget."""
    # Imported here: the governance policies import policies.base, and so this package.
    from aimesh_tasks.governance.acl import RouteAcl
    from aimesh_tasks.governance.loop_cap import LoopCap
    from aimesh_tasks.governance.rate_limit import RateLimits
    from aimesh_tasks.governance.route_policy import RouteSelection

    return [LoopCap(), RouteSelection(), RouteAcl(), RateLimits()]


def _resilience() -> list[Policy]:
    """Live servers, hedging (when on: a lost race's call is refused before the breaker
    admits it), the circuit breaker (when on), then the retry policy: after the budget."""
    # Imported here: the resilience policies import this package.
    from aimesh_tasks.resilience.breaker import CircuitBreaker
    from aimesh_tasks.resilience.hedging import Hedging
    from aimesh_tasks.resilience.retry import RetryPolicy
    from aimesh_tasks.resilience.servers import LiveServers

    settings = get_settings()
    hedging: list[Policy] = [Hedging()] if settings.hedge_enabled else []
    breaker: list[Policy] = [CircuitBreaker()] if settings.breaker_enabled else []
    return [LiveServers(), *hedging, *breaker, RetryPolicy()]


@lru_cache(maxsize=1)
def active() -> Policies:
    """The built-in policies, then AIMESH_POLICIES, in order (loaded once per process)."""
    extra = [_load(path) for path in get_settings().policies.split(",") if path.strip()]
    return Policies([*_workflows(), *_governance(), BudgetAdmission(), *_resilience(),
                     *extra])


__all__ = ["AfterCall", "CallContext", "Chosen", "ExtraCall", "Policies", "Policy", "RecordsCalls",
           "RouteContext", "Wait", "active", "with_exclusions"]
