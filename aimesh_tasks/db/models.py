"""Typed SQLAlchemy models. Money is integer nano-USD (see aimesh_tasks.money)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

JsonType = JSON().with_variant(JSONB(), "postgresql")
# Python None is SQL NULL, not the JSON `null` (a column whose IS NULL means "none kept").
NullableJsonType = JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")


class Base(DeclarativeBase):
    """Declarative base of every aimesh table."""


class EndpointRow(Base):
    """A model endpoint: where to call, what it costs, how much it takes at once."""

    __tablename__ = "endpoints"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    provider: Mapped[str] = mapped_column(String(32))
    base_url: Mapped[str] = mapped_column(String(512))
    model: Mapped[str] = mapped_column(String(128))
    api_key_env: Mapped[str | None] = mapped_column(String(128))
    # A path on the endpoint's workers (migration 0005_endpoint_keys); never the key.
    api_key_file: Mapped[str | None] = mapped_column(String(1024))
    input_nusd_per_1k: Mapped[int] = mapped_column(BigInteger)
    output_nusd_per_1k: Mapped[int] = mapped_column(BigInteger)
    capacity: Mapped[int] = mapped_column(Integer)
    max_output_tokens: Mapped[int | None] = mapped_column(Integer)
    tags: Mapped[list[str]] = mapped_column(JsonType, default=list)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    # 'operator' (aimesh endpoints add) or 'announced' (a worker's --serve; migration 0013)
    origin: Mapped[str] = mapped_column(String(16), default="operator",
                                        server_default="operator")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )


class AgentRow(Base):
    """A registered agent."""

    __tablename__ = "agents"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    description: Mapped[str] = mapped_column(String(512), default="")
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class RoutingDecisionRow(Base):
    """One routing decision: every candidate's normalised components and score, the winner."""

    __tablename__ = "routing_decisions"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    row_key: Mapped[str] = mapped_column(String(32), unique=True)
    message_id: Mapped[str] = mapped_column(String(128), index=True)
    agent_id: Mapped[str] = mapped_column(String(64), index=True)
    winner: Mapped[str | None] = mapped_column(String(64))
    fallbacks: Mapped[list[str]] = mapped_column(JsonType, default=list)
    candidates: Mapped[list[dict[str, Any]]] = mapped_column(JsonType, default=list)
    excluded: Mapped[dict[str, str]] = mapped_column(JsonType, default=dict)
    weights: Mapped[dict[str, float]] = mapped_column(JsonType, default=dict)
    error: Mapped[str | None] = mapped_column(String(512))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class CallAttemptRow(Base):
    """One upstream call made for a message (a fallback is another row)."""

    __tablename__ = "call_attempts"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    row_key: Mapped[str] = mapped_column(String(32), unique=True)
    message_id: Mapped[str] = mapped_column(String(128), index=True)
    agent_id: Mapped[str] = mapped_column(String(64), index=True)
    endpoint_id: Mapped[str] = mapped_column(String(64), index=True)
    ok: Mapped[bool] = mapped_column(Boolean)
    status: Mapped[int | None] = mapped_column(Integer)
    latency_ms: Mapped[float] = mapped_column(Float)
    input_tokens: Mapped[int] = mapped_column(Integer, default=0)
    output_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cost_nusd: Mapped[int] = mapped_column(BigInteger, default=0)
    error: Mapped[str | None] = mapped_column(String(512))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class BudgetRow(Base):
    """An agent's budget: optional token and money limits over a period, and its counters."""

    __tablename__ = "budgets"

    agent_id: Mapped[str] = mapped_column(String(64), ForeignKey("agents.id"), primary_key=True)
    token_limit: Mapped[int | None] = mapped_column(BigInteger)
    usd_limit_nusd: Mapped[int | None] = mapped_column(BigInteger)
    period: Mapped[str] = mapped_column(String(16))
    rolling_s: Mapped[int | None] = mapped_column(Integer)
    period_start: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    spent_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    spent_nusd: Mapped[int] = mapped_column(BigInteger, default=0)
    reserved_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    reserved_nusd: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ReservationRow(Base):
    """The worst-case cost held for one upstream call until it is settled or released."""

    __tablename__ = "budget_reservations"
    # Few indexes, and none on called_at, so that a claim is a HOT update (migration
    # 0014_budget_indexes, which also keeps room on each page for it): the reaper's
    # open reservations by age, a message's reservations, and (0016) closed ones by the
    # time they closed, which the workers delete after the journal's retention.
    __table_args__ = (
        Index("ix_budget_reservations_open", "created_at",
              postgresql_where=text("state = 'reserved'"),
              sqlite_where=text("state = 'reserved'")),
        Index("ix_budget_reservations_closed", "closed_at",
              postgresql_where=text("state <> 'reserved'"),
              sqlite_where=text("state <> 'reserved'")),
    )

    call_key: Mapped[str] = mapped_column(String(160), primary_key=True)
    agent_id: Mapped[str] = mapped_column(String(64))
    message_id: Mapped[str] = mapped_column(String(128), index=True)
    endpoint_id: Mapped[str] = mapped_column(String(64))
    tokens: Mapped[int] = mapped_column(BigInteger)
    nusd: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    called_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    closed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The settled call's journal entry (migration 0008_durable_answers): its answer or
    # failure, so a Redis that lost its journal does not make the call again
    # (aimesh_tasks/pipeline/durable.py). Cleared by the reaper a day after settling.
    journal_entry: Mapped[dict[str, Any] | None] = mapped_column(NullableJsonType)


