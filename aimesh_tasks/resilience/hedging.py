"""Hedged requests (the "model race"): a slow call raced by one at the next-ranked endpoint.

A message asks with `hedge={"after_ms": N}` (0: race at once) or `{"after": "p95"}` (the
first endpoint's live p95 latency, AIMESH_HEDGE_P95_DEFAULT_MS until it has one, held
between AIMESH_HEDGE_P95_FLOOR_X (1.5) and AIMESH_HEDGE_P95_CAP_X (4) times its live
p50: `hedge_delay_ms` says why), and
`max_extra` extra calls (default 1); an agent may have a default (AIMESH_HEDGE_AGENTS),
which a message's own `hedge` replaces.

| hook         | what this policy does                                                  |
|--------------|------------------------------------------------------------------------|
| admit        | plans the hedges: the endpoints ranked after the winner, `after` later  |
|              | (none when the deadline comes first, for a canvas step, or a single     |
|              | candidate); each deposits in its endpoint's hedge bucket                |
|              | (resilience/hedge_budget.py); routing publishes them with the hand-off |
| call reads   | the race (pipeline/race.py) and the endpoint's live p50                 |
| before_call  | refuses (CallNotNeeded: the task ends quietly) a call whose race is won;|
|              | a hedge fires only if the race is still open, the deadline is further  |
|              | than the endpoint's p50, its bucket has a token and its worst case can |
|              | be reserved under its own call key (audited 'hedged')                  |

A hedge is one call: no retry, no fallback of its own (the primary's path keeps those).
The first answer claims the race and is the message's result; the other calls are
refused before they start, or aborted in flight (the provider sees the disconnect) and
charged from what the provider reported, else their reservation (ledger kind
`aborted`). A message's `charged_usd` is what its winning lane was charged; a loser's
charge is in its own ledger row.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from aimesh_tasks import events, keys
from aimesh_tasks.budgets.admission import reserve_call
from aimesh_tasks.errors import BudgetExceeded, CallNotNeeded
from aimesh_tasks.governance.audit import audit
from aimesh_tasks.messages import AiMessage, Hedge, utcnow
from aimesh_tasks.pipeline import race
from aimesh_tasks.policies import CallContext, ExtraCall, Policy, RouteContext
from aimesh_tasks.redis_batch import Batch, Reader
from aimesh_tasks.registry.endpoints import Endpoint
from aimesh_tasks.registry.live import read_figures
from aimesh_tasks.resilience import hedge_budget
from aimesh_tasks.routing.selection import RoutingDecision
from aimesh_tasks.settings import Settings, get_settings

Clock = Callable[[], datetime]


def hedge_of(message: AiMessage, agent_defaults: dict[str, dict[str, Any]]) -> Hedge | None:
    """The message's own hedge, else its agent's default (None: not hedged)."""
    if message.hedge is not None:
        return message.hedge
    default = agent_defaults.get(message.agent_id)
    return Hedge.model_validate(default) if default is not None and not message.stream else None


def hedge_delay_ms(hedge: Hedge, p95_ms: float | None, default_ms: float,
                   p50_ms: float | None = None, bounds_x: tuple[float, float] | None = None
                   ) -> float:
    """How long after the hand-off the hedges fire: `after_ms`, or the live p95 held
    between bounds_x = (floor, cap) times the live p50.

    The bounds are why 'p95' works on a tail that is a second mode, not a slope, as an LLM
    endpoint's often is (most calls quick, a few stuck behind a long generation or a cold
    replica). With 5 % of calls slow (bench_resilience's bimodal case: 95 % at 100 ms, 5 %
    at 2 s) the window's 95th sample falls on either side of the gap by chance:
    - in the slow mode, a hedge fired at 2 s never wins (measured: p99 0.94x of no
      hedging). The window cannot pull itself back, since those hedges never beat a slow
      call; so the delay is at most `cap` (4) p50s: a call that much slower than the
      median is late whichever mode the 95th sample is in;
    - in the fast mode, the hedge fires a few ms past the quick calls' own spread, for
      every call a little late (under load, most are), and those spend the hedge budget
      (resilience/hedge_budget.py), so the slow calls find it empty (measured: p99 1.0x at
      6.5 % extra calls, every hedge spent on a call that answered anyway); so the delay is
      at least `floor` (1.5) p50s."""
    if hedge.after_ms is not None:
        return float(hedge.after_ms)
    if p95_ms is None:
        return default_ms
    if p50_ms is not None and bounds_x is not None:
        floor_x, cap_x = bounds_x
        return min(max(p95_ms, floor_x * p50_ms), cap_x * p50_ms)
    return p95_ms


def plan(hedge: Hedge, route: list[Endpoint], delay_ms: float, remaining_s: float | None
         ) -> list[ExtraCall]:
    """The hedges of a message routed to `route` (winner first): the next-ranked
    endpoints, at most `max_extra`, `delay_ms` after the hand-off; none when the deadline
    (`remaining_s` away; None: no deadline) comes before they would fire."""
    if remaining_s is not None and delay_ms / 1000 >= remaining_s:
        return []
    return [ExtraCall(endpoint, delay_ms / 1000, lane)
            for lane, endpoint in enumerate(route[1:1 + hedge.max_extra], start=1)]


def too_late(remaining_s: float | None, p50_ms: float | None) -> bool:
    """A hedge firing now cannot finish before the deadline: less time is left than the
    endpoint's typical call (a deadline with no figures yet: only if it has passed)."""
    return remaining_s is not None and remaining_s <= (p50_ms or 0.0) / 1000


