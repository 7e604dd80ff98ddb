"""The cluster-wide hedge budget: a token bucket per endpoint in Redis (atomic Lua).

Hedging only helps while extra calls are rare ("The Tail at Scale": hedging after the
95th percentile costs about 2-5 % more calls). When everything is slow every call passes
its hedge delay, and unbounded hedging would double the load on endpoints that are slow
already. So every hedge spends a token from its endpoint's bucket, and the bucket is
filled only by calls: each message routed that could hedge to the endpoint deposits
AIMESH_HEDGE_BUDGET_RATIO of a token (0.1), up to AIMESH_HEDGE_BUDGET_BURST tokens (10),
which a new bucket starts with. Over any stretch of time an endpoint takes at most
burst + ratio x (messages that could hedge to it) hedges: at most 10 % extra calls, plus a
small burst. A bucket nobody touched for AIMESH_HEDGE_BUDGET_WINDOW_S expires and is full
again (an idle endpoint gets its burst back).

The same scheme as gRPC's retry throttling and Finagle's RetryBudget: a budget earned by
traffic, not by the clock, so a sudden storm cannot spend tokens that quiet time minted.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from aimesh_tasks import keys
from aimesh_tasks.redis_batch import Batch
from aimesh_tasks.settings import Settings, get_settings

# KEYS: bucket. ARGV: op ('deposit', 'take', 'refund'), ratio, burst, window_s.
# Returns {taken (1/0), tokens left as a string}.
_BUCKET = """
local burst = tonumber(ARGV[3])
local tokens = tonumber(redis.call('HGET', KEYS[1], 'tokens') or burst)
local taken = 0
if ARGV[1] == 'deposit' then
  tokens = math.min(burst, tokens + tonumber(ARGV[2]))
elseif ARGV[1] == 'refund' then
  tokens = math.min(burst, tokens + 1)
elseif tokens >= 1 then
  tokens = tokens - 1
  taken = 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens))
redis.call('EXPIRE', KEYS[1], ARGV[4])
return {taken, tostring(tokens)}
"""


@dataclass(frozen=True, slots=True)
class BudgetConfig:
    """The bucket's shape (AIMESH_HEDGE_BUDGET_*)."""

    ratio: float = 0.1
    burst: float = 10.0
    window_s: float = 60.0

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> BudgetConfig:
        s = settings or get_settings()
        return cls(s.hedge_budget_ratio, s.hedge_budget_burst, s.hedge_budget_window_s)


def _args(op: str, config: BudgetConfig) -> list[object]:
    return [op, repr(config.ratio), repr(config.burst), max(1, round(config.window_s))]


def deposit(endpoint_ids: Iterable[str], config: BudgetConfig) -> None:
    """A message that could hedge to these endpoints was routed: a ratio's worth each."""
    batch = Batch()
    for endpoint_id in endpoint_ids:
        batch.script(_BUCKET, [keys.hedge_bucket(endpoint_id)], _args("deposit", config))
    batch.send()


def _one(op: str, endpoint_id: str, config: BudgetConfig) -> tuple[bool, float]:
    batch = Batch()
    index = batch.script(_BUCKET, [keys.hedge_bucket(endpoint_id)], _args(op, config))
    batch.send()
    taken, tokens = batch[index]
    return bool(int(taken)), float(tokens)


def take(endpoint_id: str, config: BudgetConfig) -> bool:
    """Spend a token for a hedge to `endpoint_id`; False (nothing spent) if none is left."""
    return _one("take", endpoint_id, config)[0]


def refund(endpoint_id: str, config: BudgetConfig) -> None:
    """Give back the token of a hedge that was not made after all (not reservable)."""
    _one("refund", endpoint_id, config)


def tokens(endpoint_id: str, config: BudgetConfig) -> float:
    """The tokens left in `endpoint_id`'s bucket (a deposit of nothing: read only)."""
    return _one("deposit", endpoint_id, BudgetConfig(0.0, config.burst, config.window_s))[1]
