"""Routes in the database: a name, example intents, a target and an ACL.

A route is what a message is for ("billing questions"): its example intents are matched
against the message's last user turn (governance/intents.py), its target is the candidate
set routing scores within (endpoint ids, tags or one model), and `allowed` says who may use
it: a list of agent ids, '*' for any registered agent, or nothing for open (anonymous
allowed). A route may name a `fallback` route for messages that match it only weakly.

Routes are applied from a file by `aimesh routes apply` (governance/spec_file.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import select

from aimesh_tasks.db import session_scope
from aimesh_tasks.db.models import RouteRow
from aimesh_tasks.errors import InvalidInput, NotFound
from aimesh_tasks.governance.version import bump_version
from aimesh_tasks.registry.endpoints import Endpoint

TargetKind = Literal["endpoints", "tags", "model"]
ANY_REGISTERED = "*"

_ADMITS: dict[str, Callable[[tuple[str, ...], Endpoint], bool]] = {
    "endpoints": lambda values, endpoint: endpoint.id in values,
    "tags": lambda values, endpoint: set(values) <= endpoint.tags,
    "model": lambda values, endpoint: endpoint.model in values,
}


@dataclass(frozen=True, slots=True)
class Target:
    """The endpoints a route may use: by id, by tags (all of them), or by model."""

    kind: TargetKind
    values: tuple[str, ...]

    def admits(self, endpoint: Endpoint) -> bool:
        """True if the endpoint is in this target."""
        return _ADMITS[self.kind](self.values, endpoint)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: {"endpoints": [...]}, {"tags": [...]} or {"model": "..."}."""
        return {self.kind: self.values[0] if self.kind == "model" else list(self.values)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Target:
        (kind, value), = data.items()
        if kind not in _ADMITS:
            raise ValueError(f"target: unknown kind '{kind}'")
        values = (value,) if isinstance(value, str) else tuple(value)
        return cls(kind=kind, values=values)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Route:
    """A route as routers see it; `allowed` None is open, ('*',) any registered agent."""

    name: str
    description: str
    intents: tuple[str, ...]
    target: Target
    allowed: tuple[str, ...] | None
    fallback: str | None

    @property
    def open(self) -> bool:
        """Anyone may use it, anonymous messages included."""
        return self.allowed is None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict, in the shape a routes file gives it."""
        allowed: list[str] | str | None = None
        if self.allowed is not None:
            allowed = ANY_REGISTERED if self.allowed == (ANY_REGISTERED,) else list(self.allowed)
        return {"name": self.name, "description": self.description,
                "intents": list(self.intents), "target": self.target.to_dict(),
                "allowed": allowed, "fallback": self.fallback}


def to_route(row: RouteRow) -> Route:
    """A database row as a Route."""
    return Route(name=row.name, description=row.description, intents=tuple(row.intents),
                 target=Target.from_dict(row.target),
                 allowed=tuple(row.allowed) if row.allowed is not None else None,
                 fallback=row.fallback)


def list_routes() -> list[Route]:
    """Every route, ordered by name."""
    with session_scope() as session:
        return [to_route(r) for r in session.scalars(select(RouteRow).order_by(RouteRow.name))]


def _not_found(name: str) -> NotFound:
    return NotFound(f"route '{name}' is not defined; `aimesh routes list` shows the routes",
                    kind="route", id=name)


def get_route(name: str) -> Route:
    """One route by name, or NotFound."""
    with session_scope() as session:
        row = session.get(RouteRow, name)
        if row is None:
            raise _not_found(name)
        return to_route(row)


def remove_route(name: str) -> None:
    """Remove a route; NotFound if it does not exist, InvalidInput if another route falls
    back to it (remove or change that one first)."""
    with session_scope() as session:
        row = session.get(RouteRow, name)
        if row is None:
            raise _not_found(name)
        dependents = list(session.scalars(select(RouteRow.name)
                                          .where(RouteRow.fallback == name)))
        if dependents:
            raise InvalidInput(
                f"route '{name}': {', '.join(sorted(dependents))} fall back to it; change "
                "their fallback first", field="fallback", value=name, errors=[])
        session.delete(row)
    bump_version()
