"""providers.aio against the real simulator: answers, cancel before and in flight (the
simulator sees the disconnect), lines as they arrive, errors, an interrupted caller, a
forked child, many threads at once; and call_provider's reading of a cancel."""

from __future__ import annotations

import json
import multiprocessing
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from celery.exceptions import SoftTimeLimitExceeded

from aimesh_tasks.errors import ProviderError
from aimesh_tasks.messages import AiMessage
from aimesh_tasks.providers import aio
from aimesh_tasks.providers.http import call_provider
from aimesh_tasks.registry.endpoints import Endpoint
from aimesh_tasks.simulator import RunningSimulator
from tests.waits import wait_until

PATH = "/v1/chat/completions"
BODY: dict[str, Any] = {"model": "gpt-sim", "messages": [{"role": "user", "content": "hi"}]}
# A latency the cancel must beat to find the simulator still waiting to answer; it decides
# no assertion on speed (the cancel takes milliseconds), only how long the tests take.
IN_FLIGHT_MS = 5000

Simulator = Callable[..., RunningSimulator]


def call(sim: RunningSimulator, key: str, body: dict[str, Any] | None = None,
         **kwargs: Any) -> aio.Response:
    """aio.post of a chat completion to `sim` under call key `key`."""
    return aio.post(sim.url, PATH, body or BODY, {"X-Aimesh-Call-Key": key},
                    **{"connect_s": 5.0, "read_s": 60.0, **kwargs})


def arrived(sim: RunningSimulator, count: int = 1) -> None:
    """Wait until `count` requests reached the simulator."""
    wait_until(lambda: sim.stats()["calls"] >= count, f"{count} request(s) at the simulator",
               60, seen=sim.stats)


def answered(sim: RunningSimulator, key: str) -> dict[str, Any]:
    """The simulator's record of the call under `key`, once it has answered it."""
    def record() -> dict[str, Any] | None:
        return next((c for c in sim.calls() if c["call_key"] == key), None)

    return wait_until(record, f"the simulator's record of {key}", 60, seen=sim.calls)


def test_an_answer_comes_back_with_lower_case_headers_and_its_body(simulator: Simulator) -> None:
    sim = simulator()
    response = call(sim, "aio-ok")
    assert response.status == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["usage"]["completion_tokens"] == 16
    assert sim.calls() == [{"n": 1, "model": "gpt-sim", "status": 200, "prompt_tokens": 4,
                            "completion_tokens": 16, "call_key": "aio-ok",
                            "disconnected": False}]


def test_a_failed_status_is_an_answer_with_its_body(simulator: Simulator) -> None:
    sim = simulator(throttle_rate=1, retry_after_s=7)
    response = call(sim, "aio-429")
    assert (response.status, response.headers["retry-after"]) == (429, "7")
    assert response.json()["error"]["code"] == "rate_limit_exceeded"


def test_a_cancel_in_flight_closes_the_connection_and_the_simulator_sees_it(
        simulator: Simulator) -> None:
    sim = simulator(latency_ms=IN_FLIGHT_MS)
    cancel = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(call, sim, "aio-cancelled", cancel=cancel)
        arrived(sim)
        cancel.set()
        with pytest.raises(aio.Cancelled) as caught:
            pending.result(timeout=60)
    assert caught.value.sent is True
    record = answered(sim, "aio-cancelled")
    assert record["disconnected"] is True, (
        f"the simulator answered before the cancel closed the connection: {record}")
    assert sim.stats()["disconnected"] == 1
    sim.configure(latency_ms=0)
    assert call(sim, "aio-after").status == 200


def test_a_cancel_before_sending_connects_nothing(simulator: Simulator) -> None:
    sim = simulator()
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(aio.Cancelled) as caught:
        call(sim, "aio-never", cancel=cancel)
    assert caught.value.sent is False
    assert call(sim, "aio-next").status == 200
    assert [c["call_key"] for c in sim.calls()] == ["aio-next"]


