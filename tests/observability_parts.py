"""Shared parts of the observability tests: metric workers, scraping, exclusive consumption."""

from __future__ import annotations

import socket
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from aimesh_tasks.app import app
from tests.processes import RUNNING, WorkerProcess, start_workers
from tests.waits import wait_until

CANARY_KEY = f"sk-canary-{uuid.uuid4().hex}"
CANARY_PROMPT = f"canary prompt {uuid.uuid4().hex}"
KEY_ENV = "OBS_UPSTREAM_CANARY"  # deliberately not a secret-looking name


def free_port() -> int:
    """A port nothing listens on right now (bind port 0, read it, release it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MetricWorkers:
    """A router worker (threads) and a prefork endpoint worker, each serving /metrics."""

    def __init__(self, tmp: Path, agent_labels: int) -> None:
        self.ports: list[int] = []
        specs = [(f"obs-router-{uuid.uuid4().hex[:6]}",
                  ["celery", "-Q", "aimesh.route", "-P", "threads", "-c", "4"]),
                 (f"obs-endpoints-{uuid.uuid4().hex[:6]}",
                  ["--endpoints", "all", "-P", "prefork", "-c", "2"])]
        self.workers: list[WorkerProcess] = []
        for name, args in specs:
            port = free_port()
            env = {"AIMESH_WORKER_METRICS_PORT": str(port),
                   "PROMETHEUS_MULTIPROC_DIR": str(tmp / name),
                   "AIMESH_METRICS_AGENT_LABELS": str(agent_labels),
                   KEY_ENV: CANARY_KEY}
            self.workers += start_workers([(name, args)], env)
            self.ports.append(port)

    @property
    def hostnames(self) -> set[str]:
        return {w.hostname for w in self.workers}

    def logs(self) -> str:
        return "".join(w.log.read_text() for w in self.workers)

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of every worker, summed over workers: (name, labels) -> value."""
        total: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for port in self.ports:
            for key, value in samples(f"http://127.0.0.1:{port}/metrics").items():
                total[key] = total.get(key, 0.0) + value
        return total

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()


def scrape_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples at a /metrics URL: (name, sorted labels) -> value."""
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(scrape_text(url)):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(scraped: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:
    """One sample's value (0 if absent)."""
    return scraped.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for(condition: Callable[[], bool], timeout_s: float = 30, what: str = "") -> None:
    """Poll until `condition()`; AssertionError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not met in {timeout_s} s: {what}")
        time.sleep(0.05)


def _queues_of(host: str) -> list[str]:
    """The queues worker `host` consumes, asked of it alone until it answers."""

    def reply() -> list[str] | None:
        replies = app.control.inspect(timeout=1, destination=[host]).active_queues() or {}
        return [q["name"] for q in replies[host]] if host in replies else None

    return wait_until(reply, f"worker {host} to report its queues")


def _wait_queues(host: str, check: Callable[[set[str]], bool], what: str) -> None:
    wait_until(lambda: check(set(_queues_of(host))) or None, f"worker {host}: {what}",
                   seen=lambda: _queues_of(host))


BRPOP_DRAIN_S = 2.5


@contextmanager
def only_these_workers(mine: set[str], endpoint_queues: list[str]) -> Iterator[None]:
    """Pause every other worker on this broker (the session's `workers`, any other this
    session started: conftest.RUNNING lists them all) so that all traffic goes through
    `mine`; resume them afterwards.

    Workers that follow the registry pick up `endpoint_queues` on their own: wait until
    they have, then cancel, so that they do not add them back behind our back."""
    others = [h for h, w in RUNNING.items() if h not in mine and w.proc.poll() is None]
    paused: dict[str, list[str]] = {}
    for host in others:
        queues = _queues_of(host)
        if any(n.startswith("aimesh.endpoint.") or n == "aimesh.idle" for n in queues):
            _wait_queues(host, lambda names: set(endpoint_queues) <= names,
                         f"following the new endpoint queues {endpoint_queues}")
            queues = _queues_of(host)
        paused[host] = queues
        for queue in queues:
            app.control.cancel_consumer(queue, destination=[host], reply=True)
        _wait_queues(host, lambda names, gone=set(queues): not names & gone,
                     f"no longer consuming {queues}")
    if paused:
        # A BRPOP a worker issued before its consumer was cancelled still names the old
        # queues, and Redis hands it the next message pushed there: let every such BRPOP
        # run out (kombu's Redis transport blocks for 1 s at a time) before traffic starts.
        time.sleep(BRPOP_DRAIN_S)
    try:
        yield
    finally:
        for host, queues in paused.items():
            back = [q for q in queues if q not in endpoint_queues]
            for queue in back:
                app.control.add_consumer(queue, destination=[host], reply=True)
            _wait_queues(host, lambda names, back=set(back): back <= names,
                         f"consuming {back} again")
