"""The five invariants of a chaos row, checked against SQL and the simulators' call logs.

1. nothing lost: every accepted message reached a terminal result its producer can read;
2. at most one settlement per call key and one audit row per outcome: no message charged
   more often than the provider billed it, and one terminal audit row (completed or
   failed) per finished message, matching its result;
3. Σ ledger = budget counters = provider truth, or flagged: every call the provider
   billed has a ledger row, every `call` row costs what the provider's token counts say
   at the endpoint's prices, per agent the ledger sums to the budget's counters; rows
   charged at an estimate (`estimated`, `lost`, `reaped` without a journal) are flagged;
4. no reservation left: no reservation held and no budget with a reserved amount;
5. deliveries deduplicated: no call key billed twice, and no call (message + attempt)
   billed more often than once plus the charges at an estimate (`lost`, `reaped`
   without a journal: a call that may have reached the provider and left no answer)
   that explain a repeat.

`collect()` reads the facts once the row has drained; `judge()` is pure.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Engine

from aimesh_tasks.money import call_cost_nusd

BILLED_STATUS = 200  # the simulator bills what it answered 200 (malformed and no-usage too)
ESTIMATE_KINDS = ("estimated", "lost")


@dataclass(frozen=True)
class ProviderCall:
    """One request a simulator answered: which endpoint, under which call key."""

    endpoint_id: str
    call_key: str
    status: int
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Charge:
    """One ledger row."""

    call_key: str
    message_id: str
    agent_id: str
    endpoint_id: str
    tokens: int
    nusd: int
    kind: str


@dataclass
class Facts:
    """Everything a row's verdict is decided from."""

    outcomes: dict[str, str | None]  # accepted message id -> SUCCESS / FAILURE / None
    calls: list[ProviderCall]
    prices: dict[str, tuple[int, int]]  # endpoint id -> (input, output) nano-USD per 1k
    charges: list[Charge]
    counters_off: list[str]  # agents whose Σ ledger differs from spent
    open_reservations: int
    audits: dict[str, Counter[str]]  # message id -> terminal audit events


@dataclass
class Verdict:
    """What broke, invariant by invariant (empty lists: it held)."""

    lost: list[str] = field(default_factory=list)
    double_charged: list[str] = field(default_factory=list)
    audit_wrong: list[str] = field(default_factory=list)
    uncharged: list[str] = field(default_factory=list)
    mispriced: list[str] = field(default_factory=list)
    counters_off: list[str] = field(default_factory=list)
    flagged: Counter[str] = field(default_factory=Counter)
    open_reservations: int = 0
    repeated_keys: list[str] = field(default_factory=list)
    extra_calls: list[str] = field(default_factory=list)

    def holds(self) -> dict[str, bool]:
        """Each invariant: True if it held."""
        return {
            "nothing lost": not self.lost,
            "one settlement and audit per outcome": not (self.double_charged
                                                         or self.audit_wrong),
            "spend exact or flagged": not (self.uncharged or self.mispriced
                                           or self.counters_off),
            "no reservation left": self.open_reservations == 0,
            "deliveries deduplicated": not (self.repeated_keys or self.extra_calls),
        }

    def spend(self) -> str:
        """`exact`, `flagged: ...` or `WRONG: ...`, for the table."""
        wrong = [f"{len(v)} {k}" for k, v in (("uncharged", self.uncharged),
                                              ("mispriced", self.mispriced),
                                              ("agents off", self.counters_off)) if v]
        if wrong:
            return "WRONG: " + ", ".join(wrong)
        if self.flagged:
            return "flagged: " + ", ".join(f"{n} {k}" for k, n in sorted(self.flagged.items()))
        return "exact"

    def broken(self) -> list[str]:
        """One line per broken invariant, with examples."""
        lines = []
        for name, items in (("lost", self.lost), ("double charged", self.double_charged),
                            ("audit", self.audit_wrong), ("uncharged", self.uncharged),
                            ("mispriced", self.mispriced), ("counters", self.counters_off),
                            ("call key billed twice", self.repeated_keys),
                            ("extra provider calls", self.extra_calls)):
            if items:
                lines.append(f"{name}: {len(items)} (e.g. {', '.join(items[:3])})")
        if self.open_reservations:
            lines.append(f"open reservations: {self.open_reservations}")
        return lines


def base_key(call_key: str) -> str:
    """`<message id>:<attempt>`, without a takeover's `:redo-...` suffix."""
    message_id, attempt, *_ = call_key.split(":") + [""]
    return f"{message_id}:{attempt}"


def message_of(call_key: str) -> str:
    """The message id of a call key."""
    return call_key.split(":", 1)[0]


def judge(facts: Facts, *, audited: bool = True) -> Verdict:
    """The verdict of a row from its facts; `audited` False when the accepted ids are
    not messages (workflow runs: their steps' audit rows are not checked one by one)."""
    verdict = Verdict(counters_off=list(facts.counters_off),
                      open_reservations=facts.open_reservations)
    verdict.lost = sorted(m for m, state in facts.outcomes.items() if state is None)
    billed = [c for c in facts.calls if c.status == BILLED_STATUS]
    by_key: dict[str, list[ProviderCall]] = defaultdict(list)
    for call in billed:
        by_key[call.call_key].append(call)
    verdict.repeated_keys = sorted(k for k, calls in by_key.items() if len(calls) > 1)
    at_estimate = _judge_charges(facts, by_key, verdict)
    _judge_repeats(billed, at_estimate, verdict)
    verdict.audit_wrong = _audit_wrong(facts) if audited else []
    return verdict


