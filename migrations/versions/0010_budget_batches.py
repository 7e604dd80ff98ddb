"""Budget batches: one Postgres function applies many reservations, claims and
settlements in arrival order, in one transaction (group commit, aimesh_tasks/budgets/
batch.py). Postgres only; SQLite keeps the general path.

Revision ID: 0010_budget_batches
Revises: 0007_ingress_keys
Create Date: 2026-12-08
"""

from __future__ import annotations

from alembic import op

revision = "0010_budget_batches"
down_revision = "0007_ingress_keys"
branch_labels = None
depends_on = None

# The budget's current period has not rolled over (else the general path records a reset).
PERIOD_IS_CURRENT = """
CREATE OR REPLACE FUNCTION budget_period_is_current(b budgets) RETURNS boolean
LANGUAGE sql STABLE AS $$
  SELECT CASE b.period
    WHEN 'none' THEN true
    WHEN 'daily' THEN b.period_start >= date_trunc('day', now() AT TIME ZONE 'UTC')
                                        AT TIME ZONE 'UTC'
    WHEN 'monthly' THEN b.period_start >= date_trunc('month', now() AT TIME ZONE 'UTC')
                                          AT TIME ZONE 'UTC'
    WHEN 'rolling' THEN now() < b.period_start + make_interval(secs => b.rolling_s)
  END
$$"""

# What a refusal is audited with: the budget as it stood when the call did not fit.
STANDING = """
CREATE OR REPLACE FUNCTION budget_standing(b budgets) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
  SELECT jsonb_build_object(
    'agent_id', b.agent_id, 'token_limit', b.token_limit, 'usd_limit_nusd', b.usd_limit_nusd,
    'spent_tokens', b.spent_tokens, 'spent_nusd', b.spent_nusd,
    'reserved_tokens', b.reserved_tokens, 'reserved_nusd', b.reserved_nusd)
$$"""

# One reservation decided on its own, as ledger.py's general path would; the outcome
# 'general' hands it back to that path (a released reservation reserved again, a period
# that rolled over).
RESERVE_ONE = """
CREATE OR REPLACE FUNCTION budget_reserve_one(o jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
  r budget_reservations;
  b budgets;
  need_tokens bigint := (o->>'tokens')::bigint;
  need_nusd bigint := (o->>'nusd')::bigint;
BEGIN
  SELECT * INTO r FROM budget_reservations WHERE call_key = o->>'call_key';
  IF FOUND AND r.state <> 'released' THEN
    RETURN jsonb_build_object('outcome', 'held', 'tokens', r.tokens, 'nusd', r.nusd,
                              'state', r.state);
  ELSIF FOUND THEN
    RETURN '{"outcome": "general"}';
  END IF;
  SELECT * INTO b FROM budgets WHERE agent_id = o->>'agent_id';
  IF NOT FOUND THEN
    RETURN '{"outcome": "unmetered"}';
  ELSIF NOT budget_period_is_current(b) THEN
    RETURN '{"outcome": "general"}';
  ELSIF b.expires_at IS NOT NULL AND b.expires_at <= now() THEN
    RETURN jsonb_build_object('outcome', 'denied', 'reason', 'expired',
                              'standing', budget_standing(b));
  ELSIF (b.token_limit IS NOT NULL AND b.spent_tokens + b.reserved_tokens + need_tokens
                                        > b.token_limit)
     OR (b.usd_limit_nusd IS NOT NULL AND b.spent_nusd + b.reserved_nusd + need_nusd
                                          > b.usd_limit_nusd) THEN
    RETURN jsonb_build_object('outcome', 'denied', 'reason', 'exhausted',
                              'standing', budget_standing(b));
  END IF;
  UPDATE budgets SET reserved_tokens = reserved_tokens + need_tokens,
                     reserved_nusd = reserved_nusd + need_nusd, updated_at = now()
  WHERE agent_id = b.agent_id;
  INSERT INTO budget_reservations
    (call_key, agent_id, message_id, endpoint_id, tokens, nusd, state, created_at)
  VALUES (o->>'call_key', b.agent_id, o->>'message_id', o->>'endpoint_id', need_tokens,
          need_nusd, 'reserved', now());
  RETURN '{"outcome": "reserved"}';
END
$$"""

