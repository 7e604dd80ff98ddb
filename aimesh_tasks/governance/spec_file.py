"""A routes file (YAML or JSON): validated whole, then applied in one transaction.

    routes:
      - name: billing
        description: Invoices, refunds and payment questions
        intents: ["why was I charged twice", "I want a refund"]
        target: {tags: [billing]}          # or {endpoints: [id, ...]} or {model: name}
        allowed: [billing-bot, support-bot]  # or "*" (any registered agent); absent: open
        fallback: general                  # weak intent matches go here (optional)
    rate_limits:                           # per registered agent; null removes its limits
      billing-bot: {requests_per_minute: 60, tokens_per_minute: 40000}
      batch-bot: {requests_per_second: 2, on_excess: queue}   # over it: wait, not 429

Routes in the file are created or replaced; routes not in it are kept (`aimesh routes
remove` removes one). A file with any error is refused whole, naming the route and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from sqlalchemy import select

from aimesh_tasks.db import session_scope
from aimesh_tasks.db.models import RateLimitRow, RouteRow
from aimesh_tasks.errors import InvalidInput
from aimesh_tasks.governance.limits import LIMIT_NAMES, OnExcess, RateLimit, write_rate_limit
from aimesh_tasks.governance.routes import ANY_REGISTERED, Route, Target, list_routes
from aimesh_tasks.governance.version import bump_version
from aimesh_tasks.messages import AGENT_ID_PATTERN, utcnow

NAME_PATTERN = AGENT_ID_PATTERN.pattern
Name = Annotated[str, Field(pattern=NAME_PATTERN, max_length=64)]
Intent = Annotated[str, Field(min_length=1, max_length=512)]
Value = Annotated[str, Field(min_length=1, max_length=128)]


class TargetSpec(BaseModel):
    """Exactly one of: endpoint ids, tags (an endpoint needs all of them), a model name."""

    model_config = ConfigDict(extra="forbid")
    endpoints: list[Value] | None = Field(None, min_length=1, max_length=100)
    tags: list[Value] | None = Field(None, min_length=1, max_length=20)
    model: Value | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> TargetSpec:
        given = [k for k in ("endpoints", "tags", "model") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of 'endpoints', 'tags' or 'model'"
                             + (f" (got {', '.join(given)})" if given else ""))
        return self

    def to_target(self) -> Target:
        kind: Literal["endpoints", "tags", "model"] = (
            "endpoints" if self.endpoints is not None else "tags" if self.tags is not None
            else "model")
        value = getattr(self, kind)
        return Target(kind, (value,) if isinstance(value, str) else tuple(value))


class RouteSpec(BaseModel):
    """One route of a routes file."""

    model_config = ConfigDict(extra="forbid")
    name: Name
    description: str = Field("", max_length=512)
    intents: list[Intent] = Field(default_factory=list, max_length=200)
    target: TargetSpec
    allowed: list[Name] | Literal["*"] | None = None
    fallback: Name | None = None

    def to_route(self) -> Route:
        allowed = ((ANY_REGISTERED,) if self.allowed == ANY_REGISTERED
                   else tuple(self.allowed) if self.allowed is not None else None)
        return Route(self.name, self.description, tuple(self.intents),
                     self.target.to_target(), allowed, self.fallback)


class LimitSpec(BaseModel):
    """One agent's rate limits, and what a message over them gets."""

    model_config = ConfigDict(extra="forbid")
    requests_per_second: int | None = Field(None, ge=1)
    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1)
    requests_per_day: int | None = Field(None, ge=1)
    tokens_per_day: int | None = Field(None, ge=1)
    on_excess: OnExcess = "refuse"

    @model_validator(mode="after")
    def _one_at_least(self) -> LimitSpec:
        if all(getattr(self, n) is None for n in LIMIT_NAMES):
            raise ValueError(f"give at least one of {', '.join(LIMIT_NAMES)} (or null to "
                             "remove the agent's limits)")
        return self


@dataclass(frozen=True)
class GovernanceSpec:
    """A validated routes file: routes to create or replace, limits to set or remove."""

    routes: list[Route] = field(default_factory=list)
    limits: list[RateLimit] = field(default_factory=list)
    remove_limits: list[str] = field(default_factory=list)


def _invalid(where: str, exc: ValidationError) -> InvalidInput:
    errors = []
    for e in exc.errors():
        loc = ".".join(str(p) for p in e["loc"])
        errors.append({"field": f"{where}.{loc}" if loc else where,
                       "reason": str(e["msg"]).removeprefix("Value error, ")})
    first = errors[0]
    return InvalidInput(f"{first['field']}: {first['reason']}", field=first["field"],
                        errors=errors)


