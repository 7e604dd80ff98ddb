"""Bounded request bodies: refused with 413 before they are read whole or parsed.

A `Content-Length` over the cap is answered at once, without reading a byte of the body;
a chunked body is counted as it arrives and cut off as soon as it passes the cap. Uploads
to /v1/files have their own, larger cap. Headers are bounded by uvicorn itself
(h11's 64 KiB default for the request head).
"""

from __future__ import annotations

import json
from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from aimesh_tasks.ingress.errors import error_body


class BodyTooLarge(HTTPException):
    """Raised inside the app by the counting receive: the body passed the cap (an
    HTTPException, so that FastAPI's body reading lets it through as a 413)."""

    def __init__(self, cap: int) -> None:
        super().__init__(413, _too_large(cap))


def _too_large(cap: int) -> str:
    return (f"request body is over the {cap}-byte cap (AIMESH_INGRESS_MAX_BODY_BYTES or, for "
            "/v1/files, AIMESH_INGRESS_MAX_FILE_BYTES)")


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _refuse(send: Send, cap: int) -> None:
    body = json.dumps(error_body(_too_large(cap), 413, code="body_too_large")).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """ASGI middleware capping request bodies; `cap_for(path)` gives the cap in bytes."""

    def __init__(self, app: ASGIApp, cap_for: Callable[[str], int]) -> None:
        self.app = app
        self.cap_for = cap_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cap = self.cap_for(scope.get("path", ""))
        declared = _declared_length(scope)
        if declared is not None and declared > cap:
            await _refuse(send, cap)
            return
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > cap:
                    raise BodyTooLarge(cap)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await _refuse(send, cap)
