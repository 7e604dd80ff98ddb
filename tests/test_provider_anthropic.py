"""Anthropic Messages: the adapter against documented fixtures, the simulator's format over
real HTTP and through the official SDK, and messages end to end through Celery workers."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from decimal import Decimal
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

from aimesh_tasks import submit
from aimesh_tasks.messages import AiMessage
from aimesh_tasks.providers import PROVIDERS
from aimesh_tasks.providers.anthropic import API_VERSION, AnthropicMessages
from aimesh_tasks.providers.base import (
    ERROR_EXCERPT_CHARS,
    Completion,
    ErrorClass,
    RateLimits,
    retry_after_s,
)
from aimesh_tasks.registry import Endpoint
from aimesh_tasks.simulator import RunningSimulator, SimulatorConfig, start_simulator

DATA = Path(__file__).parent / "data" / "providers" / "anthropic"
# The endpoint workers read an endpoint's key from this variable; set before the session's
# workers start (at collection), so they inherit it.
KEY_ENV = "AIMESH_TEST_ANTHROPIC_KEY"
os.environ.setdefault(KEY_ENV, "sk-ant-simulated-test-key")

SYSTEM = "You are terse."
QUESTION = "Summarise the quarterly report in three bullet points."
TURNS = [{"role": "user", "content": QUESTION}]
HEADERS = {"x-api-key": "test", "anthropic-version": API_VERSION}
# The simulator's documented count: ceil(len(content) / 4) + 3 per message.
PROMPT_TOKENS = sum(math.ceil(len(text) / 4) + 3 for text in (SYSTEM, QUESTION))
FIXED_NOW = datetime.fromisoformat("2025-10-25T12:00:00Z").timestamp()
ADAPTER = AnthropicMessages(clock=lambda: FIXED_NOW)

Sim = Callable[..., RunningSimulator]
MakeEndpoint = Callable[..., Endpoint]


def fixture(name: str) -> Any:
    """A JSON fixture from tests/data/providers/anthropic (see its README)."""
    return json.loads((DATA / name).read_text())


def body(max_tokens: int = 64, **fields: Any) -> dict[str, Any]:
    """A Messages request body for the standard prompt."""
    return {"model": "claude-sim", "max_tokens": max_tokens, "system": SYSTEM,
            "messages": TURNS, **fields}


@contextmanager
def running(**config: Any) -> Iterator[RunningSimulator]:
    """A simulator on a free port, stopped on exit."""
    with start_simulator(SimulatorConfig(**config)) as sim:
        yield sim


def post(sim: RunningSimulator, payload: Any = None, *, raw: bytes | None = None,
         headers: dict[str, str] | None = None, path: str = "/v1/messages") -> httpx.Response:
    """A raw POST to the simulator (JSON `payload`, or `raw` bytes)."""
    sent = HEADERS if headers is None else headers
    with httpx.Client(base_url=sim.url) as client:
        if raw is not None:
            return client.post(path, content=raw,
                               headers={**sent, "content-type": "application/json"})
        return client.post(path, json=payload, headers=sent)


def sse_events(text: str) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) pairs of a server-sent event stream."""
    events = []
    for chunk in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in chunk.splitlines())
        events.append((fields["event"], json.loads(fields["data"])))
    return events


def assert_documented_flow(events: list[tuple[str, dict[str, Any]]]) -> str:
    """Check the documented event order (message_start, then content blocks, then
    message_delta, message_stop; pings anywhere) and return the streamed text."""
    names = [name for name, _ in events if name != "ping"]
    assert all(data["type"] == name for name, data in events)
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert names[1] == "content_block_start" and names[-3] == "content_block_stop"
    assert set(names[2:-3]) == {"content_block_delta"}
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    return "".join(data["delta"]["text"] for name, data in events
                   if name == "content_block_delta")


# --- the adapter, against the documented shapes (no servers) -------------------------


def test_registered_under_anthropic() -> None:
    assert isinstance(PROVIDERS["anthropic"], AnthropicMessages)


