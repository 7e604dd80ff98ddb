"""The whole run's worst case, checked at submit against the agent's budget and the cap.

Each step's worst case is `budgets.estimate.worst_case` of its message at the most
expensive enabled endpoint that could serve it (model and capability hints applied;
health and load ignored, since they change before the step runs). A prompt that quotes a
dependency's answer is planned with that answer as `max_tokens ×
PLANNED_BYTES_PER_OUTPUT_TOKEN` bytes, since the estimator counts one token per byte.

The check refuses, before anything is queued, a run whose planned worst case exceeds
what the agent's budget has left (limit − spent − reserved) or the workflow's own cap.
It reserves nothing: each step reserves and settles its own call on the normal message
path when it runs, so concurrent messages can never overspend the budget, a step that
does not run holds nothing, and a redelivered step is charged once (its message id is
fixed). A run admitted here may still see a later step refused if other messages used
the budget meanwhile; that step then fails under the workflow's policy.
"""

from __future__ import annotations

from dataclasses import dataclass

from aimesh_tasks.budgets.admin import get_budget
from aimesh_tasks.budgets.estimate import Estimate, worst_case
from aimesh_tasks.errors import BudgetExceeded, NoEndpointAvailable, NotFound
from aimesh_tasks.messages import parse_message, utcnow
from aimesh_tasks.money import nusd_to_usd, usd_to_nusd
from aimesh_tasks.registry.endpoints import Endpoint
from aimesh_tasks.workflows.model import Step, Workflow
from aimesh_tasks.workflows.steps import step_message_dict
from aimesh_tasks.workflows.template import EXPRESSION, placeholder_size

PLANNED_BYTES_PER_OUTPUT_TOKEN = 8


@dataclass(frozen=True)
class Plan:
    """Each step's worst case and the run's total."""

    steps: dict[str, Estimate]

    @property
    def tokens(self) -> int:
        """Worst-case tokens of the whole run."""
        return sum(e.tokens for e in self.steps.values())

    @property
    def nusd(self) -> int:
        """Worst-case cost of the whole run, in nano-USD."""
        return sum(e.nusd for e in self.steps.values())


def _serves(endpoint: Endpoint, step: Step) -> bool:
    return endpoint.enabled and (step.model is None or step.model == endpoint.model) and (
        step.capability is None or step.capability in endpoint.tags)


def _planned_prompt(workflow: Workflow, step: Step) -> str:
    sizes = {s.id: s.max_tokens * PLANNED_BYTES_PER_OUTPUT_TOKEN for s in workflow.steps}
    fixed = EXPRESSION.sub("", step.prompt)
    return fixed + "x" * (placeholder_size(step.prompt, sizes) - len(fixed.encode("utf-8")))


def step_worst_case(workflow: Workflow, step: Step, endpoints: tuple[Endpoint, ...]
                    ) -> Estimate:
    """The step's worst case at the dearest endpoint that could serve it."""
    candidates = [e for e in endpoints if _serves(e, step)]
    if not candidates:
        raise NoEndpointAvailable(
            f"step '{step.id}': no enabled endpoint serves it (model {step.model or 'any'}, "
            f"capability {step.capability or 'any'}); add one with `aimesh endpoints add`",
            step_id=step.id, excluded={})
    probe = parse_message(step_message_dict(workflow.agent_id, step, "plan",
                                            _planned_prompt(workflow, step)))
    estimates = [worst_case(probe, e) for e in candidates]
    return Estimate(max(e.input_tokens for e in estimates),
                    max(e.output_tokens for e in estimates), max(e.nusd for e in estimates))


def plan_run(workflow: Workflow, endpoints: tuple[Endpoint, ...]) -> Plan:
    """The planned worst case of every step."""
    return Plan({s.id: step_worst_case(workflow, s, endpoints) for s in workflow.steps})


def _refusal(workflow: Workflow, plan: Plan, why: str, reason: str,
             left_tokens: int | None, left_nusd: int | None) -> BudgetExceeded:
    return BudgetExceeded(
        f"workflow '{workflow.name}' needs up to {plan.tokens} tokens / "
        f"${nusd_to_usd(plan.nusd)} in the worst case, {why}; raise it, or lower the "
        "steps' max_tokens", agent_id=workflow.agent_id, needed_tokens=plan.tokens,
        needed_usd=str(nusd_to_usd(plan.nusd)), left_tokens=left_tokens,
        left_usd=None if left_nusd is None else str(nusd_to_usd(max(left_nusd, 0))),
        reason=reason, steps={k: v.nusd for k, v in plan.steps.items()})


def check_plan(workflow: Workflow, plan: Plan) -> None:
    """BudgetExceeded if the planned worst case exceeds the workflow cap or the budget left."""
    cap_nusd = None if workflow.budget_usd is None else usd_to_nusd(workflow.budget_usd)
    if (cap_nusd is not None and plan.nusd > cap_nusd) or (
            workflow.budget_tokens is not None and plan.tokens > workflow.budget_tokens):
        raise _refusal(workflow, plan, "over the workflow's own budget_usd/budget_tokens cap",
                       "workflow_cap", workflow.budget_tokens, cap_nusd)
    try:
        budget = get_budget(workflow.agent_id)
    except NotFound:
        return  # the agent has no budget: its messages are not metered
    left_tokens = None if budget.token_limit is None else (
        budget.token_limit - budget.spent_tokens - budget.reserved_tokens)
    left_nusd = None if budget.usd_limit is None else (
        usd_to_nusd(budget.usd_limit) - usd_to_nusd(budget.spent_usd)
        - usd_to_nusd(budget.reserved_usd))
    if budget.expires_at is not None and budget.expires_at <= utcnow():
        raise _refusal(workflow, plan, "and the agent's budget has expired", "expired",
                       left_tokens, left_nusd)
    if (left_tokens is not None and plan.tokens > left_tokens) or (
            left_nusd is not None and plan.nusd > left_nusd):
        raise _refusal(workflow, plan, f"and agent '{workflow.agent_id}' has "
                       f"{left_tokens if left_tokens is not None else 'no limit of'} tokens / "
                       f"${'no limit' if left_nusd is None else nusd_to_usd(max(left_nusd, 0))}"
                       " left (`aimesh budgets set`)", "exhausted", left_tokens, left_nusd)
