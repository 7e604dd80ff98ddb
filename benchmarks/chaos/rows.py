"""Every row of the matrix, in the table's order."""

from __future__ import annotations

from benchmarks.chaos import rows_faults, rows_kills, rows_servers
from benchmarks.chaos.runner import Row

ROWS: dict[str, Row] = {row.name: row for row in (
    *rows_kills.ROWS, *rows_faults.INPUT_ROWS, *rows_servers.ROWS, *rows_faults.FAULT_ROWS)}