def test_request_puts_system_prompts_on_top_and_translates_parameters() -> None:
    message = AiMessage(
        agent_id="a", max_tokens=300, temperature=1.5, top_p=0.9, stop=["END"],
        messages=[
            {"role": "system", "content": SYSTEM},
            {"role": "developer", "content": [{"type": "text", "text": "Answer in "},
                                              {"type": "text", "text": "English."}]},
            {"role": "user", "content": QUESTION, "name": "ann"},
            {"role": "assistant", "content": "Which report?"},
            {"role": "tool", "content": "Q3 report text", "tool_call_id": "call_1"},
        ],
    )
    request = ADAPTER.build_request("claude-sonnet-4-5", message, "sk-ant-1")
    assert request.path == "/v1/messages"
    assert request.headers == {"anthropic-version": "2023-06-01", "x-api-key": "sk-ant-1"}
    assert request.json == {
        "model": "claude-sonnet-4-5",
        "max_tokens": 300,
        "system": [{"type": "text", "text": SYSTEM},
                   {"type": "text", "text": "Answer in English."}],
        "messages": [
            {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": "Which report?"},
            {"role": "user", "content": "Q3 report text"},
        ],
        "temperature": 1.0,  # Anthropic's range ends at 1
        "top_p": 0.9,
        "stop_sequences": ["END"],
    }


def test_request_with_one_system_message_sends_a_string_and_no_key_no_header() -> None:
    message = AiMessage(agent_id="a", messages=[{"role": "system", "content": SYSTEM},
                                                {"role": "user", "content": QUESTION}])
    request = ADAPTER.build_request("m", message, None)
    assert request.headers == {"anthropic-version": "2023-06-01"}
    assert request.json == {"model": "m", "max_tokens": 256, "system": SYSTEM,
                            "messages": TURNS}
    bare = ADAPTER.build_request("m", AiMessage(agent_id="a", prompt="hi"), "k").json
    assert "system" not in bare and "temperature" not in bare


def test_documented_message_gives_text_usage_stop_reason_and_id() -> None:
    assert ADAPTER.parse_response(fixture("message.json")) == Completion(
        text="Hello! I am a fixture.", input_tokens=12, output_tokens=7,
        model="claude-sonnet-4-5", finish_reason="stop",
        request_id="msg_01FixtureBasicText0000001", usage_known=True)


def test_cached_prompt_tokens_count_as_input_and_max_tokens_is_length() -> None:
    completion = ADAPTER.parse_response(fixture("message_cached_max_tokens.json"))
    assert completion.input_tokens == 10 + 2000 + 500
    assert completion.output_tokens == 5
    assert completion.finish_reason == "length"


def test_text_is_the_text_blocks_only_and_null_cache_fields_count_zero() -> None:
    completion = ADAPTER.parse_response(fixture("message_tool_use.json"))
    assert completion.text == "Let me look that up. One moment."
    assert (completion.input_tokens, completion.output_tokens) == (30, 25)
    assert completion.finish_reason == "tool_calls"


def test_missing_usage_is_unknown_usage_not_an_error() -> None:
    completion = ADAPTER.parse_response(fixture("message_no_usage.json"))
    assert completion.text == "An answer without usage."
    assert completion.usage_known is False
    assert (completion.input_tokens, completion.output_tokens) == (0, 0)


@pytest.mark.parametrize(
    ("broken", "named"),
    [
        ({"id": "msg_1", "type": "message"}, "'content'"),
        ({"content": "just text"}, "'content'"),
        ({"content": ["text"]}, r"content\[0\]"),
        ({"content": [{"type": "text", "text": None}]}, r"content\[0\]\.text"),
        ({"content": [], "usage": {"input_tokens": "12", "output_tokens": 1}},
         "usage.input_tokens"),
        ({"content": [], "usage": {"input_tokens": 1, "output_tokens": -1}},
         "usage.output_tokens"),
    ],
)
def test_a_body_without_the_text_structure_is_a_value_error(broken: dict[str, Any],
                                                            named: str) -> None:
    with pytest.raises(ValueError, match=named):
        ADAPTER.parse_response(broken)


ERROR_VERDICTS = {
    "invalid_request_error_400": ("fail", "bad_request"),
    "credit_balance_400": ("fallback", "quota_exhausted"),
    "authentication_error_401": ("fallback", "auth"),
    "billing_error_402": ("fallback", "billing"),
    "permission_error_403": ("fallback", "auth"),
    "not_found_error_404": ("fallback", "not_found"),
    "request_too_large_413": ("fail", "request_too_large"),
    "rate_limit_error_429": ("retry", "rate_limited"),
    "spend_cap_429": ("fallback", "quota_exhausted"),
    "api_error_500": ("fallback", "server_error"),
    "timeout_error_504": ("fallback", "timeout"),
    "overloaded_error_529": ("retry", "overloaded"),
}


def test_every_error_fixture_has_a_verdict() -> None:
    assert {p.stem for p in (DATA / "errors").glob("*.json")} == set(ERROR_VERDICTS)


@pytest.mark.parametrize(("name", "verdict"), ERROR_VERDICTS.items())
def test_documented_errors_are_classified(name: str, verdict: tuple[str, str]) -> None:
    case = fixture(f"errors/{name}.json")
    got = ADAPTER.classify_error(case["status"], case["body"], case["headers"])
    assert (got.action, got.reason) == verdict
    assert got.detail == case["body"]["error"]["message"]
    assert got.endpoint_fault is (verdict[0] != "fail")


@pytest.mark.parametrize(
    ("status", "unreadable", "verdict"),
    [
        (502, None, ErrorClass("fallback", "server_error")),
        (529, None, ErrorClass("retry", "overloaded")),
        (429, {"error": "slow down"}, ErrorClass("retry", "rate_limited", "slow down")),
        (400, {"type": "error"}, ErrorClass("fail", "bad_request")),
        (409, {"type": "error", "error": {"type": "invalid_request_error", "message": "busy"}},
         ErrorClass("retry", "conflict", "busy")),
    ],
)
def test_errors_without_a_known_type_go_by_status(status: int, unreadable: Any,
                                                   verdict: ErrorClass) -> None:
    assert ADAPTER.classify_error(status, unreadable, {}) == verdict


def test_error_detail_is_one_bounded_line() -> None:
    long = {"type": "error", "error": {"type": "api_error", "message": "boom\n" * 500}}
    detail = ADAPTER.classify_error(500, long, {}).detail
    assert len(detail) == ERROR_EXCERPT_CHARS and "\n" not in detail


def test_documented_rate_limit_headers() -> None:
    case = fixture("rate_limit_headers.json")
    adapter = AnthropicMessages(clock=lambda: datetime.fromisoformat(case["now"]).timestamp())
    assert adapter.rate_limits(case["headers"]) == RateLimits(
        requests_remaining=49, tokens_remaining=49000, reset_s=30.0)
    throttled = fixture("errors/rate_limit_error_429.json")["headers"]
    assert ADAPTER.rate_limits(throttled) == RateLimits(0, 12000, 17.0)
    assert retry_after_s(throttled, FIXED_NOW) == 17.0


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, RateLimits()),
        ({"anthropic-ratelimit-requests-remaining": "many",
          "anthropic-ratelimit-requests-reset": "soon"}, RateLimits()),
        ({"anthropic-ratelimit-requests-reset": "2025-10-25T11:59:00Z"}, RateLimits(reset_s=0.0)),
        ({"anthropic-ratelimit-requests-reset": "2025-10-25T12:00:05"}, RateLimits()),
        ({"anthropic-ratelimit-requests-reset": "2025-10-25T14:00:05+02:00"},
         RateLimits(reset_s=5.0)),
    ],
)
def test_rate_limit_headers_absent_unreadable_past_or_zoneless(
    headers: dict[str, str], expected: RateLimits
) -> None:
    assert ADAPTER.rate_limits(headers) == expected


