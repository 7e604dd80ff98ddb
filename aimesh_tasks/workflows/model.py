"""Workflow and Step: the definition of a DAG of agent steps, from Python, YAML or JSON.

    Workflow(name="brief", agent_id="planner", policy="continue", steps=[
        Step(id="facts", prompt="List the facts about X"),
        Step(id="summary", prompt="Summarise: {{ steps.facts.text }}", depends_on=["facts"]),
    ])

| field (Workflow) | meaning                                                          |
|------------------|------------------------------------------------------------------|
| name             | a label for people (runs are told apart by their run id)         |
| agent_id         | the agent every step's message is sent as (its budget pays)      |
| steps            | the steps; order does not matter, `depends_on` does              |
| policy           | `fail_fast` (default) or `continue` when a step fails            |
| budget_usd       | optional cap: the run's planned worst case must fit in it        |
| budget_tokens    | optional cap in tokens (input + output, all steps)               |

| field (Step)     | meaning                                                          |
|------------------|------------------------------------------------------------------|
| id               | unique in the workflow: letters, digits, '-' and '_'             |
| prompt           | the user prompt; may quote `{{ steps.<dep>.text }}` of a dependency |
| system           | optional system prompt (not templated)                           |
| depends_on       | ids of the steps that must finish first                          |
| model/capability | routing hints, as on any message                                 |
| max_tokens       | most output tokens of this step's answer                         |
| no_cache         | do not answer this step from the cache                           |

Shape rules (types, ranges) are checked here; graph rules (cycles, unknown ids) in
`aimesh_tasks.workflows.dag`. Every failure is an InvalidInput naming the field.
"""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from aimesh_tasks.errors import InvalidInput
from aimesh_tasks.messages import AGENT_ID_PATTERN

STEP_ID_PATTERN = r"^[A-Za-z][A-Za-z0-9_-]{0,63}$"
Policy = Literal["fail_fast", "continue"]


class Step(BaseModel):
    """One step: a message sent once the steps it depends on have finished."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=STEP_ID_PATTERN)
    prompt: str = Field(min_length=1)
    system: str | None = Field(None, min_length=1)
    depends_on: list[str] = Field(default_factory=list)
    model: str | None = Field(None, min_length=1, max_length=128)
    capability: str | None = Field(None, min_length=1, max_length=64)
    max_tokens: int = Field(256, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    no_cache: bool = False


class Workflow(BaseModel):
    """A DAG of steps sent as one agent, with a failure policy and an optional cap."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("workflow", min_length=1, max_length=128)
    agent_id: str = Field(max_length=64)
    steps: list[Step]
    policy: Policy = "fail_fast"
    budget_usd: Decimal | None = Field(None, ge=0)
    budget_tokens: int | None = Field(None, ge=0)

    @field_validator("agent_id")
    @classmethod
    def _agent_id_case(cls, value: str) -> str:
        if not AGENT_ID_PATTERN.match(value):
            raise ValueError(f"'{value}' is not lowercase kebab or snake case (e.g. 'planner')")
        return value

    def step(self, step_id: str) -> Step:
        """The step with this id (KeyError if none)."""
        for step in self.steps:
            if step.id == step_id:
                return step
        raise KeyError(step_id)

    def to_json_dict(self) -> dict[str, Any]:
        """The JSON-safe definition (money as a decimal string)."""
        return self.model_dump(mode="json", exclude_none=True)


def _field_name(loc: tuple[int | str, ...]) -> str:
    name = ""
    for part in loc:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or "workflow"


def parse_workflow(data: Workflow | dict[str, Any]) -> Workflow:
    """A Workflow from a dict, or InvalidInput naming the first bad field."""
    if isinstance(data, Workflow):
        return data
    if not isinstance(data, dict):
        raise InvalidInput(f"workflow: expected an object, got {type(data).__name__}",
                           field="workflow", errors=[])
    try:
        return Workflow.model_validate(data)
    except ValidationError as exc:
        errors = [{"field": _field_name(e["loc"]), "reason": e["msg"].removeprefix(
            "Value error, ")} for e in exc.errors()]
        first = errors[0]
        raise InvalidInput(f"{first['field']}: {first['reason']}", field=first["field"],
                           errors=errors) from None


def load_workflow(path: str | Path) -> Workflow:
    """Read a workflow from a .yaml/.yml or .json file (YAML is read with safe_load)."""
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidInput(f"{source}: cannot read the workflow file ({exc.strerror})",
                           field="file", errors=[]) from None
    try:
        data = json.loads(text) if source.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise InvalidInput(f"{source}: not valid {'JSON' if source.suffix == '.json' else 'YAML'}"
                           f" ({_syntax_error(exc)})", field="file", errors=[]) from None
    return parse_workflow(data)


def _syntax_error(exc: Exception) -> str:
    """Where a YAML/JSON file is broken: line, column and the parser's complaint."""
    if isinstance(exc, json.JSONDecodeError):
        return f"line {exc.lineno}, column {exc.colno}: {exc.msg}"
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    if mark is None:
        return str(problem)
    context, started = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    where = (f" started at line {started.line + 1}, column {started.column + 1}"
             if started is not None else "")
    return (f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
            + (f" ({context}{where})" if context else ""))