class LedgerRow(Base):
    """One charge: exactly one row per upstream call (unique call_key)."""

    __tablename__ = "budget_ledger"
    __table_args__ = (Index("ix_budget_ledger_agent_created", "agent_id", "created_at"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    call_key: Mapped[str] = mapped_column(String(160), unique=True)
    agent_id: Mapped[str] = mapped_column(String(64))
    message_id: Mapped[str] = mapped_column(String(128), index=True)
    endpoint_id: Mapped[str] = mapped_column(String(64))
    tokens: Mapped[int] = mapped_column(BigInteger)
    nusd: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class BudgetResetRow(Base):
    """A period reset: what had been spent when the period rolled over."""

    __tablename__ = "budget_resets"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    agent_id: Mapped[str] = mapped_column(String(64), index=True)
    period_start: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    new_period_start: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    spent_tokens: Mapped[int] = mapped_column(BigInteger)
    spent_nusd: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class AuditRow(Base):
    """One decision about a message: rejected, denied, routed, completed, failed, ..."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    row_key: Mapped[str] = mapped_column(String(32), unique=True)
    event: Mapped[str] = mapped_column(String(24), index=True)
    agent_id: Mapped[str] = mapped_column(String(64), index=True)
    message_id: Mapped[str] = mapped_column(String(128), index=True)
    endpoint_id: Mapped[str | None] = mapped_column(String(64))
    tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cost_nusd: Mapped[int] = mapped_column(BigInteger, default=0)
    reason: Mapped[str | None] = mapped_column(String(512))
    detail: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class WorkflowRunRow(Base):
    """One run of a workflow: its definition, status, planned worst case and result."""

    __tablename__ = "workflow_runs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    agent_id: Mapped[str] = mapped_column(String(64), index=True)
    policy: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), index=True)
    definition: Mapped[dict[str, Any]] = mapped_column(JsonType)
    result: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    planned_tokens: Mapped[int] = mapped_column(BigInteger)
    planned_nusd: Mapped[int] = mapped_column(BigInteger)
    # Steps not yet done, failed or skipped: the run ends when it reaches 0.
    steps_left: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class WorkflowStepRow(Base):
    """One step of a run: pending, running, done, failed or skipped; its call and output."""

    __tablename__ = "workflow_steps"

    run_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("workflow_runs.id", ondelete="CASCADE"), primary_key=True)
    step_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    position: Mapped[int] = mapped_column(Integer)
    level: Mapped[int] = mapped_column(Integer)
    message_id: Mapped[str] = mapped_column(String(128), index=True)
    status: Mapped[str] = mapped_column(String(16))
    depends_on: Mapped[list[str]] = mapped_column(JsonType, default=list)
    # Dependencies not yet done: the step starts when it reaches 0.
    waiting_on: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    endpoint_id: Mapped[str | None] = mapped_column(String(64))
    input_tokens: Mapped[int] = mapped_column(Integer, default=0)
    output_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cost_nusd: Mapped[int] = mapped_column(BigInteger, default=0)
    cached: Mapped[bool] = mapped_column(Boolean, default=False)
    output: Mapped[str | None] = mapped_column(Text)
    error: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class RateLimitColumns:
    """The counts of a rate limit (None: no limit of that kind) and what a message over
    it gets ('refuse' or 'queue'): on an agent's row and on an API key's
    (governance/limits.py)."""

    requests_per_second: Mapped[int | None] = mapped_column(BigInteger)
    requests_per_minute: Mapped[int | None] = mapped_column(BigInteger)
    tokens_per_minute: Mapped[int | None] = mapped_column(BigInteger)
    requests_per_day: Mapped[int | None] = mapped_column(BigInteger)
    tokens_per_day: Mapped[int | None] = mapped_column(BigInteger)
    on_excess: Mapped[str] = mapped_column(String(8), default="refuse")


class IngressKeyRow(RateLimitColumns, Base):
    """An ingress API key: only its SHA-256 is kept, found by its public prefix; its own
    rate limits (beside its agent's) are its RateLimitColumns."""

    __tablename__ = "ingress_keys"

    prefix: Mapped[str] = mapped_column(String(32), primary_key=True)
    key_sha256: Mapped[str] = mapped_column(String(64))
    agent_id: Mapped[str] = mapped_column(String(64), index=True)
    # Other agents the key may act for, chosen per request with X-Source-Agent.
    acts_for: Mapped[list[str]] = mapped_column(JsonType, default=list)
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    note: Mapped[str] = mapped_column(String(256), default="")
    # Answer this key's chat requests 202 + Location, as if each said Prefer: respond-async.
    respond_async: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class RouteRow(Base):
    """A named route: example intents, the endpoints it targets (`target`: endpoint ids,
    tags or a model), who may use it (`allowed`: agent ids, ['*'] = any registered agent,
    None = open) and the route a weak intent match falls back to."""

    __tablename__ = "routes"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    description: Mapped[str] = mapped_column(String(512), default="")
    intents: Mapped[list[str]] = mapped_column(JsonType, default=list)
    target: Mapped[dict[str, Any]] = mapped_column(JsonType)
    allowed: Mapped[list[str] | None] = mapped_column(JsonType)
    fallback: Mapped[str | None] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class RateLimitRow(RateLimitColumns, Base):
    """An agent's rate limits (its RateLimitColumns)."""

    __tablename__ = "rate_limits"

    agent_id: Mapped[str] = mapped_column(String(64), ForeignKey("agents.id"), primary_key=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class AcceptedMessageRow(Base):
    """A message a producer's `submit()` accepted, until it reaches a terminal state: the
    durable record the reconciler re-publishes from when the broker lost the message
    (aimesh_tasks/delivery/accepted.py). `message` is kept only while it may be needed."""

    __tablename__ = "accepted_messages"

    message_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    agent_id: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))  # accepted, seen, finished
    message: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    republished: Mapped[int] = mapped_column(Integer, default=0)
    accepted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # When the state last changed or the message was last re-published.
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class IngressFileRow(Base):
    """A file uploaded to the ingress (OpenAI Files API): a batch's input, or its output."""

    __tablename__ = "ingress_files"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    agent_id: Mapped[str] = mapped_column(String(64), index=True)
    purpose: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str] = mapped_column(String(256))
    bytes: Mapped[int] = mapped_column(BigInteger)
    content: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class IngressBatchRow(Base):
    """A batch (OpenAI Batch API) run on the queue; its lines are IngressBatchLineRow."""

    __tablename__ = "ingress_batches"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    agent_id: Mapped[str] = mapped_column(String(64), index=True)
    input_file_id: Mapped[str] = mapped_column(String(64))
    endpoint: Mapped[str] = mapped_column(String(64))
    completion_window: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), index=True)
    output_file_id: Mapped[str | None] = mapped_column(String(64))
    error_file_id: Mapped[str | None] = mapped_column(String(64))
    total: Mapped[int] = mapped_column(Integer)
    batch_metadata: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    # The API key that created it (its lines count against that key's rate limits).
    api_key: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    in_progress_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finalizing_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancelling_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancelled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class IngressBatchLineRow(Base):
    """One request of a batch: pending → queued (message id) → completed/failed/cancelled."""

    __tablename__ = "ingress_batch_lines"

    batch_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("ingress_batches.id", ondelete="CASCADE"), primary_key=True)
    line_no: Mapped[int] = mapped_column(Integer, primary_key=True)
    custom_id: Mapped[str] = mapped_column(String(512))
    body: Mapped[dict[str, Any]] = mapped_column(JsonType)
    state: Mapped[str] = mapped_column(String(16), index=True)
    message_id: Mapped[str | None] = mapped_column(String(128))
    status_code: Mapped[int | None] = mapped_column(Integer)
    response: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
