"""The database: SQLAlchemy 2 typed models, engine and session scope."""

from aimesh_tasks.db.engine import dispose_engines, get_engine, session_scope
from aimesh_tasks.db.models import (
    AgentRow,
    AuditRow,
    Base,
    BudgetResetRow,
    BudgetRow,
    CallAttemptRow,
    EndpointRow,
    LedgerRow,
    ReservationRow,
    RoutingDecisionRow,
    WorkflowRunRow,
    WorkflowStepRow,
)

__all__ = [
    "AgentRow",
    "AuditRow",
    "Base",
    "BudgetResetRow",
    "BudgetRow",
    "CallAttemptRow",
    "EndpointRow",
    "LedgerRow",
    "ReservationRow",
    "RoutingDecisionRow",
    "WorkflowRunRow",
    "WorkflowStepRow",
    "dispose_engines",
    "get_engine",
    "session_scope",
]
