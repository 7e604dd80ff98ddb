"""AiMessage validation and canonical JSON (pure; no servers needed)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from aimesh_tasks.errors import InvalidMessage
from aimesh_tasks.messages import AiResult, canonical_json, parse_message

GOOD: dict[str, Any] = {"agent_id": "research-bot", "prompt": "What is 2+2?"}


def test_prompt_becomes_one_user_message() -> None:
    message = parse_message(GOOD)
    assert message.chat() == [{"role": "user", "content": "What is 2+2?"}]
    assert message.prompt is None


def test_round_trip_through_json_dict_is_identity() -> None:
    message = parse_message({**GOOD, "metadata": {"k": 1}, "temperature": 0.2})
    assert parse_message(message.to_json_dict()) == message


def test_canonical_json_is_key_order_independent() -> None:
    assert canonical_json({"b": 1, "a": [2, {"d": 1, "c": 2}]}) == '{"a":[2,{"c":2,"d":1}],"b":1}'


def test_agent_ids_in_kebab_or_snake_case_are_accepted() -> None:
    for agent_id in ("a", "research-bot", "research_bot_2", "x1-y2"):
        assert parse_message({**GOOD, "agent_id": agent_id}).agent_id == agent_id


PAST = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"agent_id": "Research Bot"}, "agent_id", "kebab or snake"),
        ({"agent_id": "bot-"}, "agent_id", "kebab or snake"),
        ({"prompt": None, "messages": []}, "messages", "at least one"),
        ({"prompt": None, "messages": "hello"}, "messages", "list"),
        ({"prompt": None, "messages": [{"role": "bot", "content": "x"}]}, "messages.0.role",
         "'user'"),
        ({"prompt": None, "messages": [{"role": "user"}]}, "messages.0.content", "required"),
        ({"prompt": None, "messages": [{"role": "user", "content": "  "}]}, "messages.0",
         "must not be empty"),
        ({"prompt": None, "messages": [{"role": "user", "content": "x", "x": 1}]},
         "messages.0.x", "unknown field"),
        ({"max_tokens": 0}, "max_tokens", "between 1 and"),
        ({"max_tokens": 10**9}, "max_tokens", "AIMESH_MAX_TOKENS_CAP"),
        ({"deadline": PAST}, "deadline", "in the past"),
        ({"deadline": "2999-01-01T00:00:00"}, "deadline", "timezone-aware"),
        ({"prompt": "x" * 300_000}, "messages", "byte cap"),
        ({"colour": "blue"}, "colour", "unknown field"),
        ({"priority": 10}, "priority", "less than or equal to 9"),
        ({"messages": [{"role": "user", "content": "y"}]}, "prompt", "not both"),
    ],
)
def test_bad_message_names_field_and_reason(change: dict[str, Any], field: str, words: str
                                            ) -> None:
    with pytest.raises(InvalidMessage) as caught:
        parse_message({**GOOD, **change})
    assert caught.value.field == field
    assert words in str(caught.value)
    assert str(caught.value).startswith(f"{field}:")


def test_non_object_message_is_refused() -> None:
    with pytest.raises(InvalidMessage, match="expected a JSON object"):
        parse_message(["not", "a", "dict"])  # type: ignore[arg-type]


def test_result_cost_is_an_exact_decimal_string() -> None:
    now = datetime.now(UTC)
    result = AiResult(
        message_id="m", agent_id="a", text="t", endpoint_id="e", model="m", input_tokens=1,
        output_tokens=2, cost_usd=Decimal("0.000000007"), queue_wait_ms=1.0,
        processing_ms=2.0, submitted_at=now, started_at=now, finished_at=now,
    )
    assert result.to_json_dict()["cost_usd"] == "0.000000007"
