"""One error tree for aimesh-tasks.

    AimeshError                     base: every error this package raises on purpose
    ├── ConfigError                 a setting is invalid or two settings clash (at start-up)
    ├── InvalidInput                bad input (endpoint spec, CLI argument); names the field
    │   └── InvalidMessage          a message failed validation; nothing was queued
    ├── NotFound                    an endpoint or agent id that the registry does not hold
    ├── NoEndpointAvailable         routing found no candidate; `excluded` says why for each
    ├── BudgetExceeded              the agent's budget cannot cover the call's worst case
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


class AllEndpointsFailed(ProviderError):
    """Every ranked endpoint was tried; `attempts` lists each one's error."""

    code = "all_endpoints_failed"
