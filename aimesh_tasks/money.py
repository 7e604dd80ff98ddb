"""Exact money: integer nano-USD (1e-9 USD) in storage and arithmetic, Decimal USD at the edges.

Floats never hold money. Prices are nano-USD per 1,000 tokens; a call's cost is rounded
up to the next nano-USD, so a sum of costs never understates what was spent.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

NANO_PER_USD = 1_000_000_000


def usd_to_nusd(value: Decimal | str | int, *, field: str = "price") -> int:
    """Convert a USD amount to integer nano-USD; refuse floats, negatives and sub-nano digits."""
    if isinstance(value, float):
        raise ValueError(f"{field}: give money as a decimal string, not a float ({value!r})")
    try:
        amount = Decimal(value)
    except (InvalidOperation, ValueError) as exc:
        raise ValueError(f"{field}: {value!r} is not a decimal number") from exc
    if not amount.is_finite() or amount < 0:
        raise ValueError(f"{field}: must be a finite amount of 0 or more, got {value}")
    nano = amount * NANO_PER_USD
    if nano != nano.to_integral_value():
        raise ValueError(f"{field}: {value} has more precision than 1e-9 USD")
    return int(nano)


def nusd_to_usd(nusd: int) -> Decimal:
    """Integer nano-USD as an exact Decimal USD."""
    return Decimal(nusd) / NANO_PER_USD


def call_cost_nusd(
    input_tokens: int, output_tokens: int, input_nusd_per_1k: int, output_nusd_per_1k: int
) -> int:
    """Cost of one call in nano-USD, rounded up."""
    numerator = input_tokens * input_nusd_per_1k + output_tokens * output_nusd_per_1k
    return -(-numerator // 1000)
