"""Budget admission of one call: reserve its worst case at its endpoint's prices.

The one place a call's reservation is made: the first call's (routing, through the
budget policy) and each fallback's (the call path, before it hands the message on).
"""

from __future__ import annotations

from aimesh_tasks import keys
from aimesh_tasks.budgets.estimate import worst_case
from aimesh_tasks.budgets.ledger import Held, reserve
from aimesh_tasks.budgets.metered import rebuild
from aimesh_tasks.messages import AiMessage
from aimesh_tasks.registry.endpoints import Endpoint


def reserve_call(message: AiMessage, endpoint: Endpoint, attempt_no: int,
                 metered_hint: bool | None = None, *, call_key: str | None = None
                 ) -> Held | None:
    """Reserve call `attempt_no` of `message` at `endpoint`; None if the agent has no
    budget. `metered_hint` is the metered-agents mirror's answer: False skips Postgres,
    None (the mirror cannot say) rebuilds it first. BudgetExceeded (audited) if the
    worst case does not fit. Idempotent per call key (`call_key`: a hedge's own, else
    the attempt's)."""
    if metered_hint is False:
        return None
    if metered_hint is None:
        rebuild()
    return reserve(message.agent_id, message.id, endpoint.id,
                   call_key or keys.call_key(message.id, attempt_no),
                   worst_case(message, endpoint))
