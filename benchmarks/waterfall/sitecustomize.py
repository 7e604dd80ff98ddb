"""Step timestamps of each message in a worker, for benchmarks/bench_waterfall.py only.

Python imports `sitecustomize` at start-up from the path: bench_waterfall.py puts this
folder on the PYTHONPATH of the workers it starts, with AIMESH_WATERFALL naming where to
write. Nothing else ever has it on its path. Each line is "<task id> <step> <unix time>";
the routing task and the call task share the message's id, so one message's steps line up
across both workers. The steps wrap the path's own functions by name: a rename fails the
worker's start-up loudly rather than measuring nothing.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

if os.environ.get("AIMESH_WATERFALL"):
    from celery import signals

    _out = open(f"{os.environ['AIMESH_WATERFALL']}.{os.getpid()}", "a", buffering=1)
    _here = threading.local()

    def _step(name: str) -> None:
        task_id = getattr(_here, "task_id", None)
        if task_id:
            _out.write(f"{task_id} {name} {time.time():.6f}\n")

    def _timed(owner: Any, attribute: str, name: Callable[..., str]) -> None:
        original = getattr(owner, attribute)

        def timed(*args: Any, **kwargs: Any) -> Any:
            label = name(*args, **kwargs)
            _step(f"{label}>")
            try:
                return original(*args, **kwargs)
            finally:
                _step(f"{label}<")

        setattr(owner, attribute, timed)

    @signals.task_prerun.connect
    def _started(task_id: str | None = None, task: Any = None, **_: Any) -> None:
        _here.task_id = task_id
        _step(f"{task.name.rsplit('.', 1)[-1]}:start")

    @signals.task_postrun.connect
    def _ended(task_id: str | None = None, task: Any = None, **_: Any) -> None:
        _step(f"{task.name.rsplit('.', 1)[-1]}:end")
        _here.task_id = None

    @signals.worker_init.connect
    def _wrap(**_: Any) -> None:
        from aimesh_tasks import redis_batch, result_backend
        from aimesh_tasks.budgets import pg_batch
        from aimesh_tasks.pipeline import call
        from aimesh_tasks.tasks import shell

        _timed(pg_batch, "run", lambda op: f"pg:{op['op']}")
        _timed(redis_batch.Batch, "send", lambda *a, **k: "redis")
        _timed(call, "call_provider", lambda *a, **k: "http")
        _timed(result_backend.StoreOnceRedisBackend, "_store_result", lambda *a, **k: "store")
        _timed(shell, "hand_off", lambda *a, **k: "hand-off")