def _remaining_s(message: AiMessage, now: datetime) -> float | None:
    return (message.deadline - now).total_seconds() if message.deadline else None


class Hedging(Policy):
    """Plan hedges at admission; at each call of a raced message, refuse a lost race and
    fire a hedge only within its budget."""

    name = "hedging"

    def __init__(self, settings: Settings | None = None, clock: Clock = utcnow) -> None:
        s = settings or get_settings()
        self.agent_defaults = s.hedge_agent_defaults
        self.p95_default_ms = float(s.hedge_p95_default_ms)
        self.p95_bounds_x = (float(s.hedge_p95_floor_x), float(s.hedge_p95_cap_x))
        self.budget = hedge_budget.BudgetConfig.from_settings(s)
        self.clock = clock

    def admit(self, ctx: RouteContext, decision: RoutingDecision) -> None:
        hedge = hedge_of(ctx.message, self.agent_defaults)
        if hedge is None or ctx.in_canvas or len(decision.route) < 2:
            return
        p95_ms = p50_ms = None
        if hedge.after == "p95":
            figures, _ = read_figures([decision.winner.id])
            p95_ms, p50_ms = figures[decision.winner.id].p95_ms, figures[decision.winner.id].p50_ms
        delay_ms = hedge_delay_ms(hedge, p95_ms, self.p95_default_ms, p50_ms, self.p95_bounds_x)
        extra = plan(hedge, decision.route, delay_ms, _remaining_s(ctx.message, self.clock()))
        if extra:
            hedge_budget.deposit((e.endpoint.id for e in extra), self.budget)
            ctx.extra_calls.extend(extra)

    def queue_call_reads(self, batch: Batch, ctx: CallContext
                         ) -> Reader[tuple[race.RaceState, float | None]] | None:
        if ctx.envelope.lane is None:
            return None
        read_race = race.queue_read(batch, ctx.message.id)
        p50 = batch.call("HGET", keys.live_stats(ctx.endpoint.id), "p50_ms")
        return lambda: (read_race(), float(batch[p50]) if batch[p50] is not None else None)

    def before_call(self, ctx: CallContext) -> float | None:
        lane = ctx.envelope.lane
        if lane is None:
            return None
        state, p50_ms = ctx.reads[self.name]
        if state.winner is not None:
            raise _not_needed(ctx, "race_won", f"lane {state.winner} of its race answered")
        if lane == 0:
            return None
        if state.closed:
            raise _not_needed(ctx, "race_closed", "the primary call's failure ended its race")
        self._fire(ctx, lane, p50_ms, again=lane in state.started)
        return None

    def _fire(self, ctx: CallContext, lane: int, p50_ms: float | None, *,
              again: bool = False) -> None:
        """Fire hedge `lane` if its deadline, budget and reservation allow. `again`: the
        lane had started (this is a redelivery of its task): its token was spent then."""
        if too_late(_remaining_s(ctx.message, self.clock()), p50_ms):
            raise _not_needed(ctx, "deadline", "it cannot finish before the deadline")
        if not again and not hedge_budget.take(ctx.endpoint.id, self.budget):
            raise _not_needed(ctx, "hedge_budget", f"endpoint '{ctx.endpoint.id}' is out of "
                              "hedge budget (AIMESH_HEDGE_BUDGET_RATIO)")
        if ctx.envelope.metered:
            try:
                reserve_call(ctx.message, ctx.endpoint, lane, True, call_key=ctx.call_key)
            except BudgetExceeded as exc:
                if not again:
                    hedge_budget.refund(ctx.endpoint.id, self.budget)
                raise _not_needed(ctx, "budget", f"its worst case cannot be reserved "
                                  f"({exc.message})") from exc
        if not race.start_hedge(ctx.message.id, lane):
            raise _not_needed(ctx, "race_won", "its race ended before it fired")
        audit("hedged", message_id=ctx.message.id, agent_id=ctx.message.agent_id,
              endpoint_id=ctx.endpoint.id,
              detail={"lane": lane, "call_key": ctx.call_key})
        events.hedge_decided.send(sender=Hedging, message=ctx.message,
                                  endpoint_id=ctx.endpoint.id, lane=lane, outcome="fired")


def _not_needed(ctx: CallContext, reason: str, why: str) -> CallNotNeeded:
    """The refusal of this call; a hedge's is counted (aimesh_hedges_total) as it is made."""
    lane = ctx.envelope.lane
    what = "hedge" if lane else "call"
    if lane:
        events.hedge_decided.send(sender=Hedging, message=ctx.message,
                                  endpoint_id=ctx.endpoint.id, lane=lane, outcome=reason)
    return CallNotNeeded(f"message '{ctx.message.id}': {what} {ctx.call_key} is not made: "
                         f"{why}", policy=Hedging.name, reason=reason, lane=lane,
                         endpoint_id=ctx.endpoint.id)
