"""Reserve, claim, settle, release: every upstream call charged exactly once.

Postgres is the truth. Every step is one transaction holding the budget row's lock, so
concurrent reservations can never together exceed a limit, and each is idempotent by
`call_key` (message id + attempt), so a redelivered task finds its reservation or
settlement and neither reserves nor charges again. On Postgres, reserve, claim and
settle go through pg_batch (many operations of one process in one transaction, in
arrival order); what it hands back, and everything on SQLite, takes the general path
here (`SELECT ... FOR UPDATE`, one operation per transaction).

A reservation's life: reserved → (claimed: called_at set just before the upstream call)
→ settled (ledger row with the provider's usage) or released (no call was made) →
deleted once no delivery of its call can come any more (`forget_closed`); from then on
the ledger row alone says the call key was charged, and reserve and claim find it there.
Lock order is reservation, then budget, everywhere, so transactions never deadlock.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal, get_args

from sqlalchemy import delete, func, literal_column, select
from sqlalchemy.orm import Session

from aimesh_tasks import events
from aimesh_tasks.budgets import pg_batch
from aimesh_tasks.budgets.estimate import Estimate
from aimesh_tasks.budgets.periods import current_period_start
from aimesh_tasks.budgets.pg_batch import Standing
from aimesh_tasks.db import BudgetResetRow, BudgetRow, LedgerRow, ReservationRow, session_scope
from aimesh_tasks.errors import BudgetExceeded
from aimesh_tasks.governance.audit import audit
from aimesh_tasks.messages import utcnow
from aimesh_tasks.money import nusd_to_usd

ClaimState = Literal["claimed", "called_before", "settled", "released", "missing"]
_CLAIM_STATES: dict[str, ClaimState] = {state: state for state in get_args(ClaimState)}


@dataclass(frozen=True, slots=True)
class Held:
    """A reservation as the caller needs it."""

    call_key: str
    tokens: int
    nusd: int
    state: str


def _left(limit: int | None, spent: int, reserved: int) -> int | None:
    return None if limit is None else limit - spent - reserved


def roll_period(session: Session, budget: BudgetRow) -> None:
    """If the budget's period has rolled over, record the reset and start the new period."""
    now = utcnow()
    start = current_period_start(budget.period, budget.period_start, now, budget.rolling_s)
    if start <= budget.period_start:
        return
    session.add(BudgetResetRow(
        agent_id=budget.agent_id, period_start=budget.period_start, new_period_start=start,
        spent_tokens=budget.spent_tokens, spent_nusd=budget.spent_nusd, created_at=now,
    ))
    budget.period_start, budget.spent_tokens, budget.spent_nusd = start, 0, 0


def _standing(budget: BudgetRow) -> Standing:
    return Standing(
        agent_id=budget.agent_id, token_limit=budget.token_limit,
        usd_limit_nusd=budget.usd_limit_nusd, spent_tokens=budget.spent_tokens,
        spent_nusd=budget.spent_nusd, reserved_tokens=budget.reserved_tokens,
        reserved_nusd=budget.reserved_nusd)


def _refusal(budget: BudgetRow, need: Estimate) -> str | None:
    if budget.expires_at is not None and budget.expires_at <= utcnow():
        return "expired"
    tokens_left = _left(budget.token_limit, budget.spent_tokens, budget.reserved_tokens)
    nusd_left = _left(budget.usd_limit_nusd, budget.spent_nusd, budget.reserved_nusd)
    if (tokens_left is not None and need.tokens > tokens_left) or (
        nusd_left is not None and need.nusd > nusd_left
    ):
        return "exhausted"
    return None


