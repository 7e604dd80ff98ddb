"""The HTTP ingress end to end: a real uvicorn process, real workers, Redis, Postgres and
the simulator; clients are the official `openai` SDK and plain `httpx`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import jwt
import openai
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import select, text

from aimesh_tasks import keys
from aimesh_tasks.api_keys import create_key, revoke_key
from aimesh_tasks.budgets import set_budget
from aimesh_tasks.db import session_scope
from aimesh_tasks.db.models import IngressKeyRow
from aimesh_tasks.governance.agents import add_agent
from aimesh_tasks.redis_client import get_redis
from aimesh_tasks.registry import Endpoint
from aimesh_tasks.resilience import hedge_budget
from aimesh_tasks.resilience.hedge_budget import BudgetConfig
from aimesh_tasks.simulator import RunningSimulator
from tests.gate import Gate
from tests.ingress_parts import IngressProcess, free_port
from tests.waits import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("workers")]

ROOT = Path(__file__).resolve().parents[1]
Sim = Callable[..., RunningSimulator]
MakeEndpoint = Callable[..., Endpoint]
MakeGate = Callable[[RunningSimulator], Gate]
AGENT = "ingress-agent"
JWT_ISSUER, JWT_AUDIENCE = "https://issuer.test", "aimesh-ingress"
_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_PUBLIC_PEM = _RSA.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
# The session's ingress accepts RS256 JWTs from this issuer beside API keys.
INGRESS_ENV = {"AIMESH_INGRESS_JWT_ISSUER": JWT_ISSUER,
               "AIMESH_INGRESS_JWT_AUDIENCE": JWT_AUDIENCE,
               "AIMESH_INGRESS_JWT_ALGORITHMS": "RS256",
               "AIMESH_INGRESS_JWT_KEY": RSA_PUBLIC_PEM}


@pytest.fixture(scope="session")
def ingress(workers: Any) -> Iterator[IngressProcess]:
    """One real ingress process for the session (a test may kill and restart it)."""
    server = IngressProcess(free_port(), INGRESS_ENV)
    server.start()
    yield server
    server.stop()


@pytest.fixture()
def ingress_url(ingress: IngressProcess) -> str:
    if ingress.proc is None or ingress.proc.poll() is not None:
        ingress.start()  # a test that killed it failed before restarting it
    return ingress.url


@pytest.fixture()
def api_key(clean: None) -> str:
    """A fresh key for AGENT."""
    return create_key(AGENT).key


_OPEN_CLIENTS: list[openai.OpenAI] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _OPEN_CLIENTS:
        _OPEN_CLIENTS.pop().close()


def _client(url: str, key: str) -> openai.OpenAI:
    # No SDK retries: a test sees the first answer the ingress gives.
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)
    _OPEN_CLIENTS.append(client)
    return client


def _chat(url: str, key: str, **body: Any) -> httpx.Response:
    body.setdefault("model", "auto")
    body.setdefault("messages", [{"role": "user", "content": "hello ingress"}])
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {key}"})


def test_openai_sdk_chat_completion_comes_through_the_queue(
        ingress_url: str, api_key: str, simulator: Sim, endpoint: MakeEndpoint) -> None:
    sim = simulator(completion_tokens=9)
    served = endpoint(sim, "ing", model="sim-chat")
    reply = _client(ingress_url, api_key).chat.completions.create(
        model="sim-chat", messages=[{"role": "user", "content": "Say hi through the door"}],
        max_tokens=32)
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens == 9
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 9
    extras = reply.model_extra["aimesh"]  # type: ignore[index]
    assert extras["endpoint_id"] == served.id and reply.id == f"chatcmpl-{extras['message_id']}"
    assert sim.stats()["calls"] == 1


def test_a_hedge_header_hedges_the_message_and_a_bad_one_is_a_400_naming_it(
        ingress_url: str, api_key: str, simulator: Sim, endpoint: MakeEndpoint) -> None:
    first = endpoint(simulator(), "hedge-a")
    second = endpoint(simulator(), "hedge-b", price_in="0.002")
    bucket = BudgetConfig()
    get_redis().hset(keys.hedge_bucket(second.id), "tokens", "5")
    client = _client(ingress_url, api_key)
    plain = client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "not hedged"}], max_tokens=8)
    assert plain.model_extra["aimesh"]["endpoint_id"] == first.id  # type: ignore[index]
    assert hedge_budget.tokens(second.id, bucket) == 5  # no hedge planned: no deposit
    hedged = client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "hedged"}], max_tokens=8,
        extra_headers={"X-Aimesh-Hedge": "0"})
    assert hedged.choices[0].message.content
    # Planned at routing (a deposit of 0.1), fired or not before the first call answered.
    assert round(hedge_budget.tokens(second.id, bucket), 3) in (5.1, 4.1)
    for value, reason in (("soon", "neither 'p95' nor milliseconds"),
                          ("-5", "neither 'p95' nor milliseconds"),
                          ("700000", "from 0 to 600000")):
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(
                model="auto", messages=[{"role": "user", "content": "x"}], max_tokens=8,
                extra_headers={"X-Aimesh-Hedge": value})
        assert "x-aimesh-hedge" in str(bad.value) and reason in str(bad.value)
    with pytest.raises(openai.BadRequestError, match="a streaming message is not hedged"):
        client.chat.completions.create(
            model="auto", messages=[{"role": "user", "content": "x"}], max_tokens=8,
            stream=True, extra_headers={"X-Aimesh-Hedge": "p95"})


def test_openai_sdk_stream_with_usage(
        ingress_url: str, api_key: str, simulator: Sim, endpoint: MakeEndpoint) -> None:
    sim = simulator(completion_tokens=20)
    endpoint(sim, "ing")
    stream = _client(ingress_url, api_key).chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "Stream to me"}], max_tokens=40,
        stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(text_chunks) >= 2
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length") and all(f is None for f in finishes[:-1])
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None and usage.completion_tokens == 20
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_plain_httpx_client_and_models_list(
        ingress_url: str, api_key: str, simulator: Sim, endpoint: MakeEndpoint) -> None:
    sim = simulator()
    endpoint(sim, "ing", model="sim-plain", tags=["fast"])
    listed = httpx.get(f"{ingress_url}/v1/models", headers={"Authorization": f"Bearer {api_key}"})
    assert listed.status_code == 200
    assert {m["id"] for m in listed.json()["data"]} == {"auto", "sim-plain", "fast"}
    answer = _chat(ingress_url, api_key, model="fast", max_tokens=16)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["choices"][0]["message"]["content"] and body["model"]
    assert answer.headers["X-Aimesh-Message-Id"] == body["aimesh"]["message_id"]
    assert float(answer.headers["X-Aimesh-Queue-Wait-Ms"]) >= 0
    assert sim.stats()["calls"] == 1


def _expect(error: type[openai.APIStatusError], call: Callable[[], Any]) -> Any:
    with pytest.raises(error) as caught:
        call()
    body = caught.value.body
    assert isinstance(body, dict) and {"message", "type", "param", "code"} <= set(body)
    return caught.value


def test_each_error_class_raises_the_sdks_matching_exception(
        ingress_url: str, api_key: str, simulator: Sim, endpoint: MakeEndpoint) -> None:
    sim = simulator()
    endpoint(sim, "ing", model="sim-errors")
    client = _client(ingress_url, api_key)
    ask = client.chat.completions.create
    hello = [{"role": "user", "content": "hi"}]
    bad = _expect(openai.BadRequestError, lambda: ask(model="auto", messages=hello,
                                                      max_tokens=10**9))
    assert bad.body["param"] == "max_tokens" and "AIMESH_MAX_TOKENS_CAP" in bad.message
    empty = _expect(openai.BadRequestError, lambda: ask(model="auto", messages=[
        {"role": "user", "content": ""}]))
    assert empty.body["param"].startswith("messages.0")
    _expect(openai.BadRequestError, lambda: ask(model="auto", messages=hello, n=2))
    _expect(openai.NotFoundError, lambda: ask(model="no-such-model", messages=hello))
    _expect(openai.AuthenticationError,
            lambda: _client(ingress_url, "amk_000000000000_" + "0" * 40)
            .chat.completions.create(model="auto", messages=hello))
    forbidden = _expect(openai.PermissionDeniedError, lambda: ask(
        model="auto", messages=hello, extra_headers={"X-Source-Agent": "someone-else"}))
    assert forbidden.body["code"] == "agent_not_allowed"
    add_agent(AGENT)
    set_budget(AGENT, tokens=5)
    budget = _expect(openai.RateLimitError, lambda: ask(model="auto", messages=hello))
    assert budget.body["code"] == "budget_exceeded"
    assert budget.body["type"] == "insufficient_quota"
    assert sim.stats()["calls"] == 0


def test_no_endpoint_is_a_503_and_a_failing_provider_a_502(
        ingress_url: str, api_key: str, simulator: Sim, endpoint: MakeEndpoint) -> None:
    hello = [{"role": "user", "content": "anyone there?"}]
    ask = _client(ingress_url, api_key).chat.completions.create
    unavailable = _expect(openai.InternalServerError, lambda: ask(model="auto", messages=hello))
    assert unavailable.status_code == 503
    assert unavailable.body["code"] == "no_endpoint_available"
    endpoint(simulator(error_rate=1.0), "broken")
    failed = _expect(openai.InternalServerError, lambda: ask(model="auto", messages=hello))
    assert failed.status_code == 502


def _hold_the_endpoint(url: str, key: str, held: Gate, calls: int = 3) -> None:
    """Fill the endpoint worker's children (prefork -c 3) with calls held at the gate."""
    for n in range(calls):
        queued = httpx.post(f"{url}/v1/chat/completions", timeout=30,
                            headers={"Authorization": f"Bearer {key}",
                                     "Prefer": "respond-async"},
                            json={"model": "auto", "max_tokens": 8,
                                  "messages": [{"role": "user", "content": f"hold {n}"}]})
        assert queued.status_code == 202, queued.text
    held.wait_held(calls)


