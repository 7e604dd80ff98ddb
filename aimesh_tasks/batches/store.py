"""Files, batches and batch lines in the database (the OpenAI Files and Batch APIs).

A batch's lines are written when it is created (state `pending`); the process driving it
moves each to `queued` with its message id, then to `completed` or `failed` with its
response; at the end the output and error files are written and the batch is
`completed` (or `cancelled`). A line's message id is `<batch id>-<line no>`, so a driver
that died between queueing a line and recording it queues the same message again, which
the message path answers once (one call, one charge per message id).

Every read takes the agents the caller may act for: another agent's file or batch is
NotFound, exactly like one that does not exist.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import func, select, update

from aimesh_tasks.batches.input import CHAT_URL, parse_input
from aimesh_tasks.db import session_scope
from aimesh_tasks.db.models import IngressBatchLineRow, IngressBatchRow, IngressFileRow
from aimesh_tasks.errors import InvalidInput, NotFound

PURPOSES = ("batch", "batch_output")
ACTIVE = ("in_progress", "cancelling")
COMPLETION_WINDOW = "24h"


def _now() -> datetime:
    return datetime.now(UTC)


def _epoch(value: datetime | None) -> int | None:
    return int(value.timestamp()) if value is not None else None


@dataclass(frozen=True, slots=True)
class FileInfo:
    """A stored file, without its content."""

    id: str
    agent_id: str
    purpose: str
    filename: str
    bytes: int
    created_at: datetime

    def to_openai(self) -> dict[str, Any]:
        """OpenAI's file object."""
        return {"id": self.id, "object": "file", "bytes": self.bytes,
                "created_at": _epoch(self.created_at), "filename": self.filename,
                "purpose": self.purpose, "status": "processed", "status_details": None}


def _file(row: IngressFileRow) -> FileInfo:
    return FileInfo(id=row.id, agent_id=row.agent_id, purpose=row.purpose,
                    filename=row.filename, bytes=row.bytes, created_at=row.created_at)


def add_file(agent_id: str, purpose: str, filename: str, content: bytes) -> FileInfo:
    """Store an upload; InvalidInput for an unknown purpose or a file that is not UTF-8."""
    if purpose != "batch":
        raise InvalidInput(f"purpose: '{purpose[:32]}' is not supported; give 'batch'",
                           field="purpose", errors=[])
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput("file: not UTF-8 text (a batch file is JSONL)", field="file",
                           errors=[]) from None
    return _store_file(agent_id, purpose, filename, text, len(content))


def _store_file(agent_id: str, purpose: str, filename: str, text: str, size: int) -> FileInfo:
    row = IngressFileRow(id=f"file-{uuid.uuid4().hex}", agent_id=agent_id, purpose=purpose,
                         filename=filename[:256] or "upload.jsonl", bytes=size, content=text,
                         created_at=_now())
    with session_scope() as session:
        session.add(row)
        return _file(row)


def _visible_file(session: Any, file_id: str, agents: Iterable[str]) -> IngressFileRow:
    row = session.get(IngressFileRow, file_id)
    if row is None or row.agent_id not in set(agents):
        raise NotFound(f"file '{file_id[:64]}' not found", kind="file", id=file_id[:64])
    assert isinstance(row, IngressFileRow)
    return row


def get_file(file_id: str, agents: Iterable[str]) -> FileInfo:
    """A file of one of `agents`, or NotFound."""
    with session_scope() as session:
        return _file(_visible_file(session, file_id, agents))


def file_content(file_id: str, agents: Iterable[str]) -> str:
    """The text of a file of one of `agents`, or NotFound."""
    with session_scope() as session:
        return _visible_file(session, file_id, agents).content


