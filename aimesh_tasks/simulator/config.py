"""Configuration of the simulated LLM provider: latency, injected failures, completion size.

`SimulatorConfig` validates itself on construction; `with_changes` applies the subset of
fields that may change while the simulator runs (everything but `seed`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any, Final

MAX_COMPLETION_TOKENS: Final = 1_000_000

RUNTIME_FIELDS: Final = (
    "latency_ms",
    "jitter_ms",
    "slow_rate",
    "slow_latency_ms",
    "error_rate",
    "throttle_rate",
    "overload_rate",
    "malformed_rate",
    "no_usage_rate",
    "retry_after_s",
    "completion_tokens",
    "model_name",
    "known_models",
    "unknown_model_status",
    "hold_after_words",
    "word_interval_ms",
    "hold_in_flight",
)
# The statuses an unknown model may get: the providers' 404, or a gateway's 400 (LiteLLM).
UNKNOWN_MODEL_STATUSES: Final = (404, 400)

# The injected faults, in the order one roll per request is compared against their rates.
FAULT_RATES: Final = {
    "error_rate": "server_error",
    "throttle_rate": "throttled",
    "overload_rate": "overloaded",
    "malformed_rate": "malformed",
    "no_usage_rate": "no_usage",
}

# field -> (lowest, highest) allowed value
_FLOAT_RANGES: Final[dict[str, tuple[float, float]]] = {
    "latency_ms": (0.0, math.inf),
    "word_interval_ms": (0.0, math.inf),
    "jitter_ms": (0.0, math.inf),
    "slow_rate": (0.0, 1.0),
    "slow_latency_ms": (0.0, math.inf),
    "error_rate": (0.0, 1.0),
    "throttle_rate": (0.0, 1.0),
    "overload_rate": (0.0, 1.0),
    "malformed_rate": (0.0, 1.0),
    "no_usage_rate": (0.0, 1.0),
}
_INT_RANGES: Final[dict[str, tuple[float, float]]] = {
    "retry_after_s": (0, math.inf),
    "completion_tokens": (1, MAX_COMPLETION_TOKENS),
    "seed": (-math.inf, math.inf),
    "hold_in_flight": (0, math.inf),
}


class ConfigFieldError(ValueError):
    """A configuration field with a wrong type or a value out of range."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field} {rule}")
        self.field = field


@dataclass
class SimulatorConfig:
    """How a simulator answers: latency, failure rates, completion size, seed, model name.

    The fault rates share one roll per request, in this order: `error_rate` (the format's
    500 server error), `throttle_rate` (429 rate limited, with Retry-After),
    `overload_rate` (the format's overload answer: 529 for Anthropic, 503 elsewhere, with
    Retry-After), `malformed_rate` (200 with a truncated JSON body), `no_usage_rate` (200
    with the usage fields left out). Their sum must not exceed 1.

    `known_models` (None: every model is served) lists the models a request may name;
    any other model is answered as its provider answers an unknown model: OpenAI's 404
    `model_not_found`, Anthropic's 404 `not_found_error`, Gemini's 404 NOT_FOUND,
    Cohere's 404. `unknown_model_status` 400 makes the OpenAI format answer as the
    LiteLLM proxy does instead (400, "Invalid model name passed in model=...").

    `slow_rate` of the requests (a roll of their own) take `slow_latency_ms` instead of
    `latency_ms`: a bimodal latency, the long tail that hedged requests cut (e.g. 0.05
    at 2000 ms beside 100 ms: benchmarks/bench_resilience.py --only hedging).

    `hold_after_words` (None: never) pauses every streamed answer once that many words
    are written, until `POST /_sim/release`; `word_interval_ms` spaces a streamed answer's
    words, as a model generating them does (simulator/streaming.py).

    `hold_in_flight` N (0: off) holds every answer until N requests are waiting at once
    (after their latency): a test waits for that event instead of for the clock. The hold
    then stays open, for those and every later request, until `hold_in_flight` is set
    again or the simulator is reset.
    """

    latency_ms: float = 0
    jitter_ms: float = 0
    slow_rate: float = 0
    slow_latency_ms: float = 0
    error_rate: float = 0
    throttle_rate: float = 0
    overload_rate: float = 0
    malformed_rate: float = 0
    no_usage_rate: float = 0
    retry_after_s: int = 1
    completion_tokens: int = 16
    seed: int = 0
    model_name: str | None = None
    known_models: tuple[str, ...] | None = None
    unknown_model_status: int = 404
    hold_after_words: int | None = None
    word_interval_ms: float = 0
    hold_in_flight: int = 0

    def __post_init__(self) -> None:
        for name, (low, high) in _FLOAT_RANGES.items():
            setattr(self, name, _checked_float(name, getattr(self, name), low, high))
        for name, (low, high) in _INT_RANGES.items():
            _check_int(name, getattr(self, name), low, high)
        if sum(getattr(self, name) for name in FAULT_RATES) > 1:
            raise ConfigFieldError("error_rate", "plus the other fault rates must not exceed 1")
        if self.model_name is not None and not (
            isinstance(self.model_name, str) and self.model_name
        ):
            raise ConfigFieldError("model_name", "must be a non-empty string or null")
        self.known_models = _checked_models(self.known_models)
        if self.unknown_model_status not in UNKNOWN_MODEL_STATUSES:
            raise ConfigFieldError("unknown_model_status", "must be 404 or 400")
        if self.hold_after_words is not None:
            _check_int("hold_after_words", self.hold_after_words, 0, MAX_COMPLETION_TOKENS)

    def knows(self, model: str) -> bool:
        """Whether a request naming `model` is served (see `known_models`)."""
        return self.known_models is None or model in self.known_models

    def with_changes(self, changes: Mapping[str, Any]) -> SimulatorConfig:
        """A validated copy with the runtime-changeable fields in `changes` replaced."""
        for name in changes:
            if name not in RUNTIME_FIELDS:
                allowed = ", ".join(RUNTIME_FIELDS)
                raise ConfigFieldError(name, f"cannot be set at runtime (allowed: {allowed})")
        return replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        """All fields as a JSON-ready dict."""
        return asdict(self)


def _checked_models(value: object) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list | tuple) or not all(
            isinstance(m, str) and m for m in value):
        raise ConfigFieldError("known_models", "must be a list of non-empty strings or null")
    return tuple(value)


def _checked_float(name: str, value: object, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigFieldError(name, "must be a number")
    if not (math.isfinite(value) and low <= value <= high):
        raise ConfigFieldError(name, f"{_range_rule(low, high)} (got {value!r})")
    return float(value)


def _check_int(name: str, value: object, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigFieldError(name, "must be an integer")
    if not low <= value <= high:
        raise ConfigFieldError(name, f"{_range_rule(low, high)} (got {value!r})")


def _range_rule(low: float, high: float) -> str:
    return f"must be >= {low:g}" if high == math.inf else f"must be in [{low:g}, {high:g}]"
