"""The Celery tasks: thin shells over aimesh_tasks.pipeline."""

from aimesh_tasks.tasks.call import call_endpoint
from aimesh_tasks.tasks.route import route_message

__all__ = ["call_endpoint", "route_message"]