# --- the simulator's Anthropic format over real HTTP ---------------------------------


def test_simulated_message_has_the_documented_shape_and_usage() -> None:
    with running() as sim:
        response = post(sim, body())
        calls = sim.calls()
    assert response.status_code == 200
    assert response.headers["request-id"].startswith("req_")
    message = response.json()
    assert message["type"] == "message" and message["role"] == "assistant"
    assert message["id"].startswith("msg_") and message["model"] == "claude-sim"
    [block] = message["content"]
    assert block["type"] == "text" and len(block["text"].split(" ")) == 16
    assert message["stop_reason"] == "end_turn" and message["stop_sequence"] is None
    assert message["usage"] == {"input_tokens": PROMPT_TOKENS, "output_tokens": 16}
    assert calls[0]["prompt_tokens"] == PROMPT_TOKENS and calls[0]["status"] == 200
    completion = PROVIDERS["anthropic"].parse_response(message)
    assert (completion.input_tokens, completion.output_tokens) == (PROMPT_TOKENS, 16)


def test_figures_and_text_match_the_openai_format_for_the_same_prompt() -> None:
    chat = {"model": "claude-sim", "max_tokens": 64,
            "messages": [{"role": "system", "content": SYSTEM}, *TURNS]}
    with running(seed=3) as sim:
        openai_answer = post(sim, chat, path="/v1/chat/completions").json()
        as_string = post(sim, body()).json()
        as_blocks = post(sim, body(system=[{"type": "text", "text": SYSTEM}])).json()
    assert as_string["content"][0]["text"] == openai_answer["choices"][0]["message"]["content"]
    assert as_string["usage"] == {"input_tokens": openai_answer["usage"]["prompt_tokens"],
                                  "output_tokens": openai_answer["usage"]["completion_tokens"]}
    assert as_blocks["content"] == as_string["content"]
    assert as_blocks["usage"] == as_string["usage"]