def _deny(budget: Standing, need: Estimate, reason: str, message_id: str,
          endpoint_id: str) -> BudgetExceeded:
    agent_id = budget["agent_id"]
    snapshot = {**{k: v for k, v in budget.items() if k != "agent_id"},
                "needed_tokens": need.tokens, "needed_nusd": need.nusd}
    audit("denied", message_id=message_id, agent_id=agent_id, endpoint_id=endpoint_id,
          tokens=need.tokens, cost_nusd=need.nusd, reason=reason, detail=snapshot)
    tokens_left = _left(budget["token_limit"], budget["spent_tokens"], budget["reserved_tokens"])
    nusd_left = _left(budget["usd_limit_nusd"], budget["spent_nusd"], budget["reserved_nusd"])
    left_usd = None if nusd_left is None else str(nusd_to_usd(max(nusd_left, 0)))
    what = "has expired" if reason == "expired" else (
        f"cannot cover this call: it needs up to {need.tokens} tokens / "
        f"${nusd_to_usd(need.nusd)}, and {tokens_left if tokens_left is not None else 'no limit'}"
        f" tokens / ${left_usd if left_usd is not None else 'no limit'} are left")
    return BudgetExceeded(
        f"budget of agent '{agent_id}' {what}; raise it with `aimesh budgets set`",
        agent_id=agent_id, needed_tokens=need.tokens,
        needed_usd=str(nusd_to_usd(need.nusd)), left_tokens=tokens_left, left_usd=left_usd,
        reason=reason,
    )


def reserve(agent_id: str, message_id: str, endpoint_id: str, call_key: str,
            need: Estimate) -> Held | None:
    """Hold `need` against the agent's budget for one call; None if the agent has no budget.

    Idempotent: a call_key already reserved or settled returns what is held (a settled
    one whose reservation was deleted since: what its ledger row charged); a released
    one is reserved again. Raises BudgetExceeded (and audits 'denied') if it cannot fit.
    """
    if pg_batch.available():
        done = pg_batch.run(pg_batch.ReserveOp(
            op="reserve", call_key=call_key, agent_id=agent_id, message_id=message_id,
            endpoint_id=endpoint_id, tokens=need.tokens, nusd=need.nusd))
        if done["outcome"] != "general":
            return _batch_reserved(done, call_key, need, message_id, endpoint_id)
    return _reserve_one(agent_id, message_id, endpoint_id, call_key, need)


def _batch_reserved(done: pg_batch.Outcome, call_key: str, need: Estimate, message_id: str,
                    endpoint_id: str) -> Held | None:
    if done["outcome"] == "reserved":
        return Held(call_key, need.tokens, need.nusd, "reserved")
    if done["outcome"] == "held":
        return Held(call_key, done["tokens"], done["nusd"], done["state"])
    if done["outcome"] == "denied":
        raise _deny(done["standing"], need, done["reason"], message_id, endpoint_id)
    return None  # unmetered


def _charged(session: Session, call_key: str) -> Held | None:
    """A call key's settlement from its ledger row, if it was charged: what is left of a
    settled call whose closed reservation was deleted after the journal's retention."""
    row = session.execute(select(LedgerRow.tokens, LedgerRow.nusd)
                          .where(LedgerRow.call_key == call_key)).first()
    return None if row is None else Held(call_key, row.tokens, row.nusd, "settled")


def _reserve_one(agent_id: str, message_id: str, endpoint_id: str, call_key: str,
                 need: Estimate) -> Held | None:
    denial: BudgetExceeded | None = None
    with session_scope() as session:
        held = session.get(ReservationRow, call_key, with_for_update=True)
        if held is not None and held.state != "released":
            return Held(call_key, held.tokens, held.nusd, held.state)
        if held is None and (charged := _charged(session, call_key)) is not None:
            return charged  # settled, and its reservation deleted since (forget_closed)
        budget = session.scalars(
            select(BudgetRow).where(BudgetRow.agent_id == agent_id).with_for_update()
        ).one_or_none()
        if budget is None:
            return None
        roll_period(session, budget)
        reason = _refusal(budget, need)
        if reason is not None:
            denial = _deny(_standing(budget), need, reason, message_id, endpoint_id)
        else:
            now = utcnow()
            budget.reserved_tokens += need.tokens
            budget.reserved_nusd += need.nusd
            budget.updated_at = now
            if held is None:
                held = ReservationRow(call_key=call_key, agent_id=agent_id,
                                      message_id=message_id, created_at=now)
                session.add(held)
            held.endpoint_id, held.tokens, held.nusd = endpoint_id, need.tokens, need.nusd
            held.state, held.called_at, held.closed_at = "reserved", None, None
            return Held(call_key, need.tokens, need.nusd, "reserved")
    raise denial


