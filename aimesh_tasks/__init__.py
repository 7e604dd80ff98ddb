"""aimesh-tasks: a distributed task queue for AI agents' LLM calls, on Celery.

    from aimesh_tasks import submit
    result = submit(agent_id="research-bot", prompt="Summarise ...", max_tokens=200)
    result.get(timeout=30)  # -> AiResult as a JSON dict
"""

import importlib as _importlib
import typing as _typing

if _typing.TYPE_CHECKING:
    from celery import Celery

    from aimesh_tasks.envelope import Envelope, Flight, InvalidEnvelope
    from aimesh_tasks.errors import (
        AimeshError,
        AllEndpointsFailed,
        Ambiguous,
        BudgetExceeded,
        CallNotNeeded,
        ConfigError,
        DeadlineExceeded,
        Forbidden,
        InvalidInput,
        InvalidMessage,
        LoopCapExceeded,
        NoEndpointAvailable,
        NoRouteMatches,
        NotFound,
        ProviderError,
        RateLimited,
        Refused,
        ServiceUnavailable,
        Unauthorized,
        UndeliverableMessage,
        WorkflowCancelled,
    )
    from aimesh_tasks.messages import AiMessage, AiResult, ChatMessage
    from aimesh_tasks.policies.base import Policy
    from aimesh_tasks.producer import submit
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
    from aimesh_tasks.tasks import call_endpoint, route_message
    from aimesh_tasks.workflows.model import Step, Workflow
    from aimesh_tasks.workflows.run import submit_workflow

    app: Celery

# Importing the package builds no Celery app and imports none of its modules: every name
# is loaded on first use (so `aimesh --help` starts without pydantic, SQLAlchemy, Celery).
_LAZY = {
    "app": "aimesh_tasks.app",
    "submit": "aimesh_tasks.producer",
    "route_message": "aimesh_tasks.tasks",
    "call_endpoint": "aimesh_tasks.tasks",
    "submit_workflow": "aimesh_tasks.workflows.run",
    "Workflow": "aimesh_tasks.workflows.model",
    "Step": "aimesh_tasks.workflows.model",
    "AiMessage": "aimesh_tasks.messages",
    "AiResult": "aimesh_tasks.messages",
    "ChatMessage": "aimesh_tasks.messages",
    "Envelope": "aimesh_tasks.envelope",
    "Flight": "aimesh_tasks.envelope",
    "InvalidEnvelope": "aimesh_tasks.envelope",
    "Policy": "aimesh_tasks.policies.base",
    "Settings": "aimesh_tasks.settings",
    "get_settings": "aimesh_tasks.settings",
    **{name: "aimesh_tasks.registry" for name in (
        "Endpoint", "add_endpoint", "get_endpoint", "list_endpoints", "remove_endpoint",
        "set_enabled", "update_endpoint")},
    **{name: "aimesh_tasks.errors" for name in (
        "AimeshError", "AllEndpointsFailed", "BudgetExceeded", "ConfigError",
        "DeadlineExceeded", "InvalidInput", "InvalidMessage", "NoEndpointAvailable",
        "NotFound", "ProviderError", "Refused", "ServiceUnavailable", "UndeliverableMessage",
        "WorkflowCancelled", "CallNotNeeded")},
    # governance refusals (each with `http_status` for the ingress)
    **{name: "aimesh_tasks.errors" for name in (
        "Ambiguous", "Forbidden", "LoopCapExceeded", "NoRouteMatches", "RateLimited",
        "Unauthorized")},
}


def __getattr__(name: str) -> _typing.Any:
    if name in _LAZY:
        value = getattr(_importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'aimesh_tasks' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


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
    # the message path
    "Envelope",
    "Flight",
    "Policy",
    # settings
    "Settings",
    "get_settings",
    # errors
    "AimeshError",
    "AllEndpointsFailed",
    "BudgetExceeded",
    "ConfigError",
    "DeadlineExceeded",
    "InvalidInput",
    "InvalidMessage",
    "NoEndpointAvailable",
    "NotFound",
    "ProviderError",
    "Refused",
    "ServiceUnavailable",
    "UndeliverableMessage",
    "WorkflowCancelled",
    "CallNotNeeded",
    "InvalidEnvelope",
    # governance refusals
    "Ambiguous",
    "Forbidden",
    "LoopCapExceeded",
    "NoRouteMatches",
    "RateLimited",
    "Unauthorized",
]