def test_max_tokens_cuts_the_answer_with_stop_reason_max_tokens() -> None:
    with running(completion_tokens=10) as sim:
        full = post(sim, body()).json()
        cut = post(sim, body(max_tokens=4)).json()
    assert cut["stop_reason"] == "max_tokens" and cut["usage"]["output_tokens"] == 4
    assert full["content"][0]["text"].startswith(cut["content"][0]["text"])
    assert PROVIDERS["anthropic"].parse_response(cut).finish_reason == "length"


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b"{not json", None),
        (b"[1, 2]", "body"),
        (b'{"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}', "model"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "x"}]}', "max_tokens"),
        (b'{"model": "m", "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]}',
         "max_tokens"),
        (b'{"model": "m", "max_tokens": 5}', "messages"),
        (b'{"model": "m", "max_tokens": 5, "messages": []}', "messages"),
        (b'{"model": "m", "max_tokens": 5, "messages": ["hi"]}', "messages.0"),
        (b'{"model": "m", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}',
         "messages.0.role"),
        (b'{"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": 3}]}',
         "messages.0.content"),
        (b'{"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": '
         b'[{"type": "image", "source": {}}]}]}', "messages.0.content.0"),
        (b'{"model": "m", "max_tokens": 5, "system": 3, '
         b'"messages": [{"role": "user", "content": "x"}]}', "system"),
        (b'{"model": "m", "max_tokens": 5, "stream": "yes", '
         b'"messages": [{"role": "user", "content": "x"}]}', "stream"),
        (b'{"model": "m", "max_tokens": 5, "temperature": 1.5, '
         b'"messages": [{"role": "user", "content": "x"}]}', "temperature"),
    ],
)
def test_a_bad_request_is_400_naming_the_field(raw: bytes, field: str | None) -> None:
    with running() as sim:
        response = post(sim, raw=raw)
        stats = sim.stats()
    assert response.status_code == 400
    answer = response.json()
    assert answer["type"] == "error" and answer["request_id"].startswith("req_")
    assert answer["error"]["type"] == "invalid_request_error"
    if field is None:
        assert "JSON" in answer["error"]["message"]
    else:
        assert answer["error"]["message"].startswith(f"{field}: ")
    assert stats["bad_request_400"] == 1 and stats["ok"] == 0
    assert ADAPTER.classify_error(400, answer, {}).action == "fail"


def test_a_key_and_a_version_are_required_and_bearer_keys_are_accepted() -> None:
    with running() as sim:
        no_key = post(sim, body(), headers={"anthropic-version": API_VERSION})
        no_version = post(sim, body(), headers={"x-api-key": "k"})
        bearer = post(sim, body(), headers={"Authorization": "Bearer k",
                                            "anthropic-version": API_VERSION})
        stats = sim.stats()
    assert no_key.status_code == 401
    assert no_key.json()["error"] == {"type": "authentication_error",
                                      "message": "x-api-key header is required"}
    assert ADAPTER.classify_error(401, no_key.json(), {}) == ErrorClass(
        "fallback", "auth", "x-api-key header is required")
    assert no_version.status_code == 400
    assert no_version.json()["error"]["message"].startswith("anthropic-version: ")
    assert bearer.status_code == 200
    assert stats["status_401"] == 1 and stats["bad_request_400"] == 1 and stats["ok"] == 1


