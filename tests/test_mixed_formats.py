"""A mixed registry, one endpoint per wire format, through real workers: each format
answers, and a message falls back across formats in price order, one call per format."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest

from aimesh_tasks import submit
from aimesh_tasks.providers import PROVIDERS
from aimesh_tasks.registry import Endpoint

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("workers")]
KEY_ENV = "AIMESH_TEST_MIXED_KEY"
os.environ.setdefault(KEY_ENV, "mixed-simulated-key")  # before the session's workers start
# Cheapest first: the order routing tries them in when cost decides.
FORMATS = [("anthropic", "0.0001"), ("gemini", "0.0002"), ("cohere", "0.0003"),
           ("openai", "0.0004")]


def _registry(simulator: Callable[..., Any], endpoint: Callable[..., Endpoint],
              failing: set[str]) -> dict[str, tuple[Endpoint, Any]]:
    made = {}
    for kind, price in FORMATS:
        sim = simulator(error_rate=1.0 if kind in failing else 0.0)
        made[kind] = (endpoint(sim, f"mixed-{kind}", provider=kind, api_key_env=KEY_ENV,
                               model=f"model-{kind}", price_in=price, price_out=price), sim)
    return made


def test_every_format_is_registered() -> None:
    assert {kind for kind, _ in FORMATS} <= set(PROVIDERS)


def test_each_format_answers_with_its_own_usage(
    simulator: Callable[..., Any], endpoint: Callable[..., Endpoint]
) -> None:
    made = _registry(simulator, endpoint, failing=set())
    for kind, (target, sim) in made.items():
        result = submit(agent_id="mixed-agent", prompt=f"hello from {kind}", max_tokens=8,
                        model=f"model-{kind}").get(timeout=60)
        [call] = sim.calls()
        assert result["endpoint_id"] == target.id
        assert (result["input_tokens"], result["output_tokens"]) == (
            call["prompt_tokens"], call["completion_tokens"])


def test_a_message_falls_back_across_formats_in_price_order(
    simulator: Callable[..., Any], endpoint: Callable[..., Endpoint]
) -> None:
    made = _registry(simulator, endpoint, failing={"anthropic", "gemini", "cohere"})
    result = submit(agent_id="mixed-agent", prompt="which format answers?",
                    max_tokens=8).get(timeout=90)
    assert result["endpoint_id"] == made["openai"][0].id
    tried = [a["endpoint_id"] for a in result["attempts"]]
    assert tried == [made[kind][0].id for kind, _ in FORMATS]
    assert [a["ok"] for a in result["attempts"]] == [False, False, False, True]
    for kind, (_, sim) in made.items():
        assert len(sim.calls()) == 1, kind  # one call per format, none repeated