def test_a_cancel_that_never_comes_changes_nothing(simulator: Simulator) -> None:
    sim = simulator()
    cancel = threading.Event()
    assert call(sim, "aio-kept", cancel=cancel).status == 200
    cancel.set()  # after the answer: nothing left to cancel
    assert [(c["call_key"], c["disconnected"]) for c in sim.calls()] == [("aio-kept", False)]


def test_an_interrupted_caller_aborts_its_call(simulator: Simulator) -> None:
    """As the prefork pool's soft time limit does: a signal handler raises in the thread
    waiting for the answer; the call is cancelled and the exception goes on."""
    sim = simulator(latency_ms=IN_FLIGHT_MS)
    main = threading.main_thread()
    assert threading.current_thread() is main, "signals are handled on the main thread"

    def soft_limit(signum: int, frame: object) -> None:
        raise SoftTimeLimitExceeded()

    def interrupt_once_sent() -> None:
        arrived(sim)
        assert main.ident is not None
        signal.pthread_kill(main.ident, signal.SIGUSR1)

    previous = signal.signal(signal.SIGUSR1, soft_limit)
    try:
        threading.Thread(target=interrupt_once_sent, daemon=True).start()
        with pytest.raises(SoftTimeLimitExceeded):
            call(sim, "aio-interrupted")
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert answered(sim, "aio-interrupted")["disconnected"] is True


def comparable(lines: list[bytes]) -> list[Any]:
    """SSE lines with each chunk's id and timestamp left out (they differ per call)."""
    def chunk(line: bytes) -> Any:
        if not line.startswith(b"data: {"):
            return line
        return {k: v for k, v in json.loads(line[6:]).items() if k not in ("id", "created")}

    return [chunk(line) for line in lines]


def test_lines_arrive_in_order_on_the_callers_thread(simulator: Simulator) -> None:
    sim = simulator(completion_tokens=5)
    stream = {**BODY, "stream": True}
    with httpx.Client(base_url=sim.url) as plain:
        sent = plain.post(PATH, json=stream).content
    lines: list[bytes] = []
    threads: set[int] = set()

    def on_line(line: bytes) -> None:
        lines.append(line)
        threads.add(threading.get_ident())

    response = call(sim, "aio-stream", stream, on_line=on_line)
    assert (response.status, response.body) == (200, b"")
    assert response.headers["content-type"].startswith("text/event-stream")
    assert comparable(lines) == comparable(sent.split(b"\n")[:-1])  # blank lines included
    assert lines[0].startswith(b"data: {") and lines[-2:] == [b"data: [DONE]", b""]
    assert threads == {threading.get_ident()}


def test_lines_of_a_failed_answer_stay_in_its_body(simulator: Simulator) -> None:
    sim = simulator(error_rate=1)
    lines: list[bytes] = []
    response = call(sim, "aio-500", {**BODY, "stream": True}, on_line=lines.append)
    assert response.status == 500 and response.json()["error"]["type"] == "server_error"
    assert lines == []


def test_a_line_callback_that_raises_ends_the_call_with_its_error(simulator: Simulator) -> None:
    sim = simulator()

    def refuse(line: bytes) -> None:
        raise RuntimeError(f"no room for {line[:6]!r}")

    with pytest.raises(RuntimeError, match="no room for b'data: '"):
        call(sim, "aio-refused", {**BODY, "stream": True}, on_line=refuse)
    assert call(sim, "aio-after").status == 200


