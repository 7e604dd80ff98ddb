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
from tests.conftest import WorkerProcess, start_workers

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


def _active_queues(hosts: list[str] | None = None) -> dict[str, list[str]]:
    replies = app.control.inspect(timeout=1, destination=hosts).active_queues() or {}
    return {host: [q["name"] for q in queues] for host, queues in replies.items()}


@contextmanager
def only_these_workers(mine: set[str], endpoint_queues: list[str]) -> Iterator[None]:
    """Pause every other worker on this broker (e.g. the session's `workers`) so that all
    traffic goes through `mine`; resume them afterwards.

    Workers that follow the registry pick up `endpoint_queues` on their own: wait until
    they have, then cancel, so that they do not add them back behind our back."""
    others = {h: q for h, q in _active_queues().items() if h not in mine}
    followers = [h for h, q in others.items()
                 if any(n.startswith("aimesh.endpoint.") or n == "aimesh.idle" for n in q)]
    if followers:
        wait_for(lambda: all(set(endpoint_queues) <= set(q)
                             for q in _active_queues(followers).values()),
                 what="other workers following the new endpoint queues")
    others = {h: q for h, q in _active_queues(list(others) or None).items() if h not in mine} \
        if others else {}
    for host, queues in others.items():
        for queue in queues:
            app.control.cancel_consumer(queue, destination=[host], reply=True)
    try:
        yield
    finally:
        for host, queues in others.items():
            for queue in queues:
                if queue not in endpoint_queues:
                    app.control.add_consumer(queue, destination=[host], reply=True)
