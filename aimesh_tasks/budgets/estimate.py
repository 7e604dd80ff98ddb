"""The worst case a call may cost, reserved before it is made (pure)."""

from __future__ import annotations

from dataclasses import dataclass

from aimesh_tasks.estimation import estimate_input_tokens
from aimesh_tasks.messages import AiMessage
from aimesh_tasks.money import call_cost_nusd
from aimesh_tasks.registry.endpoints import Endpoint


@dataclass(frozen=True, slots=True)
class Estimate:
    """Upper bounds of one call: tokens (input + output) and cost in nano-USD."""

    input_tokens: int
    output_tokens: int
    nusd: int

    @property
    def tokens(self) -> int:
        """Input plus output tokens."""
        return self.input_tokens + self.output_tokens


def worst_case(message: AiMessage, endpoint: Endpoint) -> Estimate:
    """Input by the byte-bound estimator (never undercounts, see aimesh_tasks.estimation),
    output by max_tokens clamped to the endpoint's output cap, priced at its prices."""
    input_tokens = max(message.token_estimate or 0, estimate_input_tokens(message.chat()))
    output_tokens = message.max_tokens
    if endpoint.max_output_tokens is not None:
        output_tokens = min(output_tokens, endpoint.max_output_tokens)
    nusd = call_cost_nusd(
        input_tokens, output_tokens, endpoint.input_nusd_per_1k, endpoint.output_nusd_per_1k
    )
    return Estimate(input_tokens, output_tokens, nusd)