@pytest.mark.parametrize(
    ("config", "status", "kind", "verdict"),
    [
        ({"error_rate": 1}, 500, "api_error", ("fallback", "server_error")),
        ({"throttle_rate": 1}, 429, "rate_limit_error", ("retry", "rate_limited")),
        ({"overload_rate": 1}, 529, "overloaded_error", ("retry", "overloaded")),
    ],
)
def test_injected_error_faults_answer_the_documented_bodies(
    config: dict[str, float], status: int, kind: str, verdict: tuple[str, str]
) -> None:
    with running(retry_after_s=7, **config) as sim:
        response = post(sim, body())
        calls = sim.calls()
    assert response.status_code == status
    answer = response.json()
    assert answer["type"] == "error" and answer["error"]["type"] == kind
    assert answer["request_id"] == response.headers["request-id"]
    assert response.headers.get("Retry-After") == (None if status == 500 else "7")
    got = ADAPTER.classify_error(status, answer, dict(response.headers))
    assert (got.action, got.reason) == verdict and got.detail.endswith("(simulated)")
    assert calls[0]["status"] == status and calls[0]["model"] == "claude-sim"


def test_throttled_answer_carries_the_rate_limit_headers() -> None:
    with running(throttle_rate=1, retry_after_s=7) as sim:
        response = post(sim, body())
    headers = {name.lower(): value for name, value in response.headers.items()}
    served_at = parsedate_to_datetime(headers["date"]).timestamp()
    limits = AnthropicMessages(clock=lambda: served_at).rate_limits(headers)
    assert limits.requests_remaining == 0
    # The reset is 7 s after the answer; both are stamped to the whole second.
    assert limits.reset_s is not None and 6.0 <= limits.reset_s <= 7.0


def test_malformed_fault_is_a_cut_json_body_with_status_200() -> None:
    with running(malformed_rate=1) as sim:
        response = post(sim, body())
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    with pytest.raises(ValueError):
        response.json()


def test_no_usage_fault_answers_200_without_usage() -> None:
    with running(no_usage_rate=1) as sim:
        response = post(sim, body())
        stats = sim.stats()
    message = response.json()
    assert response.status_code == 200 and "usage" not in message
    completion = ADAPTER.parse_response(message)
    assert completion.usage_known is False and len(completion.text.split(" ")) == 16
    assert stats["no_usage"] == 1


def test_documented_stream_fixture_passes_the_flow_check() -> None:
    assert assert_documented_flow(sse_events((DATA / "stream.sse").read_text())) == "Hello!"


def test_stream_events_follow_the_documented_flow_and_equal_the_message() -> None:
    with running() as sim:
        whole = post(sim, body()).json()
        response = post(sim, body(stream=True))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert assert_documented_flow(events) == whole["content"][0]["text"]
    start, delta = events[0][1]["message"], events[-2][1]
    assert start["usage"]["input_tokens"] == PROMPT_TOKENS
    assert start["id"].startswith("msg_") and start["model"] == "claude-sim"
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert delta["usage"] == {"output_tokens": 16}
    assert sum(name == "content_block_delta" for name, _ in events) == 16


def test_call_log_keeps_the_call_key_header() -> None:
    with running() as sim:
        post(sim, body(), headers={**HEADERS, "X-Aimesh-Call-Key": "key-7"})
        [call] = sim.calls()
    assert call == {"n": 1, "model": "claude-sim", "status": 200, "call_key": "key-7",
                    "prompt_tokens": PROMPT_TOKENS, "completion_tokens": 16, "disconnected": False}


# --- the official SDK against the simulator -------------------------------------------


@contextmanager
def sdk(sim: RunningSimulator) -> Iterator[anthropic.Anthropic]:
    """An Anthropic client for the simulator that never retries."""
    with anthropic.Anthropic(base_url=sim.url, api_key="test", max_retries=0) as client:
        yield client


def test_sdk_create_reads_text_and_usage() -> None:
    with running() as sim, sdk(sim) as client:
        message = client.messages.create(model="claude-sim", max_tokens=64, system=SYSTEM,
                                         messages=[{"role": "user", "content": QUESTION}])
    assert message.type == "message" and message.stop_reason == "end_turn"
    block = message.content[0]
    assert isinstance(block, anthropic.types.TextBlock)
    assert len(block.text.split(" ")) == 16
    assert (message.usage.input_tokens, message.usage.output_tokens) == (PROMPT_TOKENS, 16)


def test_sdk_stream_text_and_final_usage_equal_the_non_streamed_message() -> None:
    with running() as sim, sdk(sim) as client:
        whole = client.messages.create(model="claude-sim", max_tokens=64, system=SYSTEM,
                                       messages=[{"role": "user", "content": QUESTION}])
        with client.messages.stream(model="claude-sim", max_tokens=64, system=SYSTEM,
                                    messages=[{"role": "user", "content": QUESTION}]) as stream:
            streamed = "".join(stream.text_stream)
            final = stream.get_final_message()
    block = whole.content[0]
    assert isinstance(block, anthropic.types.TextBlock)
    assert streamed == block.text
    assert (final.usage.input_tokens, final.usage.output_tokens) == (PROMPT_TOKENS, 16)
    assert final.stop_reason == "end_turn"


