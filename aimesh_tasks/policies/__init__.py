"""The policies on the message path, in the order their hooks run (see policies/base.py).

Built in: `budget` (reserve the first call before dispatch). Deployments add their own
with AIMESH_POLICIES ('package.module:ClassName,...'), run after the built-in ones.
Later issues add rate limits, ACLs, intents, retries, the circuit breaker and hedging
here, one file each.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

from aimesh_tasks.errors import ConfigError, ProviderError
from aimesh_tasks.messages import AiMessage
from aimesh_tasks.policies.base import AfterCall, CallContext, Policy, RouteContext
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


class Policies:
    """An ordered list of policies, called hook by hook."""

    def __init__(self, policies: Sequence[Policy]) -> None:
        self.policies = list(policies)

    def queue_route_reads(self, batch: Batch, message: AiMessage
                          ) -> Callable[[], dict[str, Any]]:
        readers = [(p.name, p.queue_route_reads(batch, message)) for p in self.policies]
        return lambda: {name: read() for name, read in readers if read is not None}

    def before_route(self, ctx: RouteContext) -> None:
        for policy in self.policies:
            policy.before_route(ctx)

    def choose(self, ctx: RouteContext, candidates: list[Endpoint]) -> list[Endpoint]:
        for policy in self.policies:
            candidates = policy.choose(ctx, candidates)
        return candidates

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


def _governance() -> list[Policy]:
    """Loop cap, route (by name or intent), its ACL, rate limits: all before the budget."""
    # Imported here: the governance policies import policies.base, and so this package.
    from aimesh_tasks.governance.acl import RouteAcl
    from aimesh_tasks.governance.loop_cap import LoopCap
    from aimesh_tasks.governance.rate_limit import RateLimits
    from aimesh_tasks.governance.route_policy import RouteSelection

    return [LoopCap(), RouteSelection(), RouteAcl(), RateLimits()]


@lru_cache(maxsize=1)
def active() -> Policies:
    """The built-in policies, then AIMESH_POLICIES, in order (loaded once per process)."""
    extra = [_load(path) for path in get_settings().policies.split(",") if path.strip()]
    return Policies([*_governance(), BudgetAdmission(), *extra])


__all__ = ["AfterCall", "CallContext", "Policies", "Policy", "RouteContext", "active"]
