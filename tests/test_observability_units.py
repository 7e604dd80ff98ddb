"""Pure parts of observability: JSON log lines, redaction, labels, bucket resolution."""

from __future__ import annotations

import json
import logging
import math
import sys

import pytest

from aimesh_tasks.messages import AiMessage, Attempt
from aimesh_tasks.observability import decision_log
from aimesh_tasks.observability.exporter import priority_lists
from aimesh_tasks.observability.logging import REDACTED, JsonFormatter, Redactor
from aimesh_tasks.observability.metrics import LATENCY_BUCKETS_S, AgentLabels
from aimesh_tasks.observability.record import call_outcome
from aimesh_tasks.registry import Endpoint
from aimesh_tasks.routing.selection import RoutingDecision
from aimesh_tasks.settings import reset_settings

SECRET = "sk-unit-9f8e7d6c5b4a"


def _line(msg: str, *args: object, redactor: Redactor | None = None, **extra: object) -> str:
    record = logging.LogRecord("t", logging.INFO, __file__, 1, msg, args or None, None)
    record.__dict__.update(extra)
    return JsonFormatter(redactor or Redactor()).format(record)


def test_a_line_is_one_json_object_with_the_extra_fields() -> None:
    entry = json.loads(_line("message.completed", message_id="m1", agent_id="a", tokens=3))
    assert entry["event"] == "message.completed" and entry["level"] == "info"
    assert (entry["message_id"], entry["agent_id"], entry["tokens"]) == ("m1", "a", 3)


@pytest.mark.parametrize("text", [
    f"Authorization: Bearer {SECRET}",
    f"headers={{'authorization': 'Bearer {SECRET}'}}",
    f"GET https://g.example/v1/models?key={SECRET}&alt=json",
    f"x-api-key: {SECRET}",
    f"api_key={SECRET}",
    f"redis://user:{SECRET}@host:6379/0",
    f"1 validation error\n  input_value='{SECRET}', input_type=str",
])
def test_credential_patterns_are_redacted(text: str) -> None:
    line = _line(text)
    assert SECRET not in line and REDACTED in line


def test_known_secret_values_are_redacted_anywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UPSTREAM_PLAIN_NAME", SECRET)
    redactor = Redactor()
    assert SECRET in _line(f"saw {SECRET}", redactor=redactor)
    redactor.add_env("UPSTREAM_PLAIN_NAME")  # an endpoint's api_key_env
    assert SECRET not in _line(f"saw {SECRET}", redactor=redactor, extra={"nested": [SECRET]})
    monkeypatch.setenv("FLOWER_AUTH_X", f"admin:{SECRET}-2")
    redactor.add_secret_looking_env()
    assert f"{SECRET}-2" not in _line(f"pw {SECRET}-2", redactor=redactor)


def test_celery_task_arguments_and_return_values_are_dropped() -> None:
    line = _line("Task %(name)s[%(id)s] succeeded in %(runtime)ss: %(return_value)s",
                 {"name": "aimesh.call", "id": "x", "runtime": 0.1,
                  "return_value": {"text": "the answer"}},
                 data={"args": ["prompt text"], "kwargs": {}})
    assert "the answer" not in line and "prompt text" not in line and "aimesh.call" in line


def test_tracebacks_are_redacted() -> None:
    try:
        raise RuntimeError(f"Authorization: Bearer {SECRET}")
    except RuntimeError:
        record = logging.LogRecord("t", logging.ERROR, __file__, 1, "boom", None, sys.exc_info())
    line = JsonFormatter(Redactor()).format(record)
    assert SECRET not in line and "RuntimeError" in json.loads(line)["error"]


def _endpoint(endpoint_id: str) -> Endpoint:
    return Endpoint(id=endpoint_id, provider="openai", base_url="http://127.0.0.1:1", model="m",
                    api_key_env=None, input_nusd_per_1k=1, output_nusd_per_1k=1, capacity=1,
                    tags=frozenset(), enabled=True)


@pytest.mark.parametrize("log_prompts", [False, True])
def test_prompts_are_logged_only_when_configured(
    log_prompts: bool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("AIMESH_LOG_PROMPTS", str(log_prompts).lower())
    reset_settings()
    message = AiMessage(agent_id="unit-agent", prompt="a secret plan")
    decision = RoutingDecision(message_id=message.id, agent_id=message.agent_id, ranked=[],
                               excluded={}, weights=(0.4, 0.3, 0.3), route=[_endpoint("e1")])
    with caplog.at_level(logging.INFO, logger="aimesh_tasks.decisions"):
        decision_log.on_routed(message=message, decision=decision)
    reset_settings()
    line = JsonFormatter(Redactor()).format(caplog.records[-1])
    assert json.loads(line)["endpoint_id"] == "e1"
    assert ("a secret plan" in line) is log_prompts


def test_agent_labels_are_capped() -> None:
    labels = AgentLabels()
    assert [labels.label(a, 2) for a in ("a", "b", "c", "a", "d")] == ["a", "b", "_other", "a",
                                                                      "_other"]


def test_call_outcomes_are_a_small_fixed_set() -> None:
    def outcome(ok: bool, status: int | None = None) -> str:
        error = None if ok else {"status": status}
        return call_outcome(Attempt(endpoint_id="e", ok=ok, latency_ms=1.0, error=error))

    assert [outcome(True), outcome(False), outcome(False, 429), outcome(False, 404),
            outcome(False, 503), outcome(False, 200)] == [
        "ok", "transport_error", "http_429", "http_4xx", "http_5xx", "bad_response"]


def test_buckets_resolve_p99_9_within_25_percent_from_1_ms_to_100_s() -> None:
    finite = [b for b in LATENCY_BUCKETS_S if math.isfinite(b)]
    assert finite[0] <= 0.001 and finite[-1] >= 100 and math.isinf(LATENCY_BUCKETS_S[-1])
    assert all(b / a <= 1.26 for a, b in zip(finite, finite[1:], strict=False))


def test_priority_sub_queues_follow_kombu() -> None:
    from kombu.transport.redis import Channel

    from aimesh_tasks.app import app

    channel = Channel.__new__(Channel)
    channel.priority_steps = app.conf.broker_transport_options["priority_steps"]
    assert channel.priority_steps == list(range(10))  # one list per AiMessage.priority
    assert priority_lists("q") == [channel._q_for_pri("q", p) for p in range(10)]
