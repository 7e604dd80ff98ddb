"""Events on the message path, for metrics, logs and audit to subscribe to.

The pipeline sends them; it never knows who listens (the way Celery's own signals and
dramatiq's middleware hooks work). Receivers must be quick and must not raise: an
exception in a receiver is logged by Celery's dispatcher and does not stop the message.

| event              | sent with (keyword arguments)                                      |
|--------------------|--------------------------------------------------------------------|
| message_routed     | message: AiMessage, decision: RoutingDecision                      |
| routing_failed     | message: AiMessage, error: AimeshError                             |
| call_finished      | message, endpoint: Endpoint, attempt: Attempt,                     |
|                    | completion: Completion | None, cost_nusd: int                       |
| message_completed  | message: AiMessage, result: AiResult                               |
| message_failed     | message: AiMessage, error: AimeshError                             |
| message_deduplicated | message, outcome: hit, join, miss or bypass,                     |
|                    | result: the cached AiResult dict on a hit, else None               |
| budget_settled     | agent_id: str, tokens_left: int | None, nusd_left: int | None       |
| hedge_decided      | message, endpoint_id: str, lane: int, outcome: fired or why not    |
|                    | (race_won, race_closed, deadline, hedge_budget, budget)            |

    from aimesh_tasks import events

    @events.call_finished.connect
    def count(sender, message, endpoint, attempt, completion, cost_nusd, **_): ...
"""

from __future__ import annotations

from celery.utils.dispatch import Signal

message_routed = Signal(name="aimesh.message_routed", use_caching=False)
routing_failed = Signal(name="aimesh.routing_failed", use_caching=False)
call_finished = Signal(name="aimesh.call_finished", use_caching=False)
message_completed = Signal(name="aimesh.message_completed", use_caching=False)
message_failed = Signal(name="aimesh.message_failed", use_caching=False)
message_deduplicated = Signal(name="aimesh.message_deduplicated", use_caching=False)
budget_settled = Signal(name="aimesh.budget_settled", use_caching=False)
hedge_decided = Signal(name="aimesh.hedge_decided", use_caching=False)