@dataclass(frozen=True, slots=True)
class BatchInfo:
    """A batch and its request counts."""

    row: dict[str, Any]
    total: int
    completed: int
    failed: int

    @property
    def id(self) -> str:
        return str(self.row["id"])

    @property
    def status(self) -> str:
        return str(self.row["status"])

    def to_openai(self) -> dict[str, Any]:
        """OpenAI's batch object."""
        r = self.row
        created = r["created_at"]
        return {
            "id": r["id"], "object": "batch", "endpoint": r["endpoint"], "errors": None,
            "input_file_id": r["input_file_id"], "completion_window": r["completion_window"],
            "status": r["status"], "output_file_id": r["output_file_id"],
            "error_file_id": r["error_file_id"], "created_at": _epoch(created),
            "in_progress_at": _epoch(r["in_progress_at"]),
            "expires_at": _epoch(created + timedelta(hours=24)),
            "finalizing_at": _epoch(r["finalizing_at"]),
            "completed_at": _epoch(r["completed_at"]), "failed_at": None, "expired_at": None,
            "cancelling_at": _epoch(r["cancelling_at"]),
            "cancelled_at": _epoch(r["cancelled_at"]),
            "request_counts": {"total": self.total, "completed": self.completed,
                               "failed": self.failed},
            "metadata": r["batch_metadata"] or None,
        }


COLUMNS = ("id", "agent_id", "input_file_id", "endpoint", "completion_window", "status",
           "output_file_id", "error_file_id", "total", "batch_metadata", "created_at",
           "in_progress_at", "finalizing_at", "completed_at", "cancelling_at", "cancelled_at")


def _batch(session: Any, row: IngressBatchRow) -> BatchInfo:
    counts = dict(session.execute(
        select(IngressBatchLineRow.state, func.count()).where(
            IngressBatchLineRow.batch_id == row.id).group_by(IngressBatchLineRow.state)).all())
    return BatchInfo(row={c: getattr(row, c) for c in COLUMNS}, total=row.total,
                     completed=int(counts.get("completed", 0)),
                     failed=int(counts.get("failed", 0)))


def create_batch(agent_id: str, agents: Iterable[str], input_file_id: str, endpoint: str,
                 completion_window: str, metadata: dict[str, str] | None,
                 api_key: str | None = None) -> BatchInfo:
    """A batch over an uploaded file, its lines stored `pending`; InvalidInput names a bad
    field or the first bad line of the file. `api_key` is the prefix of the key that
    created it: its lines count against that key's rate limits."""
    if endpoint != CHAT_URL:
        raise InvalidInput(f"endpoint: only {CHAT_URL} is supported", field="endpoint",
                           errors=[])
    if completion_window != COMPLETION_WINDOW:
        raise InvalidInput(f"completion_window: only '{COMPLETION_WINDOW}' is supported",
                           field="completion_window", errors=[])
    with session_scope() as session:
        source = _visible_file(session, input_file_id, agents)
        lines = parse_input(source.content, endpoint)
        now = _now()
        row = IngressBatchRow(
            id=f"batch_{uuid.uuid4().hex}", agent_id=agent_id, input_file_id=input_file_id,
            endpoint=endpoint, completion_window=completion_window, status="in_progress",
            total=len(lines), batch_metadata=dict(metadata or {}), api_key=api_key,
            created_at=now, in_progress_at=now)
        session.add(row)
        session.flush()
        session.add_all(IngressBatchLineRow(batch_id=row.id, line_no=n, custom_id=line.custom_id,
                                            body=line.body, state="pending")
                        for n, line in enumerate(lines))
        session.flush()
        return _batch(session, row)


def _visible_batch(session: Any, batch_id: str, agents: Iterable[str]) -> IngressBatchRow:
    row = session.get(IngressBatchRow, batch_id)
    if row is None or row.agent_id not in set(agents):
        raise NotFound(f"batch '{batch_id[:64]}' not found", kind="batch", id=batch_id[:64])
    assert isinstance(row, IngressBatchRow)
    return row


def get_batch(batch_id: str, agents: Iterable[str]) -> BatchInfo:
    """A batch of one of `agents`, with its counts, or NotFound."""
    with session_scope() as session:
        return _batch(session, _visible_batch(session, batch_id, agents))


def cancel_batch(batch_id: str, agents: Iterable[str]) -> BatchInfo:
    """Ask a batch to stop: lines not yet queued are cancelled, queued ones finish."""
    with session_scope() as session:
        row = _visible_batch(session, batch_id, agents)
        if row.status == "in_progress":
            row.status, row.cancelling_at = "cancelling", _now()
        return _batch(session, row)


