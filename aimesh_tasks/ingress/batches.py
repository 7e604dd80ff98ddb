"""The OpenAI Files and Batch APIs, run on our own queue.

    POST /v1/files                (multipart: file, purpose=batch)
    GET  /v1/files/{id}           GET /v1/files/{id}/content (input, output, error files)
    POST /v1/batches              GET /v1/batches, GET /v1/batches/{id}
    POST /v1/batches/{id}/cancel

Files, batches and every line are stored in the database (aimesh_tasks/batches/store.py)
and driven by the ingress processes (batch_driver.py); each line goes through routing,
budgets, dedup and audit like any message. Uploads are capped by
AIMESH_INGRESS_MAX_FILE_BYTES before they are read.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.responses import Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from aimesh_tasks.batches import store
from aimesh_tasks.ingress.auth import CallerDep

router = APIRouter(tags=["openai"])


@router.post("/v1/files")
async def upload_file(who: CallerDep, file: Annotated[UploadFile, File()],
                      purpose: Annotated[str, Form()]) -> dict[str, Any]:
    """Upload a batch input file (JSONL)."""
    content = await file.read()
    stored = await run_in_threadpool(store.add_file, who.agent_id, purpose,
                                     file.filename or "upload.jsonl", content)
    return stored.to_openai()


@router.get("/v1/files/{file_id}")
async def get_file(file_id: str, who: CallerDep) -> dict[str, Any]:
    """A file's record."""
    return (await run_in_threadpool(store.get_file, file_id, who.key.agents)).to_openai()


@router.get("/v1/files/{file_id}/content", response_class=Response)
async def file_content(file_id: str, who: CallerDep) -> Response:
    """A file's content (a batch's output and error files are JSONL)."""
    text = await run_in_threadpool(store.file_content, file_id, who.key.agents)
    return Response(text.encode(), media_type="application/jsonl")


class BatchCreate(BaseModel):
    """The body of POST /v1/batches."""

    input_file_id: str = Field(min_length=1, max_length=64)
    endpoint: str = Field(max_length=64)
    completion_window: str = Field(max_length=16)
    metadata: dict[str, str] | None = Field(None, max_length=16)


@router.post("/v1/batches")
async def create_batch(body: BatchCreate, who: CallerDep) -> dict[str, Any]:
    """Queue every request of an uploaded file."""
    created = await run_in_threadpool(
        store.create_batch, who.agent_id, who.key.agents, body.input_file_id, body.endpoint,
        body.completion_window, body.metadata, who.api_key)
    return created.to_openai()


@router.get("/v1/batches")
async def list_batches(who: CallerDep) -> dict[str, Any]:
    """The newest batches of the agents this key acts for."""
    batches = await run_in_threadpool(store.list_batches, who.key.agents)
    data = [b.to_openai() for b in batches]
    return {"object": "list", "data": data, "has_more": False,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}


@router.get("/v1/batches/{batch_id}")
async def get_batch(batch_id: str, who: CallerDep) -> dict[str, Any]:
    """A batch, with its request counts as they progress."""
    return (await run_in_threadpool(store.get_batch, batch_id, who.key.agents)).to_openai()


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str, who: CallerDep) -> dict[str, Any]:
    """Stop a batch: requests not queued yet are cancelled, queued ones finish."""
    return (await run_in_threadpool(store.cancel_batch, batch_id, who.key.agents)).to_openai()
