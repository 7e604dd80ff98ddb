"""The database: SQLAlchemy 2 typed models, engine and session scope."""

from aimesh_tasks.db.engine import dispose_engines, get_engine, session_scope
from aimesh_tasks.db.models import AgentRow, Base, CallAttemptRow, EndpointRow, RoutingDecisionRow

__all__ = [
    "AgentRow",
    "Base",
    "CallAttemptRow",
    "EndpointRow",
    "RoutingDecisionRow",
    "dispose_engines",
    "get_engine",
    "session_scope",
]
