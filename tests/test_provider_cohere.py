"""Cohere Chat v2: the adapter against Cohere's documented bodies, the simulator's /v2/chat
over real HTTP (plain httpx, as the API reference's curl examples), and the message path
end to end through real Celery workers against a simulator speaking this format."""

from __future__ import annotations

import json
import os
import uuid
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
from aimesh_tasks.providers.base import ERROR_EXCERPT_CHARS, excerpt
from aimesh_tasks.providers.cohere import CohereChat
from aimesh_tasks.registry import Endpoint
from aimesh_tasks.settings import get_settings
from aimesh_tasks.simulator import RunningSimulator, SimulatorConfig, start_simulator
from aimesh_tasks.simulator.cohere_format import PROMPT_TEMPLATE_TOKENS, TRIAL_CALL_LIMIT

FIXTURES = Path(__file__).parent / "data" / "providers" / "cohere"
# The endpoint workers read the key from their environment; they inherit this process's,
# and pytest imports every test module before the session's workers start.
KEY_ENV = "AIMESH_TEST_COHERE_KEY"
os.environ.setdefault(KEY_ENV, "sim-cohere-key")

ADAPTER = CohereChat()
SYSTEM = "You are terse."
QUESTION = "Summarise the quarterly report in three bullet points."
CHAT = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
AUTH = {"Authorization": "Bearer test-key"}

Sim = Callable[..., RunningSimulator]
MakeEndpoint = Callable[..., Endpoint]


def fixture(name: str) -> Any:
    """A JSON fixture transcribed from Cohere's documentation (see its README)."""
    return json.loads((FIXTURES / name).read_text())


def message(**fields: Any) -> AiMessage:
    """An AiMessage from an agent of these tests."""
    return AiMessage.model_validate({"agent_id": "cohere-test", **fields})


# --- the adapter, against Cohere's documented bodies (no servers) --------------------------


def test_cohere_is_registered_in_providers() -> None:
    assert isinstance(PROVIDERS["cohere"], CohereChat)


def test_request_is_v2_chat_with_bearer_key_and_translated_parameters() -> None:
    request = ADAPTER.build_request("command-a-03-2025", message(
        messages=[
            {"role": "user", "content": "Hi."},
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Use English."}]},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Sum 2+2.", "name": "alice"},
        ],
        max_tokens=40, temperature=0.2, top_p=0.5, stop=["END"],
    ), "co-key")
    assert request.path == "/v2/chat"
    assert request.headers == {"Authorization": "Bearer co-key"}
    assert request.json == {
        "model": "command-a-03-2025",
        "messages": [
            {"role": "system", "content": "Be brief.\n\nUse English."},
            {"role": "user", "content": "Hi."},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Sum 2+2."},
        ],
        "max_tokens": 40, "temperature": 0.2, "p": 0.5, "stop_sequences": ["END"],
    }


def test_request_without_key_or_options_and_top_p_one_kept_in_cohere_range() -> None:
    plain = ADAPTER.build_request("m", message(prompt="hi", max_tokens=5), None)
    assert plain.headers == {}
    assert plain.json == {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                          "max_tokens": 5}
    wide = ADAPTER.build_request("m", message(prompt="hi", top_p=1.0), None)
    assert wide.json["p"] == 0.99


def test_documented_response_charges_billed_units() -> None:
    body = fixture("chat_response.json")
    completion = ADAPTER.parse_response(body)
    assert completion.text == body["message"]["content"][0]["text"]
    assert completion.text.startswith("LLMs stand for Large Language Models")
    assert (completion.input_tokens, completion.output_tokens) == (5, 418)
    assert completion.usage_known is True
    assert completion.finish_reason == "stop"  # documented as "complete"
    assert completion.request_id == "c14c80c3-18eb-4519-9460-6c92edd8cfb4"
    assert completion.model == ""  # Cohere does not echo it; the path uses the endpoint's


def test_usage_without_billed_units_uses_tokens() -> None:
    body = fixture("chat_response.json")
    del body["usage"]["billed_units"]
    completion = ADAPTER.parse_response(body)
    assert (completion.input_tokens, completion.output_tokens) == (71, 418)
    assert completion.usage_known is True


@pytest.mark.parametrize("usage", [None, {}, {"billed_units": {}, "tokens": None}, "n/a"])
def test_missing_usage_is_unknown_not_an_error(usage: Any) -> None:
    body = fixture("chat_response.json")
    if usage is None:
        del body["usage"]
    else:
        body["usage"] = usage
    completion = ADAPTER.parse_response(body)
    assert completion.usage_known is False
    assert (completion.input_tokens, completion.output_tokens) == (0, 0)
    assert completion.text.startswith("LLMs")


