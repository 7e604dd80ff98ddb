"""Workers that join with their own endpoints (issue 19 items 1 and 5): `aimesh worker
--serve` announces with a registration token, its endpoint is routed to while it beats, a
killed one is left out after the heartbeat bound and its messages fall back, a clean stop
withdraws at once, two servers share one queue, a conflicting announcement is refused.

Real worker processes, Redis, Postgres and the simulator. Nothing here waits on the clock:
each step waits for its event (a heartbeat in Redis, a decision record, a held answer at
a gate); the one check that depends on when the bound passes reads the decision record
routing wrote, and the in-process checks inject the policy's clock.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery.result import AsyncResult
from typer.testing import CliRunner

from aimesh_tasks import submit
from aimesh_tasks.app import app
from aimesh_tasks.cli.main import cli
from aimesh_tasks.cli.worker import worker_queues
from aimesh_tasks.envelope import Envelope
from aimesh_tasks.errors import ConfigError, InvalidInput, ProviderError
from aimesh_tasks.messages import AiMessage
from aimesh_tasks.pipeline import calling, routing
from aimesh_tasks.pipeline.call import endpoint_to_args
from aimesh_tasks.pipeline.outcomes import Fallback, HandOff
from aimesh_tasks.policies import CallContext, Policies, RouteContext
from aimesh_tasks.policies.budget import BudgetAdmission
from aimesh_tasks.registry import Endpoint, get_endpoint, list_endpoints
from aimesh_tasks.registry.announce import (
    AnnouncementConflict,
    announce,
    parse_announcement,
    read_serve_file,
)
from aimesh_tasks.registry.registration import (
    RegistrationRefused,
    check_registration_token,
    token_digest,
)
from aimesh_tasks.registry.servers import beat, newest, servers_of, withdraw
from aimesh_tasks.resilience.servers import LiveServers
from aimesh_tasks.routing import decisions_for
from aimesh_tasks.settings import load_settings, reset_settings
from aimesh_tasks.simulator import RunningSimulator
from aimesh_tasks.tasks.call import call_signature
from tests.gate import Gate
from tests.processes import AIMESH, ROOT, WorkerProcess
from tests.redis_trips import round_trips
from tests.waits import wait_until

Sim = Callable[..., RunningSimulator]
MakeEndpoint = Callable[..., Endpoint]
TOKEN = "test-registration-" + "k3Jq9vXw2mNp"
SERVE_ENV = {"AIMESH_REGISTRATION_TOKENS": token_digest(TOKEN),
             "AIMESH_REGISTRATION_TOKEN": TOKEN}
CHEAP = ("0.0001", "0.0002")
AGENT = "serve-agent"


def _eid(name: str = "self") -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


def _serve_args(endpoint_id: str, url: str, *, model: str = "sim-model",
                price: tuple[str, str] = CHEAP, concurrency: int = 2) -> list[str]:
    return ["--serve", endpoint_id, "--url", url, "--model", model, "--price-in", price[0],
            "--price-out", price[1], "-P", "threads", "-c", str(concurrency)]


@pytest.fixture()
def serving() -> Iterator[Callable[..., WorkerProcess]]:
    """Start `aimesh worker --serve ...` processes with the registration token; each is
    stopped (if still running) after the test."""
    started: list[WorkerProcess] = []

    def start(endpoint_id: str, url: str, **options: Any) -> WorkerProcess:
        name = f"serve-{uuid.uuid4().hex[:6]}"
        started.append(WorkerProcess(name, _serve_args(endpoint_id, url, **options),
                                     env=SERVE_ENV))
        started[-1].wait_ready()
        return started[-1]

    yield start
    for each in started:
        each.stop()


@pytest.fixture()
def tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """This test process presents the registration token the cluster accepts."""
    for name, value in SERVE_ENV.items():
        monkeypatch.setenv(name, value)
    reset_settings()


def _announced(endpoint_id: str, url: str) -> Endpoint:
    """Announce a free endpoint at `url` from this process (the `tokens` fixture)."""
    [done] = announce([parse_announcement({"id": endpoint_id, "base_url": url,
                                           "model": "sim-model", "input_usd_per_1k": "0",
                                           "output_usd_per_1k": "0"})], worker="test")
    return done.endpoint


def _live_server(endpoint_id: str, worker: WorkerProcess) -> Any:
    server = newest([endpoint_id])[endpoint_id]
    return server if server is not None and server.worker == worker.hostname else None


def _decision(message_id: str) -> dict[str, Any]:
    decisions = decisions_for(message_id)
    assert decisions, f"no routing decision recorded for {message_id}"
    return decisions[0]


def _candidates(decision: dict[str, Any]) -> list[str]:
    return [c["endpoint_id"] for c in decision["candidates"]]


def _sigkill(worker: WorkerProcess) -> None:
    os.killpg(worker.proc.pid, signal.SIGKILL)
    worker.proc.wait(30)
    worker.stop()  # forget it and close its log; nothing left to stop


# --- through worker processes ---------------------------------------------------------------


def test_a_served_endpoint_is_routed_to_while_it_beats_and_falls_back_once_killed(
    workers: Any, simulator: Sim, endpoint: MakeEndpoint,
    serving: Callable[..., WorkerProcess]
) -> None:
    sim = simulator()
    other = endpoint(sim, "op-fallback", price_in="0.01", price_out="0.02")
    eid = _eid()
    first = serving(eid, sim.url)
    assert "created it" in first.log.read_text()
    assert get_endpoint(eid).origin == "announced"
    wait_until(lambda: _live_server(eid, first), "the serving worker's first heartbeat")

    routed = submit(agent_id=AGENT, prompt=f"while it beats {uuid.uuid4()}", max_tokens=8)
    routed.get(timeout=60)
    decision = _decision(routed.id)
    assert eid in _candidates(decision) and eid not in decision["excluded"]

    _sigkill(first)

    def left_out() -> tuple[dict[str, Any], dict[str, Any]] | None:
        probe = submit(agent_id=AGENT, prompt=f"after the kill {uuid.uuid4()}", max_tokens=8)
        answer = probe.get(timeout=60)  # one routed to it meanwhile is drained and falls back
        decision = _decision(probe.id)
        return (decision, answer) if eid in decision["excluded"] else None

    decision, answer = wait_until(left_out, f"routing to leave {eid} out after the SIGKILL",
                                  timeout_s=120)
    assert decision["excluded"][eid].startswith("no_servers: no live worker serves it")
    assert first.hostname in decision["excluded"][eid]
    assert answer["endpoint_id"] == other.id

    second = serving(eid, sim.url)  # the same announcement joins the endpoint it left
    assert "joined it (self-registered)" in second.log.read_text()
    wait_until(lambda: _live_server(eid, second), "the restarted worker's heartbeat")
    again = submit(agent_id=AGENT, prompt=f"restarted {uuid.uuid4()}", max_tokens=8)
    again.get(timeout=60)
    assert eid in _candidates(_decision(again.id))

    last_beat = newest([eid])[eid]
    assert last_beat is not None and last_beat.worker == second.hostname
    second.stop()  # a clean stop: withdrawn at once, not after the bound
    assert second.hostname not in [s.worker for s in servers_of([eid])[eid]]
    frozen = Policies([BudgetAdmission(), LiveServers(clock=lambda: last_beat.last_seen)])
    outcome = routing.route(app, AiMessage(agent_id=AGENT, prompt=f"gone {uuid.uuid4()}",
                                           max_tokens=8), policies=frozen)
    assert isinstance(outcome, HandOff) and outcome.envelope.route[0]["id"] == other.id
    assert _decision(outcome.envelope.message_id)["excluded"][eid].startswith("no_servers")


def test_two_workers_serving_one_id_share_its_queue(
    workers: Any, simulator: Sim, gate: Callable[[RunningSimulator], Gate], clean: None,
    serving: Callable[..., WorkerProcess]
) -> None:
    held = gate(simulator())
    eid = _eid("shared")
    one = serving(eid, held.url, model="shared-model", concurrency=1)
    two = serving(eid, held.url, model="shared-model", concurrency=1)
    assert "joined it (self-registered)" in two.log.read_text()
    wait_until(lambda: {s.worker for s in servers_of([eid])[eid]} >= {one.hostname,
                                                                         two.hostname},
               "both servers' heartbeats")
    # Until the first heartbeat the endpoint had no server, and routers drained its queue;
    # they stop once they see it served: then only its two servers consume it.
    queue = f"aimesh.endpoint.{eid}"
    wait_until(lambda: _consumers_of(queue) == {one.hostname, two.hostname},
               f"only the two servers consuming {queue}", seen=lambda: _consumers_of(queue))
    pending = [submit(agent_id=AGENT, prompt=f"shared {n} {uuid.uuid4()}", max_tokens=8,
                      model="shared-model") for n in range(2)]
    ports = held.wait_held(2)
    # One call in flight each (-c 1, prefetch 1): the second message went to the other.
    assert {held.caller_pid(port) for port in ports} == {one.proc.pid, two.proc.pid}
    held.open()
    assert [p.get(timeout=60)["endpoint_id"] for p in pending] == [eid, eid]


def _consumers_of(queue: str) -> set[str]:
    replies = app.control.inspect(timeout=1.0).active_queues() or {}
    return {node for node, queues in replies.items() if any(q["name"] == queue for q in queues)}


def test_a_queue_left_without_servers_is_drained_and_its_messages_fall_back(
    workers: Any, simulator: Sim, endpoint: MakeEndpoint, tokens: None
) -> None:
    sim = simulator()
    other = endpoint(sim, "op-drain", price_in="0.01", price_out="0.02")
    eid = _eid("orphan")
    orphan = _announced(eid, sim.url)
    # Messages already in its queue (routed while a server lived, which then went away):
    # routers and followers consume the queue now, refuse each call, and fall back.
    both = _queued(orphan, other)
    alone = _queued(orphan)
    answer = AsyncResult(both, app=app).get(timeout=60)
    assert answer["endpoint_id"] == other.id
    first = answer["attempts"][0]
    assert first["endpoint_id"] == eid and first["error"]["reason"] == "not_served_here"
    assert sim.stats()["calls"] == 1  # the self-registered endpoint was never called
    with pytest.raises(ProviderError) as failed:
        AsyncResult(alone, app=app).get(timeout=60)
    assert failed.value.fields["reason"] == "not_served_here"


def _queued(*route: Endpoint) -> str:
    """Publish a call for `route` straight to its first endpoint's queue; the message id."""
    message = AiMessage(agent_id=AGENT, prompt=f"queued {uuid.uuid4()}", max_tokens=8)
    envelope = Envelope(message=message.to_json_dict(),
                        route=[endpoint_to_args(e) for e in route])
    call_signature(envelope).apply_async(task_id=message.id)
    return message.id


