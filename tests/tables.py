"""Emptying every table between tests while session-scoped workers may still hold a
transaction open (a redelivered copy finishing, a relay's last batch).

One TRUNCATE of all tables takes ACCESS EXCLUSIVE locks one table after another; a worker
whose transaction holds one of them and then reads another the TRUNCATE already locked
deadlocks with it, and Postgres aborts one side after deadlock_timeout (1 s) -- sometimes
the worker's transaction, sometimes the test's set-up (CI saw the latter). A short
lock_timeout makes the TRUNCATE give way first: it waits at most LOCK_WAIT for each lock,
lets go of all it took, and tries again once the worker's transaction has ended.
"""

from __future__ import annotations

from psycopg import errors
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError

from aimesh_tasks.db import Base
from tests.waits import wait_until

LOCK_WAIT = "200ms"  # well under deadlock_timeout, so the test's side is the one to yield


def empty_tables(engine: Engine) -> None:
    """TRUNCATE every table the models declare, giving way to any open transaction."""
    names = ", ".join(t.name for t in Base.metadata.sorted_tables)

    def attempt() -> bool:
        try:
            with engine.begin() as connection:
                connection.execute(text(f"SET LOCAL lock_timeout = '{LOCK_WAIT}'"))
                connection.execute(text(f"TRUNCATE {names}"))
        except OperationalError as error:
            if isinstance(error.orig, errors.LockNotAvailable | errors.DeadlockDetected):
                return False
            raise
        return True

    wait_until(attempt, "every table emptied (a transaction kept holding their locks)")