def list_batches(agents: Iterable[str], limit: int = 20) -> list[BatchInfo]:
    """The newest batches of `agents`."""
    with session_scope() as session:
        rows = session.scalars(select(IngressBatchRow).where(
            IngressBatchRow.agent_id.in_(list(agents))).order_by(
            IngressBatchRow.created_at.desc()).limit(limit)).all()
        return [_batch(session, row) for row in rows]


class ActiveBatch(NamedTuple):
    """A batch still to drive: its id, agent, status and the key that created it."""

    id: str
    agent_id: str
    status: str
    api_key: str | None


def active_batches() -> list[ActiveBatch]:
    """Every batch still to drive."""
    with session_scope() as session:
        return [ActiveBatch(r.id, r.agent_id, r.status, r.api_key) for r in session.scalars(
            select(IngressBatchRow).where(IngressBatchRow.status.in_(ACTIVE)))]


def lines_in(batch_id: str, state: str, limit: int) -> list[IngressBatchLineRow]:
    """Up to `limit` lines of a batch in `state`, in line order (detached rows)."""
    with session_scope() as session:
        return list(session.scalars(select(IngressBatchLineRow).where(
            IngressBatchLineRow.batch_id == batch_id, IngressBatchLineRow.state == state)
            .order_by(IngressBatchLineRow.line_no).limit(limit)))


def message_id_of(batch_id: str, line_no: int) -> str:
    """The message id of a batch line (the same on every try)."""
    return f"{batch_id}-{line_no}"


def record_lines(batch_id: str, outcomes: list[tuple[int, str, int | None,
                                                     dict[str, Any] | None]]) -> None:
    """Set (line, state, status code, response) of some lines."""
    with session_scope() as session:
        for line_no, state, status_code, response in outcomes:
            session.execute(update(IngressBatchLineRow).where(
                IngressBatchLineRow.batch_id == batch_id,
                IngressBatchLineRow.line_no == line_no).values(
                state=state, status_code=status_code, response=response,
                message_id=message_id_of(batch_id, line_no)))


def cancel_pending(batch_id: str) -> None:
    """Cancel the lines of a batch that were not queued yet."""
    with session_scope() as session:
        session.execute(update(IngressBatchLineRow).where(
            IngressBatchLineRow.batch_id == batch_id,
            IngressBatchLineRow.state == "pending").values(state="cancelled"))


def _output_line(line: IngressBatchLineRow) -> str:
    return json.dumps({"id": f"batch_req_{line.batch_id}_{line.line_no}",
                       "custom_id": line.custom_id,
                       "response": {"status_code": line.status_code,
                                    "request_id": line.message_id, "body": line.response},
                       "error": None}, separators=(",", ":"))


def finalize(batch_id: str) -> None:
    """Write the output and error files of a batch whose lines are all done (else do
    nothing); the batch is then `completed` (or `cancelled`, when it was being cancelled)."""
    with session_scope() as session:
        row = session.get(IngressBatchRow, batch_id, with_for_update=True)
        if row is None or row.status not in ACTIVE:
            return
        open_lines = session.scalar(select(func.count()).where(
            IngressBatchLineRow.batch_id == batch_id,
            IngressBatchLineRow.state.in_(("pending", "queued"))))
        if open_lines:
            return
        lines = session.scalars(select(IngressBatchLineRow).where(
            IngressBatchLineRow.batch_id == batch_id).order_by(IngressBatchLineRow.line_no)).all()
        now = _now()
        row.finalizing_at = now
        for state, column in (("completed", "output_file_id"), ("failed", "error_file_id")):
            chosen = [_output_line(line) for line in lines if line.state == state]
            if chosen:
                text = "\n".join(chosen) + "\n"
                stored = IngressFileRow(id=f"file-{uuid.uuid4().hex}", agent_id=row.agent_id,
                                        purpose="batch_output",
                                        filename=f"{batch_id}_{column[:-8]}.jsonl",
                                        bytes=len(text.encode()), content=text, created_at=now)
                session.add(stored)
                setattr(row, column, stored.id)
        if row.status == "cancelling":
            row.status, row.cancelled_at = "cancelled", now
        else:
            row.status, row.completed_at = "completed", now
