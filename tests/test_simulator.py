"""The simulated LLM provider over real HTTP on 127.0.0.1, through the official OpenAI SDK."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import httpx
import openai
import pytest
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletion, ChatCompletionMessageParam

from aimesh_tasks.simulator import RunningSimulator, SimulatorConfig, start_simulator
from tests.waits import wait_until

SYSTEM = "You are terse."
QUESTION = "Summarise the quarterly report in three bullet points."
PROMPT: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": QUESTION},
]


def expected_prompt_tokens(*contents: str) -> int:
    """The documented formula: sum of ceil(len(content) / 4) + 3 per message."""
    return sum(math.ceil(len(content) / 4) + 3 for content in contents)


PROMPT_TOKENS = expected_prompt_tokens(SYSTEM, QUESTION)


@contextmanager
def running(**config: Any) -> Iterator[RunningSimulator]:
    """A simulator on a free port, stopped on exit."""
    with start_simulator(SimulatorConfig(**config)) as sim:
        yield sim


@contextmanager
def sdk(sim: RunningSimulator) -> Iterator[openai.OpenAI]:
    """An OpenAI client for the simulator that never retries."""
    with openai.OpenAI(base_url=sim.url + "/v1", api_key="test", max_retries=0) as client:
        yield client


def ask(client: openai.OpenAI, messages: Sequence[ChatCompletionMessageParam],
        **kwargs: Any) -> ChatCompletion:
    """A non-streaming chat completion."""
    response: ChatCompletion = client.chat.completions.create(
        model="gpt-sim", messages=messages, **kwargs
    )
    return response


def text_of(response: ChatCompletion) -> str:
    """The assistant text of a completion."""
    content = response.choices[0].message.content
    assert content is not None
    return content


def usage_of(response: ChatCompletion) -> CompletionUsage:
    """The usage of a completion."""
    assert response.usage is not None
    return response.usage


def post(sim: RunningSimulator, path: str, **kwargs: Any) -> httpx.Response:
    """A raw POST to the simulator."""
    with httpx.Client(base_url=sim.url) as client:
        return client.post(path, **kwargs)


def test_non_streaming_completion_has_documented_usage() -> None:
    with running() as sim, sdk(sim) as client:
        response = ask(client, PROMPT)
    assert response.object == "chat.completion"
    assert response.id.startswith("chatcmpl-")
    assert response.model == "gpt-sim"
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert len(text_of(response).split(" ")) == 16
    assert choice.finish_reason == "stop"
    usage = usage_of(response)
    assert usage.prompt_tokens == PROMPT_TOKENS
    assert usage.completion_tokens == 16
    assert usage.total_tokens == PROMPT_TOKENS + 16


def test_max_tokens_cuts_the_completion_with_finish_reason_length() -> None:
    with running(completion_tokens=10) as sim, sdk(sim) as client:
        full = ask(client, PROMPT)
        cut = ask(client, PROMPT, max_tokens=4)
        newer = ask(client, PROMPT, max_completion_tokens=3)
        roomy = ask(client, PROMPT, max_tokens=50)
    assert cut.choices[0].finish_reason == "length"
    assert usage_of(cut).completion_tokens == 4
    assert text_of(full).startswith(text_of(cut))
    assert usage_of(newer).completion_tokens == 3
    assert usage_of(roomy).completion_tokens == 10
    assert roomy.choices[0].finish_reason == "stop"


def test_streaming_deltas_equal_the_non_streaming_text_and_end_with_usage() -> None:
    with running() as sim, sdk(sim) as client:
        text = text_of(ask(client, PROMPT))
        with client.chat.completions.create(
            model="gpt-sim", messages=PROMPT, stream=True,
            stream_options={"include_usage": True},
        ) as stream:
            chunks = list(stream)
    deltas = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert deltas == text
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.prompt_tokens == PROMPT_TOKENS
    assert last.usage.completion_tokens == 16


def test_stream_without_include_usage_has_no_usage_chunk() -> None:
    with running() as sim:
        body = {"model": "m", "messages": PROMPT, "stream": True}
        response = post(sim, "/v1/chat/completions", json=body)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line for line in response.text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    assert all('"usage"' not in event for event in events)


def test_completions_are_deterministic_per_prompt_and_seed() -> None:
    other: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "Something else entirely."}
    ]
    with running(seed=7) as first, running(seed=7) as twin, running(seed=8) as reseeded:
        with sdk(first) as a, sdk(twin) as b, sdk(reseeded) as c:
            text = text_of(ask(a, PROMPT))
            again = text_of(ask(a, PROMPT))
            from_twin = text_of(ask(b, PROMPT))
            different_prompt = text_of(ask(a, other))
            different_seed = text_of(ask(c, PROMPT))
    assert text == again == from_twin
    assert different_prompt != text
    assert different_seed != text


def test_error_rate_one_answers_500_and_the_sdk_raises() -> None:
    with running(error_rate=1) as sim, sdk(sim) as client:
        with pytest.raises(openai.InternalServerError) as caught:
            ask(client, PROMPT)
        assert caught.value.status_code == 500
        assert sim.stats()["errors_500"] == 1


def test_throttle_rate_one_answers_429_with_retry_after() -> None:
    with running(throttle_rate=1, retry_after_s=7) as sim:
        response = post(sim, "/v1/chat/completions", json={"model": "m", "messages": PROMPT})
        with sdk(sim) as client, pytest.raises(openai.RateLimitError):
            ask(client, PROMPT)
        stats = sim.stats()
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "7"
    assert response.json()["error"]["code"] == "rate_limit_exceeded"
    assert stats["throttled_429"] == 2 and stats["ok"] == 0


def test_latency_is_honoured_without_blocking_other_requests() -> None:
    with running(latency_ms=200) as sim, sdk(sim) as client:
        started = time.monotonic()
        ask(client, PROMPT)
        assert time.monotonic() - started >= 0.2  # a lower bound: no load makes it flaky
        # One request sleeps a latency far longer than the test; five others, sent while it
        # sleeps with the latency set to 0, are all answered: the sleeper blocks nobody.
        sim.configure(latency_ms=600_000)
        with ThreadPoolExecutor(1) as pool:
            sleeper = pool.submit(post, sim, "/v1/chat/completions",
                                  json={"model": "m", "messages": PROMPT}, timeout=None)
            wait_until(lambda: sim.stats()["calls"] == 2, "the sleeping request to arrive",
                       seen=sim.stats)
            sim.configure(latency_ms=0)
            with ThreadPoolExecutor(5) as parallel:
                list(parallel.map(lambda _: ask(client, PROMPT), range(5)))
            assert not sleeper.done()
            assert sim.stats()["ok"] == 6 and len(sim.calls()) == 6  # all but the sleeper
            sim.stop()  # ends the sleeper's request too
            with pytest.raises(httpx.HTTPError):
                sleeper.result(timeout=60)


def test_a_hold_answers_nothing_until_that_many_wait_at_once() -> None:
    """hold_in_flight=3: two requests wait however long it takes; the third opens the
    hold for all three and for later ones; /_sim/in_flight saw three at once."""
    with running(hold_in_flight=3) as sim, ThreadPoolExecutor(3) as pool:
        def one() -> int:
            return post(sim, "/v1/chat/completions", timeout=60,
                        json={"model": "m", "messages": PROMPT}).status_code

        first = [pool.submit(one) for _ in range(2)]
        wait_until(lambda: sim.in_flight()["in_flight"] == 2, "two requests held",
                   seen=sim.in_flight)
        assert not any(f.done() for f in first) and sim.stats()["ok"] == 0
        third = pool.submit(one)
        assert [f.result(timeout=60) for f in (*first, third)] == [200, 200, 200]
        assert one() == 200  # the hold stays open
        with httpx.Client(base_url=sim.url) as http:
            over_http = http.get("/_sim/in_flight").json()
        assert over_http == sim.in_flight() == {"in_flight": 0, "max_in_flight": 3}
        sim.reset()
        assert sim.in_flight() == {"in_flight": 0, "max_in_flight": 0}


def test_stats_and_calls_count_every_request_with_call_keys() -> None:
    with running() as sim, sdk(sim) as client:
        ask(client, PROMPT, extra_headers={"X-Aimesh-Call-Key": "key-1"})
        ask(client, [{"role": "user", "content": "hi"}])
        post(sim, "/v1/chat/completions", content=b"not json",
             headers={"X-Aimesh-Call-Key": "key-3"})
        stats = sim.stats()
        calls = sim.calls()
        with httpx.Client(base_url=sim.url) as http:
            over_http = (http.get("/_sim/stats").json(), http.get("/_sim/calls").json())
            health = http.get("/health").json()
            reset = http.post("/_sim/reset").json()
        after_reset = (sim.stats(), sim.calls())
    tokens = PROMPT_TOKENS + expected_prompt_tokens("hi")
    assert stats == {"calls": 3, "ok": 2, "errors_500": 0, "throttled_429": 0,
                     "bad_request_400": 1, "prompt_tokens": tokens, "completion_tokens": 32}
    assert [c["call_key"] for c in calls] == ["key-1", None, "key-3"]
    assert [c["status"] for c in calls] == [200, 200, 400]
    assert calls[0] == {"n": 1, "model": "gpt-sim", "status": 200, "call_key": "key-1",
                        "prompt_tokens": PROMPT_TOKENS,
                        "completion_tokens": 16, "disconnected": False}
    assert over_http == (stats, calls)
    assert health == {"status": "ok"}
    assert reset["calls"] == 0
    assert after_reset == (dict.fromkeys(stats, 0), [])


def test_runtime_config_changes_behaviour_and_rejects_bad_fields() -> None:
    with running() as sim, sdk(sim) as client:
        config = post(sim, "/_sim/config", json={"completion_tokens": 5,
                                                 "model_name": "served"}).json()
        response = ask(client, PROMPT)
        bad_range = post(sim, "/_sim/config", json={"error_rate": 1.5})
        bad_type = post(sim, "/_sim/config", json={"latency_ms": "fast"})
        not_runtime = post(sim, "/_sim/config", json={"seed": 3})
        sim.configure(error_rate=1)
        with pytest.raises(openai.InternalServerError):
            ask(client, PROMPT)
        with pytest.raises(ValueError, match="throttle_rate"):
            sim.configure(throttle_rate=-0.1)
    assert config["completion_tokens"] == 5 and config["seed"] == 0
    assert usage_of(response).completion_tokens == 5
    assert response.model == "served"
    for rejected, field in ((bad_range, "error_rate"), (bad_type, "latency_ms"),
                            (not_runtime, "seed")):
        assert rejected.status_code == 400
        assert rejected.json()["error"]["param"] == field
        assert field in rejected.json()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (b'{"model": "m"}', "messages"),
        (b'{"model": "m", "messages": []}', "messages"),
        (b'{"model": "m", "messages": ["hi"]}', "messages[0]"),
        (b'{"model": "m", "messages": [{"role": "user", "content": 3}]}',
         "messages[0].content"),
        (b'{"model": "m", "messages": [{"content": "hi"}]}', "messages[0].role"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}',
         "max_tokens"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}',
         "stream"),
    ],
)
def test_malformed_body_is_400_naming_the_param(body: bytes, param: str | None) -> None:
    with running() as sim:
        response = post(sim, "/v1/chat/completions", content=body,
                        headers={"Content-Type": "application/json"})
        stats = sim.stats()
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["code"] is None
    assert stats["bad_request_400"] == 1 and stats["calls"] == 1


def test_config_validation_names_the_field_and_rule() -> None:
    with pytest.raises(ValueError, match=r"error_rate must be in \[0, 1\]"):
        SimulatorConfig(error_rate=2)
    with pytest.raises(ValueError, match="latency_ms must be >= 0"):
        SimulatorConfig(latency_ms=-5)
    with pytest.raises(ValueError, match="completion_tokens must be in"):
        SimulatorConfig(completion_tokens=0)
    with pytest.raises(ValueError, match="retry_after_s must be an integer"):
        SimulatorConfig(retry_after_s=1.5)  # type: ignore[arg-type]


def test_several_simulators_run_at_once_and_stop_cleanly() -> None:
    sims = [start_simulator() for _ in range(3)]
    try:
        assert len({sim.url for sim in sims}) == 3
        for sim in sims:
            with sdk(sim) as client:
                ask(client, PROMPT)
        assert [sim.stats()["ok"] for sim in sims] == [1, 1, 1]
    finally:
        for sim in sims:
            sim.stop()
    sims[0].stop()  # idempotent
    with pytest.raises(RuntimeError):
        sims[0].stats()
    with pytest.raises(httpx.ConnectError), httpx.Client() as client:
        client.get(sims[0].url + "/health")