def _route_label(index: int, item: Any) -> str:
    name = item.get("name") if isinstance(item, dict) else None
    return f"routes.{name}" if isinstance(name, str) and name else f"routes[{index}]"


def _parse_routes(items: Any) -> list[Route]:
    if not isinstance(items, list):
        raise InvalidInput("routes: expected a list of routes", field="routes", errors=[])
    routes: list[Route] = []
    for index, item in enumerate(items):
        try:
            routes.append(RouteSpec.model_validate(item).to_route())
        except ValidationError as exc:
            raise _invalid(_route_label(index, item), exc) from None
    return routes


def _parse_limits(items: Any) -> tuple[list[RateLimit], list[str]]:
    if not isinstance(items, dict):
        raise InvalidInput("rate_limits: expected a mapping of agent id to limits",
                           field="rate_limits", errors=[])
    limits, removed = [], []
    for agent_id, item in items.items():
        if not isinstance(agent_id, str) or not AGENT_ID_PATTERN.match(agent_id):
            raise InvalidInput(f"rate_limits.{agent_id}: not an agent id (lowercase kebab or "
                               "snake case)", field=f"rate_limits.{agent_id}", errors=[])
        if item is None:
            removed.append(agent_id)
            continue
        try:
            limits.append(RateLimit(agent_id, **LimitSpec.model_validate(item).model_dump()))
        except ValidationError as exc:
            raise _invalid(f"rate_limits.{agent_id}", exc) from None
    return limits, removed


def _check_fallbacks(routes: list[Route], known: set[str]) -> None:
    names = [r.name for r in routes]
    twice = sorted(n for n in set(names) if names.count(n) > 1)
    if twice:
        raise InvalidInput(f"routes.{twice[0]}: the name is given twice",
                           field=f"routes.{twice[0]}", errors=[])
    for route in routes:
        where = f"routes.{route.name}.fallback"
        if route.fallback == route.name:
            raise InvalidInput(f"{where}: a route cannot fall back to itself", field=where,
                               errors=[])
        if route.fallback is not None and route.fallback not in known | set(names):
            raise InvalidInput(f"{where}: route '{route.fallback}' is neither in this file nor "
                               "defined", field=where, errors=[])


def parse_spec(data: Any, known_routes: set[str] | None = None) -> GovernanceSpec:
    """Validate a routes file's content whole; InvalidInput names the route and field.
    `known_routes` are the routes already defined (fallbacks may name them)."""
    if isinstance(data, list):
        data = {"routes": data}
    if not isinstance(data, dict):
        raise InvalidInput("routes file: expected a mapping with 'routes' and/or "
                           "'rate_limits'", field="file", errors=[])
    unknown = set(data) - {"routes", "rate_limits"}
    if unknown:
        raise InvalidInput(f"{sorted(unknown)[0]}: unknown section; a routes file has "
                           "'routes' and 'rate_limits'", field=sorted(unknown)[0], errors=[])
    routes = _parse_routes(data.get("routes") or [])
    _check_fallbacks(routes, known_routes or set())
    limits, removed = _parse_limits(data.get("rate_limits") or {})
    return GovernanceSpec(routes, limits, removed)


def read_file(path: str | Path) -> Any:
    """The content of a .yaml/.yml or .json file (YAML read with safe_load)."""
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidInput(f"{source}: cannot read the routes file ({exc.strerror})",
                           field="file", errors=[]) from None
    as_json = source.suffix == ".json"
    try:
        return json.loads(text) if as_json else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise InvalidInput(f"{source}: not valid {'JSON' if as_json else 'YAML'} "
                           f"({str(exc).splitlines()[0]})", field="file", errors=[]) from None


def _row(route: Route) -> RouteRow:
    data = route.to_dict()
    allowed = data["allowed"]
    return RouteRow(name=route.name, description=route.description,
                    intents=list(route.intents), target=data["target"],
                    allowed=[allowed] if allowed == ANY_REGISTERED else allowed,
                    fallback=route.fallback, updated_at=utcnow())


def apply_spec(data: Any) -> GovernanceSpec:
    """Validate and apply a routes file's content in one transaction (nothing is applied
    if any part is invalid, an agent of `rate_limits` unregistered included)."""
    spec = parse_spec(data, {r.name for r in list_routes()})
    with session_scope() as session:
        for route in spec.routes:
            session.merge(_row(route))
        for limit in spec.limits:
            write_rate_limit(session, limit)
        for agent_id in spec.remove_limits:
            for row in session.scalars(select(RateLimitRow)
                                       .where(RateLimitRow.agent_id == agent_id)):
                session.delete(row)
    bump_version()
    return spec


def apply_file(path: str | Path) -> GovernanceSpec:
    """Validate and apply a routes file (.yaml, .yml or .json)."""
    return apply_spec(read_file(path))