def test_a_message_past_its_deadline_is_a_504(
        ingress_url: str, api_key: str, simulator: Sim, endpoint: MakeEndpoint,
        gate: MakeGate) -> None:
    held = gate(simulator())
    endpoint(held, "slow")
    _hold_the_endpoint(ingress_url, api_key, held)
    replies: list[httpx.Response] = []
    deadline = time.time() + 1
    waiter = threading.Thread(target=lambda: replies.append(httpx.post(
        f"{ingress_url}/v1/chat/completions", timeout=60,
        json={"model": "auto", "messages": [{"role": "user", "content": "late"}]},
        headers={"Authorization": f"Bearer {api_key}", "X-Aimesh-Deadline-S": "1"})))
    waiter.start()
    # Its deadline passes while it waits behind the held calls (an event, not a duration).
    wait_until(lambda: time.time() > deadline + 0.2, "the message's deadline to pass")
    held.open()
    waiter.join(60)
    [reply] = replies
    assert reply.status_code == 504, reply.text
    assert reply.json()["error"]["code"] == "deadline_exceeded"


def test_keys_unknown_revoked_expired_are_401_and_only_hashes_are_stored(
        ingress_url: str, clean: None, simulator: Sim, endpoint: MakeEndpoint) -> None:
    endpoint(simulator(), "ing")
    good = create_key(AGENT)
    expired = create_key(AGENT, expires_at=datetime.now(UTC) - timedelta(seconds=1))
    assert _chat(ingress_url, good.key, max_tokens=8).status_code == 200
    for key in ("not-a-key", "amk_000000000000_" + "0" * 40, expired.key,
                good.key[:-1] + ("0" if good.key[-1] != "0" else "1")):
        refused = _chat(ingress_url, key)
        assert refused.status_code == 401, (key, refused.text)
        assert refused.json()["error"]["code"] == "invalid_api_key"
    missing = httpx.post(f"{ingress_url}/v1/chat/completions", json={"messages": []})
    assert missing.status_code == 401
    revoke_key(good.info.prefix)
    wait_until(lambda: _chat(ingress_url, good.key).status_code == 401,
               "the revoked key to be refused", 10)
    with session_scope() as session:
        rows = session.scalars(select(IngressKeyRow)).all()
        dumped = session.execute(text("SELECT * FROM ingress_keys")).all()
    assert {r.prefix for r in rows} == {good.info.prefix, expired.info.prefix}
    everything = json.dumps([list(map(str, row)) for row in dumped])
    for created in (good, expired):
        assert created.key not in everything
        assert created.key.split("_")[2] not in everything


