"""Resilience on the message path: policies on the seam (aimesh_tasks/policies), one file each.

| module        | what                                                                   |
|---------------|------------------------------------------------------------------------|
| retry.py      | the same endpoint again after a short overload: full-jitter backoff,   |
|               | Retry-After honoured, bounded attempts and waits, deadline-aware       |
| breaker.py    | a circuit breaker per endpoint shared by every worker (the policy)     |
| breaker_store | its state in Redis: atomic Lua scripts, exactly K half-open probes     |
| priority.py   | AiMessage.priority 0-9 as the broker's priority (Redis steps, AMQP)    |
| hedging.py    | hedged requests: a slow call raced by one at the next-ranked endpoint  |
| hedge_budget  | the hedge budget: a token bucket per endpoint in Redis (atomic Lua)    |

Hedged requests (issue 14, part 3). A message asking `hedge={"after_ms": N}` (0: race at
once) or `{"after": "p95"}` (the first endpoint's live p95), or whose agent has a default
(AIMESH_HEDGE_AGENTS), is planned a hedge by the hedging policy's `admit`: the next-ranked
endpoint (up to `max_extra` of them), unless the deadline comes first. Routing hands the
message off as lane 0 of a race and publishes each hedge (lane 1..) with a countdown of
the delay, on its endpoint's queue, under its own call key. When a hedge's task runs,
the policy's `before_call` fires it only if the race is still open, the deadline is
further than the endpoint's live p50, the endpoint's token bucket has a token, and its
worst case can be reserved; otherwise the task ends quietly (`CallNotNeeded` → `Lost`)
and holds nothing. The race itself (pipeline/race.py): the first answer claims a winner
key (SET NX) and becomes the message's result, once; the win is published, and the one
subscriber thread of each worker process (aimesh_tasks/flag_watch.py) aborts the race's
calls in flight there (the connection closed: the provider sees the disconnect), which
are charged from the provider's reported usage, else their reservation (`aborted`). A
hedge is one call with no fallback of its own; when every call that started has failed,
the first call's error (after its retries and fallbacks) is the message's, delivered
once by whichever call failed last; a dead-lettered hedge counts as failed.

Measured (benchmarks/bench_resilience.py --only hedging --rounds 3 --hedge-messages 400
--hedge-rate 10; two endpoints answering 95 % in 100 ms and 5 % in 2 s; medians of 3
rounds; docs/design-notes.md has the table): p99 2023 ms without hedging; after the live
p95 284 ms (0.14x) at 5.75 % extra calls; after a fixed 150 ms 275 ms (0.136x) at 6.75 %;
an immediate race 139 ms (0.069x) at 100 %. The 'p95' delay is held between 1.5 and 4
live p50s (AIMESH_HEDGE_P95_FLOOR_X, _CAP_X; hedging.hedge_delay_ms says why): without
the bounds it measured 0.94x (a 95th sample in the slow mode) and 1.0x (one just past the
fast mode, which spent the hedge budget on calls a few ms late).
"""
