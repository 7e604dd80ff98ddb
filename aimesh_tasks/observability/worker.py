"""Observability of a worker node: JSON logs, event receivers and the node's /metrics.

`install()` (called once by aimesh_tasks.app) connects the metric and decision-log
receivers to the message-path events in the importing process; prefork children inherit
the connections when they fork. At worker start:

- Celery's `setup_logging` signal: the JSON handler with redaction replaces Celery's own
  log set-up (`configure_logging`);
- `worker_init` (main process, before the pool forks): with AIMESH_WORKER_METRICS_PORT
  set, prepare PROMETHEUS_MULTIPROC_DIR (a fresh temporary directory when unset; emptied
  of stale files when given: one directory per worker node) and serve the sum of all the
  node's processes on that port (see metrics.py for why multiprocess mode).
"""

from __future__ import annotations

import glob
import logging
import os
import sys
import tempfile
from typing import Any

from celery import signals

from aimesh_tasks.errors import ConfigError
from aimesh_tasks.settings import get_settings

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
logger = logging.getLogger(__name__)
_installed = False


def prepare_multiproc_dir() -> str:
    """The node's multiprocess directory, ready for this run; set in the environment."""
    path = os.environ.get(MULTIPROC_ENV)
    if not path:
        if "prometheus_client.values" in sys.modules:
            raise ConfigError(
                f"AIMESH_WORKER_METRICS_PORT needs {MULTIPROC_ENV} set before prometheus_client "
                "is imported: set it in the worker's environment (one directory per node)",
                setting=MULTIPROC_ENV,
            )
        path = tempfile.mkdtemp(prefix="aimesh-metrics-")
        os.environ[MULTIPROC_ENV] = path
    os.makedirs(path, exist_ok=True)
    for stale in glob.glob(os.path.join(path, "*.db")):  # counts of an earlier run
        os.remove(stale)
    return path


def serve_node_metrics(port: int, address: str = "0.0.0.0") -> None:
    """Serve the summed samples of every process of this node on `port`."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    start_http_server(port, addr=address, registry=registry)
    logger.info("worker.metrics_serving", extra={"port": port})


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