def claim(call_key: str) -> ClaimState:
    """Mark a reservation as about to be called; say what state it was found in."""
    if pg_batch.available():
        return _CLAIM_STATES[pg_batch.run(pg_batch.ClaimOp(op="claim", call_key=call_key)
                                          )["outcome"]]
    with session_scope() as session:
        held = session.get(ReservationRow, call_key, with_for_update=True)
        if held is None:
            return "missing" if _charged(session, call_key) is None else "settled"
        if held.state != "reserved":
            return "settled" if held.state == "settled" else "released"
        if held.called_at is not None:
            return "called_before"
        held.called_at = utcnow()
        return "claimed"


def settle(call_key: str, tokens: int, nusd: int, *, kind: str = "call",
           entry: dict[str, Any] | None = None) -> bool:
    """Charge the actual usage, release the rest, write the ledger row, and keep `entry`
    (the call's journal entry) with the settlement; False if the reservation was already
    settled or released (nothing changes)."""
    if pg_batch.available():
        op = pg_batch.SettleOp(op="settle", call_key=call_key, tokens=tokens, nusd=nusd,
                               kind=kind)
        if entry is not None:
            op["entry"] = entry
        done = pg_batch.run(op)
        if done["outcome"] == "settled":
            events.budget_settled.send(sender=settle, agent_id=done["agent_id"],
                                       tokens_left=done["tokens_left"],
                                       nusd_left=done["nusd_left"])
            return True
        if done["outcome"] == "closed":
            return False
    with session_scope() as session:
        held = session.get(ReservationRow, call_key, with_for_update=True)
        if held is None or held.state != "reserved":
            return False
        budget = session.get(BudgetRow, held.agent_id, with_for_update=True)
        now = utcnow()
        if budget is not None:
            roll_period(session, budget)
            budget.reserved_tokens -= held.tokens
            budget.reserved_nusd -= held.nusd
            budget.spent_tokens += tokens
            budget.spent_nusd += nusd
            budget.updated_at = now
        held.state, held.closed_at, held.journal_entry = "settled", now, entry
        session.add(LedgerRow(call_key=call_key, agent_id=held.agent_id,
                              message_id=held.message_id, endpoint_id=held.endpoint_id,
                              tokens=tokens, nusd=nusd, kind=kind, created_at=now))
        left = None if budget is None else (
            _left(budget.token_limit, budget.spent_tokens, budget.reserved_tokens),
            _left(budget.usd_limit_nusd, budget.spent_nusd, budget.reserved_nusd))
    if left is not None:
        events.budget_settled.send(sender=settle, agent_id=held.agent_id, tokens_left=left[0],
                                   nusd_left=left[1])
    return True


def release(call_key: str, *, only_if_uncalled: bool = False) -> bool:
    """Give a reservation back untouched (the call was certainly not made)."""
    with session_scope() as session:
        held = session.get(ReservationRow, call_key, with_for_update=True)
        if held is None or held.state != "reserved":
            return False
        if only_if_uncalled and held.called_at is not None:
            return False
        budget = session.get(BudgetRow, held.agent_id, with_for_update=True)
        if budget is not None:
            budget.reserved_tokens -= held.tokens
            budget.reserved_nusd -= held.nusd
            budget.updated_at = utcnow()
        held.state, held.closed_at = "released", utcnow()
        return True