def test_source_agent_picks_among_the_agents_a_key_acts_for(
        ingress_url: str, clean: None, simulator: Sim, endpoint: MakeEndpoint) -> None:
    endpoint(simulator(), "ing")
    key = create_key(AGENT, acts_for=["helper-bot"]).key
    acting = httpx.post(f"{ingress_url}/v1/chat/completions", timeout=60,
                        json={"model": "auto", "messages": [{"role": "user", "content": "x"}]},
                        headers={"Authorization": f"Bearer {key}",
                                 "X-Source-Agent": "helper-bot"})
    assert acting.status_code == 200, acting.text
    assert acting.json()["aimesh"]["agent_id"] == "helper-bot"
    plain = _chat(ingress_url, key, max_tokens=8)
    assert plain.json()["aimesh"]["agent_id"] == AGENT


def test_bodies_are_capped_and_bad_bodies_are_4xx(ingress_url: str, api_key: str) -> None:
    auth = {"Authorization": f"Bearer {api_key}"}
    url = f"{ingress_url}/v1/chat/completions"
    huge = b'{"messages": "' + b"x" * (10 * 1024 * 1024) + b'"}'
    big = httpx.post(url, content=huge, headers={**auth, "Content-Type": "application/json"},
                     timeout=60)
    assert big.status_code == 413 and big.json()["error"]["code"] == "body_too_large"

    def chunked() -> Iterator[bytes]:
        yield b'{"messages": "'
        for _ in range(40):
            yield b"x" * 65536
        yield b'"}'

    streamed = httpx.post(url, content=chunked(), timeout=60,
                          headers={**auth, "Content-Type": "application/json"})
    assert streamed.status_code == 413
    nested = httpx.post(url, content=b"[" * 100_000 + b"]" * 100_000, timeout=60,
                        headers={**auth, "Content-Type": "application/json"})
    assert nested.status_code in (400, 413) and "error" in nested.json()
    deep_ok_size = b'{"model": "auto", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    deep = httpx.post(url, content=deep_ok_size, timeout=60,
                      headers={**auth, "Content-Type": "application/json"})
    assert deep.status_code == 400, deep.text
    wrong_type = httpx.post(url, content=b"model=auto", timeout=60,
                            headers={**auth, "Content-Type": "application/x-www-form-urlencoded"})
    assert wrong_type.status_code == 415, wrong_type.text
    not_json = httpx.post(url, content=b"{nope", timeout=60,
                          headers={**auth, "Content-Type": "application/json"})
    assert not_json.status_code == 400 and not_json.json()["error"]["param"] == "body"
    unknown = httpx.get(f"{ingress_url}/v1/nothing-here", headers=auth)
    assert unknown.status_code == 404 and "error" in unknown.json()


