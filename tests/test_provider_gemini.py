"""The Gemini generateContent adapter and the simulator's Gemini format.

Three layers: the adapter against transcribed Gemini bodies (tests/data/providers/gemini,
no servers), the simulator's format over real HTTP with plain httpx as the REST reference
shows it (no SDK), and the message path end to end through real Celery workers.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from aimesh_tasks import submit
from aimesh_tasks.messages import AiMessage
from aimesh_tasks.providers import PROVIDERS
from aimesh_tasks.providers.base import ERROR_EXCERPT_CHARS
from aimesh_tasks.providers.gemini import Gemini
from aimesh_tasks.registry import Endpoint
from aimesh_tasks.settings import get_settings
from aimesh_tasks.simulator import RunningSimulator, SimulatorConfig, start_simulator

DATA = Path(__file__).parent / "data" / "providers" / "gemini"
# Worker subprocesses copy this environment when the session starts them, after collection.
GOOD_KEY_ENV, BAD_KEY_ENV = "AIMESH_TEST_GEMINI_KEY", "AIMESH_TEST_GEMINI_BAD_KEY"
os.environ.setdefault(GOOD_KEY_ENV, "AIza-simulated-test-key")
os.environ.setdefault(BAD_KEY_ENV, "invalid-simulated-key")

SYSTEM = "You are terse."
QUESTION = "Summarise the quarterly report in three bullet points."
CHAT = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
GEMINI_BODY = {"systemInstruction": {"parts": [{"text": SYSTEM}]},
               "contents": [{"role": "user", "parts": [{"text": QUESTION}]}]}
PROMPT_TOKENS = sum(math.ceil(len(text) / 4) + 3 for text in (SYSTEM, QUESTION))
ADAPTER = Gemini()

Sim = Callable[..., RunningSimulator]
MakeEndpoint = Callable[..., Endpoint]


def fixture(name: str) -> Any:
    """A transcribed Gemini body."""
    return json.loads((DATA / name).read_text())


def message(**fields: Any) -> AiMessage:
    fields.setdefault("messages", CHAT)
    return AiMessage(agent_id="gemini-test", **fields)


# --- the adapter, against documented bodies ------------------------------------------------


def test_registered_under_gemini() -> None:
    assert isinstance(PROVIDERS["gemini"], Gemini)


def test_request_is_the_documented_generate_content_call() -> None:
    chat = [*CHAT, {"role": "developer", "content": "Use British spelling."},
            {"role": "assistant", "content": "Noted."}, {"role": "assistant", "content": ""},
            {"role": "tool", "content": "tool output"}]
    request = ADAPTER.build_request(
        "gemini-2.5-flash", message(messages=chat, max_tokens=64, temperature=0.2, top_p=0.9,
                                    stop=["END"]), "secret-key")
    assert request.path == "/v1beta/models/gemini-2.5-flash:generateContent"
    assert request.headers == {"x-goog-api-key": "secret-key"}
    assert request.json == {
        "systemInstruction": {"parts": [{"text": SYSTEM}, {"text": "Use British spelling."}]},
        "contents": [{"role": "user", "parts": [{"text": QUESTION}]},
                     {"role": "model", "parts": [{"text": "Noted."}]},
                     {"role": "user", "parts": [{"text": "tool output"}]}],
        "generationConfig": {"maxOutputTokens": 64, "temperature": 0.2, "topP": 0.9,
                             "stopSequences": ["END"]},
    }
    assert "secret-key" not in json.dumps(request.json)


def test_request_without_key_or_options_carries_neither() -> None:
    request = ADAPTER.build_request("models/gemini-2.0-flash", message(prompt="hi",
                                                                       messages=[]), None)
    assert request.path == "/v1beta/models/gemini-2.0-flash:generateContent"
    assert request.headers == {}
    assert request.json == {"contents": [{"role": "user", "parts": [{"text": "hi"}]}],
                            "generationConfig": {"maxOutputTokens": 256}}


def test_documented_response_gives_text_usage_and_finish_reason() -> None:
    completion = ADAPTER.parse_response(fixture("generate_content.json"))
    assert completion.text == "Why did the chicken cross the road? To get to the other side!"
    assert (completion.input_tokens, completion.output_tokens) == (4, 12)
    assert completion.finish_reason == "stop" and completion.usage_known


def test_thinking_tokens_count_as_output_and_ids_are_kept() -> None:
    completion = ADAPTER.parse_response(fixture("generate_content_thinking.json"))
    assert (completion.input_tokens, completion.output_tokens) == (4, 5947 + 2042)
    assert completion.model == "gemini-2.5-flash"
    assert completion.request_id == "IZI2acSKMoWl0-kPmYj2yQc"


def test_body_without_usage_is_an_answer_with_usage_unknown() -> None:
    completion = ADAPTER.parse_response(fixture("generate_content_no_usage.json"))
    assert completion.text == "A summary of the conversation."
    assert (completion.input_tokens, completion.output_tokens) == (0, 0)
    assert completion.usage_known is False and completion.finish_reason is None


@pytest.mark.parametrize(("candidate", "text", "finish"), [
    ({"content": {"role": "model"}, "finishReason": "MAX_TOKENS"}, "", "length"),
    ({"finishReason": "SAFETY", "safetyRatings": []}, "", "content_filter"),
    ({"content": {"parts": [{"text": "plan", "thought": True}, {"text": "answer"}]},
      "finishReason": "STOP"}, "answer", "stop"),
    ({"content": {"parts": [{"text": "x"}]}, "finishReason": "OTHER"}, "x", "other"),
])
def test_finish_reasons_map_to_the_paths_words(candidate: dict[str, Any], text: str,
                                               finish: str) -> None:
    usage = {"promptTokenCount": 3, "candidatesTokenCount": 1}
    completion = ADAPTER.parse_response({"candidates": [candidate], "usageMetadata": usage})
    assert (completion.text, completion.finish_reason) == (text, finish)


def test_blocked_prompt_is_an_empty_filtered_answer() -> None:
    body = {"promptFeedback": {"blockReason": "SAFETY"},
            "usageMetadata": {"promptTokenCount": 9, "totalTokenCount": 9}}
    completion = ADAPTER.parse_response(body)
    assert (completion.text, completion.finish_reason, completion.input_tokens) == (
        "", "content_filter", 9)


@pytest.mark.parametrize("body", [
    {}, {"candidates": []}, {"candidates": [{}]}, {"candidates": "none"},
    {"candidates": [{"content": {"parts": [7]}}]},
    {"candidates": [{"content": {"parts": [{"text": "x"}]}}],
     "usageMetadata": {"promptTokenCount": "many"}},
])
def test_body_without_the_text_structure_is_malformed(body: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="malformed generateContent response"):
        ADAPTER.parse_response(body)


@pytest.mark.parametrize(("name", "status", "action", "reason"), [
    ("error_400_invalid_argument.json", 400, "fail", "bad_request"),
    ("error_400_api_key_invalid.json", 400, "fallback", "auth"),
    ("error_400_failed_precondition.json", 400, "fallback", "precondition"),
    ("error_403_permission_denied.json", 403, "fallback", "auth"),
    ("error_404_not_found.json", 404, "fallback", "unknown_model"),
    ("error_429_per_minute.json", 429, "retry", "rate_limited"),
    ("error_429_per_day.json", 429, "fallback", "quota_exhausted"),
    ("error_500_internal.json", 500, "fallback", "server_error"),
    ("error_503_unavailable.json", 503, "retry", "overloaded"),
    ("error_504_deadline_exceeded.json", 504, "fallback", "timeout"),
])
def test_documented_errors_are_classified(name: str, status: int, action: str,
                                          reason: str) -> None:
    body = fixture(name)
    verdict = ADAPTER.classify_error(status, body, {})
    assert (verdict.action, verdict.reason) == (action, reason)
    assert verdict.detail == " ".join(body["error"]["message"].split())
    assert verdict.endpoint_fault is (action != "fail")


def test_unreadable_error_bodies_fall_back_to_the_http_status() -> None:
    assert ADAPTER.classify_error(502, None, {}).reason == "server_error"
    assert ADAPTER.classify_error(429, {"error": "busy"}, {}).action == "retry"
    assert ADAPTER.classify_error(400, {"error": {"message": "odd"}}, {}).action == "fail"


def test_error_detail_is_a_bounded_excerpt() -> None:
    body = {"error": {"code": 400, "status": "INVALID_ARGUMENT", "message": "x" * 5000}}
    detail = ADAPTER.classify_error(400, body, {}).detail
    assert len(detail) == ERROR_EXCERPT_CHARS and detail.endswith("…")


def test_rate_limits_read_only_retry_after() -> None:
    openai_style = {"x-ratelimit-remaining-requests": "5", "x-ratelimit-remaining-tokens": "9"}
    assert ADAPTER.rate_limits(openai_style).requests_remaining is None
    assert ADAPTER.rate_limits({}).reset_s is None
    limits = ADAPTER.rate_limits({"retry-after": "7"})
    assert (limits.requests_remaining, limits.tokens_remaining, limits.reset_s) == (None, None,
                                                                                   7.0)


# --- the simulator's Gemini format over real HTTP ------------------------------------------


@contextmanager
def running(**config: Any) -> Iterator[RunningSimulator]:
    with start_simulator(SimulatorConfig(**config)) as sim:
        yield sim


def generate(sim: RunningSimulator, body: Any = None, *, model: str = "gemini-sim",
             method: str = "generateContent", key: str | None = "AIza-key", query: str = "",
             **kwargs: Any) -> httpx.Response:
    """POST /v1beta/models/{model}:{method} as the REST reference shows it."""
    kwargs["headers"] = {**({"x-goog-api-key": key} if key else {}), **kwargs.get("headers", {})}
    if body is not None:
        kwargs["json"] = body
    with httpx.Client(base_url=sim.url) as client:
        return client.post(f"/v1beta/models/{model}:{method}{query}", **kwargs)


def sse_events(response: httpx.Response) -> list[dict[str, Any]]:
    """The JSON of every `data:` line of a server-sent event stream."""
    assert response.headers["content-type"].startswith("text/event-stream")
    return [json.loads(line.removeprefix("data: ")) for line in response.text.splitlines()
            if line.startswith("data: ")]


def test_answer_has_the_documented_shape_and_the_openai_formats_figures() -> None:
    with running() as sim:
        response = generate(sim, GEMINI_BODY, headers={"X-Aimesh-Call-Key": "k-1"})
        with httpx.Client(base_url=sim.url) as client:
            openai = client.post("/v1/chat/completions",
                                 json={"model": "gemini-sim", "messages": CHAT}).json()
        calls = sim.calls()
    assert response.status_code == 200
    body = response.json()
    [candidate] = body["candidates"]
    assert candidate["content"]["role"] == "model" and candidate["finishReason"] == "STOP"
    assert body["usageMetadata"]["promptTokenCount"] == PROMPT_TOKENS
    assert body["usageMetadata"]["candidatesTokenCount"] == 16
    assert body["usageMetadata"]["totalTokenCount"] == PROMPT_TOKENS + 16
    assert body["modelVersion"] == "gemini-sim" and body["responseId"]
    completion = ADAPTER.parse_response(body)
    assert completion.text == openai["choices"][0]["message"]["content"]
    assert completion.input_tokens == openai["usage"]["prompt_tokens"] == PROMPT_TOKENS
    assert calls[0] == {"n": 1, "model": "gemini-sim", "status": 200, "call_key": "k-1",
                        "prompt_tokens": PROMPT_TOKENS, "completion_tokens": 16,
                        "disconnected": False}


def test_answer_keeps_the_shape_of_a_real_gemini_event() -> None:
    real = [json.loads(line.removeprefix("data: ")) for line in
            (DATA / "stream_events.txt").read_text().splitlines() if line.startswith("data: ")]

    def shape(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: shape(v) for k, v in value.items() if k != "thoughtsTokenCount"}
        return [shape(v) for v in value] if isinstance(value, list) else type(value).__name__

    with running() as sim:
        events = sse_events(generate(sim, GEMINI_BODY, method="streamGenerateContent",
                                     query="?alt=sse"))
    assert shape(events[0]) == shape(real[0]) and shape(events[-1]) == shape(real[-1])


def test_max_output_tokens_cuts_the_answer_with_max_tokens() -> None:
    with running(completion_tokens=10) as sim:
        full = ADAPTER.parse_response(generate(sim, GEMINI_BODY).json())
        body = {**GEMINI_BODY, "generation_config": {"max_output_tokens": 4}}
        cut = generate(sim, body).json()
    assert cut["candidates"][0]["finishReason"] == "MAX_TOKENS"
    assert cut["usageMetadata"]["candidatesTokenCount"] == 4
    assert full.text.startswith(ADAPTER.parse_response(cut).text)
    assert ADAPTER.parse_response(cut).finish_reason == "length"


def test_streamed_events_add_up_to_the_non_streamed_text() -> None:
    with running() as sim:
        text = ADAPTER.parse_response(generate(sim, GEMINI_BODY).json()).text
        events = sse_events(generate(sim, GEMINI_BODY, method="streamGenerateContent",
                                     query="?alt=sse"))
        array = generate(sim, GEMINI_BODY, method="streamGenerateContent").json()
    assert len(events) == 16
    assert "".join(e["candidates"][0]["content"]["parts"][0]["text"] for e in events) == text
    finishes = [e["candidates"][0].get("finishReason") for e in events]
    assert finishes[-1] == "STOP" and set(finishes[:-1]) == {None}
    assert events[-1]["usageMetadata"]["candidatesTokenCount"] == 16
    assert len({e["responseId"] for e in events}) == 1
    assert [{**e, "responseId": ""} for e in array] == [{**e, "responseId": ""} for e in events]


@pytest.mark.parametrize(("body", "field"), [
    (b"{not json", None),
    (b"[1, 2]", None),
    (b'{"contents": [], "temprature": 1}', "temprature"),
    (b"{}", "contents"),
    (b'{"contents": []}', "contents"),
    (b'{"contents": ["hi"]}', "contents[0]"),
    (b'{"contents": [{"role": "assistant", "parts": [{"text": "x"}]}]}', "contents[0].role"),
    (b'{"contents": [{"role": "user", "parts": []}]}', "contents[0].parts"),
    (b'{"contents": [{"parts": [{"text": 3}]}]}', "contents[0].parts[0].text"),
    (b'{"contents": [{"parts": [{"text": "x"}]}], "systemInstruction": {"parts": "s"}}',
     "systemInstruction.parts"),
    (b'{"contents": [{"parts": [{"text": "x"}]}], "generationConfig": {"maxOutputTokens": 0}}',
     "generationConfig.maxOutputTokens"),
    (b'{"contents": [{"parts": [{"text": "x"}]}], "generationConfig": {"temperature": 3}}',
     "generationConfig.temperature"),
    (b'{"contents": [{"parts": [{"text": "x"}]}], "generationConfig": {"topP": "hi"}}',
     "generationConfig.topP"),
    (b'{"contents": [{"parts": [{"text": "x"}]}], "generationConfig": {"stopSequences": [1]}}',
     "generationConfig.stopSequences"),
])
def test_bad_request_is_400_invalid_argument_naming_the_field(body: bytes,
                                                              field: str | None) -> None:
    with running() as sim:
        response = generate(sim, content=body, headers={"Content-Type": "application/json"})
        stats = sim.stats()
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["code"], error["status"]) == (400, "INVALID_ARGUMENT")
    [violation] = error["details"][0]["fieldViolations"]
    assert violation.get("field") == field
    if field is not None:
        assert field in error["message"]
    assert ADAPTER.classify_error(400, response.json(), {}).action == "fail"
    assert stats["bad_request_400"] == 1 and stats["calls"] == 1


def test_a_key_the_api_refuses_is_a_fallback_in_either_place() -> None:
    with running() as sim:
        in_header = generate(sim, GEMINI_BODY, key="invalid-key")
        in_query = generate(sim, GEMINI_BODY, key=None, query="?key=invalid-key")
        no_key = generate(sim, GEMINI_BODY, key=None)
    for refused in (in_header, in_query):
        assert refused.status_code == 400
        assert refused.json()["error"]["details"][0]["reason"] == "API_KEY_INVALID"
        verdict = ADAPTER.classify_error(400, refused.json(), {})
        assert (verdict.action, verdict.reason) == ("fallback", "auth")
    assert no_key.status_code == 200


@pytest.mark.parametrize(("rate", "status", "name", "action"), [
    ("error_rate", 500, "INTERNAL", "fallback"),
    ("throttle_rate", 429, "RESOURCE_EXHAUSTED", "retry"),
    ("overload_rate", 503, "UNAVAILABLE", "retry"),
])
def test_injected_error_faults_answer_in_geminis_error_format(rate: str, status: int, name: str,
                                                              action: str) -> None:
    with running(**{rate: 1.0}, retry_after_s=7) as sim:
        response = generate(sim, GEMINI_BODY)
        streamed = generate(sim, GEMINI_BODY, method="streamGenerateContent", query="?alt=sse")
        stats = sim.stats()
    assert response.status_code == streamed.status_code == status
    error = response.json()["error"]
    assert (error["code"], error["status"]) == (status, name)
    headers = {k.lower(): v for k, v in response.headers.items()}
    assert ADAPTER.classify_error(status, response.json(), headers).action == action
    if status == 500:
        assert "retry-after" not in headers
    else:
        assert headers["retry-after"] == "7" and ADAPTER.rate_limits(headers).reset_s == 7.0
    if status == 503:
        assert error["message"].startswith("The model is overloaded")
    if status == 429:
        assert {"@type": "type.googleapis.com/google.rpc.RetryInfo",
                "retryDelay": "7s"} in error["details"]
    assert stats["calls"] == 2 and stats["ok"] == 0


def test_malformed_fault_is_a_truncated_200() -> None:
    with running(malformed_rate=1.0) as sim:
        response = generate(sim, GEMINI_BODY)
    assert response.status_code == 200
    with pytest.raises(ValueError):
        response.json()


def test_no_usage_fault_leaves_usage_metadata_out() -> None:
    with running(no_usage_rate=1.0) as sim:
        response = generate(sim, GEMINI_BODY)
        events = sse_events(generate(sim, GEMINI_BODY, method="streamGenerateContent",
                                     query="?alt=sse"))
    assert response.status_code == 200 and "usageMetadata" not in response.json()
    completion = ADAPTER.parse_response(response.json())
    assert completion.usage_known is False and completion.text
    assert all("usageMetadata" not in event for event in events)


# --- end to end through real Celery workers -----------------------------------------------


def _ask(**fields: Any) -> dict[str, Any]:
    result: dict[str, Any] = submit(agent_id="gemini-e2e", prompt="Say hello in Gemini",
                                    max_tokens=64, **fields).get(timeout=60)
    return result


@pytest.mark.usefixtures("workers")
def test_message_answered_by_a_gemini_endpoint_matches_the_call_log(
    simulator: Sim, endpoint: MakeEndpoint
) -> None:
    sim = simulator(completion_tokens=12)
    gemini = endpoint(sim, "gemini", provider="gemini", api_key_env=GOOD_KEY_ENV,
                      price_in="0.001", price_out="0.002")
    result = _ask()
    [call] = sim.calls()
    assert result["endpoint_id"] == gemini.id and call["status"] == 200
    assert (result["input_tokens"], result["output_tokens"]) == (
        call["prompt_tokens"], call["completion_tokens"]) == (
        math.ceil(len("Say hello in Gemini") / 4) + 3, 12)
    expected = (Decimal(call["prompt_tokens"]) * Decimal("0.001")
                + Decimal(call["completion_tokens"]) * Decimal("0.002")) / 1000
    assert Decimal(result["cost_usd"]) == expected
    assert call["call_key"] and call["model"] == "sim-model" == result["model"]
    assert result["finish_reason"] == "stop" and result["request_id"].startswith("sim-")
    assert len(result["text"].split()) == 12


@pytest.mark.usefixtures("workers")
@pytest.mark.parametrize(("fault", "status"), [
    ({"overload_rate": 1.0}, 503), ({"error_rate": 1.0}, 500), ({}, 400),
])
def test_failing_gemini_endpoint_falls_back_to_an_openai_endpoint(
    simulator: Sim, endpoint: MakeEndpoint, fault: dict[str, float], status: int
) -> None:
    gemini_sim, openai_sim = simulator(**fault), simulator()
    # No fault: the key is the one the simulator refuses, which it reads from x-goog-api-key.
    gemini = endpoint(gemini_sim, "gemini", provider="gemini",
                      api_key_env=GOOD_KEY_ENV if fault else BAD_KEY_ENV,
                      price_in="0.001", price_out="0.001")
    backup = endpoint(openai_sim, "backup", provider="openai", price_in="0.002",
                      price_out="0.002")
    result = _ask()
    # A 503 is a short overload: retried at the same endpoint first (resilience/retry.py).
    tries = 1 + get_settings().retry_max_attempts if status == 503 else 1
    assert result["endpoint_id"] == backup.id
    assert [(a["endpoint_id"], a["ok"]) for a in result["attempts"]] == [
        (gemini.id, False)] * tries + [(backup.id, True)]
    assert result["attempts"][0]["error"]["status"] == status
    assert [c["status"] for c in gemini_sim.calls()] == [status] * tries
    [answered] = openai_sim.calls()
    assert (result["input_tokens"], result["output_tokens"]) == (
        answered["prompt_tokens"], answered["completion_tokens"])
