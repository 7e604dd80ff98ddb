"""Streaming through the queue, end to end: a real ingress process, real workers, Redis,
Postgres and the simulator; the client is the official `openai` SDK or plain httpx.

Order, not time, proves that text arrives while its call is still open: the simulator
pauses each stream at a word (`hold_after_words`) until the test releases it, and the
client has read the text before that, while the ledger has no charge for it yet.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import select

from aimesh_tasks import keys
from aimesh_tasks.api_keys import create_key
from aimesh_tasks.budgets import set_budget
from aimesh_tasks.db import session_scope
from aimesh_tasks.db.models import LedgerRow, ReservationRow
from aimesh_tasks.dedup.cache import counters
from aimesh_tasks.governance.agents import add_agent
from aimesh_tasks.redis_client import get_redis
from aimesh_tasks.registry import Endpoint
from aimesh_tasks.simulator import RunningSimulator
from tests.ingress_parts import IngressProcess, free_port
from tests.observability_parts import only_these_workers
from tests.processes import WorkerProcess, start_workers
from tests.waits import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("workers")]
Sim = Callable[..., RunningSimulator]
MakeEndpoint = Callable[..., Endpoint]
KEY_ENV = "AIMESH_TEST_STREAM_KEY"
os.environ.setdefault(KEY_ENV, "stream-simulated-key")  # before the session's workers start
AGENT = "stream-agent"
FORMATS = ["openai", "anthropic", "gemini", "cohere"]
DROPS = int(os.environ.get("AIMESH_TEST_STREAM_DROPS", "50"))  # 200 for the full run
WORDS = 12


@pytest.fixture(scope="module")
def ingress(workers: Any) -> Iterator[IngressProcess]:
    server = IngressProcess(free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture()
def key(clean: None) -> str:
    """A key for AGENT, which has a budget (so every call is reserved and settled)."""
    add_agent(AGENT)
    set_budget(AGENT, tokens=10_000_000)
    return create_key(AGENT).key


@pytest.fixture()
def sdk(ingress: IngressProcess, key: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{ingress.url}/v1", api_key=key, max_retries=0,
                       timeout=120) as client:
        yield client


def _words(chunks: list[Any]) -> int:
    return len("".join(c.choices[0].delta.content or "" for c in chunks if c.choices).split())


def _ledger(message_ids: list[str]) -> list[LedgerRow]:
    with session_scope() as session:
        return list(session.scalars(select(LedgerRow).where(
            LedgerRow.message_id.in_(message_ids))).all())


def _open_reservations() -> list[ReservationRow]:
    with session_scope() as session:
        return list(session.scalars(select(ReservationRow).where(
            ReservationRow.agent_id == AGENT, ReservationRow.state == "reserved")).all())


def _message_id(chunk: Any) -> str:
    return str(chunk.id).removeprefix("chatcmpl-")


@pytest.mark.parametrize("provider", FORMATS)
def test_each_format_streams_through_a_worker_before_its_call_ends(
        sdk: openai.OpenAI, simulator: Sim, endpoint: MakeEndpoint, provider: str) -> None:
    sim = simulator(completion_tokens=WORDS, hold_after_words=WORDS)
    endpoint(sim, f"stream-{provider}", provider=provider, api_key_env=KEY_ENV)
    stream = sdk.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": f"Stream in {provider}"}],
        max_tokens=32, stream=True, stream_options={"include_usage": True})
    chunks = iter(stream)
    head = [next(chunks)]
    while _words(head) < WORDS - 1:  # Gemini's last chunk carries the last word
        head.append(next(chunks))
    message_id = _message_id(head[0])
    # The provider holds the rest of its answer: the text came first, nothing is charged.
    wait_until(lambda: sim.held() == 1, "the simulator to hold the stream's end")
    assert _ledger([message_id]) == [] and all(c.usage is None for c in head)
    assert head[0].choices[0].delta.role == "assistant"
    sim.release()
    rest = list(chunks)
    every = head + rest
    [call] = sim.calls()
    usage = every[-1].usage
    assert every[-1].choices == [] and usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (call["prompt_tokens"], WORDS)
    finishes = [c.choices[0].finish_reason for c in every if c.choices]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    assert _words(every) == WORDS and len({c.id for c in every}) == 1
    [row] = wait_until(lambda: _ledger([message_id]) or None, "the call's ledger row")
    assert row.tokens == call["prompt_tokens"] + WORDS and row.kind == "call"
    assert not call["disconnected"] and not _open_reservations()
    wait_until(lambda: not get_redis().exists(keys.message_stream(message_id)),
               "the relayed stream deleted, not left to expire")


def test_a_client_that_drops_mid_call_is_finished_and_charged_what_was_billed(
        ingress: IngressProcess, key: str, simulator: Sim, endpoint: MakeEndpoint) -> None:
    sim = simulator(completion_tokens=30, hold_after_words=3)
    endpoint(sim, "drop-held")
    with httpx.stream("POST", f"{ingress.url}/v1/chat/completions", timeout=60,
                      headers={"Authorization": f"Bearer {key}"},
                      json={"model": "auto", "max_tokens": 64, "stream": True,
                            "messages": [{"role": "user", "content": "drop me"}]}) as stream:
        message_id = stream.headers["X-Aimesh-Message-Id"]
        lines = (line for line in stream.iter_lines() if line.startswith("data: "))
        texts = [json.loads(next(lines)[6:]) for _ in range(4)]  # the role and 3 words
        wait_until(lambda: sim.held() == 1, "the simulator to hold the stream")
    assert "".join(t["choices"][0]["delta"].get("content", "") for t in texts).split()
    # The ingress tells the worker; the call goes on (finish mode) once the provider does.
    wait_until(lambda: get_redis().exists(keys.stream_gone(message_id)), "the gone flag")
    assert _ledger([message_id]) == []
    sim.release()
    [row] = wait_until(lambda: _ledger([message_id]) or None, "the dropped call charged")
    [call] = sim.calls()
    assert not call["disconnected"] and call["completion_tokens"] == 30
    assert row.tokens == call["prompt_tokens"] + call["completion_tokens"]
    assert not _open_reservations()


async def _drop_after_a_few_chunks(client: httpx.AsyncClient, url: str, key: str, n: int
                                   ) -> str:
    async with client.stream("POST", f"{url}/v1/chat/completions",
                             headers={"Authorization": f"Bearer {key}"},
                             json={"model": "auto", "max_tokens": 64, "stream": True,
                                   "messages": [{"role": "user", "content": f"drop {n}"}]}
                             ) as stream:
        assert stream.status_code == 200
        seen = 0
        async for line in stream.aiter_lines():
            seen += line.startswith("data: ")
            if seen == 3:
                break  # the client goes away
        return stream.headers["X-Aimesh-Message-Id"]


@pytest.mark.timeout(600)
def test_many_dropped_streams_leave_no_reservation_open(
        ingress: IngressProcess, key: str, simulator: Sim, endpoint: MakeEndpoint) -> None:
    sim = simulator(completion_tokens=40)
    endpoint(sim, "drops", capacity=DROPS)

    async def drops() -> list[str]:
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(
                max_connections=DROPS)) as client:
            return list(await asyncio.gather(*(
                _drop_after_a_few_chunks(client, ingress.url, key, n) for n in range(DROPS))))

    ids = asyncio.run(drops())

    def settled() -> list[LedgerRow] | None:
        rows = _ledger(ids)
        return rows if len(rows) == DROPS and not _open_reservations() else None

    rows = wait_until(settled, f"all {DROPS} dropped streams charged, none held", 500)
    billed = sim.stats()
    assert billed["calls"] == DROPS and len(set(ids)) == DROPS
    assert sum(r.tokens for r in rows) == billed["prompt_tokens"] + billed["completion_tokens"]


def test_a_cache_hit_and_a_follower_of_a_streaming_leader_stream_too(
        sdk: openai.OpenAI, simulator: Sim, endpoint: MakeEndpoint) -> None:
    sim = simulator(completion_tokens=WORDS, hold_after_words=4)
    endpoint(sim, "stream-dedup")
    ask: dict[str, Any] = {"model": "auto", "max_tokens": 32, "stream": True,
                           "stream_options": {"include_usage": True},
                           "messages": [{"role": "user", "content": "the same question"}]}
    leader = iter(sdk.chat.completions.create(**ask))
    first = [next(leader) for _ in range(3)]
    wait_until(lambda: sim.held() == 1, "the leader's stream held")
    with ThreadPoolExecutor(1) as pool:  # its answer begins only when the leader's ends
        follower = pool.submit(lambda: list(sdk.chat.completions.create(**ask)))
        wait_until(lambda: counters()["joins"] == 1, "the follower to join the leader's flight")
        sim.release()
        led, followed = first + list(leader), follower.result(timeout=120)
    again = list(sdk.chat.completions.create(**ask))  # answered from the cache
    text = ["".join(c.choices[0].delta.content or "" for c in s if c.choices)
            for s in (led, followed, again)]
    assert text[0] == text[1] == text[2] and len(text[0].split()) == WORDS
    extras = [s[-1].model_extra["aimesh"] for s in (led, followed, again)]  # type: ignore[index]
    assert [(e["dedup"], e["cached"]) for e in extras] == [(False, False), (True, False),
                                                           (False, True)]
    assert all(s[-1].usage is not None for s in (led, followed, again))
    assert len([c for c in again if c.choices and c.choices[0].delta.content]) > 1
    assert sim.stats()["calls"] == 1


def test_a_call_that_breaks_after_it_streamed_ends_the_message_and_is_not_sent_elsewhere(
        sdk: openai.OpenAI, simulator: Sim, endpoint: MakeEndpoint) -> None:
    breaking, spare = simulator(completion_tokens=30, hold_after_words=3), simulator()
    endpoint(breaking, "stream-breaks", price_in="0.0001", price_out="0.0001")
    endpoint(spare, "stream-spare", price_in="0.01", price_out="0.01")
    stream = iter(sdk.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "break mid-way"}],
        max_tokens=64, stream=True))
    head = [next(stream) for _ in range(4)]  # the role and 3 words
    message_id = _message_id(head[0])
    wait_until(lambda: breaking.held() == 1, "the first endpoint to hold its stream")
    breaking.stop()  # the provider goes away mid-answer
    with pytest.raises(openai.APIError, match="streamed"):
        list(stream)
    assert spare.stats()["calls"] == 0  # the client's text would not continue elsewhere
    [row] = wait_until(lambda: _ledger([message_id]) or None, "the broken call charged")
    assert row.kind == "lost" and not _open_reservations()


def test_a_redelivered_streaming_call_replays_its_journal_and_calls_once(
        ingress: IngressProcess, simulator: Sim, endpoint: MakeEndpoint) -> None:
    agent = "kill-before-settle"  # paused at before_settle by the session's failpoints
    add_agent(agent)
    set_budget(agent, tokens=1_000_000)
    token = create_key(agent).key
    sim = simulator(completion_tokens=WORDS)
    endpoint(sim, "stream-replay")
    with httpx.stream("POST", f"{ingress.url}/v1/chat/completions", timeout=120,
                      headers={"Authorization": f"Bearer {token}"},
                      json={"model": "auto", "max_tokens": 32, "stream": True,
                            "stream_options": {"include_usage": True},
                            "messages": [{"role": "user", "content": "replay me"}]}) as stream:
        data = (json.loads(line[6:]) for line in stream.iter_lines()
                if line.startswith("data: ") and line != "data: [DONE]")
        chunks = [next(data)]
        while len("".join(c["choices"][0]["delta"].get("content", "")
                          for c in chunks if c["choices"]).split()) < WORDS:
            chunks.append(next(data))
        # Every word was streamed and journalled; the worker pauses before settling it.
        pid = int(wait_until(lambda: get_redis().get(keys.failpoint("before_settle")),
                             "the worker paused before settling"))
        os.kill(pid, signal.SIGKILL)
        chunks += list(data)  # the redelivery finds the journal and replays the text
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert len(text.split()) == WORDS  # each word once, though replayed
    assert chunks[-1]["usage"]["completion_tokens"] == WORDS
    assert sim.stats()["calls"] == 1
    message_id = str(chunks[0]["id"]).removeprefix("chatcmpl-")
    [row] = wait_until(lambda: _ledger([message_id]) or None, "the replayed call charged")
    assert row.tokens == sim.calls()[0]["prompt_tokens"] + WORDS


# --- AIMESH_STREAM_ON_DISCONNECT=abort: workers of their own -----------------------------


@pytest.fixture(scope="module")
def aborting(workers: Any) -> Iterator[list[WorkerProcess]]:
    """A router and an endpoint worker that abort a streaming call whose client left."""
    tag = uuid.uuid4().hex[:6]
    started = start_workers([
        (f"abort-router-{tag}", ["celery", "-Q", "aimesh.route", "-P", "threads", "-c", "4"]),
        (f"abort-endpoints-{tag}", ["--endpoints", "all", "-P", "threads", "-c", "4"]),
    ], env={"AIMESH_STREAM_ON_DISCONNECT": "abort"})
    yield started
    for worker in started:
        worker.stop()


@pytest.mark.parametrize(("provider", "charged"), [("openai", "reservation"),
                                                   ("gemini", "reported")])
def test_abort_mode_closes_the_call_and_charges_what_the_provider_reported(
        ingress: IngressProcess, key: str, simulator: Sim, endpoint: MakeEndpoint,
        aborting: list[WorkerProcess], provider: str, charged: str) -> None:
    sim = simulator(completion_tokens=30, hold_after_words=3)
    target = endpoint(sim, f"abort-{provider}", provider=provider, api_key_env=KEY_ENV)
    with only_these_workers({w.hostname for w in aborting}, [target.queue]):
        with httpx.stream("POST", f"{ingress.url}/v1/chat/completions", timeout=60,
                          headers={"Authorization": f"Bearer {key}"},
                          json={"model": "auto", "max_tokens": 64, "stream": True,
                                "messages": [{"role": "user", "content": "abort me"}]}
                          ) as stream:
            message_id = stream.headers["X-Aimesh-Message-Id"]
            lines = (line for line in stream.iter_lines() if line.startswith("data: "))
            [next(lines) for _ in range(3)]
            wait_until(lambda: sim.held() == 1, "the simulator to hold the stream")
        # The worker hears the client left and closes the call: the provider sees it.
        [call] = wait_until(lambda: [c for c in sim.calls() if c["disconnected"]] or None,
                            "the provider to see the call aborted", seen=sim.calls)
        [row] = wait_until(lambda: _ledger([message_id]) or None, "the aborted call charged")
    assert call["completion_tokens"] == 3 and row.kind == "aborted"
    billed = call["prompt_tokens"] + call["completion_tokens"]
    if charged == "reported":  # Gemini sends its usage so far with every chunk
        assert row.tokens == billed
    else:  # OpenAI sends usage only at the end: the reservation, never less than billed
        assert row.tokens > billed
    assert not _open_reservations()
