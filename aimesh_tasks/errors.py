"""One error tree for aimesh-tasks.

    AimeshError                     base: every error this package raises on purpose
    ├── ConfigError                 a setting is invalid or two settings clash (at start-up)
    ├── InvalidInput                bad input (endpoint spec, CLI argument); names the field
    │   └── InvalidMessage          a message failed validation; nothing was queued
    ├── NotFound                    an endpoint or agent id that the registry does not hold
    ├── NoEndpointAvailable         routing found no candidate; `excluded` says why for each
    ├── BudgetExceeded              the agent's budget cannot cover the call's worst case
    ├── Refused                     a policy on the message path said no (`policy`, `reason`)
    │   ├── Unauthorized            a restricted route, and the agent is not registered (401)
    │   ├── Forbidden               the agent may not use the route (403)
    │   ├── Ambiguous               two routes match the intent too closely to choose (409)
    │   ├── NoRouteMatches          no route fits the message and none falls back (404)
    │   ├── RateLimited             the agent is over a rate limit; `retry_after_s` (429)
    │   ├── LoopCapExceeded         an agent-to-agent chain passed its hop cap (403)
    │   ├── WorkflowCancelled       a step of a run that fail_fast cancelled (409)
    │   └── CallNotNeeded           a raced message's call is not made: another call of the
    │                               race answered, or the hedge was not fired (never seen by
    │                               a producer: the call's task ends quietly)
    ├── DeadlineExceeded            the message's deadline passed before it was answered
    ├── ServiceUnavailable          Redis or Postgres stayed unreachable past the retries
    ├── UndeliverableMessage        a worker could not run a message; it is in the dead letters
    └── ProviderError               an upstream call failed (transport error or bad status)
        └── AllEndpointsFailed      every ranked endpoint was tried and failed

Each error has a message that names the field, the rule and the fix, plus structured
`fields` (`field`, `endpoint_id`, `retry_after_s`, ...). The governance refusals carry
the HTTP status the ingress answers with as the class attribute `http_status`. The
exception's args are `(message, fields)`, so an error raised in a worker crosses Celery's
JSON result backend and is raised again, whole, by the producer's `AsyncResult.get()`.
"""

from __future__ import annotations

from typing import Any


class AimeshError(Exception):
    """Base class of every error aimesh-tasks raises on purpose."""

    code: str = "aimesh_error"

    def __init__(self, message: str, fields: dict[str, Any] | None = None, /, **kw: Any) -> None:
        merged = {**(fields or {}), **kw}
        super().__init__(message, merged)
        self.message = message
        self.fields = merged

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict[str, Any]:
        """The JSON-safe form: code, message and the structured fields."""
        return {"code": self.code, "message": self.message, **self.fields}


class ConfigError(AimeshError):
    """A setting is invalid, or two settings clash; `setting` names the variable."""

    code = "config_error"


class InvalidInput(AimeshError):
    """Bad input; `field` names the first bad field, `errors` lists them all."""

    code = "invalid_input"

    @property
    def field(self) -> str:
        return str(self.fields.get("field", ""))


class InvalidMessage(InvalidInput):
    """A message failed validation; nothing was queued."""

    code = "invalid_message"


class NotFound(AimeshError):
    """An id (`kind`, `id`) that the registry does not hold."""

    code = "not_found"


class NoEndpointAvailable(AimeshError):
    """Routing found no candidate; `excluded` maps each endpoint id to why it was left out."""

    code = "no_endpoint_available"

    @property
    def excluded(self) -> dict[str, str]:
        return dict(self.fields.get("excluded", {}))


class BudgetExceeded(AimeshError):
    """The agent's budget cannot cover a call's worst case; no upstream call was made.

    Fields: agent_id, needed_tokens, needed_usd, left_tokens, left_usd (None = no limit),
    reason ('exhausted' or 'expired').
    """

    code = "budget_exceeded"

    @property
    def agent_id(self) -> str:
        return str(self.fields.get("agent_id", ""))

    @property
    def needed(self) -> int:
        """Tokens the call's worst case needs."""
        return int(self.fields.get("needed_tokens") or 0)

    @property
    def left(self) -> int | None:
        """Tokens left in the budget (None: no token limit)."""
        left = self.fields.get("left_tokens")
        return None if left is None else int(left)

    @property
    def needed_usd(self) -> str | None:
        return self.fields.get("needed_usd")

    @property
    def left_usd(self) -> str | None:
        return self.fields.get("left_usd")


class Refused(AimeshError):
    """A policy on the message path refused the message before budget and dispatch;
    `policy` names it, `reason` says why."""

    code = "refused"

    @property
    def policy(self) -> str:
        return str(self.fields.get("policy", ""))


class DeadlineExceeded(AimeshError):
    """The message's deadline (`deadline`, ISO 8601) passed before it was answered,
    while it waited in a queue or followed an identical message in flight."""

    code = "deadline_exceeded"


class ServiceUnavailable(AimeshError):
    """Redis or Postgres (`service`) stayed unreachable through every retry of a task;
    nothing the message bought was lost (its answer is journalled)."""

    code = "service_unavailable"


class UndeliverableMessage(AimeshError):
    """A worker could not run a message (bad envelope or arguments, unknown task, or a task
    that killed its worker on every delivery) and moved it to the dead letters of `queue`.

    Fields: queue, reason, dead_letter_id, task_id, detail (`aimesh dead show <id>`).
    """

    code = "undeliverable_message"

    @property
    def queue(self) -> str:
        return str(self.fields.get("queue", ""))

    @property
    def reason(self) -> str:
        return str(self.fields.get("reason", ""))

    @property
    def dead_letter_id(self) -> str:
        return str(self.fields.get("dead_letter_id", ""))


