"""Celery settings of aimesh-tasks, loaded by `aimesh_tasks.app` when the app is built.

Values that differ per deployment come from the typed settings object (AIMESH_* variables,
see aimesh_tasks/settings.py); the rest are fixed here because the delivery guarantees
depend on them (`GUARANTEED`: a deployment's `celeryconfig.py` cannot change those).
This module lives inside the package, so a stray top-level `celeryconfig` module on
`sys.path` can never replace it.
"""

from aimesh_tasks import keys
from aimesh_tasks.celery_overrides import deployment_overrides, find_overrides
from aimesh_tasks.rabbit.queues import is_amqp
from aimesh_tasks.resilience.priority import (
    BROKER_PRIORITY_STEPS,
    DEFAULT,
    HIGHEST,
    broker_priority,
)
from aimesh_tasks.settings import get_settings

_settings = get_settings()

# Where messages and results live. memory:// and cache+memory:// are the embedded mode.
broker_url = _settings.broker_url
result_backend = _settings.result_backend
# A Redis result backend stores each result in one round trip (aimesh_tasks/result_backend.py).
override_backends = {scheme: "aimesh_tasks.result_backend:StoreOnceRedisBackend"
                     for scheme in ("redis", "rediss")}

# JSON only, in and out: a pickle-typed message is refused by the worker, never executed.
# At-least-once delivery: a message is acked only after its task returned, and a message
# whose worker process died (SIGKILL, OOM) goes back to the queue instead of being lost.
GUARANTEED = {
    "task_serializer": "json",
    "result_serializer": "json",
    "accept_content": ["json"],
    "result_accept_content": ["json"],
    "event_serializer": "json",
    "task_acks_late": True,
    "task_reject_on_worker_lost": True,
}
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
result_accept_content = ["json"]
event_serializer = "json"
task_acks_late = True
task_reject_on_worker_lost = True
# On a lost broker connection, let running tasks finish. Cancelling them (True) stores
# TaskRevokedError ("terminated") as the result their producers read, a final failure for
# a message that was fine; a task that finishes stores its real result, and the second
# copy the broker may redeliver later is the same message (hand-off record, call-key
# lease, journal: one call, one charge, the same result again).
worker_cancel_long_running_tasks_on_connection_loss = False
# Publishing (a hand-off to the next hop, a retry, a submit) rides out a broker restart:
# about 35 s of retries instead of Celery's 0.6 s; past that, a task gives its message
# back (aimesh_tasks/tasks/shell.py) and a producer gets the error.
task_publish_retry_policy = {"max_retries": 10, "interval_start": 0, "interval_step": 1,
                             "interval_max": 5}
# Storing a result rides out a short result-backend outage instead of failing the task.
result_backend_always_retry = True
result_backend_max_retries = 10

# Time limits: soft raises SoftTimeLimitExceeded in the task; hard kills the worker child.
task_soft_time_limit = _settings.task_soft_time_limit_s
task_time_limit = _settings.task_time_limit_s

# Broker: keep retrying at start-up; the visibility timeout (redelivery of unacked
# messages on Redis) must exceed the hard time limit, checked by aimesh_tasks.app.
broker_connection_retry_on_startup = True
broker_transport_options = {
    "visibility_timeout": _settings.visibility_timeout_s,
    # kombu's default of 10 broker connections fails under gevent/threads concurrency
    # (MEASURED.md finding 3); this is a ceiling, not a number opened up front, raised at
    # worker start for a worker running more tasks at once (aimesh_tasks/pools.py).
    "max_connections": 1000,
    # Ten priority levels, one Redis list each (aimesh_tasks/resilience/priority.py):
    # kombu's default steps 0, 3, 6, 9 would fold AiMessage.priority 0-9 into four. Its
    # queue order stays round robin: kombu BRPOPs every queue's step 0 before any step 1
    # whatever the order, and 'priority' order would starve an endpoint queue listed late.
    "priority_steps": list(BROKER_PRIORITY_STEPS),
    # Messages a dead worker held are restored by the other workers once the visibility
    # timeout passes; kombu looks only every 10 s x 10, which would add up to 100 s to it.
    "unacked_restore_interval": min(10.0, _settings.visibility_timeout_s / 10),
    "unacked_restore_throttle": 1,
    # The in-memory transport polls; 5 ms takes embedded mode from ~15 to ~220 msgs/s.
    **({"polling_interval": 0.005} if _settings.embedded else {}),
    # RabbitMQ: publisher confirms. A publish returns once the broker has the message
    # (on a quorum queue: a majority of its nodes), and raises if the broker refuses it,
    # instead of a submit that "succeeded" for a message the broker dropped.
    **({"confirm_publish": True} if is_amqp(_settings.broker_url) else {}),
}
# RabbitMQ: every task queue is declared by AIMESH_RABBIT_QUEUE_TYPE's rules
# (aimesh_tasks/rabbit/queues.py: quorum, or classic with x-max-priority 9). A message
# published without a priority (a follower routed again) gets AiMessage's default, 5.
task_queue_max_priority = None if is_amqp(_settings.broker_url) else HIGHEST
task_default_priority = broker_priority(DEFAULT, _settings.broker_url)
# A worker shares one result backend (one Redis pool) among its threads, sized from its
# concurrency at start (aimesh_tasks/pools.py: result_backend_thread_safe,
# redis_max_connections, broker_pool_limit); the Redis backend reads no max_connections
# from result_backend_transport_options.

# Queues: routing tasks on one queue, each endpoint's calls on its own queue
# (aimesh.endpoint.<endpoint_id>), created on first use.
task_default_queue = keys.ROUTE_QUEUE
task_create_missing_queues = True
task_routes = {"aimesh.route": {"queue": keys.ROUTE_QUEUE}}

# Short tasks: prefetching 1 vs 4 made no difference, 16 was ~15 % slower (MEASURED.md).
worker_prefetch_multiplier = 1

# Results are kept a day; producers read them with AsyncResult.get().
result_expires = 86400
task_track_started = False

# Keep the application's own logging configuration.
worker_hijack_root_logger = False

imports = ("aimesh_tasks.tasks", "aimesh_tasks.tasks.workflow")

# A deployment's own celeryconfig (see aimesh_tasks/celery_overrides.py), then the
# guarantees again, whatever it said.
globals().update(deployment_overrides(find_overrides(), GUARANTEED))
globals().update(GUARANTEED)