def reap_one(call_key: str, journal_usage: tuple[int, int] | None,
             entry: dict[str, Any] | None = None) -> str:
    """Close one stale reservation: settle at the journal's usage when the call finished
    (keeping `entry`, its journal entry, when given), at the estimate when the provider
    may have been called, release when it was not."""
    with session_scope() as session:
        held = session.get(ReservationRow, call_key, with_for_update=True)
        if held is None or held.state != "reserved":
            return "gone"
        called = held.called_at is not None
    if journal_usage is not None:
        settle(call_key, *journal_usage, kind="reaped", entry=entry)
        return "settled_actual"
    if called:
        settle(call_key, held.tokens, held.nusd, kind="reaped")
        return "settled_estimate"
    return "released" if release(call_key, only_if_uncalled=True) else "raced"


def stale_reservations(older_than_s: float, limit: int = 500) -> list[str]:
    """Call keys of reservations still held `older_than_s` seconds after they were made,
    or, once claimed, after their call started (a message that waited in a backlog and is
    being called now is not stale)."""
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    since = func.coalesce(ReservationRow.called_at, ReservationRow.created_at)
    # The state inline, not a parameter: only then can any plan (a prepared statement's
    # generic one too) use the partial index of open reservations (ix_budget_reservations_open).
    is_open = ReservationRow.state == literal_column("'reserved'")
    with session_scope() as session:
        return list(session.scalars(
            select(ReservationRow.call_key)
            .where(is_open, since < cutoff)
            .order_by(ReservationRow.created_at).limit(limit)
        ))


def estimate_of(call_key: str) -> Held | None:
    """The reservation of a call key, whatever its state."""
    with session_scope() as session:
        held = session.get(ReservationRow, call_key)
        return None if held is None else Held(call_key, held.tokens, held.nusd, held.state)


@dataclass(frozen=True, slots=True)
class Kept:
    """A settled call's journal entry, kept with its settlement: the call key it was
    charged under, the endpoint it was made at, and what the call cost the agent in all
    (nano-USD: a takeover's `lost` charge included)."""

    call_key: str
    endpoint_id: str
    entry: dict[str, Any]
    charged_nusd: int


def kept_entry(message_id: str, call_key: str) -> Kept | None:
    """The journal entry kept with the settlement of `call_key`, or of a takeover's redo
    of it (`<call_key>:redo-...`; the last one settled), or None."""
    def this_call(key: Any) -> Any:
        return (key == call_key) | key.startswith(f"{call_key}:redo-", autoescape=True)

    charged = (select(func.coalesce(func.sum(LedgerRow.nusd), 0))
               .where(LedgerRow.message_id == message_id, this_call(LedgerRow.call_key))
               .scalar_subquery())
    with session_scope() as session:
        row = session.execute(
            select(ReservationRow.call_key, ReservationRow.endpoint_id,
                   ReservationRow.journal_entry, charged.label("charged_nusd"))
            .where(ReservationRow.message_id == message_id,
                   this_call(ReservationRow.call_key), ReservationRow.state == "settled",
                   ReservationRow.journal_entry.is_not(None))
            .order_by(ReservationRow.closed_at.desc()).limit(1)
        ).first()
    return None if row is None else Kept(row.call_key, row.endpoint_id, row.journal_entry,
                                         int(row.charged_nusd))


def forget_closed(older_than_s: float, batch_size: int = 1000) -> int:
    """Delete the reservations closed (settled or released) more than `older_than_s` ago,
    journal entry and all, a batch at a time (rows another worker is deleting are
    skipped); how many. Their ledger rows stay: the charge's record. After that long no
    delivery of their calls comes again (`pipeline/journal.retention_s`)."""
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    # The state inline, not a parameter, so that any plan can use the partial index of
    # closed reservations (ix_budget_reservations_closed).
    closed = ReservationRow.state != literal_column("'reserved'")
    deleted = 0
    while True:
        with session_scope() as session:
            keys = list(session.scalars(
                select(ReservationRow.call_key)
                .where(closed, ReservationRow.closed_at < cutoff)
                .order_by(ReservationRow.closed_at).limit(batch_size)
                .with_for_update(skip_locked=True)))
            if keys:
                session.execute(delete(ReservationRow)
                                .where(ReservationRow.call_key.in_(keys)))
        deleted += len(keys)
        if len(keys) < batch_size:
            return deleted