@contextmanager
def closed_port() -> Iterator[int]:
    """A local port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        yield probe.getsockname()[1]


def test_transport_errors_say_whether_the_request_was_sent(simulator: Simulator) -> None:
    with closed_port() as port, pytest.raises(aio.TransportError) as refused:
        aio.post(f"http://127.0.0.1:{port}", PATH, BODY, {}, connect_s=5, read_s=5)
    assert refused.value.sent is False
    assert refused.value.kind == "ClientConnectorError"
    sim = simulator(latency_ms=IN_FLIGHT_MS)
    with pytest.raises(aio.TransportError) as timed_out:
        call(sim, "aio-slow", read_s=0.2)
    assert (timed_out.value.sent, timed_out.value.kind) == (True, "SocketTimeoutError")
    assert answered(sim, "aio-slow")["disconnected"] is True  # a timed-out call is closed too


def _child_call(url: str, results: Any) -> None:
    try:
        results.put(aio.post(url, PATH, BODY, {"X-Aimesh-Call-Key": "aio-child"},
                             connect_s=5, read_s=60).status)
    except BaseException as exc:
        results.put(repr(exc))


def test_a_forked_child_makes_calls_on_its_own_loop(simulator: Simulator) -> None:
    sim = simulator()
    assert call(sim, "aio-parent").status == 200  # the parent's loop runs before the fork
    fork = multiprocessing.get_context("fork")
    results = fork.Queue()
    child = fork.Process(target=_child_call, args=(sim.url, results))
    child.start()
    try:
        assert results.get(timeout=60) == 200
    finally:
        child.join(60)
    assert child.exitcode == 0
    assert call(sim, "aio-parent-again").status == 200
    assert [c["call_key"] for c in sim.calls()] == ["aio-parent", "aio-child",
                                                    "aio-parent-again"]


def test_two_hundred_threads_at_once_all_get_their_answers(simulator: Simulator) -> None:
    sim = simulator(latency_ms=200)
    keys = [f"aio-many-{n}" for n in range(400)]
    with ThreadPoolExecutor(200) as pool:
        statuses = list(pool.map(lambda key: call(sim, key).status, keys))
    assert statuses == [200] * len(keys)
    assert sorted(c["call_key"] for c in sim.calls()) == sorted(keys)
    assert sim.stats()["ok"] == len(keys)


# --- through call_provider: the path's reading of a cancel and a transport failure --------

def _endpoint(base_url: str) -> Endpoint:
    return Endpoint(id="aio-ep", provider="openai", base_url=base_url, model="gpt-sim",
                    api_key_env=None, input_nusd_per_1k=1, output_nusd_per_1k=1, capacity=1,
                    tags=frozenset(), enabled=True)


def _provider_error(endpoint: Endpoint, key: str, **kwargs: Any) -> ProviderError:
    with pytest.raises(ProviderError) as caught:
        call_provider(endpoint, AiMessage(agent_id="aio", prompt="hi"), key, **kwargs)
    return caught.value


def _reading(error: ProviderError) -> tuple[Any, ...]:
    return (error.action, error.fields["reason"], error.fields["maybe_billed"], error.retryable)


def test_call_provider_fails_a_cancelled_call_saying_whether_it_was_sent(
        simulator: Simulator) -> None:
    sim = simulator(latency_ms=IN_FLIGHT_MS)
    endpoint = _endpoint(sim.url)
    before = threading.Event()
    before.set()
    assert _reading(_provider_error(endpoint, "aio-p0", cancel=before)) == (
        "fail", "cancelled", False, False)
    in_flight = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(_provider_error, endpoint, "aio-p1", cancel=in_flight)
        arrived(sim)
        in_flight.set()
        error = pending.result(timeout=60)
    assert _reading(error) == ("fail", "cancelled", True, False)
    assert "cancelled in flight" in error.message and error.endpoint_id == "aio-ep"
    assert answered(sim, "aio-p1")["disconnected"] is True


def test_call_provider_reads_a_refused_connection_as_never_sent() -> None:
    with closed_port() as port:
        error = _provider_error(_endpoint(f"http://127.0.0.1:{port}"), "aio-p2")
    assert _reading(error) == ("fallback", "connect", False, True)
    assert "ClientConnectorError calling http://127.0.0.1:" in error.message
