"""The fault matrix: chaos rows against servers the run starts and kills itself.

    servers     own redis-server / Postgres (initdb + pg_ctl) / worker subprocesses, by PID
    relay       holds one provider call at an exact phase (request held, answer held)
    cluster     a run's servers; per row: simulators, relays, endpoints, agents, workers
    workload    messages submitted through the producer API and followed to a result
    invariants  the five invariants, judged from SQL and the simulators' call logs
    runner      one row: its fault under load, the drain, the verdict
    rows_*      the rows; `rows.ROWS` lists them in the table's order
    report      the table

`benchmarks/chaos.py` is the script; `tests/test_chaos.py` runs small rows through it.
"""
