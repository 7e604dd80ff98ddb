"""A deployment's own Celery overrides for aimesh-tasks (optional; this file is an example).

aimesh-tasks keeps its Celery settings inside the package (`aimesh_tasks/celery_config.py`)
and reads AIMESH_* variables for what differs per deployment. When the app is built, a
module named `celeryconfig` found on `sys.path` (e.g. this file, in the directory a worker
starts from) is applied on top, if it declares `AIMESH_OVERRIDES = True`:

- any Celery setting may be overridden (e.g. `worker_send_task_events`, `broker_pool_limit`);
- the delivery guarantees cannot be (JSON only, acks_late, reject_on_worker_lost): a value
  that would change one is ignored, with a warning naming this file and the setting;
- a `celeryconfig` without the marker (another project's) is ignored, with a warning.
"""

AIMESH_OVERRIDES = True

# Examples (uncomment to use):
# worker_send_task_events = True
# task_send_sent_event = True