def _judge_charges(facts: Facts, by_key: dict[str, list[ProviderCall]],
                   verdict: Verdict) -> list[str]:
    """Judge every charge against the provider's log; the call keys charged at an
    estimate because the call may have been made (`lost`, `reaped` without a journal)."""
    charged = {c.call_key: c for c in facts.charges if c.nusd or c.tokens}
    at_estimate = []
    verdict.uncharged = sorted(k for k in by_key if k not in charged)
    extra: Counter[str] = Counter()
    for charge in charged.values():
        calls = by_key.get(charge.call_key)
        if charge.kind in ESTIMATE_KINDS:
            verdict.flagged[charge.kind if calls else f"{charge.kind} (never called)"] += 1
            at_estimate += [charge.call_key] if charge.kind == "lost" else []
            continue
        if not calls:  # charged as a call the provider never answered
            extra[charge.message_id] += 1
            continue
        price_in, price_out = facts.prices[calls[0].endpoint_id]
        cost = call_cost_nusd(calls[0].prompt_tokens, calls[0].completion_tokens,
                              price_in, price_out)
        if charge.nusd != cost:
            if charge.kind == "reaped":
                verdict.flagged["reaped at estimate"] += 1
                at_estimate.append(charge.call_key)
            else:
                verdict.mispriced.append(f"{charge.call_key} ({charge.nusd} != {cost})")
    verdict.double_charged = sorted(extra)
    return at_estimate


def _judge_repeats(billed: list[ProviderCall], at_estimate: list[str],
                   verdict: Verdict) -> None:
    """A call made again is explained only by an earlier call of it that may have
    reached the provider and left no answer (charged at an estimate)."""
    per_call = Counter(base_key(c.call_key) for c in billed)
    explained = Counter(base_key(key) for key in at_estimate)
    verdict.extra_calls = sorted(f"{key} ({n} calls, {explained[key]} charged at an estimate)"
                                 for key, n in per_call.items() if n > 1 + explained[key])


def _audit_wrong(facts: Facts) -> list[str]:
    wrong = []
    for message_id, state in facts.outcomes.items():
        events = facts.audits.get(message_id, Counter())
        expected = {"SUCCESS": "completed", "FAILURE": "failed"}.get(state or "")
        if sum(events.values()) > 1 or (expected and events[expected] != 1):
            wrong.append(f"{message_id} ({state}: {dict(events) or 'no audit row'})")
    return sorted(wrong)


# --- reading the facts -------------------------------------------------------------------

_COUNTERS_OFF = """
    SELECT b.agent_id FROM budgets b
    LEFT JOIN (SELECT agent_id, SUM(tokens) t, SUM(nusd) n FROM budget_ledger
               GROUP BY agent_id) l ON l.agent_id = b.agent_id
    LEFT JOIN (SELECT agent_id, SUM(spent_tokens) t, SUM(spent_nusd) n FROM budget_resets
               GROUP BY agent_id) r ON r.agent_id = b.agent_id
    WHERE COALESCE(l.t, 0) <> b.spent_tokens + COALESCE(r.t, 0)
       OR COALESCE(l.n, 0) <> b.spent_nusd + COALESCE(r.n, 0)"""
_OPEN = """
    SELECT (SELECT count(*) FROM budget_reservations WHERE state = 'reserved')
         + (SELECT count(*) FROM budgets WHERE reserved_tokens <> 0 OR reserved_nusd <> 0)"""
_LEDGER = ("SELECT call_key, message_id, agent_id, endpoint_id, tokens, nusd, kind "
           "FROM budget_ledger")
_AUDITS = ("SELECT message_id, event FROM audit_events "
           "WHERE event IN ('completed', 'failed')")
_PRICES = "SELECT id, input_nusd_per_1k, output_nusd_per_1k FROM endpoints"


def open_reservations(engine: Engine) -> int:
    """Reservations still held, plus budgets with a reserved amount."""
    with engine.connect() as connection:
        return int(connection.execute(text(_OPEN)).scalar_one())


def collect(engine: Engine, outcomes: dict[str, str | None],
            logs: dict[str, list[dict[str, Any]]]) -> Facts:
    """The facts of a drained row: `logs` maps endpoint id -> its simulator's call log."""
    calls = [ProviderCall(endpoint_id, str(c["call_key"] or ""), int(c["status"]),
                          int(c["prompt_tokens"] or 0), int(c["completion_tokens"] or 0))
             for endpoint_id, log in logs.items() for c in log]
    audits: dict[str, Counter[str]] = defaultdict(Counter)
    with engine.connect() as connection:
        charges = [Charge(*row) for row in connection.execute(text(_LEDGER))]
        counters_off = [row[0] for row in connection.execute(text(_COUNTERS_OFF))]
        for message_id, event in connection.execute(text(_AUDITS)):
            audits[message_id][event] += 1
        prices = {row[0]: (int(row[1]), int(row[2]))
                  for row in connection.execute(text(_PRICES))}
    return Facts(outcomes=outcomes, calls=calls, prices=prices, charges=charges,
                 counters_off=counters_off, open_reservations=open_reservations(engine),
                 audits=dict(audits))
