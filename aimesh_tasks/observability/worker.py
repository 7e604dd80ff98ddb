"""Observability of a worker node: JSON logs, event receivers and the node's /metrics.

`install()` (called once by aimesh_tasks.app) connects the metric and decision-log
receivers to the message-path events in the importing process; prefork children inherit
the connections when they fork. At worker start:

- Celery's `setup_logging` signal: the JSON handler with redaction replaces Celery's own
  log set-up (`configure_logging`);
- `worker_init` (main process, before the pool forks): with AIMESH_WORKER_METRICS_PORT
  set, prepare PROMETHEUS_MULTIPROC_DIR (a fresh temporary directory when unset, removed
  when the node exits; emptied of stale files when given: one directory per worker node)
  and serve the sum of all the node's processes on that port (see metrics.py for why
  multiprocess mode).

A start-up hook that fails stops the worker with one `error: ...` line on stderr and exit
status 2 (`never_silent`): Celery logs and then ignores an exception raised by a signal
receiver, and at `worker_init` logging is not set up yet, so the failure vanished and the
worker ran without what the hook was to give it (metrics, say).
"""

from __future__ import annotations

import atexit
import functools
import glob
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from typing import Any

from celery import signals

from aimesh_tasks.errors import ConfigError
from aimesh_tasks.settings import get_settings

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
logger = logging.getLogger(__name__)
_installed = False


def prepare_multiproc_dir() -> str:
    """The node's multiprocess directory, ready for this run; set in the environment.

    When PROMETHEUS_MULTIPROC_DIR is unset, a temporary directory is made (and removed
    when this process exits). prometheus-client picks its value store when it is first
    imported, and the `celery` command imports it before any hook runs (Flower's command
    plugin does), so it is told again here; no aimesh metric has a value yet at
    worker_init (each is labelled, and labelled values are made on first use).
    """
    path = os.environ.get(MULTIPROC_ENV)
    if not path:
        path = tempfile.mkdtemp(prefix="aimesh-metrics-")
        os.environ[MULTIPROC_ENV] = path
        atexit.register(_remove_dir, path, os.getpid())
        values: Any = sys.modules.get("prometheus_client.values")
        if values is not None:
            values.ValueClass = values.get_value_class()
    os.makedirs(path, exist_ok=True)
    for stale in glob.glob(os.path.join(path, "*.db")):  # counts of an earlier run
        os.remove(stale)
    return path


def _remove_dir(path: str, owner_pid: int) -> None:
    if os.getpid() == owner_pid:  # not in a forked pool child that happens to exit cleanly
        shutil.rmtree(path, ignore_errors=True)


def serve_node_metrics(port: int, address: str = "0.0.0.0") -> None:
    """Serve the summed samples of every process of this node on `port`."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    try:
        start_http_server(port, addr=address, registry=registry)
    except OSError as exc:
        raise ConfigError(
            f"AIMESH_WORKER_METRICS_PORT={port}: cannot serve /metrics on {address}:{port} "
            f"({exc.strerror or exc}). Fix: give each worker node on this host its own port, "
            "or set 0 to serve none", setting="AIMESH_WORKER_METRICS_PORT") from exc
    logger.info("worker.metrics_serving", extra={"port": port, "multiproc_dir":
                                                 os.environ.get(MULTIPROC_ENV)})


def never_silent(hook: Callable[..., None]) -> Callable[..., None]:
    """A worker start-up hook whose failure stops the worker: `error: ...` on stderr and
    exit status 2, instead of a log line Celery drops (see the module docstring)."""

    @functools.wraps(hook)
    def guarded(**kwargs: Any) -> None:
        try:
            hook(**kwargs)
        except Exception as exc:
            message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
            sys.stderr.write(f"error: the worker cannot start: {message}\n")
            sys.stderr.flush()
            # SystemExit is no Exception, so Celery's signal dispatch does not swallow it:
            # the worker stops before it consumes anything.
            raise SystemExit(2) from exc

    return guarded


@never_silent
def _on_worker_init(**_: Any) -> None:
    port = get_settings().worker_metrics_port
    if port:
        prepare_multiproc_dir()
        serve_node_metrics(port)


def _on_setup_logging(loglevel: Any = None, **_: Any) -> None:
    from aimesh_tasks.observability.logging import configure_logging

    configure_logging(loglevel or logging.INFO, get_settings().log_level)


def install() -> None:
    """Connect the metric and log receivers and the worker start-up hooks (idempotent)."""
    global _installed
    if _installed:
        return
    from aimesh_tasks.observability import decision_log, record

    record.connect()
    decision_log.connect()
    signals.setup_logging.connect(_on_setup_logging, weak=False)
    signals.worker_init.connect(_on_worker_init, weak=False)
    _installed = True
