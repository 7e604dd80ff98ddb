"""The between-tests reset gives way to a worker's open transaction instead of deadlocking
with it (CI once failed a teardown on exactly this: DeadlockDetected in TRUNCATE)."""

from __future__ import annotations

import threading

from sqlalchemy import text

from aimesh_tasks.db import Base, get_engine
from tests.tables import empty_tables
from tests.waits import wait_until


def test_reset_yields_to_a_transaction_that_takes_locks_in_the_other_order(
    database: str,
) -> None:
    tables = [t.name for t in Base.metadata.sorted_tables]
    first, last = tables[0], tables[-1]
    engine = get_engine()
    outcome: list[BaseException | None] = []

    def reset() -> None:
        try:
            empty_tables(engine)
            outcome.append(None)
        except BaseException as error:  # reported by the assertion below
            outcome.append(error)

    def reset_waiting() -> bool:
        with engine.connect() as watcher:  # its own transaction: activity is snapshotted
            return watcher.execute(text(
                "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND query LIKE 'TRUNCATE%'")).first() is not None

    with engine.connect() as worker:
        worker.execute(text(f"SELECT count(*) FROM {last}"))  # holds ACCESS SHARE on `last`
        resetter = threading.Thread(target=reset)
        resetter.start()
        wait_until(reset_waiting, "the reset waiting for the lock the open transaction holds")
        # The reset holds `first` by now; a plain TRUNCATE would deadlock with this read.
        worker.execute(text(f"SELECT count(*) FROM {first}"))
        worker.commit()
    resetter.join(timeout=60)
    assert outcome == [None]
