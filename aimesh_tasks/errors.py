"""One error tree for aimesh-tasks.

    AimeshError                     base: every error this package raises on purpose
    ├── ConfigError                 a setting is invalid or two settings clash (at start-up)
    ├── InvalidInput                bad input (endpoint spec, CLI argument); names the field
    │   └── InvalidMessage          a message failed validation; nothing was queued
    ├── NotFound                    an endpoint or agent id that the registry does not hold
    ├── NoEndpointAvailable         routing found no candidate; `excluded` says why for each
    ├── BudgetExceeded              the agent's budget cannot cover the call's worst case
    ├── Refused                     a policy on the message path said no (`policy`, `reason`)
    ├── DeadlineExceeded            the message's deadline passed before it was answered
    ├── ServiceUnavailable          Redis or Postgres stayed unreachable past the retries
    ├── UndeliverableMessage        a worker could not run a message; it is in the dead letters
    └── ProviderError               an upstream call failed (transport error or bad status)
        └── AllEndpointsFailed      every ranked endpoint was tried and failed

Each error has a message that names the field, the rule and the fix, plus structured
`fields` (`field`, `endpoint_id`, `retry_after_s`, ...). The exception's args are
`(message, fields)`, so an error raised in a worker crosses Celery's JSON result backend
and is raised again, whole, by the producer's `AsyncResult.get()`.
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


class AllEndpointsFailed(ProviderError):
    """Every ranked endpoint was tried; `attempts` lists each one's error."""

    code = "all_endpoints_failed"
