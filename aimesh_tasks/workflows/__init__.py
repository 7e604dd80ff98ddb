"""Scatter-gather workflows: DAGs of agent steps, each started as soon as its own
dependencies are done.

    from aimesh_tasks import Step, Workflow, submit_workflow
    run_id, result = submit_workflow(Workflow(agent_id="planner", steps=[...]))
    result.get(timeout=60)  # {"status", "outputs", "failures", "skipped", "cost_usd", ...}

Modules: `model` (definitions, YAML/JSON), `template` and `dag` (pure rules), `steps`
(a step's message), `budget` (the run's worst case), `state` (runs and steps in the
database, and the rule that starts each step: why it is not chords), `view` (a run as
JSON), `cancellation` (fail_fast refuses queued steps), `run` (`submit_workflow`); the
record task that ends a step and sends what follows is `aimesh_tasks/tasks/workflow.py`.
"""

from typing import TYPE_CHECKING, Any

from aimesh_tasks.workflows.model import Step, Workflow, load_workflow, parse_workflow

if TYPE_CHECKING:
    from aimesh_tasks.workflows.run import Submitted, submit_workflow
    from aimesh_tasks.workflows.view import run_view

# Running a workflow needs the Celery app; importing the package does not build it.
_LAZY = {"Submitted": "aimesh_tasks.workflows.run", "submit_workflow": "aimesh_tasks.workflows.run",
         "run_view": "aimesh_tasks.workflows.view"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'aimesh_tasks.workflows' has no attribute '{name}'")


__all__ = ["Step", "Submitted", "Workflow", "load_workflow", "parse_workflow", "run_view",
           "submit_workflow"]