@pytest.mark.parametrize("body", [
    {},
    {"id": "x", "message": {"role": "assistant"}},
    {"message": {"content": "a string, not items"}},
    {"message": {"content": [{"type": "text"}]}},
    {"message": None},
])
def test_body_without_the_text_structure_is_a_value_error(body: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="malformed Cohere chat response"):
        ADAPTER.parse_response(body)


@pytest.mark.parametrize(("reason", "expected"), [
    ("COMPLETE", "stop"), ("STOP_SEQUENCE", "stop"), ("MAX_TOKENS", "length"),
    ("max_tokens", "length"), ("TOOL_CALL", "tool_calls"), ("ERROR", "error"),
    ("TIMEOUT", "timeout"), (None, None),
])
def test_finish_reasons_in_the_paths_words(reason: str | None, expected: str | None) -> None:
    body = fixture("chat_response.json")
    body["finish_reason"] = reason
    assert ADAPTER.parse_response(body).finish_reason == expected


@pytest.mark.parametrize(("name", "action", "reason"), [
    ("bad_request", "fail", "bad_request"),
    ("bad_request_too_many_tokens", "fail", "bad_request"),
    ("bad_request_model_with_id", "fallback", "unsupported_model"),
    ("unauthorized_no_key", "fallback", "auth"),
    ("unauthorized_invalid", "fallback", "auth"),
    ("payment_required", "fallback", "payment_required"),
    ("not_found", "fallback", "unknown_model"),
    ("too_many_requests", "retry", "rate_limited"),
    ("too_many_requests_trial", "retry", "rate_limited"),
    ("too_many_requests_tokens", "retry", "rate_limited"),
    ("cancelled", "retry", "cancelled"),
])
def test_documented_errors_are_classified(name: str, action: str, reason: str) -> None:
    case = fixture("errors.json")[name]
    verdict = ADAPTER.classify_error(case["status"], case["body"], {})
    assert (verdict.action, verdict.reason) == (action, reason)
    assert verdict.detail == excerpt(case["body"]["message"])
    assert 0 < len(verdict.detail) <= ERROR_EXCERPT_CHARS
    assert verdict.endpoint_fault is (action != "fail")


# Statuses Cohere's SDK lists with no documented example body: the bodies are ours, in
# Cohere's `{"message"}` shape.
@pytest.mark.parametrize(("status", "text", "action", "reason"), [
    (403, "forbidden", "fallback", "auth"),
    (422, "unknown field: parameter 'top_k' is not a valid field", "fail", "bad_request"),
    (429, "You are using a Trial key, which is limited to 1000 API calls / month.",
     "fallback", "quota_exhausted"),
    (498, "invalid token", "fallback", "auth"),
    (500, "internal server error", "fallback", "server_error"),
    (501, "not implemented", "fallback", "server_error"),
    (503, "service unavailable", "retry", "overloaded"),
    (504, "gateway timeout", "fallback", "timeout"),
])
def test_other_listed_statuses_are_classified(status: int, text: str, action: str,
                                              reason: str) -> None:
    verdict = ADAPTER.classify_error(status, {"id": "e-1", "message": text}, {})
    assert (verdict.action, verdict.reason, verdict.detail) == (action, reason, text)


def test_error_without_a_json_body_is_classified_by_status_and_detail_is_bounded() -> None:
    assert ADAPTER.classify_error(503, None, {}).action == "retry"
    assert ADAPTER.classify_error(500, None, {}).detail == ""
    long = ADAPTER.classify_error(400, {"message": "invalid request: " + "x " * 1000}, {})
    assert long.action == "fail" and len(long.detail) == ERROR_EXCERPT_CHARS


def test_rate_limits_read_the_trial_headers_and_retry_after() -> None:
    headers = fixture("trial_headers.json")
    limits = ADAPTER.rate_limits(headers)
    assert (limits.requests_remaining, limits.tokens_remaining, limits.reset_s) == (19, None,
                                                                                    None)
    throttled = ADAPTER.rate_limits({**headers, "retry-after": "7"})
    assert throttled.reset_s == 7.0
    assert ADAPTER.rate_limits({}) == ADAPTER.rate_limits({"x-trial-endpoint-call-remaining":
                                                           "many"})
    assert ADAPTER.rate_limits({}).requests_remaining is None


# --- the simulator's /v2/chat over real HTTP ------------------------------------------------