def test_respond_async_gives_202_a_position_while_queued_then_the_result(
        ingress_url: str, api_key: str, simulator: Sim, endpoint: MakeEndpoint,
        gate: MakeGate) -> None:
    sim = simulator()
    held = gate(sim)
    endpoint(held, "busy")
    auth = {"Authorization": f"Bearer {api_key}", "Prefer": "respond-async"}
    ids = []
    for n in range(12):
        accepted = httpx.post(f"{ingress_url}/v1/chat/completions", headers=auth, timeout=30,
                              json={"model": "auto", "max_tokens": 8,
                                    "messages": [{"role": "user", "content": f"n{n}"}]})
        assert accepted.status_code == 202, accepted.text
        assert accepted.headers["Location"] == f"/v1/aimesh/messages/{accepted.json()['id']}"
        ids.append(accepted.json()["id"])

    def state(message_id: str) -> dict[str, Any]:
        reply = httpx.get(f"{ingress_url}/v1/aimesh/messages/{message_id}", headers=auth)
        assert reply.status_code == 200, reply.text
        body: dict[str, Any] = reply.json()
        return body

    last = ids[-1]
    held.wait_held(3)  # the endpoint worker's three children are busy; the rest wait
    # (the worker also reserves a few; the others are in the endpoint's queue)
    queued = wait_until(lambda: (s := state(last))["state"] == "queued" and s.get("endpoint_id")
                        and s["position"] >= 3 and s, "the last message to wait in its queue",
                        seen=lambda: state(last))
    # (routed by four router processes at once, it need not be the last one in)
    assert queued["depth"] > queued["position"]
    assert queued["queue"].endswith(queued["endpoint_id"])
    # From now on each wave of three calls takes 1.5 s: the queue drains in steps.
    sim.configure(latency_ms=1500)
    held.open()
    seen: list[dict[str, Any]] = []

    def finished() -> dict[str, Any] | None:
        now = state(last)
        seen.append(now)
        return now if now["state"] == "completed" else None

    done = wait_until(finished, "the last message's result", 120, seen=lambda: seen[-3:])
    assert done["result"]["choices"][0]["message"]["content"]
    positions = [s["position"] for s in seen if s["state"] == "queued"]
    assert positions == sorted(positions, reverse=True) and len(set(positions)) >= 2, positions
    assert any(s.get("eta_s") for s in seen if s["state"] == "queued"), seen
    other = create_key("someone-else").key
    hidden = httpx.get(f"{ingress_url}/v1/aimesh/messages/{last}",
                       headers={"Authorization": f"Bearer {other}"})
    assert hidden.status_code == 404


def test_batch_route_answers_each_request_in_place(
        ingress_url: str, api_key: str, simulator: Sim, endpoint: MakeEndpoint) -> None:
    endpoint(simulator(), "ing")
    requests = [{"model": "auto", "messages": [{"role": "user", "content": f"b{n}"}]}
                for n in range(3)]
    requests.insert(1, {"model": "auto", "messages": [{"role": "user", "content": "x"}],
                        "max_tokens": 0})
    reply = httpx.post(f"{ingress_url}/v1/batch", json={"requests": requests}, timeout=60,
                       headers={"Authorization": f"Bearer {api_key}"})
    assert reply.status_code == 200, reply.text
    data = reply.json()["data"]
    assert [d["status"] for d in data] == [200, 400, 200, 200]
    assert data[1]["error"]["param"] == "max_tokens"


def test_status_metrics_and_openapi(ingress_url: str, clean: None, simulator: Sim,
                                    endpoint: MakeEndpoint) -> None:
    served = endpoint(simulator(), "ing")
    user, admin = create_key(AGENT).key, create_key("ops", admin=True).key
    assert httpx.get(f"{ingress_url}/v1/status",
                     headers={"Authorization": f"Bearer {user}"}).status_code == 403
    status = httpx.get(f"{ingress_url}/v1/status", timeout=30,
                       headers={"Authorization": f"Bearer {admin}"})
    assert status.status_code == 200, status.text
    assert [e["id"] for e in status.json()["endpoints"]] == [served.id]
    assert status.json()["workers"]
    providers = httpx.get(f"{ingress_url}/v1/providers",
                          headers={"Authorization": f"Bearer {user}"}).json()
    assert served.id in next(p for p in providers["data"] if p["id"] == "openai")["endpoints"]
    assert _chat(ingress_url, user, max_tokens=8).status_code == 200
    scraped = httpx.get(f"{ingress_url}/metrics").text
    assert 'aimesh_ingress_requests_total{method="POST",route="/v1/chat/completions",' \
           'status="200"}' in scraped
    schema = httpx.get(f"{ingress_url}/openapi.json").json()
    assert "/v1/chat/completions" in schema["paths"] and "/v1/aimesh/messages/{message_id}" \
        in schema["paths"]


def _batch_file(n: int, bad_line: int | None = None) -> bytes:
    lines = []
    for i in range(n):
        body: dict[str, Any] = {"model": "auto", "max_tokens": 16,
                                "messages": [{"role": "user", "content": f"batch line {i}"}]}
        if i == bad_line:
            body["max_tokens"] = 10**9
        lines.append(json.dumps({"custom_id": f"req-{i}", "method": "POST",
                                 "url": "/v1/chat/completions", "body": body}))
    return ("\n".join(lines) + "\n").encode()


def _finished_batch(client: openai.OpenAI, batch_id: str) -> Any:
    return wait_until(
        lambda: (b := client.batches.retrieve(batch_id)).status in ("completed", "cancelled")
        and b, f"batch {batch_id} to finish", 120,
        seen=lambda: client.batches.retrieve(batch_id).model_dump())