def test_sdk_raises_its_overloaded_and_rate_limit_errors() -> None:
    with running(overload_rate=1) as sim, sdk(sim) as client:
        with pytest.raises(anthropic.InternalServerError) as overloaded:
            client.messages.create(model="m", max_tokens=8, messages=TURNS)
        sim.configure(overload_rate=0, throttle_rate=1)
        with pytest.raises(anthropic.RateLimitError):
            client.messages.create(model="m", max_tokens=8, messages=TURNS)
    assert overloaded.value.status_code == 529
    overloaded_class = getattr(anthropic, "OverloadedError", anthropic.InternalServerError)
    assert isinstance(overloaded.value, overloaded_class)


# --- end to end through real Celery workers --------------------------------------------


def _ask(**fields: Any) -> dict[str, Any]:
    result: dict[str, Any] = submit(
        agent_id="anthropic-e2e", max_tokens=64,
        messages=[{"role": "system", "content": SYSTEM}, *TURNS], **fields,
    ).get(timeout=60)
    return result


@pytest.mark.usefixtures("workers")
def test_end_to_end_tokens_and_cost_equal_the_simulator_call_log(
    simulator: Sim, endpoint: MakeEndpoint
) -> None:
    sim = simulator(completion_tokens=12)
    claude = endpoint(sim, "claude", provider="anthropic", api_key_env=KEY_ENV,
                      price_in="0.003", price_out="0.015")
    result = _ask()
    [call] = sim.calls()
    assert call["status"] == 200 and call["call_key"]  # the path's call key reached it
    assert result["endpoint_id"] == claude.id
    assert result["input_tokens"] == call["prompt_tokens"] == PROMPT_TOKENS
    assert result["output_tokens"] == call["completion_tokens"] == 12
    expected = (Decimal(call["prompt_tokens"]) * Decimal("0.003")
                + Decimal(call["completion_tokens"]) * Decimal("0.015")) / 1000
    assert Decimal(result["cost_usd"]) == expected
    assert result["finish_reason"] == "stop" and result["request_id"].startswith("msg_")
    assert len(result["text"].split(" ")) == 12


@pytest.mark.usefixtures("workers")
def test_end_to_end_without_the_key_header_is_401_and_falls_back(
    simulator: Sim, endpoint: MakeEndpoint
) -> None:
    claude_sim, openai_sim = simulator(), simulator()
    keyless = endpoint(claude_sim, "claude-keyless", provider="anthropic",
                       price_in="0.001", price_out="0.001")
    backup = endpoint(openai_sim, "openai-backup", price_in="0.002", price_out="0.002")
    result = _ask()
    assert result["endpoint_id"] == backup.id
    assert [(a["endpoint_id"], a["ok"]) for a in result["attempts"]] == [
        (keyless.id, False), (backup.id, True)]
    assert result["attempts"][0]["error"]["status"] == 401
    assert claude_sim.stats()["status_401"] == 1


@pytest.mark.usefixtures("workers")
@pytest.mark.parametrize(("fault", "status"), [("overload_rate", 529), ("error_rate", 500)])
def test_end_to_end_overload_or_server_error_falls_back_to_an_openai_endpoint(
    simulator: Sim, endpoint: MakeEndpoint, fault: str, status: int
) -> None:
    claude_sim = simulator(retry_after_s=0, **{fault: 1.0})
    openai_sim = simulator()
    claude = endpoint(claude_sim, "claude-failing", provider="anthropic",
                      api_key_env=KEY_ENV, price_in="0.001", price_out="0.001")
    backup = endpoint(openai_sim, "openai-backup", price_in="0.002", price_out="0.002")
    result = _ask()
    assert result["endpoint_id"] == backup.id
    *failed, last = result["attempts"]
    assert (last["endpoint_id"], last["ok"]) == (backup.id, True)
    assert failed and all(a["endpoint_id"] == claude.id and not a["ok"] for a in failed)
    assert {a["error"]["status"] for a in failed} == {status}
    assert len(claude_sim.calls()) == len(failed)
    assert openai_sim.stats()["ok"] == 1
