"""How many connections each pool of a process may open, sized from how many tasks the
process runs at once.

An endpoint worker on the threads pool runs its `-c` tasks in one process: `-P threads
-c 1000` holds a thousand provider calls in flight, each thread blocked on a future of
the process's one event loop (providers/aio.py). A task uses a connection of each pool
below for one round trip at a time, never across the provider call, and never two of one
pool at once; pools open connections on demand and keep what the busiest moment needed.
Sized at worker start (`size_for_worker`, from Celery's `worker_init`):

| pool                           | most connections, per process   | when every one is busy      |
|--------------------------------|---------------------------------|-----------------------------|
| Redis client (redis_client.py) | tasks + BACKGROUND_THREADS, at  | waits up to                 |
|                                | most SHARED_REDIS_CONNECTIONS   | AIMESH_REDIS_TIMEOUT_S, then|
|                                | (AIMESH_REDIS_MAX_CONNECTIONS)  | RedisPoolExhausted          |
| result backend (Redis): one for| tasks + BACKGROUND_THREADS      | never: a thread stores one  |
| all threads, not one per thread| (`redis_max_connections`)       | result at a time            |
| broker producers (hand-offs)   | tasks + BACKGROUND_THREADS      | waits up to AIMESH_REDIS_   |
|                                | (`broker_pool_limit`)           | TIMEOUT_S, then kombu's     |
|                                |                                 | OperationalError            |
| Postgres, per engine (db/)     | AIMESH_DB_POOL_SIZE             | waits up to AIMESH_DB_POOL_ |
|                                |                                 | TIMEOUT_S, then             |
|                                |                                 | DbPoolExhausted             |
| budget batches (budgets/       | one per batch in flight         | never: the threads of a     |
| pg_batch.py, autocommit)       | (PARALLEL_BATCHES), not per task| process join a batch        |

Why the Redis client and Postgres stop short of the tasks: a process runs Python on one
thread at a time, so its round trips in progress are bounded by its CPU, not its threads.
A thousand threads answered at once, each making its Redis round trips, would open a
connection each from a pool of a thousand (measured: benchmarks/bench_inflight.py, the
`held` phase), against a Redis whose `maxclients` (10,000) every process of the cluster
shares; from SHARED_REDIS_CONNECTIONS they take turns for milliseconds instead. Postgres's
max_connections (100 by default) is smaller still. The result backend keeps one
connection per task thread because Celery's Redis backend fails at once, rather than
waits, when its pool is full.

Each error above is a transient one to the task shells (tasks/shell.py): the task is
retried with backoff, then fails with ServiceUnavailable; none waits for ever. Kombu's
prefetch is the concurrency times `worker_prefetch_multiplier` (1): a worker reserves as
many messages as it has threads to run them. A process that is no worker (the ingress, the
CLI) gets OUTSIDE_A_WORKER Redis connections, redis-py's own default.
"""

from __future__ import annotations

import os
from typing import Any, Final

from aimesh_tasks.settings import get_settings

# The worker's own threads that use the same pools besides its tasks: the outbox flusher,
# the reaper, the flights and the reconciler (worker_steps.py), the registry follower,
# the consumer's own publishes, with room to spare.
BACKGROUND_THREADS: Final = 16
SHARED_REDIS_CONNECTIONS: Final = 64
OUTSIDE_A_WORKER: Final = 100  # redis-py's own default pool size
# Pools whose processes each run one task at a time (the rest run `concurrency` at once).
_ONE_TASK_POOLS: Final = ("prefork", "processes", "solo")

_tasks: int | None = None  # tasks this process runs at once, once it is a worker


def pool_alias(pool_cls: Any) -> str:
    """Celery's name for a worker pool given as a name or a class ('threads', 'prefork')."""
    if isinstance(pool_cls, str):
        return pool_cls
    from celery.concurrency import ALIASES

    path = f"{pool_cls.__module__}:{pool_cls.__qualname__}"
    return next((alias for alias, target in ALIASES.items() if target == path), path)


def tasks_per_process(pool: str, concurrency: Any) -> int:
    """Tasks one process of a worker runs at once: 1 in a process pool, `concurrency` in
    a thread or green pool ('auto' or nothing: one per CPU, as Celery does)."""
    if pool in _ONE_TASK_POOLS:
        return 1
    return concurrency if isinstance(concurrency, int) and concurrency > 0 else os.cpu_count() or 1


def size_for_worker(pool_cls: Any, concurrency: Any) -> int:
    """Size this process's pools (and the forked children's) for the worker starting in
    it; the tasks each process runs at once."""
    global _tasks
    _tasks = tasks_per_process(pool_alias(pool_cls), concurrency)
    return _tasks


def redis_connections() -> int:
    """The most connections this process's Redis client opens (see the module notes)."""
    configured = get_settings().redis_max_connections
    if configured:
        return configured
    if _tasks is None:
        return OUTSIDE_A_WORKER
    return min(_tasks + BACKGROUND_THREADS, SHARED_REDIS_CONNECTIONS)


def celery_settings(conf: Any) -> dict[str, Any]:
    """The Celery settings that size a worker's result-backend and broker pools, from
    its tasks per process (after `size_for_worker`) and the current `conf`."""
    assert _tasks is not None, "size_for_worker() first"
    connections = _tasks + BACKGROUND_THREADS
    transport = dict(conf.broker_transport_options or {})
    transport["max_connections"] = max(int(transport.get("max_connections") or 0), connections)
    return {
        # One backend (and so one Redis pool) for all the threads of a process; Celery's
        # default gives each thread a client of its own, a thousand idle connections.
        "result_backend_thread_safe": True,
        "redis_max_connections": connections,
        "broker_pool_limit": connections,
        "broker_pool_acquire_timeout": get_settings().redis_timeout_s,
        "broker_transport_options": transport,
    }