def test_openai_batch_api_end_to_end(ingress_url: str, api_key: str, simulator: Sim,
                                     endpoint: MakeEndpoint) -> None:
    sim = simulator(completion_tokens=5)
    endpoint(sim, "ing")
    client = _client(ingress_url, api_key)
    uploaded = client.files.create(file=("in.jsonl", _batch_file(6, bad_line=2)),
                                   purpose="batch")
    assert uploaded.bytes > 0 and uploaded.purpose == "batch"
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"run": "test"})
    assert batch.request_counts is not None and batch.request_counts.total == 6
    done = _finished_batch(client, batch.id)
    assert done.status == "completed"
    assert done.request_counts.completed == 5 and done.request_counts.failed == 1
    output = [json.loads(line) for line in
              client.files.content(done.output_file_id).text.splitlines()]
    assert sorted(o["custom_id"] for o in output) == [f"req-{i}" for i in (0, 1, 3, 4, 5)]
    assert all(o["response"]["status_code"] == 200 for o in output)
    assert all(o["response"]["body"]["usage"]["completion_tokens"] == 5 for o in output)
    [failed] = [json.loads(line) for line in
                client.files.content(done.error_file_id).text.splitlines()]
    assert failed["custom_id"] == "req-2" and failed["response"]["status_code"] == 400
    assert failed["response"]["body"]["error"]["param"] == "max_tokens"
    assert sim.stats()["calls"] == 5
    other = _client(ingress_url, create_key("someone-else").key)
    with pytest.raises(openai.NotFoundError):
        other.batches.retrieve(batch.id)
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=client.files.create(
            file=("bad.jsonl", b"not json\n"), purpose="batch").id,
            endpoint="/v1/chat/completions", completion_window="24h")


def test_a_batch_survives_an_ingress_crash(ingress: IngressProcess, api_key: str,
                                           simulator: Sim, endpoint: MakeEndpoint,
                                           gate: MakeGate) -> None:
    from aimesh_tasks.batches import store

    sim = simulator()
    held = gate(sim)
    endpoint(held, "ing")
    client = _client(ingress.url, api_key)
    uploaded = client.files.create(file=("in.jsonl", _batch_file(5)), purpose="batch")
    first = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    held.wait_held(3)  # its lines are queued and being answered when the ingress dies
    ingress.kill()
    # Accepted just before the crash: stored, none of its lines queued yet.
    second = store.create_batch(AGENT, [AGENT], uploaded.id, "/v1/chat/completions", "24h",
                                None)
    ingress.start()
    held.open()
    for batch_id in (first.id, second.id):
        done = _finished_batch(client, batch_id)
        assert done.status == "completed" and done.request_counts.completed == 5
        output = client.files.content(done.output_file_id).text.splitlines()
        assert sorted(json.loads(o)["custom_id"] for o in output) == [
            f"req-{i}" for i in range(5)]


def test_result_waiter_is_woken_by_the_backends_publish(clean: None) -> None:
    import asyncio

    from aimesh_tasks.app import app
    from aimesh_tasks.results import ResultWaiter

    message_id = f"waiter-{os.getpid()}-{time.monotonic_ns()}"

    async def scenario() -> Any:
        # The re-read fallback is far away: only the publish can end this wait in time.
        waiter = ResultWaiter.for_app(app, poll_s=1000)
        try:
            waiting = asyncio.create_task(waiter.wait(message_id, timeout_s=1000))
            await asyncio.sleep(0.2)  # let it subscribe; the result is not stored yet
            assert not waiting.done()
            await asyncio.to_thread(app.backend.store_result, message_id, {"ok": 1}, "SUCCESS")
            return await asyncio.wait_for(waiting, 30)
        finally:
            await waiter.close()

    finished = asyncio.run(scenario())
    assert finished is not None and finished.ok and finished.result == {"ok": 1}


def test_a_rate_limit_is_a_429_with_retry_after_distinct_from_a_budget(
        ingress_url: str, api_key: str, simulator: Sim, endpoint: MakeEndpoint) -> None:
    from aimesh_tasks.governance.limits import RateLimit, set_rate_limit

    endpoint(simulator(), "ing")
    add_agent(AGENT)
    set_rate_limit(RateLimit(AGENT, requests_per_minute=1))
    client = _client(ingress_url, api_key)
    hello = [{"role": "user", "content": "once a minute"}]
    assert client.chat.completions.create(model="auto", messages=hello).choices
    limited = _expect(openai.RateLimitError, lambda: client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "twice"}]))
    assert limited.body["code"] == "rate_limited"
    assert int(limited.response.headers["Retry-After"]) >= 1


def test_routes_lists_the_governance_routes_a_key_may_use(ingress_url: str, clean: None) -> None:
    from aimesh_tasks.governance.spec_file import apply_spec

    add_agent("other-bot")
    apply_spec({"routes": [
        {"name": "open-route", "intents": ["anything at all"], "target": {"model": "m"}},
        {"name": "closed-route", "intents": ["secret things"], "target": {"model": "m"},
         "allowed": ["other-bot"]}]})
    user, admin = create_key(AGENT).key, create_key("ops", admin=True).key

    def names(key: str) -> list[str]:
        reply = httpx.get(f"{ingress_url}/v1/routes", headers={"Authorization": f"Bearer {key}"})
        assert reply.status_code == 200, reply.text
        return sorted(r["name"] for r in reply.json()["data"])

    assert names(user) == ["open-route"]
    assert names(admin) == ["closed-route", "open-route"]


