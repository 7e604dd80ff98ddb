"""Resilience on the message path: policies on the seam (aimesh_tasks/policies), one file each.

| module        | what                                                                   |
|---------------|------------------------------------------------------------------------|
| retry.py      | the same endpoint again after a short overload: full-jitter backoff,   |
|               | Retry-After honoured, bounded attempts and waits, deadline-aware       |
| breaker.py    | a circuit breaker per endpoint shared by every worker (the policy)     |
| breaker_store | its state in Redis: atomic Lua scripts, exactly K half-open probes     |
| priority.py   | AiMessage.priority 0-9 as the broker's priority (Redis steps, AMQP)    |

Hedged requests are not built yet (see the note in retry.py's docstring for where they
would sit).
"""
