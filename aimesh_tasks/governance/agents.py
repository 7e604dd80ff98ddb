"""The agent registry: who may send messages (ids are lowercase kebab or snake case).

Agents are not required on submit; budgets (`aimesh budgets set`), route ACLs and rate
limits (governance/routes.py, governance/limits.py) refer to registered agents. Adding one
moves the governance version, so every router sees it on its next message.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select

from aimesh_tasks.db import AgentRow, session_scope
from aimesh_tasks.errors import InvalidInput, NotFound
from aimesh_tasks.governance.version import bump_version
from aimesh_tasks.messages import AGENT_ID_PATTERN

MAX_ID_LENGTH = 64
MAX_DESCRIPTION_LENGTH = 512


@dataclass(frozen=True, slots=True)
class Agent:
    """A registered agent."""

    id: str
    description: str
    enabled: bool
    created_at: datetime | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict."""
        return {
            "id": self.id,
            "description": self.description,
            "enabled": self.enabled,
            "created_at": self.created_at.isoformat() if self.created_at else None,
        }


def _to_agent(row: AgentRow) -> Agent:
    return Agent(id=row.id, description=row.description, enabled=row.enabled,
                 created_at=row.created_at)


def validate_agent_id(agent_id: str) -> str:
    """The id unchanged, or InvalidInput naming the rule and an example."""
    if len(agent_id) > MAX_ID_LENGTH:
        raise InvalidInput(
            f"agent_id: '{agent_id[:20]}...' is {len(agent_id)} characters; "
            f"the most is {MAX_ID_LENGTH}",
            field="agent_id", value=agent_id, errors=[],
        )
    if not AGENT_ID_PATTERN.match(agent_id):
        raise InvalidInput(
            f"agent_id: '{agent_id}' is not lowercase kebab or snake case: start with a "
            "letter, then letters, digits and single '-' or '_' (e.g. 'research-bot')",
            field="agent_id", value=agent_id, errors=[],
        )
    return agent_id


def add_agent(agent_id: str, description: str = "") -> Agent:
    """Register an agent; InvalidInput for a bad or already registered id."""
    validate_agent_id(agent_id)
    if len(description) > MAX_DESCRIPTION_LENGTH:
        raise InvalidInput(
            f"description: {len(description)} characters; the most is {MAX_DESCRIPTION_LENGTH}",
            field="description", errors=[],
        )
    with session_scope() as session:
        if session.get(AgentRow, agent_id) is not None:
            raise InvalidInput(
                f"agent_id: agent '{agent_id}' is already registered; "
                "`aimesh agents list` shows it",
                field="agent_id", value=agent_id, errors=[],
            )
        row = AgentRow(id=agent_id, description=description, enabled=True)
        session.add(row)
        session.flush()
        session.refresh(row)
        agent = _to_agent(row)
    bump_version()
    return agent


def get_agent(agent_id: str) -> Agent:
    """One agent by id, or NotFound."""
    with session_scope() as session:
        row = session.get(AgentRow, agent_id)
        if row is None:
            raise NotFound(
                f"agent '{agent_id}' is not registered; add it with `aimesh agents add "
                f"{agent_id}`, `aimesh agents list` shows the registered ones",
                kind="agent", id=agent_id,
            )
        return _to_agent(row)


def list_agents() -> list[Agent]:
    """Every registered agent, ordered by id."""
    with session_scope() as session:
        return [_to_agent(row) for row in session.scalars(select(AgentRow).order_by(AgentRow.id))]
