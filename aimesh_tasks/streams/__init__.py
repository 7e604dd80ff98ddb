"""Streaming through the queue: a message's text travels from the worker that calls the
provider to the ingress that relays it, through one Redis stream per message.

    worker (endpoint queue)                         ingress (event loop)
    provider SSE ─ adapter parser ─ Forwarder ─XADD─▶ aimesh:stream:<id> ─XREAD BLOCK─▶
        start, delta, delta, ...   (as they arrive)       StreamReader ─ relay ─ SSE chunks
    journal → settle → `end` (the AiResult) or `error`
                                  ◀── aimesh:stream:<id>:gone + PUBLISH ── client left

- entries.py: the shapes of the entries (versioned JSON, one field each).
- writer.py: the worker's side: deltas as they arrive, the message's end, a replay.
- watch.py: the worker's ear for a client that left (AIMESH_STREAM_ON_DISCONNECT=abort).
- reader.py: the ingress's side: one XREAD BLOCK per process for every stream it relays.

The call path keeps its guarantees: the journal is written before the call is settled,
one provider call per call key (a redelivery whose journal exists replays its text), and
the budget is settled from the provider's final usage. The `end` entry is written only
after the call is settled, so a relay that has shown the usage has shown what was charged.
"""
