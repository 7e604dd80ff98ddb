"""Endpoints in the database; their live figures in Redis."""

from aimesh_tasks.registry.endpoints import (
    Endpoint,
    EndpointSpec,
    add_endpoint,
    get_endpoint,
    list_endpoints,
    remove_endpoint,
    set_enabled,
    update_endpoint,
)
from aimesh_tasks.registry.live import LiveFigures, call_finished, call_started, read_figures

__all__ = [
    "Endpoint",
    "EndpointSpec",
    "LiveFigures",
    "add_endpoint",
    "call_finished",
    "call_started",
    "get_endpoint",
    "list_endpoints",
    "read_figures",
    "remove_endpoint",
    "set_enabled",
    "update_endpoint",
]
