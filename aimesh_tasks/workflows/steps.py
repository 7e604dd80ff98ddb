"""A step's message (pure): the rendered prompt plus the step's hints, sent as the run's agent.

Message ids are `<run id>.<step id>`: a step task that runs twice (a redelivery) sends the
same message, so its budget reservation and charge are found again, never doubled. A step
fed a dependency's answer names that step's message as its parent ('aimesh.parent_id'),
so the loop cap counts its hops as for any agent fed another's output.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aimesh_tasks.messages import PARENT_KEY, AiMessage, parse_message
from aimesh_tasks.workflows.model import Step
from aimesh_tasks.workflows.template import render

RUN_KEY = "workflow_run"  # metadata: the run a step's message belongs to
STEP_KEY = "workflow_step"


def message_id(run_id: str, step_id: str) -> str:
    """The id of the message a step sends."""
    return f"{run_id}.{step_id}"


def run_of(message: AiMessage) -> str | None:
    """The run whose step sent `message`, or None for any other message."""
    run_id = message.metadata.get(RUN_KEY)
    if not isinstance(run_id, str) or not message.id.startswith(f"{run_id}."):
        return None
    return run_id


def step_message_dict(agent_id: str, step: Step, run_id: str, prompt: str,
                      fed_from: str | None = None) -> dict[str, Any]:
    """The message fields of a step whose prompt is already rendered (`fed_from`: the
    step whose answer it quotes at the end of the longest chain, see dag.feeders)."""
    chat = [{"role": "system", "content": step.system}] if step.system else []
    chat.append({"role": "user", "content": prompt})
    fields: dict[str, Any] = {
        "id": message_id(run_id, step.id),
        "agent_id": agent_id,
        "messages": chat,
        "max_tokens": step.max_tokens,
        "no_cache": step.no_cache,
        "metadata": {RUN_KEY: run_id, STEP_KEY: step.id},
    }
    if fed_from is not None:
        fields["metadata"][PARENT_KEY] = message_id(run_id, fed_from)
    for hint in ("model", "capability", "temperature"):
        if getattr(step, hint) is not None:
            fields[hint] = getattr(step, hint)
    return fields


def step_message(agent_id: str, step: Step, run_id: str, outputs: Mapping[str, str],
                 fed_from: str | None = None) -> AiMessage:
    """The validated message of a step sent as `agent_id`, its prompt rendered from its
    dependencies' outputs (InvalidMessage names the field, e.g. a rendered prompt over
    the payload cap)."""
    prompt = render(step.prompt, outputs)
    return parse_message(step_message_dict(agent_id, step, run_id, prompt, fed_from))
