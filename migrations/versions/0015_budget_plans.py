"""Budget batches whose plans do not depend on the tables' statistics (issue 18).

`budget_apply` runs with `plan_cache_mode = force_generic_plan`: each connection plans
its statements once, at its first batch, and keeps the plans. A connection that made
them while `budget_reservations` was small or empty (a new deployment, a test run, a
table no ANALYZE has seen: autovacuum off, or not yet come round) planned the claim's
and the settle's UPDATE with the table as the outer side of a nested loop: a scan of the
whole primary-key index, filtered, for every batch. It visited every reservation ever
made ("Rows Removed by Filter: 20005" after 20,000 calls), so a cycle grew from 1.4 ms
to 17 ms on that connection and stayed there for the connection's life (measured:
benchmarks/bench_budgets.py's first run on a new database did 526 cycles/s, its second
2,242).

Both UPDATEs now also name their call keys as an array (`r.call_key = ANY(keys)`, the
batch's keys gathered first), an index condition on the primary key whatever the
statistics say: a batch visits its own reservations only. The function is 0008's text
(0010's with the journal entry) with those changes; the downgrade puts 0008's back.

Revision ID: 0015_budget_plans
Revises: 0008_durable_answers
Create Date: 2026-12-04
"""

from __future__ import annotations

from types import ModuleType

from alembic import op

from aimesh_tasks.db.revisions import edited, sibling

revision = "0015_budget_plans"
down_revision = "0008_durable_answers"
branch_labels = None
depends_on = None

# (0008's text, what it becomes).
BY_KEY = (
    ("  o record;\nBEGIN",
     "  o record;\n  claim_keys text[];\n  settle_keys text[];\nBEGIN"),
    ("  IF jsonb_array_length(claims) > 0 THEN\n",
     "  IF jsonb_array_length(claims) > 0 THEN\n"
     "    claim_keys := ARRAY(SELECT e->>'call_key' FROM jsonb_array_elements(claims) e);\n"),
    ("  IF jsonb_array_length(settles) > 0 THEN\n",
     "  IF jsonb_array_length(settles) > 0 THEN\n"
     "    settle_keys := ARRAY(SELECT e->>'call_key' FROM jsonb_array_elements(settles) e);\n"),
    ("      WHERE r.call_key = c.call_key AND coalesce(r.state, '') = 'reserved'\n",
     "      WHERE r.call_key = c.call_key AND r.call_key = ANY(claim_keys)\n"
     "        AND coalesce(r.state, '') = 'reserved'\n"),
    ("      WHERE r.call_key = s.call_key AND coalesce(r.state, '') = 'reserved'\n",
     "      WHERE r.call_key = s.call_key AND r.call_key = ANY(settle_keys)\n"
     "        AND coalesce(r.state, '') = 'reserved'\n"),
)


def _durable_answers() -> ModuleType:
    """Revision 0008's module (its function text)."""
    return sibling(__file__, "0008_durable_answers.py")


def apply_by_key() -> str:
    """budget_apply as this revision defines it."""
    return edited(_durable_answers()._apply_keeping_entries(), BY_KEY, revision)


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(apply_by_key())


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_durable_answers()._apply_keeping_entries())
