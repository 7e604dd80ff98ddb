"""Budget admission as a policy: the first call's worst case is reserved once the winner
is known, before anything is queued; a budget that cannot cover it refuses the message
(`BudgetExceeded`, audited as `denied` by the ledger)."""

from __future__ import annotations

from aimesh_tasks.budgets.admission import reserve_call
from aimesh_tasks.failpoints import failpoint
from aimesh_tasks.policies.base import Policy, RouteContext
from aimesh_tasks.routing.selection import RoutingDecision


class BudgetAdmission(Policy):
    """Reserve the first call; sets `ctx.metered`."""

    name = "budget"

    def admit(self, ctx: RouteContext, decision: RoutingDecision) -> None:
        held = reserve_call(ctx.message, decision.winner, 0, ctx.metered_hint)
        failpoint("after_reserve", ctx.message.agent_id)
        ctx.metered = held is not None