def test_schemathesis_finds_no_server_error(ingress_url: str, api_key: str, simulator: Sim,
                                            endpoint: MakeEndpoint) -> None:
    endpoint(simulator(), "ing")
    done = subprocess.run(
        [str(Path(sys.executable).with_name("st")), "run", f"{ingress_url}/openapi.json",
         "--checks", "not_a_server_error", "-H", f"Authorization: Bearer {api_key}",
         "--max-examples", "5", "--seed", "1", "--request-timeout", "60",
         "--exclude-path", "/v1/status"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    schema = httpx.get(f"{ingress_url}/openapi.json").json()
    operations = sum(len(methods) for methods in schema["paths"].values())
    tested = re.search(r"Tested: (\d+)", done.stdout)
    assert tested and int(tested.group(1)) == operations - 1, done.stdout[-3000:]


def test_keys_cli_creates_once_lists_without_secrets_and_revokes(clean: None) -> None:
    from typer.testing import CliRunner

    from aimesh_tasks.api_keys import find_key
    from aimesh_tasks.cli.main import cli

    runner = CliRunner()
    created = runner.invoke(cli, ["keys", "create", "--agent", AGENT, "--acts-for",
                                  "helper-bot", "--expires", "30d", "--json"])
    assert created.exit_code == 0, created.output
    record = json.loads(created.stdout)
    key = record["key"]
    info = find_key(key)
    assert info is not None and info.acts_for == ("helper-bot",) and info.expires_at
    listed = runner.invoke(cli, ["keys", "list", "--json"])
    assert listed.exit_code == 0 and record["prefix"] in listed.stdout
    assert key.split("_")[2] not in listed.stdout
    revoked = runner.invoke(cli, ["keys", "revoke", record["prefix"]])
    assert revoked.exit_code == 0, revoked.output
    after = find_key(key)
    assert after is not None and after.revoked_at is not None
    bad = runner.invoke(cli, ["keys", "create", "--agent", AGENT, "--expires", "soon"])
    assert bad.exit_code != 0 and "--expires" in bad.output


def _jwt(claims: dict[str, Any], key: Any = None, algorithm: str = "RS256") -> str:
    return jwt.encode(claims, key if key is not None else _RSA, algorithm=algorithm)


def _claims(**changes: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {"iss": JWT_ISSUER, "aud": JWT_AUDIENCE, "sub": AGENT,
                              "exp": int(time.time()) + 600, "iat": int(time.time())}
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


def _b64(data: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _forged(header: dict[str, Any], claims: dict[str, Any], secret: bytes | None) -> str:
    """A token built by hand: alg none (no signature), or HS256 keyed with `secret`."""
    import hashlib
    import hmac

    signing = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    if secret is None:
        return f"{signing}."
    return f"{signing}.{_b64(hmac.new(secret, signing.encode(), hashlib.sha256).digest())}"


def test_jwt_bearer_tokens_and_their_attack_cases(
        ingress_url: str, clean: None, simulator: Sim, endpoint: MakeEndpoint) -> None:
    endpoint(simulator(), "ing")
    good = _chat(ingress_url, _jwt(_claims(aimesh_acts_for=["helper-bot"])), max_tokens=8)
    assert good.status_code == 200, good.text
    assert good.json()["aimesh"]["agent_id"] == AGENT
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    attacks = {
        "alg none": _forged({"alg": "none", "typ": "JWT"}, _claims(), None),
        "HS256 keyed with the RSA public key": _forged({"alg": "HS256", "typ": "JWT"},
                                                      _claims(), RSA_PUBLIC_PEM.encode()),
        "signed by another key": _jwt(_claims(), other_key),
        "wrong audience": _jwt(_claims(aud="someone-else")),
        "wrong issuer": _jwt(_claims(iss="https://evil.test")),
        "expired": _jwt(_claims(exp=int(time.time()) - 60)),
        "no exp": _jwt(_claims(exp=None)),
        "no agent": _jwt(_claims(sub=None)),
        "agent not an id": _jwt(_claims(sub="Not An Agent")),
    }
    for name, token in attacks.items():
        refused = _chat(ingress_url, token)
        assert refused.status_code == 401, (name, refused.text)
        assert refused.json()["error"]["code"] == "invalid_api_key", name
    as_other = httpx.post(f"{ingress_url}/v1/chat/completions", timeout=60,
                          json={"model": "auto", "messages": [{"role": "user", "content": "x"}]},
                          headers={"Authorization": f"Bearer {_jwt(_claims())}",
                                   "X-Source-Agent": "helper-bot"})
    assert as_other.status_code == 403
    admin_route = httpx.get(f"{ingress_url}/v1/status",
                            headers={"Authorization": f"Bearer {_jwt(_claims())}"})
    assert admin_route.status_code == 403  # a JWT is never an admin credential


def test_jwt_algorithm_families_cannot_be_mixed(monkeypatch: pytest.MonkeyPatch) -> None:
    from aimesh_tasks.errors import ConfigError
    from aimesh_tasks.ingress.jwt_auth import jwt_config
    from aimesh_tasks.settings import reset_settings

    for name, value in {**INGRESS_ENV, "AIMESH_INGRESS_JWT_ALGORITHMS": "RS256,HS256"}.items():
        monkeypatch.setenv(name, value)
    reset_settings()
    jwt_config.cache_clear()
    try:
        with pytest.raises(ConfigError, match="one family"):
            jwt_config()
        monkeypatch.setenv("AIMESH_INGRESS_JWT_ALGORITHMS", "none")
        reset_settings()
        jwt_config.cache_clear()
        with pytest.raises(ConfigError, match="AIMESH_INGRESS_JWT_ALGORITHMS"):
            jwt_config()
    finally:
        monkeypatch.undo()
        reset_settings()
        jwt_config.cache_clear()


def test_cache_clear_is_admin_only_and_makes_the_next_identical_call_pay(
        ingress_url: str, clean: None, simulator: Sim, endpoint: MakeEndpoint) -> None:
    sim = simulator()
    endpoint(sim, "ing")
    user, admin = create_key(AGENT).key, create_key("ops", admin=True).key
    same = [{"role": "user", "content": "cache me once"}]  # (a truncated answer is not cached)
    first = _chat(ingress_url, user, messages=same, max_tokens=64)
    again = _chat(ingress_url, user, messages=same, max_tokens=64)
    assert again.json()["aimesh"]["cached"] is True and sim.stats()["calls"] == 1
    refused = httpx.post(f"{ingress_url}/v1/cache/clear",
                         headers={"Authorization": f"Bearer {user}"})
    assert refused.status_code == 403
    cleared = httpx.post(f"{ingress_url}/v1/cache/clear",
                         headers={"Authorization": f"Bearer {admin}"})
    assert cleared.status_code == 200 and cleared.json()["deleted"] >= 1
    third = _chat(ingress_url, user, messages=same, max_tokens=64)
    assert first.status_code == third.status_code == 200
    assert third.json()["aimesh"]["cached"] is False and sim.stats()["calls"] == 2


def test_message_events_stream_each_state_change_until_the_result(
        ingress_url: str, api_key: str, simulator: Sim, endpoint: MakeEndpoint,
        gate: MakeGate) -> None:
    held = gate(simulator())
    endpoint(held, "busy")
    _hold_the_endpoint(ingress_url, api_key, held)
    auth = {"Authorization": f"Bearer {api_key}"}
    accepted = httpx.post(f"{ingress_url}/v1/chat/completions", timeout=30,
                          headers={**auth, "Prefer": "respond-async"},
                          json={"model": "auto", "messages": [{"role": "user", "content": "ev"}]})
    message_id = accepted.json()["id"]
    events: list[dict[str, Any]] = []
    with httpx.stream("GET", f"{ingress_url}/v1/aimesh/messages/{message_id}/events",
                      headers=auth, timeout=60) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        for line in stream.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
                if len(events) == 1:
                    held.open()  # the first state is seen while the endpoint is held
    states = [e["state"] for e in events]
    assert states[0] in ("queued", "running") and states[-1] == "completed", states
    assert all(a != b for a, b in zip(events, events[1:], strict=False))  # changes only
    assert events[-1]["result"]["id"] == f"chatcmpl-{message_id}"


def test_a_client_dropping_a_stream_is_charged_what_was_billed_and_holds_nothing(
        ingress_url: str, api_key: str, simulator: Sim, endpoint: MakeEndpoint) -> None:
    from aimesh_tasks.db.models import LedgerRow, ReservationRow

    sim = simulator(completion_tokens=40)
    endpoint(sim, "ing")
    add_agent(AGENT)
    set_budget(AGENT, tokens=1_000_000)
    ids = []
    for n in range(5):
        with httpx.stream("POST", f"{ingress_url}/v1/chat/completions", timeout=60,
                          headers={"Authorization": f"Bearer {api_key}"},
                          json={"model": "auto", "max_tokens": 64, "stream": True,
                                "messages": [{"role": "user", "content": f"drop me {n}"}]}
                          ) as stream:
            assert stream.status_code == 200
            ids.append(stream.headers["X-Aimesh-Message-Id"])
            lines = stream.iter_lines()
            next(lines), next(lines)  # a couple of chunks, then the client goes away

    def charged() -> dict[str, int] | None:
        with session_scope() as session:
            rows = session.scalars(select(LedgerRow).where(LedgerRow.message_id.in_(ids))).all()
            open_ = session.scalars(select(ReservationRow).where(
                ReservationRow.agent_id == AGENT, ReservationRow.state == "reserved")).all()
        by_message = {r.message_id: r.tokens for r in rows}
        return by_message if len(by_message) == len(ids) and not open_ else None

    tokens = wait_until(charged, "every dropped stream's call charged, nothing held")
    billed = sim.stats()
    assert billed["calls"] == len(ids)
    assert sum(tokens.values()) == billed["prompt_tokens"] + billed["completion_tokens"]


def test_a_respond_async_key_is_answered_202_without_asking(
        ingress_url: str, clean: None, simulator: Sim, endpoint: MakeEndpoint) -> None:
    endpoint(simulator(), "ing")
    key = create_key(AGENT, respond_async=True).key
    accepted = _chat(ingress_url, key, max_tokens=8)
    assert accepted.status_code == 202, accepted.text
    location = accepted.headers["Location"]
    done = wait_until(lambda: (s := httpx.get(f"{ingress_url}{location}", headers={
        "Authorization": f"Bearer {key}"}).json())["state"] == "completed" and s,
        "the queued message's result")
    assert done["result"]["choices"][0]["message"]["content"]


def test_a_sync_request_behind_a_saturated_endpoint_waits_and_reports_its_position(
        ingress_url: str, api_key: str, simulator: Sim, endpoint: MakeEndpoint,
        gate: MakeGate) -> None:
    held = gate(simulator())
    full = endpoint(held, "full", capacity=3)  # as many as the endpoint worker's children
    _hold_the_endpoint(ingress_url, api_key, held)
    replies: dict[str, httpx.Response] = {}

    def ask(name: str) -> threading.Thread:
        def run() -> None:
            replies[name] = _chat(ingress_url, api_key, max_tokens=8, messages=[
                {"role": "user", "content": f"wait your turn, {name}"}])
        thread = threading.Thread(target=run)
        thread.start()
        return thread

    def queued_ids() -> list[str]:
        from aimesh_tasks.observability.exporter import broker_client, priority_lists
        from aimesh_tasks.settings import get_settings

        broker = broker_client(get_settings().broker_url)
        try:
            raw = [item for name in priority_lists(full.queue)
                   for item in broker.lrange(name, 0, -1)]
        finally:
            broker.close()
        return [json.loads(item)["headers"]["id"] for item in raw]

    first = ask("first")
    wait_until(lambda: len(queued_ids()) == 1, "the first request to wait in the full "
               "endpoint's queue", seen=queued_ids)
    second = ask("second")
    wait_until(lambda: len(queued_ids()) == 2, "the second request to wait behind it",
               seen=queued_ids)
    held.open()
    first.join(60)
    second.join(60)
    for name, ahead in (("first", 0), ("second", 1)):
        reply = replies[name]
        assert reply.status_code == 200, reply.text  # not a 429 or a 503
        assert reply.headers["X-Aimesh-Queue-Position"] == str(ahead)
        assert reply.json()["aimesh"]["queue_position"] == ahead
        assert reply.headers["X-Aimesh-Endpoint"] == full.id


def test_a_keys_own_rate_limit_is_a_429_while_another_key_of_its_agent_passes(
        ingress_url: str, clean: None, simulator: Sim, endpoint: MakeEndpoint) -> None:
    from aimesh_tasks.governance.limits import RateLimit

    endpoint(simulator(), "ing")
    add_agent(AGENT)
    once = create_key(AGENT, limits=RateLimit("", requests_per_minute=1)).key
    twice = create_key(AGENT, limits=RateLimit("", requests_per_minute=2))
    hello = [{"role": "user", "content": "per key"}]
    assert _chat(ingress_url, once, messages=hello).status_code == 200
    limited = _chat(ingress_url, once, messages=[{"role": "user", "content": "again"}])
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
    assert limited.json()["error"]["code"] == "rate_limited"
    assert "API key amk_" in limited.json()["error"]["message"]
    # The other key has its own count; naming the first key in metadata changes nothing
    # (the ingress stamps the key that was verified).
    forged = {"aimesh.api_key": once.split("_")[0] + "_" + once.split("_")[1]}
    for n in range(2):
        reply = _chat(ingress_url, twice.key, metadata=forged,
                      messages=[{"role": "user", "content": f"other key {n}"}])
        assert reply.status_code == 200, reply.text
    over = _chat(ingress_url, twice.key, messages=[{"role": "user", "content": "third"}])
    assert over.status_code == 429 and twice.info.prefix in over.json()["error"]["message"]


def test_an_idle_connection_outlives_the_clients_own_keep_alive(ingress_url: str) -> None:
    """httpx (so the openai SDK) reuses an idle connection for 5 s, uvicorn's default
    server-side idle limit too: a request sent as the server closes meets a dead socket. The
    ingress keeps idle connections open for KEEP_ALIVE_S (75 s), so one idle for 6 s still
    answers on the same socket."""
    import http.client

    from aimesh_tasks.cli.ingress import KEEP_ALIVE_S

    assert KEEP_ALIVE_S > 6
    host, port = ingress_url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request("GET", "/healthz")
        assert connection.getresponse().read() and connection.sock is not None
        socket_before = connection.sock
        time.sleep(6)  # past uvicorn's default 5 s idle limit, well inside 75 s
        connection.request("GET", "/healthz")  # RemoteDisconnected here if it was closed
        assert connection.getresponse().status == 200
        assert connection.sock is socket_before
    finally:
        connection.close()


def test_postgres_refusing_connections_is_a_503_with_retry_after_not_a_500() -> None:
    """An ingress whose Postgres refuses connections (nothing listens on its port) answers a
    request it cannot check with 503 and Retry-After, naming Postgres: the SDKs retry a 503
    on their own, and a 500 would say the request was bad. Redis and the broker still run."""
    closed = free_port()  # nothing listens there: connection refused
    database = f"postgresql+psycopg://postgres@127.0.0.1:{closed}/test"
    server = IngressProcess(free_port(), {**INGRESS_ENV, "AIMESH_DATABASE_URL": database})
    server.start()
    try:
        key = f"amk_{'a' * 12}_{'b' * 40}"  # well formed: its prefix is looked up
        reply = _chat(server.url, key,
                      messages=[{"role": "user", "content": "is anyone there"}])
        assert reply.status_code == 503, reply.text
        error = reply.json()["error"]
        assert error["code"] == "service_unavailable" and "Postgres" in error["message"], error
        assert int(reply.headers["Retry-After"]) >= 1
        sdk = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)
        with pytest.raises(openai.InternalServerError) as raised:
            sdk.chat.completions.create(model="auto",
                                        messages=[{"role": "user", "content": "sdk"}])
        assert raised.value.status_code == 503
        sdk.close()
    finally:
        server.stop()