class ProviderError(AimeshError):
    """An upstream call failed; `retryable` says whether another endpoint may succeed."""

    code = "provider_error"

    @property
    def retryable(self) -> bool:
        return bool(self.fields.get("retryable", True))

    @property
    def status(self) -> int | None:
        status = self.fields.get("status")
        return int(status) if status is not None else None

    @property
    def retry_after_s(self) -> float | None:
        value = self.fields.get("retry_after_s")
        return float(value) if value is not None else None

    @property
    def action(self) -> str:
        """'retry' (same endpoint), 'fallback' (next endpoint) or 'fail' (neither)."""
        return str(self.fields.get("action") or ("fallback" if self.retryable else "fail"))

    @property
    def endpoint_id(self) -> str | None:
        return self.fields.get("endpoint_id")

    @property
    def endpoint_fault(self) -> bool:
        """The failure counts against the endpoint's health: it is not the message's own
        fault ('fail'), or it was made the message's last after the endpoint broke (a
        stream cut once it had begun: `endpoint_fault` set)."""
        return bool(self.fields.get("endpoint_fault", self.action != "fail"))


class AllEndpointsFailed(ProviderError):
    """Every ranked endpoint was tried; `attempts` lists each one's error."""

    code = "all_endpoints_failed"


class Unauthorized(Refused):
    """The route is restricted and the agent (`agent_id`) is not a registered one, or the
    message is anonymous; `route` names it, `rule` says which check fired."""

    code = "unauthorized"
    http_status = 401

    @property
    def route(self) -> str:
        return str(self.fields.get("route", ""))

    @property
    def rule(self) -> str:
        return str(self.fields.get("rule", ""))


class Forbidden(Refused):
    """The agent (`agent_id`) may not use the route (`route`); `rule` says which check fired
    (e.g. 'not_listed', 'agent_disabled')."""

    code = "forbidden"
    http_status = 403

    @property
    def route(self) -> str:
        return str(self.fields.get("route", ""))

    @property
    def rule(self) -> str:
        return str(self.fields.get("rule", ""))


class Ambiguous(Refused):
    """The message's intent sits between two routes: `routes` names the top two and
    `scores` their similarities, closer than AIMESH_INTENT_AMBIGUITY_THRESHOLD."""

    code = "ambiguous_route"
    http_status = 409

    @property
    def routes(self) -> list[str]:
        return [str(r) for r in self.fields.get("routes", [])]

    @property
    def scores(self) -> dict[str, float]:
        return {str(k): float(v) for k, v in dict(self.fields.get("scores", {})).items()}


class NoRouteMatches(Refused):
    """Routes are defined and none fits the message (`scores` by route), or it names a
    route that does not exist (`route`)."""

    code = "no_route_matches"
    http_status = 404

    @property
    def scores(self) -> dict[str, float]:
        return {str(k): float(v) for k, v in dict(self.fields.get("scores", {})).items()}


class RateLimited(Refused):
    """The agent (`agent_id`) is over `limit` (e.g. 'requests_per_minute' = `limit_value`);
    `retry_after_s` says when the next message fits (None: this one never fits, its
    token estimate alone is over the limit)."""

    code = "rate_limited"
    http_status = 429

    @property
    def agent_id(self) -> str:
        return str(self.fields.get("agent_id", ""))

    @property
    def limit(self) -> str:
        return str(self.fields.get("limit", ""))

    @property
    def retry_after_s(self) -> float | None:
        value = self.fields.get("retry_after_s")
        return float(value) if value is not None else None


class LoopCapExceeded(Refused):
    """A message fed from another agent's output is `hops` hops from its origin, past
    AIMESH_MAX_HOPS (`max_hops`); it is refused and dead-lettered (`dead_letter_id`)."""

    code = "loop_cap_exceeded"
    http_status = 403

    @property
    def hops(self) -> int:
        return int(self.fields.get("hops") or 0)

    @property
    def max_hops(self) -> int:
        return int(self.fields.get("max_hops") or 0)


def _subclasses(cls: type[AimeshError]) -> list[type[AimeshError]]:
    return [cls, *(sub for child in cls.__subclasses__() for sub in _subclasses(child))]


def error_from_dict(data: dict[str, Any]) -> AimeshError:
    """The error that `AimeshError.to_dict()` gave `data`, rebuilt by its `code` (a plain
    AimeshError for a code this release does not know)."""
    fields = dict(data)
    code, message = fields.pop("code", None), str(fields.pop("message", ""))
    cls = next((c for c in _subclasses(AimeshError) if c.code == code), AimeshError)
    return cls(message, fields)


class WorkflowCancelled(Refused):
    """A workflow step's message reached routing after its run (`run_id`) was cancelled:
    another step failed and the run's policy is fail_fast. The step is then skipped."""

    code = "workflow_cancelled"
    http_status = 409

    @property
    def run_id(self) -> str:
        return str(self.fields.get("run_id", ""))


class CallNotNeeded(Refused):
    """A call of a raced message (resilience/hedging.py) is not made: another call of the
    race answered first, or a hedge was not fired (its budget, its reservation or the
    deadline said no); `reason` says which. The call's task ends without a result of its
    own: the race's answer is the message's."""

    code = "call_not_needed"
    http_status = 409