@contextmanager
def running(**config: Any) -> Iterator[RunningSimulator]:
    """A simulator on a free port, stopped on exit."""
    with start_simulator(SimulatorConfig(**config)) as sim:
        yield sim


def post(sim: RunningSimulator, body: Any = None, *, path: str = "/v2/chat",
         headers: dict[str, str] | None = None, content: bytes | None = None) -> httpx.Response:
    """A POST to the simulator, with a bearer key unless `headers` says otherwise."""
    with httpx.Client(base_url=sim.url) as client:
        if content is not None:
            return client.post(path, content=content,
                               headers={**AUTH, "Content-Type": "application/json",
                                        **(headers or {})})
        return client.post(path, json=body, headers=AUTH if headers is None else headers)


def sse_events(text: str) -> list[dict[str, Any]]:
    """Parse an SSE body; each event's name must equal its data's `type`."""
    events = []
    for block in filter(None, text.split("\n\n")):
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        assert set(fields) == {"event", "data"}, block
        data = json.loads(fields["data"])
        assert fields["event"] == data["type"]
        events.append(data)
    return events


def shape(value: Any) -> Any:
    """The keys of nested objects (first item of lists), without the values."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return type(value).__name__


def test_answer_has_documented_shape_and_same_figures_as_the_openai_format() -> None:
    with running(completion_tokens=12) as sim:
        response = post(sim, {"model": "command-a-03-2025", "messages": CHAT})
        openai = post(sim, {"model": "command-a-03-2025", "messages": CHAT},
                      path="/v1/chat/completions").json()
        calls = sim.calls()
    assert response.status_code == 200
    body = response.json()
    assert shape(body) == shape(fixture("chat_response.json"))
    assert body["finish_reason"] == "COMPLETE"
    assert body["message"]["content"][0]["text"] == openai["choices"][0]["message"]["content"]
    billed = body["usage"]["billed_units"]
    assert billed == {"input_tokens": openai["usage"]["prompt_tokens"], "output_tokens": 12}
    assert body["usage"]["tokens"] == {
        "input_tokens": billed["input_tokens"] + PROMPT_TEMPLATE_TOKENS, "output_tokens": 12}
    assert calls[0]["status"] == 200
    assert calls[0]["prompt_tokens"] == billed["input_tokens"]
    completion = ADAPTER.parse_response(body)
    assert (completion.input_tokens, completion.output_tokens) == (billed["input_tokens"], 12)
    assert completion.request_id == body["id"]
    limits = ADAPTER.rate_limits({k.lower(): v for k, v in response.headers.items()})
    assert limits.requests_remaining == TRIAL_CALL_LIMIT - 1


def test_adapter_request_is_accepted_and_max_tokens_cuts_with_max_tokens_reason() -> None:
    request = ADAPTER.build_request("m", message(messages=CHAT, max_tokens=4, top_p=1.0,
                                                 temperature=0.3, stop=["."]), "k")
    with running(completion_tokens=10) as sim:
        response = post(sim, request.json, headers=request.headers)
        full = post(sim, {**request.json, "max_tokens": 50}).json()
    body = response.json()
    assert response.status_code == 200, body
    assert body["finish_reason"] == "MAX_TOKENS"
    assert body["usage"]["billed_units"]["output_tokens"] == 4
    assert full["finish_reason"] == "COMPLETE"
    cut, whole = (ADAPTER.parse_response(b) for b in (body, full))
    assert whole.text.startswith(cut.text) and cut.finish_reason == "length"


@pytest.mark.parametrize(("headers", "message"), [
    ({}, "no api key supplied"),
    ({"Authorization": "Basic dXNlcjpwYXNz"}, "invalid api token"),
    ({"Authorization": "Bearer"}, "invalid api token"),
])
def test_call_without_a_bearer_key_is_401(headers: dict[str, str], message: str) -> None:
    with running() as sim:
        response = post(sim, {"model": "m", "messages": CHAT}, headers=headers)
        calls = sim.calls()
    assert response.status_code == 401
    assert response.json()["message"] == message and response.json()["id"]
    assert ADAPTER.classify_error(401, response.json(), {}).reason == "auth"
    assert calls[0]["status"] == 401


@pytest.mark.parametrize(("content", "field"), [
    (b"{not json", "json"),
    (b"[1, 2]", "JSON object"),
    (b'{"messages": [{"role": "user", "content": "x"}]}', "'model'"),
    (b'{"model": "m"}', "'messages'"),
    (b'{"model": "m", "messages": []}', "'messages'"),
    (b'{"model": "m", "messages": ["hi"]}', "messages[0]"),
    (b'{"model": "m", "messages": [{"role": "chatbot", "content": "x"}]}', "messages[0].role"),
    (b'{"model": "m", "messages": [{"role": "user", "content": 3}]}', "messages[0].content"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}',
     "'max_tokens'"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "p": 1.0}', "'p'"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": -1}',
     "'temperature'"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "stop_sequences": "x"}',
     "'stop_sequences'"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}',
     "'stream'"),
])
def test_invalid_request_is_400_in_cohere_form_naming_the_field(content: bytes,
                                                                field: str) -> None:
    with running() as sim:
        response = post(sim, content=content)
        stats = sim.stats()
    assert response.status_code == 400
    body = response.json()
    assert set(body) == {"id", "message"}
    assert field in body["message"]
    assert ADAPTER.classify_error(400, body, {}).action == "fail"
    assert stats["bad_request_400"] == 1 and stats["calls"] == 1


def test_content_as_text_items_counts_like_a_string() -> None:
    items = [{"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
             {"role": "user", "content": [{"type": "text", "text": QUESTION[:10]},
                                          {"type": "text", "text": QUESTION[10:]}]}]
    with running() as sim:
        as_items = post(sim, {"model": "m", "messages": items}).json()
        as_strings = post(sim, {"model": "m", "messages": CHAT}).json()
    assert as_items["message"] == as_strings["message"]
    assert as_items["usage"] == as_strings["usage"]


def test_injected_server_error_is_cohere_500() -> None:
    with running(error_rate=1) as sim:
        response = post(sim, {"model": "m", "messages": CHAT})
        stats = sim.stats()
    assert response.status_code == 500
    assert set(response.json()) == {"id", "message"}
    verdict = ADAPTER.classify_error(500, response.json(), {})
    assert (verdict.action, verdict.reason) == ("fallback", "server_error")
    assert "internal server error" in verdict.detail
    assert stats["errors_500"] == 1


def test_injected_throttle_is_429_with_retry_after_and_no_calls_left() -> None:
    with running(throttle_rate=1, retry_after_s=7) as sim:
        response = post(sim, {"model": "m", "messages": CHAT})
        stats = sim.stats()
    headers = {k.lower(): v for k, v in response.headers.items()}
    assert response.status_code == 429
    assert headers["retry-after"] == "7"
    assert headers["x-trial-endpoint-call-limit"] == str(TRIAL_CALL_LIMIT)
    verdict = ADAPTER.classify_error(429, response.json(), headers)
    assert (verdict.action, verdict.reason) == ("retry", "rate_limited")
    limits = ADAPTER.rate_limits(headers)
    assert (limits.requests_remaining, limits.reset_s) == (0, 7.0)
    assert stats["throttled_429"] == 1


def test_injected_overload_is_503_service_unavailable_with_retry_after() -> None:
    with running(overload_rate=1, retry_after_s=3) as sim:
        response = post(sim, {"model": "m", "messages": CHAT})
        stats = sim.stats()
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "3"
    verdict = ADAPTER.classify_error(503, response.json(), {})
    assert (verdict.action, verdict.reason) == ("retry", "overloaded")
    assert stats["overloaded"] == 1 and stats["status_503"] == 1


def test_injected_malformed_is_200_with_a_truncated_body() -> None:
    with running(malformed_rate=1) as sim:
        response = post(sim, {"model": "m", "messages": CHAT})
    assert response.status_code == 200
    assert response.text.startswith('{"id":')
    with pytest.raises(ValueError):
        response.json()


def test_injected_no_usage_is_200_without_usage_and_unknown_to_the_adapter() -> None:
    with running(no_usage_rate=1) as sim:
        response = post(sim, {"model": "m", "messages": CHAT})
        stream = post(sim, {"model": "m", "messages": CHAT, "stream": True})
    body = response.json()
    assert response.status_code == 200 and "usage" not in body
    completion = ADAPTER.parse_response(body)
    assert completion.usage_known is False and completion.text
    assert sse_events(stream.text)[-1]["delta"] == {"finish_reason": "COMPLETE"}


def test_stream_events_follow_the_documented_sequence_and_equal_the_plain_text() -> None:
    documented = fixture("chat_stream.json")
    with running(completion_tokens=9) as sim:
        plain = post(sim, {"model": "m", "messages": CHAT}).json()
        response = post(sim, {"model": "m", "messages": CHAT, "stream": True},
                        headers={**AUTH, "X-Aimesh-Call-Key": "stream-1"})
        calls = sim.calls()
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert [e["type"] for e in events] == [e["type"] for e in documented]
    del documented[-1]["delta"]["usage"]["api_version"]  # not a usage figure; not sent
    assert [shape(e) for e in events] == [shape(e) for e in documented]
    text = "".join(e["delta"]["message"]["content"]["text"] for e in events
                   if e["type"] == "content-delta")
    assert text == plain["message"]["content"][0]["text"]
    assert events[0]["id"] and events[-1]["delta"]["usage"] == plain["usage"]
    assert events[-1]["delta"]["finish_reason"] == "COMPLETE"
    assert calls[-1]["call_key"] == "stream-1" and calls[-1]["status"] == 200


# --- end to end: real workers, the message path, a simulator speaking Cohere v2 ------------


def _ask(prompt: str) -> dict[str, Any]:
    result: dict[str, Any] = submit(agent_id="cohere-test", prompt=prompt,
                                    max_tokens=64).get(timeout=60)
    return result


def _cost(result: dict[str, Any], price_in: str, price_out: str) -> Decimal:
    return (Decimal(result["input_tokens"]) * Decimal(price_in)
            + Decimal(result["output_tokens"]) * Decimal(price_out)) / 1000


@pytest.mark.slow
@pytest.mark.usefixtures("workers")
def test_message_through_a_cohere_endpoint_is_charged_what_the_simulator_billed(
    simulator: Sim, endpoint: MakeEndpoint
) -> None:
    sim = simulator(completion_tokens=12)
    cohere = endpoint(sim, "cohere", provider="cohere", api_key_env=KEY_ENV,
                      price_in="0.001", price_out="0.002")
    result = _ask(f"Hello Cohere {uuid.uuid4().hex}")
    [call] = sim.calls()
    # The simulator answers 401 without `Authorization: Bearer <key>`: a 200 shows the
    # call carried the provider's auth header form.
    assert call["status"] == 200 and call["call_key"]
    assert result["endpoint_id"] == cohere.id
    assert (result["input_tokens"], result["output_tokens"]) == (call["prompt_tokens"],
                                                                call["completion_tokens"])
    assert result["output_tokens"] == 12
    assert Decimal(result["cost_usd"]) == _cost(result, "0.001", "0.002")
    assert result["text"] and [a["ok"] for a in result["attempts"]] == [True]


@pytest.mark.slow
@pytest.mark.usefixtures("workers")
def test_cohere_endpoint_without_its_key_is_refused_and_falls_back(
    simulator: Sim, endpoint: MakeEndpoint
) -> None:
    cohere_sim, openai_sim = simulator(), simulator()
    keyless = endpoint(cohere_sim, "keyless", provider="cohere",
                       price_in="0.001", price_out="0.002")
    fallback = endpoint(openai_sim, "openai", price_in="0.010", price_out="0.020")
    result = _ask(f"Who holds the key {uuid.uuid4().hex}")
    assert [c["status"] for c in cohere_sim.calls()] == [401]
    assert [(a["endpoint_id"], a["ok"]) for a in result["attempts"]] == [
        (keyless.id, False), (fallback.id, True)]
    assert result["attempts"][0]["error"]["status"] == 401
    assert result["endpoint_id"] == fallback.id


@pytest.mark.slow
@pytest.mark.usefixtures("workers")
@pytest.mark.parametrize(("fault", "status"), [("overload_rate", 503), ("error_rate", 500)])
def test_fault_on_the_cohere_endpoint_falls_back_to_an_openai_endpoint(
    simulator: Sim, endpoint: MakeEndpoint, fault: str, status: int
) -> None:
    cohere_sim, openai_sim = simulator(**{fault: 1.0}), simulator(completion_tokens=7)
    cohere = endpoint(cohere_sim, "cohere", provider="cohere", api_key_env=KEY_ENV,
                      price_in="0.001", price_out="0.002")
    fallback = endpoint(openai_sim, "openai", price_in="0.010", price_out="0.020")
    result = _ask(f"Fall back please {uuid.uuid4().hex}")
    # A 503 is a short overload: retried at the same endpoint first (resilience/retry.py).
    tries = 1 + get_settings().retry_max_attempts if status == 503 else 1
    assert [c["status"] for c in cohere_sim.calls()] == [status] * tries
    assert [(a["endpoint_id"], a["ok"]) for a in result["attempts"]] == [
        (cohere.id, False)] * tries + [(fallback.id, True)]
    assert result["attempts"][0]["error"]["status"] == status
    [call] = openai_sim.calls()
    assert result["endpoint_id"] == fallback.id
    assert (result["input_tokens"], result["output_tokens"]) == (call["prompt_tokens"], 7)
    assert Decimal(result["cost_usd"]) == _cost(result, "0.010", "0.020")