# The batch. Budget rows are locked first, in agent order, so two batches never wait on
# each other in a cycle. Every operation in a batch was pending when it began, so any
# order of them is one the callers could have seen: claims, then settles, then
# reservations in arrival order. Each kind is one statement for the whole batch; an
# agent whose new reservations do not all fit at once has them decided one by one (the
# first that does not fit is refused, a later smaller one may still fit). A batch names
# each call key once (the caller splits one that does not).
# Plans: generic, so these statements are planned once per connection, not again at
# every batch (custom plans of a varying jsonb argument cost more to make than to run).
# The planner takes a jsonb array for 100 rows, and for 100 rows a hash join over a
# whole table (every budget) looks cheaper than 100 probes of its primary key; a batch
# holds a few operations, so hash and merge joins and sequential scans are off, and
# `coalesce(r.state, '')` keeps the state index out of the updates (through it, a plan
# on stale statistics once visited every reserved row): primary keys drive every step.
APPLY = """
CREATE OR REPLACE FUNCTION budget_apply(reserves jsonb, claims jsonb, settles jsonb)
RETURNS jsonb
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan SET enable_seqscan = off SET enable_hashjoin = off
SET enable_mergejoin = off AS $$
DECLARE
  claimed jsonb := '[]';
  settled jsonb := '[]';
  reserved jsonb := '[]';
  o record;
BEGIN
  IF jsonb_array_length(reserves) + jsonb_array_length(settles) > 0 THEN
    PERFORM 1 FROM budgets
    WHERE agent_id IN (
      SELECT e->>'agent_id' FROM jsonb_array_elements(reserves) e
      UNION
      SELECT r.agent_id FROM budget_reservations r
      WHERE r.call_key IN (SELECT e->>'call_key' FROM jsonb_array_elements(settles) e))
    ORDER BY agent_id FOR UPDATE;
  END IF;

  IF jsonb_array_length(claims) > 0 THEN
    WITH c AS (
      SELECT t.i, t.e->>'call_key' AS call_key
      FROM jsonb_array_elements(claims) WITH ORDINALITY AS t(e, i)),
    done AS (
      UPDATE budget_reservations r SET called_at = now() FROM c
      WHERE r.call_key = c.call_key AND coalesce(r.state, '') = 'reserved'
        AND r.called_at IS NULL
      RETURNING r.call_key)
    SELECT jsonb_agg(jsonb_build_object('outcome', CASE
        WHEN d.call_key IS NOT NULL THEN 'claimed'
        WHEN r.call_key IS NULL THEN 'missing'
        WHEN r.state = 'settled' THEN 'settled'
        WHEN r.state <> 'reserved' THEN 'released'
        ELSE 'called_before' END) ORDER BY c.i)
    INTO claimed
    FROM c LEFT JOIN done d ON d.call_key = c.call_key
           LEFT JOIN budget_reservations r ON r.call_key = c.call_key;
  END IF;

  IF jsonb_array_length(settles) > 0 THEN
    WITH s AS (
      SELECT t.i, t.e->>'call_key' AS call_key, (t.e->>'tokens')::bigint AS tokens,
             (t.e->>'nusd')::bigint AS nusd, t.e->>'kind' AS kind
      FROM jsonb_array_elements(settles) WITH ORDINALITY AS t(e, i)),
    closed AS (
      UPDATE budget_reservations r SET state = 'settled', closed_at = now()
      FROM s, budgets b
      WHERE r.call_key = s.call_key AND coalesce(r.state, '') = 'reserved'
        AND b.agent_id = r.agent_id
        AND budget_period_is_current(b)
      RETURNING s.i, r.call_key, r.agent_id, r.message_id, r.endpoint_id,
                r.tokens AS held_tokens, r.nusd AS held_nusd, s.tokens, s.nusd, s.kind),
    charged AS (
      INSERT INTO budget_ledger
        (call_key, agent_id, message_id, endpoint_id, tokens, nusd, kind, created_at)
      SELECT call_key, agent_id, message_id, endpoint_id, tokens, nusd, kind, now()
      FROM closed),
    left_after AS (
      UPDATE budgets b SET reserved_tokens = b.reserved_tokens - d.held_tokens,
                           reserved_nusd = b.reserved_nusd - d.held_nusd,
                           spent_tokens = b.spent_tokens + d.tokens,
                           spent_nusd = b.spent_nusd + d.nusd, updated_at = now()
      FROM (SELECT agent_id, sum(held_tokens) AS held_tokens, sum(held_nusd) AS held_nusd,
                   sum(tokens) AS tokens, sum(nusd) AS nusd
            FROM closed GROUP BY agent_id) d
      WHERE b.agent_id = d.agent_id
      RETURNING b.agent_id,
                b.token_limit - b.spent_tokens - b.reserved_tokens AS tokens_left,
                b.usd_limit_nusd - b.spent_nusd - b.reserved_nusd AS nusd_left)
    SELECT jsonb_agg(CASE
        WHEN c.i IS NOT NULL THEN jsonb_build_object(
          'outcome', 'settled', 'agent_id', c.agent_id, 'tokens_left', a.tokens_left,
          'nusd_left', a.nusd_left)
        WHEN r.call_key IS NULL OR r.state <> 'reserved' THEN '{"outcome": "closed"}'
        ELSE '{"outcome": "general"}' END ORDER BY s.i)
    INTO settled
    FROM s LEFT JOIN closed c ON c.i = s.i
           LEFT JOIN left_after a ON a.agent_id = c.agent_id
           LEFT JOIN budget_reservations r ON r.call_key = s.call_key;
  END IF;

  IF jsonb_array_length(reserves) > 0 THEN
    WITH q AS (
      SELECT t.i, t.e->>'call_key' AS call_key, t.e->>'agent_id' AS agent_id,
             t.e->>'message_id' AS message_id, t.e->>'endpoint_id' AS endpoint_id,
             (t.e->>'tokens')::bigint AS tokens, (t.e->>'nusd')::bigint AS nusd
      FROM jsonb_array_elements(reserves) WITH ORDINALITY AS t(e, i)),
    cand AS (  -- new reservations of a budget that is current and not expired
      SELECT q.* FROM q JOIN budgets b ON b.agent_id = q.agent_id
      WHERE NOT EXISTS (SELECT 1 FROM budget_reservations r WHERE r.call_key = q.call_key)
        AND budget_period_is_current(b) AND (b.expires_at IS NULL OR b.expires_at > now())),
    fits AS (  -- agents that can take all their new reservations at once (so each in turn)
      SELECT b.agent_id, sum(c.tokens) AS tokens, sum(c.nusd) AS nusd
      FROM cand c JOIN budgets b ON b.agent_id = c.agent_id
      GROUP BY b.agent_id
      HAVING (b.token_limit IS NULL
              OR b.spent_tokens + b.reserved_tokens + sum(c.tokens) <= b.token_limit)
         AND (b.usd_limit_nusd IS NULL
              OR b.spent_nusd + b.reserved_nusd + sum(c.nusd) <= b.usd_limit_nusd)),
    held AS (
      INSERT INTO budget_reservations
        (call_key, agent_id, message_id, endpoint_id, tokens, nusd, state, created_at)
      SELECT c.call_key, c.agent_id, c.message_id, c.endpoint_id, c.tokens, c.nusd,
             'reserved', now()
      FROM cand c JOIN fits f ON f.agent_id = c.agent_id),
    counted AS (
      UPDATE budgets b SET reserved_tokens = b.reserved_tokens + f.tokens,
                           reserved_nusd = b.reserved_nusd + f.nusd, updated_at = now()
      FROM fits f WHERE b.agent_id = f.agent_id)
    SELECT jsonb_agg(CASE
        WHEN r.call_key IS NOT NULL AND r.state <> 'released' THEN jsonb_build_object(
          'outcome', 'held', 'tokens', r.tokens, 'nusd', r.nusd, 'state', r.state)
        WHEN r.call_key IS NOT NULL THEN '{"outcome": "general"}'
        WHEN b.agent_id IS NULL THEN '{"outcome": "unmetered"}'
        WHEN NOT budget_period_is_current(b) THEN '{"outcome": "general"}'
        WHEN b.expires_at IS NOT NULL AND b.expires_at <= now() THEN jsonb_build_object(
          'outcome', 'denied', 'reason', 'expired', 'standing', budget_standing(b))
        WHEN f.agent_id IS NOT NULL THEN '{"outcome": "reserved"}'
        END ORDER BY q.i)  -- NULL: decided one by one below
    INTO reserved
    FROM q LEFT JOIN budget_reservations r ON r.call_key = q.call_key
           LEFT JOIN budgets b ON b.agent_id = q.agent_id
           LEFT JOIN fits f ON f.agent_id = q.agent_id;
    IF reserved @> '[null]' THEN
      FOR o IN SELECT t.i, t.e FROM jsonb_array_elements(reserves) WITH ORDINALITY AS t(e, i)
               WHERE jsonb_typeof(reserved->(t.i::int - 1)) = 'null' ORDER BY t.i LOOP
        reserved := jsonb_set(reserved, ARRAY[(o.i - 1)::text], budget_reserve_one(o.e));
      END LOOP;
    END IF;
  END IF;
  RETURN jsonb_build_object('reserve', reserved, 'claim', claimed, 'settle', settled);
END
$$"""

FUNCTIONS = ("budget_apply(jsonb, jsonb, jsonb)", "budget_reserve_one(jsonb)",
             "budget_standing(budgets)", "budget_period_is_current(budgets)")


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for statement in (PERIOD_IS_CURRENT, STANDING, RESERVE_ONE, APPLY):
        op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for function in FUNCTIONS:
        op.execute(f"DROP FUNCTION IF EXISTS {function}")
