"""Resilience on the message path: policies on the seam (aimesh_tasks/policies), one file each.

| module        | what                                                                   |
|---------------|------------------------------------------------------------------------|
| retry.py      | the same endpoint again after a short overload: full-jitter backoff,   |
|               | Retry-After honoured, bounded attempts and waits, deadline-aware       |
| breaker.py    | a circuit breaker per endpoint shared by every worker (the policy)     |
| breaker_store | its state in Redis: atomic Lua scripts, exactly K half-open probes     |
| priority.py   | AiMessage.priority 0-9 as the broker's priority (Redis steps, AMQP)    |

Hedged requests (issue 14, part 3) are not built yet. Where they would sit: a
`hedging.py` policy after the retry policy. Its before_call, for a message asking
`hedge={"after_ms": N}` (or the endpoint's live p95), reserves the next-ranked endpoint's
worst case under a new attempt number and, if a per-endpoint token bucket in Redis
allows (about 10 % extra calls over a window), publishes that call with a countdown of
N ms on its own queue. The first answer claims the message in Redis (SET NX on a
winner key next to the hand-off record) and stores the result under the message id;
the loser, if not yet started, sees the claim in its begin round trip and releases its
reservation; if in flight, its worker aborts the HTTP request (a cancel flag polled by
a streamed read) and settles from the provider's usage or, lacking it, its reservation.
"""
