"""Graph rules of a workflow (pure): what is refused at submit, and the topological levels.

Refused, each with an InvalidInput naming the step and the fix:
- no steps at all, or more than AIMESH_WORKFLOW_MAX_STEPS;
- two steps with one id;
- a `depends_on` naming a step the workflow does not have;
- a prompt template that is malformed, or quotes a step that is not a dependency;
- a cycle, named in full: `a -> b -> c -> a`.

`levels()` orders the steps into topological levels: a step's level is one more than the
highest level among its dependencies (shown with each step; steps do not wait for their
level, see `workflows/state.py`). `dependents()` inverts `depends_on`.

`feeders()` names, for each step whose prompt quotes a dependency's answer, the quoted
dependency at the end of the longest such chain: the step's message names that step's
message as its parent, so its hop count (loop caps, governance/loop_cap.py) is one more
than the longest chain of answers fed into it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from aimesh_tasks.errors import InvalidInput
from aimesh_tasks.workflows.model import Step, Workflow
from aimesh_tasks.workflows.template import TemplateError, references


def _refuse(field: str, reason: str, **fields: object) -> InvalidInput:
    return InvalidInput(f"{field}: {reason}", field=field, errors=[], **fields)


def _check_size(steps: Sequence[Step], max_steps: int) -> None:
    if not steps:
        raise _refuse("steps", "a workflow needs at least one step")
    if len(steps) > max_steps:
        raise _refuse("steps", f"{len(steps)} steps is more than the {max_steps} allowed "
                      "(AIMESH_WORKFLOW_MAX_STEPS); split the workflow or raise the setting")


def _check_ids(steps: Sequence[Step]) -> None:
    seen: set[str] = set()
    for step in steps:
        if step.id in seen:
            raise _refuse(f"steps.{step.id}", f"two steps have the id '{step.id}'; "
                          "give each step its own id", step_id=step.id)
        seen.add(step.id)


def _check_dependencies(steps: Sequence[Step]) -> None:
    known = {step.id for step in steps}
    for step in steps:
        for dep in step.depends_on:
            if dep not in known:
                raise _refuse(f"steps.{step.id}.depends_on",
                              f"'{dep}' is not a step of this workflow (steps: "
                              f"{', '.join(sorted(known))})", step_id=step.id)


def _check_templates(steps: Sequence[Step]) -> None:
    for step in steps:
        try:
            quoted = references(step.prompt)
        except TemplateError as exc:
            raise _refuse(f"steps.{step.id}.prompt", str(exc), step_id=step.id) from None
        for ref in quoted:
            if ref not in step.depends_on:
                raise _refuse(f"steps.{step.id}.prompt",
                              f"quotes steps.{ref}.text but '{ref}' is not in its depends_on;"
                              f" add '{ref}' to depends_on", step_id=step.id)


def find_cycle(graph: Mapping[str, Sequence[str]]) -> list[str] | None:
    """One cycle of `graph` (node -> the nodes it depends on) as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished
    for root in graph:
        if state.get(root):
            continue
        path: list[str] = [root]
        stack = [iter(graph[root])]
        state[root] = 1
        while stack:
            node = next(stack[-1], None)
            if node is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(node) == 1:
                return [*path[path.index(node):], node]
            elif not state.get(node):
                state[node] = 1
                path.append(node)
                stack.append(iter(graph[node]))
    return None


def levels(steps: Sequence[Step]) -> list[list[str]]:
    """Step ids by topological level (a valid, acyclic workflow), in definition order."""
    level: dict[str, int] = {}
    waiting = {step.id: set(step.depends_on) for step in steps}
    while len(level) < len(steps):
        ready = [s for s, deps in waiting.items() if s not in level and deps <= level.keys()]
        for step_id in ready:
            level[step_id] = 1 + max((level[d] for d in waiting[step_id]), default=-1)
    grouped: list[list[str]] = [[] for _ in range(max(level.values()) + 1)]
    for step in steps:
        grouped[level[step.id]].append(step.id)
    return grouped


def feeders(steps: Sequence[Step], order: Sequence[Sequence[str]]) -> dict[str, str | None]:
    """For each step (of a valid workflow, `order` its levels), the quoted dependency at
    the end of the longest chain of quoted answers that reaches it (ties: the first
    quoted), or None when its prompt quotes no answer."""
    by_id = {step.id: step for step in steps}
    depth: dict[str, int] = {}
    fed_from: dict[str, str | None] = {}
    for level in order:
        for step_id in level:
            quoted = references(by_id[step_id].prompt)
            deepest = max(quoted, key=lambda ref: depth[ref], default=None)
            fed_from[step_id] = deepest
            depth[step_id] = 0 if deepest is None else depth[deepest] + 1
    return fed_from


def dependents(steps: Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
    """Step id -> the ids of the steps that depend on it, in definition order; `steps` are
    definition dicts (`Workflow.to_json_dict()["steps"]`), as a run stores them."""
    found: dict[str, list[str]] = {str(step["id"]): [] for step in steps}
    for step in steps:
        for dep in step.get("depends_on") or ():
            found[dep].append(str(step["id"]))
    return found


def validate_workflow(workflow: Workflow, max_steps: int) -> list[list[str]]:
    """Check every graph rule; the topological levels of a valid workflow."""
    steps = workflow.steps
    _check_size(steps, max_steps)
    _check_ids(steps)
    _check_dependencies(steps)
    _check_templates(steps)
    cycle = find_cycle({step.id: step.depends_on for step in steps})
    if cycle is not None:
        raise _refuse(f"steps.{cycle[0]}.depends_on",
                      f"the steps form a cycle: {' -> '.join(cycle)}; remove one of these "
                      "dependencies", step_id=cycle[0], cycle=cycle)
    return levels(steps)
