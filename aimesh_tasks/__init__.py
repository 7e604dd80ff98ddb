"""aimesh-tasks: a distributed task queue for AI agents' LLM calls, on Celery.

    from aimesh_tasks import submit
    result = submit(agent_id="research-bot", prompt="Summarise ...", max_tokens=200)
    result.get(timeout=30)  # -> AiResult as a JSON dict
"""

from aimesh_tasks.app import app
from aimesh_tasks.errors import (
    AimeshError,
    AllEndpointsFailed,
    ConfigError,
    InvalidInput,
    InvalidMessage,
    NoEndpointAvailable,
    NotFound,
    ProviderError,
)
from aimesh_tasks.messages import AiMessage, AiResult, ChatMessage
from aimesh_tasks.registry import (
    Endpoint,
    add_endpoint,
    get_endpoint,
    list_endpoints,
    remove_endpoint,
    set_enabled,
    update_endpoint,
)
from aimesh_tasks.settings import Settings, get_settings
from aimesh_tasks.submit import submit
from aimesh_tasks.tasks import call_endpoint, route_message
from aimesh_tasks.workflows import Step, Workflow, submit_workflow

__version__ = "0.1.0"

__all__ = [
    # producing
    "submit",
    "route_message",
    "call_endpoint",
    "app",
    # workflows
    "Workflow",
    "Step",
    "submit_workflow",
    # messages
    "AiMessage",
    "AiResult",
    "ChatMessage",
    # endpoints
    "Endpoint",
    "add_endpoint",
    "get_endpoint",
    "list_endpoints",
    "remove_endpoint",
    "set_enabled",
    "update_endpoint",
    # settings
    "Settings",
    "get_settings",
    # errors
    "AimeshError",
    "AllEndpointsFailed",
    "ConfigError",
    "InvalidInput",
    "InvalidMessage",
    "NoEndpointAvailable",
    "NotFound",
    "ProviderError",
]
