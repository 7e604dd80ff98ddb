"""Metrics, logs and redaction on real parts: real workers (prefork endpoint worker in
prometheus multiprocess mode, threads router), real Redis and Postgres, the simulator, the
`aimesh metrics` exporter as a subprocess; /metrics scraped over HTTP.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis

from aimesh_tasks import outbox, submit
from aimesh_tasks.app import app
from aimesh_tasks.errors import AllEndpointsFailed, NoEndpointAvailable, ProviderError
from aimesh_tasks.messages import AiMessage
from aimesh_tasks.pipeline.call import endpoint_to_args
from aimesh_tasks.providers import PROVIDERS
from aimesh_tasks.registry import Endpoint
from aimesh_tasks.simulator import RunningSimulator
from aimesh_tasks.tasks import call_endpoint
from tests.conftest import BROKER_DB, LIVE_DB, REDIS
from tests.observability_parts import (
    CANARY_KEY,
    CANARY_PROMPT,
    KEY_ENV,
    MetricWorkers,
    free_port,
    samples,
    scrape_text,
    value,
    wait_for,
)
from tests.observability_parts import only_these_workers as exclusive
from tests.processes import AIMESH, ROOT

pytestmark = pytest.mark.slow

Sim = Callable[..., RunningSimulator]
MakeEndpoint = Callable[..., Endpoint]
AGENTS = ("obs-alpha", "obs-beta", "obs-gamma")
AGENT_CAP = 2


@pytest.fixture(scope="module")
def obs(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MetricWorkers]:
    started = MetricWorkers(tmp_path_factory.mktemp("multiproc"), agent_labels=AGENT_CAP)
    yield started
    started.stop()


def _consuming(obs: MetricWorkers, queues: list[str]) -> None:
    def ready() -> bool:
        replies = app.control.inspect(timeout=1, destination=list(obs.hostnames)).active_queues()
        names = {q["name"] for qs in (replies or {}).values() for q in qs}
        return set(queues) <= names

    wait_for(ready, what=f"test workers consuming {queues}")


def _delta(before: dict[Any, float], after: dict[Any, float], name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def _ask(agent: str, **fields: Any) -> dict[str, Any]:
    fields.setdefault("prompt", "count me")
    result: dict[str, Any] = submit(agent_id=agent, max_tokens=16, **fields).get(timeout=30)
    return result


def test_counters_and_histograms_equal_the_traffic_sent(
    obs: MetricWorkers, simulator: Sim, endpoint: MakeEndpoint
) -> None:
    flaky = endpoint(simulator(error_rate=1.0), "flaky", price_in="0.0001",
                     price_out="0.0001", model="flaky-model")
    good = endpoint(simulator(completion_tokens=7), "good", price_in="0.001", price_out="0.002")
    with exclusive(obs.hostnames, [flaky.queue, good.queue]):
        _consuming(obs, [flaky.queue, good.queue])
        before = obs.scrape()
        # 3 messages: flaky first (cheapest, 500) then good; 1 only flaky can serve; 1 no one.
        results = [_ask(AGENTS[i], prompt=f"count me {i}") for i in range(3)]
        with pytest.raises(ProviderError):
            _ask(AGENTS[0], model="flaky-model")
        with pytest.raises(NoEndpointAvailable):
            _ask(AGENTS[1], model="no-such-model")
        after = obs.scrape()

    assert [[(a["endpoint_id"], a["ok"]) for a in r["attempts"]] for r in results] == [
        [(flaky.id, False), (good.id, True)]] * 3

    def d(name: str, **labels: str) -> float:
        return _delta(before, after, name, **labels)

    assert d("aimesh_messages_routed_total", endpoint=flaky.id) == 4
    assert d("aimesh_messages_routed_total", endpoint=good.id) == 0
    assert d("aimesh_messages_total", outcome="completed", endpoint=good.id) == 3
    assert d("aimesh_messages_total", outcome="failed", endpoint=flaky.id) == 1
    assert d("aimesh_messages_total", outcome="unroutable", endpoint="none") == 1
    assert d("aimesh_provider_calls_total", endpoint=flaky.id, outcome="http_5xx") == 4
    assert d("aimesh_provider_calls_total", endpoint=good.id, outcome="ok") == 3
    for name, labels, count in (
        ("aimesh_provider_latency_seconds", {"endpoint": flaky.id, "outcome": "http_5xx"}, 4),
        ("aimesh_provider_latency_seconds", {"endpoint": good.id, "outcome": "ok"}, 3),
        ("aimesh_queue_wait_seconds", {"endpoint": good.id}, 3),
        ("aimesh_end_to_end_latency_seconds", {"endpoint": good.id}, 3),
    ):
        assert d(f"{name}_count", **labels) == count
        assert d(f"{name}_bucket", **labels, le="+Inf") == count
    ok_latency_s = sum(a["latency_ms"] for r in results for a in r["attempts"] if a["ok"]) / 1000
    assert math.isclose(d("aimesh_provider_latency_seconds_sum", endpoint=good.id, outcome="ok"),
                        ok_latency_s, rel_tol=1e-3)
    assert d("aimesh_tokens_total", endpoint=good.id, direction="input") == sum(
        r["input_tokens"] for r in results)
    assert d("aimesh_tokens_total", endpoint=good.id, direction="output") == 3 * 7
    total_cost = float(sum(Decimal(r["cost_usd"]) for r in results))
    assert total_cost > 0
    assert math.isclose(d("aimesh_cost_usd_total", endpoint=good.id), total_cost, rel_tol=1e-9)
    assert d("aimesh_tokens_total", endpoint=flaky.id, direction="input") == 0

    agent_labels = {dict(labels)["agent"] for (name, labels) in after
                    if name == "aimesh_agent_messages_total"}
    assert agent_labels <= {*AGENTS, "_other"}
    agent_total = sum(v for (name, _), v in after.items() if name == "aimesh_agent_messages_total")
    agent_before = sum(v for (name, _), v in before.items()
                       if name == "aimesh_agent_messages_total")
    assert agent_total - agent_before == 5
    agent_cost = sum(v for (name, _), v in after.items() if name == "aimesh_agent_cost_usd_total")
    agent_cost -= sum(v for (name, _), v in before.items() if name == "aimesh_agent_cost_usd_total")
    assert math.isclose(agent_cost, total_cost, rel_tol=1e-9)


@pytest.fixture()
def exporter() -> Iterator[str]:
    port = free_port()
    log = Path(f"/tmp/aimesh-test-exporter-{port}.log")
    with log.open("w") as out:
        proc = subprocess.Popen([AIMESH, "metrics", "--port", str(port)], stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}/metrics"

    def serving() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"aimesh metrics exited: {log.read_text()[-2000:]}")
        try:
            scrape_text(url)
            return True
        except OSError:
            return False

    wait_for(serving, what="aimesh metrics serving")
    yield url
    proc.terminate()
    proc.wait(10)


def test_exporter_counts_every_waiting_message_and_falls_to_zero_after_draining(
    obs: MetricWorkers, simulator: Sim, endpoint: MakeEndpoint, exporter: str
) -> None:
    only = endpoint(simulator(), "depth", capacity=7)
    endpoint_worker = [h for h in obs.hostnames if "obs-endpoints" in h]

    def depth(queue: str) -> float:
        return value(samples(exporter), "aimesh_queue_depth_messages", queue=queue)

    with exclusive(obs.hostnames, [only.queue]):
        _consuming(obs, [only.queue])
        app.control.cancel_consumer(only.queue, destination=endpoint_worker, reply=True)
        routed = [submit(agent_id="obs-depth", prompt=f"wait {i}", max_tokens=8) for i in range(3)]
        urgent = [call_endpoint.apply_async(
            (AiMessage(agent_id="obs-depth", prompt=f"urgent {i}").to_json_dict(),
             [endpoint_to_args(only)]), {"metered": False}, queue=only.queue, priority=9)
            for i in range(2)]
        wait_for(lambda: depth(only.queue) == 5, what="5 messages counted as waiting")
        broker = redis.Redis.from_url(f"{REDIS}/{BROKER_DB}")
        assert broker.llen(f"{only.queue}\x06\x169") == 2  # the priority sub-queue is counted
        assert depth("aimesh.route") == 0
        app.control.add_consumer(only.queue, destination=endpoint_worker, reply=True)
        for result in routed + urgent:
            assert result.get(timeout=30)["endpoint_id"] == only.id
        wait_for(lambda: depth(only.queue) == 0, what="queue drained to 0")
    scraped = samples(exporter)
    assert value(scraped, "aimesh_endpoint_capacity_calls", endpoint=only.id) == 7
    assert value(scraped, "aimesh_endpoint_in_flight_calls", endpoint=only.id) == 0
    assert value(scraped, "aimesh_endpoint_health", endpoint=only.id, state="up") == 1
    assert value(scraped, "aimesh_endpoint_error_ratio", endpoint=only.id) == 0
    assert value(scraped, "aimesh_endpoint_live_latency_seconds", endpoint=only.id,
                 quantile="0.5") > 0
    for source in ("broker", "redis", "database"):
        assert value(scraped, "aimesh_exporter_source_up", source=source) == 1


def _redis_text(db: int, pattern: str = "*") -> str:
    client = redis.Redis.from_url(f"{REDIS}/{db}")
    chunks: list[str] = []
    for key in client.scan_iter(match=pattern, count=1000):
        kind = client.type(key).decode()
        if kind == "string":
            chunks.append(repr(client.get(key)))
        elif kind == "hash":
            chunks.append(repr(client.hgetall(key)))
        elif kind == "list":
            chunks.append(repr(client.lrange(key, 0, -1)))
        elif kind == "zset":
            chunks.append(repr(client.zrange(key, 0, -1)))
        elif kind == "set":
            chunks.append(repr(client.smembers(key)))
        chunks.append(repr(key))
    return "\n".join(chunks)


# A second canary, read from a key file on the workers (api_key_file) instead of a variable.
CANARY_FILE_KEY = f"sk-canary-file-{uuid.uuid4().hex}"
# The auth header of each wire format, as each provider documents it.
KEY_HEADERS = {"openai": ("Authorization", "Bearer {}"), "anthropic": ("x-api-key", "{}"),
               "gemini": ("x-goog-api-key", "{}"), "cohere": ("Authorization", "Bearer {}")}


def _database_text() -> str:
    """Every row of every table, as text."""
    from aimesh_tasks.db import Base, get_engine

    with get_engine().connect() as connection:
        return "\n".join(repr(row) for table in Base.metadata.sorted_tables
                         for row in connection.execute(table.select()))


def test_canary_key_header_and_prompt_reach_no_log_result_or_label(
    obs: MetricWorkers, simulator: Sim, endpoint: MakeEndpoint, exporter: str, tmp_path: Path
) -> None:
    for kind, (header, form) in KEY_HEADERS.items():  # what is sent upstream
        request = PROVIDERS[kind].build_request("m", AiMessage(agent_id="a", prompt="p"),
                                                CANARY_KEY)
        assert request.headers[header] == form.format(CANARY_KEY), kind
    key_file = tmp_path / "upstream-key"
    key_file.write_text(CANARY_FILE_KEY + "\n")
    flaky = endpoint(simulator(error_rate=1.0), "canary-flaky", price_in="0.0001",
                     price_out="0.0001", model="canary-flaky-model", api_key_env=KEY_ENV)
    good = endpoint(simulator(), "canary-good", api_key_env=KEY_ENV)
    formats = simulator()  # one simulator speaks all four formats
    # Anthropic and Cohere answer 401 without their key header: a success shows it was sent.
    # Dearer than `good`, so that un-hinted messages still go flaky -> good.
    by_format = {kind: endpoint(formats, f"canary-{kind}", provider=kind, price_in="0.01",
                                price_out="0.01", model=f"canary-{kind}-model", **source)
                 for kind, source in (("anthropic", {"api_key_env": KEY_ENV}),
                                      ("gemini", {"api_key_env": KEY_ENV}),
                                      ("cohere", {"api_key_file": str(key_file)}))}
    queues = [flaky.queue, good.queue, *(e.queue for e in by_format.values())]
    with exclusive(obs.hostnames, queues):
        _consuming(obs, queues)
        ok = [_ask("obs-canary", prompt=f"{CANARY_PROMPT} {i}") for i in range(2)]  # fallback
        failed = submit(agent_id="obs-canary", prompt=CANARY_PROMPT, max_tokens=8,
                        model="canary-flaky-model")
        with pytest.raises((ProviderError, AllEndpointsFailed)):
            failed.get(timeout=30)
        chat = [{"role": "system", "content": f"Authorization: Bearer {CANARY_KEY}"},
                {"role": "user", "content": f"{CANARY_PROMPT} chat"}]
        ok.append(submit(agent_id="obs-canary", messages=chat, max_tokens=8).get(timeout=30))
        formatted = {kind: _ask("obs-canary", prompt=f"{CANARY_PROMPT} {kind}",
                                model=f"canary-{kind}-model") for kind in by_format}
    assert all(r["endpoint_id"] == good.id for r in ok)
    assert [a["ok"] for a in ok[0]["attempts"]] == [False, True]
    assert {k: r["endpoint_id"] for k, r in formatted.items()} == {
        k: e.id for k, e in by_format.items()}
    ok += formatted.values()

    ids = [r["message_id"] for r in ok] + [failed.id]
    expected = {(event, i) for i in ids for event in ("message.routed", "call.finished")}
    expected |= {("message.completed", ok[0]["message_id"]), ("message.failed", failed.id)}

    def decisions() -> set[tuple[str, str | None]]:
        events = [json.loads(line) for line in obs.logs().splitlines() if line.startswith("{")]
        return {(e["event"], e.get("message_id")) for e in events}

    # Each worker process writes its own lines: wait until every expected one is written.
    wait_for(lambda: expected <= decisions(), what="decision logs written")
    assert expected <= decisions(), sorted(expected - decisions())
    outbox.flush(wait_s=10)  # audit, attempts and decisions reach the database
    # A message stays in the broker's unacked hash until its task is acked, just after its
    # result is stored: what is checked is what stays once this test's messages were acked
    # (another test's held message, a countdown, is none of this test's).
    broker = redis.Redis.from_url(f"{REDIS}/{BROKER_DB}")
    wait_for(lambda: not any(i.encode() in held for held in broker.hvals("unacked")
                             for i in ids), what="every message of the test acked")

    stores = _redis_text(BROKER_DB) + _redis_text(LIVE_DB)
    database = _database_text()
    assert by_format["cohere"].id in database and str(key_file) in database  # the path only
    labels = "".join(scrape_text(f"http://127.0.0.1:{p}/metrics") for p in obs.ports)
    labels += scrape_text(exporter)
    for canary in (CANARY_KEY, CANARY_FILE_KEY, CANARY_PROMPT):
        assert canary not in obs.logs()
        assert canary not in stores
        assert canary not in labels
    for key in (CANARY_KEY, CANARY_FILE_KEY):
        assert key not in database
