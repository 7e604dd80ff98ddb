"""Every error the ingress answers, in OpenAI's shape, with the status SDKs map.

    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}

An error class that declares `http_status` (the governance errors: Unauthorized 401,
Forbidden 403, Ambiguous 409, RateLimited 429) is answered with it; the others by the
first class of their MRO in `STATUS`. The OpenAI SDKs raise by status: 400
BadRequestError, 401 AuthenticationError, 403 PermissionDeniedError, 404 NotFoundError,
409 ConflictError, 413/415 APIStatusError, 429 RateLimitError, 5xx InternalServerError.
An exhausted budget is a 429 with code `budget_exceeded` (type `insufficient_quota`, as
OpenAI's own exhausted quota), distinct from a rate limit (`rate_limit_exceeded`).
"""

from __future__ import annotations

import json
import math
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from aimesh_tasks.errors import (
    AimeshError,
    AllEndpointsFailed,
    BudgetExceeded,
    ConfigError,
    DeadlineExceeded,
    InvalidInput,
    NoEndpointAvailable,
    NotFound,
    ProviderError,
    Refused,
    ServiceUnavailable,
    UndeliverableMessage,
)
from aimesh_tasks.outages import TRANSIENT, service_of

OUTAGE_RETRY_AFTER_S = 2
STATUS: dict[type[AimeshError], int] = {
    InvalidInput: 400,
    NotFound: 404,
    Refused: 403,
    BudgetExceeded: 429,
    DeadlineExceeded: 504,
    NoEndpointAvailable: 503,
    ServiceUnavailable: 503,
    AllEndpointsFailed: 502,
    ProviderError: 502,
    UndeliverableMessage: 502,
    ConfigError: 500,
}
TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error",
         415: "invalid_request_error", 429: "rate_limit_error"}
CODES = {BudgetExceeded: "budget_exceeded", NotFound: "not_found",
         DeadlineExceeded: "deadline_exceeded"}


def status_of(error: AimeshError) -> int:
    """The HTTP status of an aimesh error: its class's `http_status`, else by its MRO."""
    declared = getattr(type(error), "http_status", None)
    if isinstance(declared, int):
        return declared
    for cls in type(error).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def error_body(message: str, status: int, *, code: str | None = None,
               param: str | None = None, kind: str | None = None) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind or TYPES.get(status, "server_error"),
                      "param": param, "code": code}}


def error_response(message: str, status: int, *, code: str | None = None,
                   param: str | None = None, kind: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """An OpenAI-shaped error response."""
    return JSONResponse(error_body(message, status, code=code, param=param, kind=kind),
                        status_code=status, headers=headers)


def _retry_after(error: AimeshError) -> dict[str, str]:
    value = error.fields.get("retry_after_s")
    try:
        seconds = float(value) if value is not None else None
    except (TypeError, ValueError):
        seconds = None
    return {"Retry-After": str(max(1, math.ceil(seconds)))} if seconds is not None else {}


def aimesh_error_response(error: AimeshError) -> JSONResponse:
    """The response for an aimesh error (its fields stay on the server, but for `field`)."""
    status = status_of(error)
    code = next((c for cls, c in CODES.items() if isinstance(error, cls)), error.code)
    kind = "insufficient_quota" if isinstance(error, BudgetExceeded) else None
    param = error.fields.get("field") or None
    headers = _retry_after(error) if status in (429, 503) else {}
    return error_response(error.message, status, code=code, param=param, kind=kind,
                          headers=headers)


def outage_response(exc: BaseException) -> JSONResponse:
    """503 with Retry-After for a server the cluster needs being away (one of TRANSIENT)."""
    return error_response(
        f"{service_of(exc)} is unreachable right now ({type(exc).__name__}); nothing was "
        "accepted, send the request again shortly", 503, kind="server_error",
        code="service_unavailable", headers={"Retry-After": str(OUTAGE_RETRY_AFTER_S)})


def failure_response(error: BaseException) -> JSONResponse:
    """The response for the error a message ended with (raised in a worker), or a request
    could not be accepted with (a server away: 503)."""
    if isinstance(error, AimeshError):
        return aimesh_error_response(error)
    if isinstance(error, TRANSIENT):
        return outage_response(error)
    return error_response(f"the message failed in a worker ({type(error).__name__})", 502,
                          code="worker_error", kind="server_error")


def failure_body(error: BaseException) -> dict[str, Any]:
    """The OpenAI error object of `failure_response` (sent inside a stream that has
    begun, where the status can no longer say it)."""
    body: dict[str, Any] = json.loads(bytes(failure_response(error).body))
    return body


def _field(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "header", "path")]
    return ".".join(parts) or "body"


async def on_aimesh_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AimeshError)
    return aimesh_error_response(exc)


async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    """A body or parameter FastAPI could not read: 415 for a body that is not JSON,
    else 400 naming the first bad field and the rule."""
    assert isinstance(exc, RequestValidationError)
    content_type = request.headers.get("content-type", "")
    if request.method == "POST" and content_type and "json" not in content_type:
        return error_response(f"Content-Type '{content_type[:64]}' is not supported; send "
                              "'application/json'", 415, code="unsupported_media_type")
    errors: list[dict[str, Any]] = [dict(e) for e in exc.errors()]
    first: dict[str, Any] = errors[0] if errors else {"loc": ("body",), "msg": "invalid"}
    field = _field(first.get("loc", ()))
    reason = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    if first.get("type") == "json_invalid":
        reason = f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'bad JSON')})"
        field = "body"
    return error_response(f"{field}: {reason}", 400, param=field, code="invalid_request")


async def on_http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else "request refused"
    if exc.status_code == 404:
        detail = "no such route; see /openapi.json for the ones this ingress serves"
    code = {413: "body_too_large", 405: "method_not_allowed", 404: "unknown_route"}.get(
        exc.status_code)
    return error_response(detail, exc.status_code, code=code, headers=dict(exc.headers or {}))


async def on_unexpected(_: Request, exc: Exception) -> JSONResponse:
    """A server the cluster needs being away (Postgres refusing connections, Redis or the
    broker unreachable) is a 503 with Retry-After, which the SDKs retry on their own, naming
    the server; anything else is a 500 in OpenAI's shape, naming only the exception's class."""
    if isinstance(exc, TRANSIENT):
        return outage_response(exc)
    return error_response(f"internal error ({type(exc).__name__})", 500, kind="server_error",
                          code="internal_error")
