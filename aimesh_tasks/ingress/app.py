"""The ingress's FastAPI app: routes, error handlers, body caps, metrics.

    aimesh ingress --host 0.0.0.0 --port 8080 --workers 2
    uvicorn aimesh_tasks.ingress.app:app --host 0.0.0.0 --port 8080 --workers 2

Importing this module builds the FastAPI app only; the Celery app and the result waiter
are built when the server starts (lifespan), one per process. The OpenAPI schema is at
/openapi.json.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from aimesh_tasks import __version__
from aimesh_tasks.errors import AimeshError
from aimesh_tasks.ingress import batch, batches, chat, errors, messages, metrics, status
from aimesh_tasks.ingress.limits import BodyLimit
from aimesh_tasks.settings import get_settings

FILES_PATH = "/v1/files"


def body_cap(path: str) -> int:
    """The body cap of a request path, in bytes."""
    settings = get_settings()
    if path.rstrip("/") == FILES_PATH:
        return settings.ingress_max_file_bytes
    return settings.ingress_max_body_bytes


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Build this process's Celery app, result waiter, stream reader and batch driver;
    stop them at the end."""
    from aimesh_tasks.app import app as celery_app
    from aimesh_tasks.ingress.batch_driver import BatchDriver
    from aimesh_tasks.ingress.service import Ingress
    from aimesh_tasks.results import ResultWaiter
    from aimesh_tasks.streams.reader import StreamReader

    waiter = ResultWaiter.for_app(celery_app, get_settings().ingress_result_poll_s)
    streams = StreamReader.for_settings()
    app.state.ingress = Ingress(waiter, streams)
    driver = BatchDriver(app.state.ingress)
    driver.start()
    try:
        yield
    finally:
        await driver.stop()
        await waiter.close()
        if streams is not None:
            await streams.close()


def create_app() -> FastAPI:
    """A new ingress app."""
    app = FastAPI(title="aimesh-tasks ingress", version=__version__, lifespan=lifespan,
                  description="An OpenAI-compatible HTTP door to the aimesh queue.")
    for module in (chat, messages, batch, batches, status, metrics):
        app.include_router(module.router)
    app.add_exception_handler(AimeshError, errors.on_aimesh_error)
    app.add_exception_handler(RequestValidationError, errors.on_validation_error)
    app.add_exception_handler(HTTPException, errors.on_http_error)
    app.add_exception_handler(Exception, errors.on_unexpected)
    app.add_middleware(BodyLimit, cap_for=body_cap)
    app.add_middleware(metrics.RequestMetrics)
    return app


app = create_app()