def _worker_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`aimesh worker ...` in a real process, expected to refuse before it starts."""
    return subprocess.run([AIMESH, "worker", *args], env={**os.environ, **env}, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_an_announcement_without_the_credential_is_refused(
    simulator: Sim, clean: None
) -> None:
    sim = simulator()
    eid = _eid("stranger")
    wrong = "not-the-registration-" + "token-7Hq2"
    cases = {
        "this cluster accepts no registration token": {"AIMESH_REGISTRATION_TOKEN": TOKEN},
        "presents no registration token": {"AIMESH_REGISTRATION_TOKENS": token_digest(TOKEN)},
        "is not one the cluster accepts": {**SERVE_ENV, "AIMESH_REGISTRATION_TOKEN": wrong},
    }
    for why, env in cases.items():
        plain = {k: v for k, v in os.environ.items() if not k.startswith("AIMESH_REGISTRATION")}
        done = subprocess.run([AIMESH, "worker", *_serve_args(eid, sim.url)],
                              env={**plain, **env}, cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 2, (why, done.stdout[-2000:], done.stderr[-2000:])
        assert done.stderr.startswith("error: announcing endpoints is refused"), done.stderr
        assert why in done.stderr
        assert wrong not in done.stdout + done.stderr and TOKEN not in done.stderr
    assert eid not in [e.id for e in list_endpoints()]


def test_a_conflicting_announcement_is_refused_naming_each_field(
    simulator: Sim, clean: None, tokens: None
) -> None:
    sim, elsewhere = simulator(), simulator()
    eid = _eid("clash")
    fields = {"id": eid, "base_url": sim.url, "model": "sim-model",
              "input_usd_per_1k": "0.001", "output_usd_per_1k": "0.002"}
    assert announce([parse_announcement(fields)], worker="w1")[0].created
    assert not announce([parse_announcement(fields)], worker="w2")[0].created  # joins it
    with pytest.raises(AnnouncementConflict) as caught:
        announce([parse_announcement({**fields, "model": "other-model",
                                      "input_usd_per_1k": "0.003",
                                      "base_url": elsewhere.url})], worker="w3")
    differences = caught.value.fields["differences"]
    assert list(differences) == ["base_url", "model", "input_usd_per_1k"]
    assert differences["model"] == {"registered": "sim-model", "announced": "other-model"}
    assert differences["input_usd_per_1k"] == {"registered": "0.001", "announced": "0.003"}
    assert "'other-model' announced, 'sim-model' registered" in caught.value.message
    assert get_endpoint(eid).model == "sim-model"  # nothing merged

    done = _worker_cli(*_serve_args(eid, sim.url, model="other-model", price=("0.001",
                                                                              "0.002")),
                       env=SERVE_ENV)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.startswith(f"error: model: endpoint '{eid}' is registered"), done.stderr


# --- the pieces, in this process -------------------------------------------------------------


def test_the_registration_token_is_checked_against_digests_in_constant_form() -> None:
    digests = [token_digest("other-token"), token_digest(TOKEN).upper()]
    assert check_registration_token(TOKEN, digests) == f"sha256:{token_digest(TOKEN)[:12]}"
    for presented, accepted, reason in [(TOKEN, [], "no_tokens"), (None, digests, "no_token"),
                                        ("", digests, "no_token"),
                                        ("guess", digests, "unknown_token")]:
        with pytest.raises(RegistrationRefused) as caught:
            check_registration_token(presented, accepted)
        assert caught.value.fields["reason"] == reason
        assert isinstance(caught.value, ConfigError)
        assert "guess" not in caught.value.message and TOKEN not in caught.value.message


def test_the_heartbeat_bound_leaves_a_silent_endpoint_out_and_never_an_operators(
    simulator: Sim, endpoint: MakeEndpoint, tokens: None
) -> None:
    sim = simulator()
    operator = endpoint(sim, "op-kept")
    eid = _eid("beats")
    _announced(eid, sim.url)
    candidates = [e for e in list_endpoints() if e.id in (eid, operator.id)]
    beat("w1@host", [eid], now=1000.0)
    message = AiMessage(agent_id=AGENT, prompt="beats", max_tokens=8)

    def kept(at: float) -> tuple[list[str], dict[str, str]]:
        policy = LiveServers(down_after_s=5.0, clock=lambda: at)
        ctx = RouteContext(message)
        chosen = policy.choose(ctx, candidates)
        return sorted(e.id for e in chosen), dict(getattr(chosen, "excluded", {}))

    assert kept(1004.9) == (sorted([eid, operator.id]), {})
    ids, excluded = kept(1005.1)
    assert ids == [operator.id]
    assert excluded == {eid: "no_servers: no live worker serves it (last heartbeat 5.1 s ago, "
                             "from w1@host; down after 5 s)"}
    withdraw("w1@host", [eid])
    assert kept(1000.0)[1][eid].startswith("no_servers: no worker serves it")


def test_the_servers_read_rides_routings_round_trip(
    simulator: Sim, tokens: None, monkeypatch: pytest.MonkeyPatch, clean: None
) -> None:
    sim = simulator()
    eid = _eid("trip")
    _announced(eid, sim.url)
    beat("w@host", [eid])
    with_servers = Policies([BudgetAdmission(), LiveServers()])
    without = Policies([BudgetAdmission()])

    def route(policies: Policies) -> Any:
        return routing.route(app, AiMessage(agent_id=AGENT, prompt=f"trip {uuid.uuid4()}",
                                            max_tokens=8), policies=policies)

    route(with_servers)  # loads the registry copy
    sent = round_trips(monkeypatch)
    assert isinstance(route(without), HandOff)
    baseline = len(sent)
    sent.clear()
    outcome = route(with_servers)
    assert isinstance(outcome, HandOff) and outcome.envelope.route[0]["id"] == eid
    assert len(sent) == baseline


def test_only_its_servers_call_a_self_registered_endpoint(
    simulator: Sim, endpoint: MakeEndpoint, tokens: None
) -> None:
    sim = simulator()
    other = endpoint(sim, "op-next")
    eid = _eid("theirs")
    theirs = _announced(eid, sim.url)
    message = AiMessage(agent_id=AGENT, prompt="theirs", max_tokens=8)
    envelope = Envelope(message=message.to_json_dict(),
                        route=[endpoint_to_args(theirs), endpoint_to_args(other)])
    outcome = calling.call(app, envelope, wait_s=5,
                           policies=Policies([BudgetAdmission(), LiveServers(serves=frozenset())]))
    assert isinstance(outcome, Fallback) and outcome.envelope.route[0]["id"] == other.id
    assert outcome.envelope.attempts[0]["error"]["reason"] == "not_served_here"
    assert sim.stats()["calls"] == 0
    ctx = CallContext(message, envelope, theirs, "k")
    assert LiveServers(serves=frozenset({eid})).before_call(ctx) is None
    assert LiveServers(serves=frozenset()).before_call(CallContext(message, envelope, other,
                                                                   "k")) is None


def test_endpoints_list_shows_who_serves_each_and_when_last_seen(
    simulator: Sim, endpoint: MakeEndpoint, tokens: None
) -> None:
    sim = simulator()
    operator = endpoint(sim, "op-listed")
    eid = _eid("listed")
    _announced(eid, sim.url)
    now = time.time()
    beat("alive@host", [eid], now=now)
    beat("gone@host", [eid], now=now - 600)
    runner = CliRunner()
    listed = runner.invoke(cli, ["endpoints", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    rows = {row["id"]: row for row in map(json.loads, listed.stdout.splitlines())}
    assert rows[eid]["origin"] == "announced" and rows[operator.id]["origin"] == "operator"
    assert [(s["worker"], s["live"]) for s in rows[eid]["servers"]] == [
        ("alive@host", True), ("gone@host", False)]
    assert rows[eid]["servers"][1]["last_seen_s_ago"] >= 600
    assert rows[operator.id]["servers"] == []
    text = runner.invoke(cli, ["endpoints", "list"]).stdout
    assert f"endpoint {eid} (self-registered): served by alive@host (last seen" in text
    assert "gone@host (last seen 6" in text and "not live)" in text


def test_workers_following_the_registry_leave_self_registered_queues_to_their_servers(
    simulator: Sim, endpoint: MakeEndpoint, tokens: None
) -> None:
    sim = simulator()
    operator = endpoint(sim, "op-follow")
    eid = _eid("own")
    _announced(eid, sim.url)
    assert worker_queues(False, "all", None) == [f"aimesh.endpoint.{operator.id}"]
    assert worker_queues(False, None, None, [eid]) == [f"aimesh.endpoint.{eid}"]
    with pytest.raises(InvalidInput, match=f"'{eid}' is self-registered"):
        worker_queues(False, eid, None)


def test_a_serve_file_lists_endpoints_and_names_the_entry_and_field_at_fault(
    tmp_path: Path
) -> None:
    good = tmp_path / "endpoints.yaml"
    good.write_text("endpoints:\n  - id: local-a\n    base_url: http://127.0.0.1:9/v1\n"
                    "    model: m\n    input_usd_per_1k: '0'\n    output_usd_per_1k: '0'\n"
                    "    capacity: 4\n    tags: [chat]\n")
    [spec] = read_serve_file(good)
    assert (spec.id, spec.base_url, spec.capacity, spec.tags) == (
        "local-a", "http://127.0.0.1:9", 4, ["chat"])
    for text, needle in [
        ("endpoints:\n  - id: a\n    model: m\n", "endpoints[0].base_url: Field required"),
        ("endpoints:\n  - {id: a, base_url: 'http://x', model: m, input_usd_per_1k: '0', "
         "output_usd_per_1k: '0', enabled: false}\n", "endpoints[0].enabled: an operator"),
        ("- id: a\n", "expected one key, 'endpoints'"),
        ("endpoints: [\n", "not valid YAML"),
    ]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(InvalidInput) as caught:
            read_serve_file(bad)
        assert needle in caught.value.message and str(bad) in caught.value.message


def test_serve_settings_are_checked_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIMESH_REGISTRATION_TOKENS", TOKEN)  # a token pasted, not a digest
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert caught.value.message.startswith("AIMESH_REGISTRATION_TOKENS=(hidden): entry 1 is "
                                           "not a sha256 hex digest")
    assert TOKEN not in caught.value.message
    monkeypatch.setenv("AIMESH_REGISTRATION_TOKENS", token_digest(TOKEN))
    monkeypatch.setenv("AIMESH_UPSTREAM_ALLOW_PRIVATE", "10.0.0.0/8,not-a-net")
    with pytest.raises(ConfigError, match="AIMESH_UPSTREAM_ALLOW_PRIVATE=.*'not-a-net' is not "
                                          "a network"):
        load_settings()
    monkeypatch.setenv("AIMESH_UPSTREAM_ALLOW_PRIVATE", "")
    assert load_settings().upstream_private_networks == []
    monkeypatch.setenv("AIMESH_SERVE_DOWN_AFTER_S", "1")
    monkeypatch.setenv("AIMESH_SERVE_HEARTBEAT_S", "1")
    with pytest.raises(ConfigError, match="at least twice AIMESH_SERVE_HEARTBEAT_S"):
        load_settings()
