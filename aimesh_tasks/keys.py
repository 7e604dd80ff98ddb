"""Every Redis key and Celery queue name, built by small functions (one test pins them)."""

from __future__ import annotations

PREFIX = "aimesh"
ROUTE_QUEUE = "aimesh.route"
ENDPOINT_QUEUE_PREFIX = "aimesh.endpoint."
# Nothing is published here: an endpoint worker following an empty registry listens on it
# (a Celery worker given no queue would consume the default queue, aimesh.route).
IDLE_QUEUE = "aimesh.idle"
# RabbitMQ: where quorum queues dead-letter a message past its delivery limit (a fanout
# exchange), and the one queue bound to it that workers drain into the dead-letter store.
DEAD_EXCHANGE = "aimesh.dead"
DEAD_QUEUE = "aimesh.dead"


def endpoint_queue(endpoint_id: str) -> str:
    """The Celery queue served by the workers of one endpoint."""
    return f"{ENDPOINT_QUEUE_PREFIX}{endpoint_id}"


def endpoint_id_of_queue(queue: str) -> str | None:
    """The endpoint id of an endpoint queue name, or None for any other queue."""
    if queue.startswith(ENDPOINT_QUEUE_PREFIX):
        return queue[len(ENDPOINT_QUEUE_PREFIX) :]
    return None


def live_stats(endpoint_id: str) -> str:
    """Hash of an endpoint's live figures: p50/p99 latency, error rate, health."""
    return f"{PREFIX}:live:{endpoint_id}:stats"


def live_window(endpoint_id: str) -> str:
    """List of the endpoint's recent calls, newest first: 'latency_ms:ok' strings."""
    return f"{PREFIX}:live:{endpoint_id}:window"


def live_inflight(endpoint_id: str) -> str:
    """Sorted set of call keys in flight at the endpoint, scored by start time (epoch s)."""
    return f"{PREFIX}:live:{endpoint_id}:inflight"


def key_missing(endpoint_id: str) -> str:
    """Sorted set of the workers serving an endpoint without its API key, each scored by
    when its report expires (epoch s); the follow step refreshes it."""
    return f"{PREFIX}:keys:missing:{endpoint_id}"


def registry_version() -> str:
    """Random token replaced on every endpoint change; routers reload when it moves."""
    return f"{PREFIX}:registry:version"


def outbox() -> str:
    """List of records waiting to be written to Postgres (JSON, oldest first)."""
    return f"{PREFIX}:outbox"


def outbox_rejected() -> str:
    """List of outbox records Postgres refused as data, each with the reason (JSON)."""
    return f"{PREFIX}:outbox:rejected"


def outbox_lock() -> str:
    """Lock held by the one flusher moving the outbox to Postgres."""
    return f"{PREFIX}:outbox:lock"


def call_journal(call_key: str) -> str:
    """A finished call's completion and cost, kept until it is surely settled."""
    return f"{PREFIX}:journal:{call_key}"


def call_key(message_id: str, attempt: int) -> str:
    """The key of one upstream call: unique per message and attempt (ledger, journal)."""
    return f"{message_id}:{attempt}"


def failpoint(name: str) -> str:
    """Set to the pid of the process paused at a test failpoint."""
    return f"{PREFIX}:failpoint:{name}"


def cache_entry(request_key: str) -> str:
    """A cached AiResult (JSON) for a request key, with a TTL."""
    return f"{PREFIX}:cache:{request_key}"


def flight(request_key: str) -> str:
    """The single-flight leader's fencing token for a request key, with a lease TTL."""
    return f"{PREFIX}:flight:{request_key}"


def flight_followers(request_key: str) -> str:
    """Messages waiting for the leader of a request key (JSON, in arrival order)."""
    return f"{PREFIX}:flight:{request_key}:followers"


def flight_tokens() -> str:
    """Counter handing out single-flight fencing tokens."""
    return f"{PREFIX}:flight:tokens"


def dedup_counters() -> str:
    """Hash of dedup counters: hits, misses, joins, semantic_hits."""
    return f"{PREFIX}:dedup:counters"


def semantic_index(scope: str) -> str:
    """Sorted set of a scope's semantic-cache entry ids, scored by expiry time (epoch s)."""
    return f"{PREFIX}:semantic:{scope}:index"


def semantic_entry(scope: str, entry_id: str) -> str:
    """One semantic-cache entry of a scope: result key, prompt text and vector, with a TTL."""
    return f"{PREFIX}:semantic:{scope}:entry:{entry_id}"


def metered_agents() -> str:
    """Set of agents that have a budget (a mirror of the budgets table)."""
    return f"{PREFIX}:budgets:metered"


def metered_agents_ready() -> str:
    """Present while the metered-agents set is complete; absent means ask Postgres."""
    return f"{PREFIX}:budgets:metered:ready"


def handoff(message_id: str) -> str:
    """The envelope a message was first handed to its call with: a duplicate delivery of
    its routing task reuses it instead of routing and reserving again."""
    return f"{PREFIX}:handoff:{message_id}"


def call_lease(call_key: str) -> str:
    """The lease of the one delivery allowed to make a call: 'token|host|pid'."""
    return f"{PREFIX}:call:{call_key}:lease"


def call_charged(call_key: str) -> str:
    """The call key a call is charged under, when a takeover had to use a new one."""
    return f"{PREFIX}:call:{call_key}:charged"


def call_lease_tokens() -> str:
    """Counter of call-lease fencing tokens."""
    return f"{PREFIX}:call:lease-tokens"
def dead_letters(queue: str) -> str:
    """Stream of the dead letters of one Celery queue, oldest first (delivery/dead_letters)."""
    return f"{PREFIX}:dead:queue:{queue}"


def dead_letter_queues() -> str:
    """Set of the queues that have a dead-letter stream."""
    return f"{PREFIX}:dead:queues"


def deliveries(task_id: str) -> str:
    """Counter of a task message's redeliveries (its first delivery is not counted)."""
    return f"{PREFIX}:deliveries:{task_id}"


def put_back(task_id: str) -> str:
    """Counter of the times a task message RabbitMQ dead-lettered unrun was put back on its
    queue (rabbit/drain.py)."""
    return f"{PREFIX}:deliveries:{task_id}:put_back"


def delivery_history(task_id: str) -> str:
    """List of a task message's deliveries that lost their worker (JSON, oldest first)."""
    return f"{PREFIX}:deliveries:{task_id}:history"


def ingress_message(message_id: str) -> str:
    """Hash of a message the HTTP ingress accepted: its agent and when (to poll it by id)."""
    return f"{PREFIX}:ingress:message:{message_id}"


def governance_version() -> str:
    """Random token replaced on every change of routes, agents or rate limits; each process
    reloads its governance table when it moves."""
    return f"{PREFIX}:governance:version"


def rate_log(subject: str, window_s: int) -> str:
    """Sorted set of the messages a subject ('agent:<id>') sent in a moving window, scored
    by the time they were admitted (epoch ms)."""
    return f"{PREFIX}:rate:{subject}:{window_s}:log"


def rate_tokens(subject: str, window_s: int) -> str:
    """Hash of the tokens each message in a subject's window is charged, plus '_total'."""
    return f"{PREFIX}:rate:{subject}:{window_s}:tokens"


def hops(message_id: str) -> str:
    """How many agent-to-agent hops a message is from its origin (absent: 0), with a TTL."""
    return f"{PREFIX}:hops:{message_id}"


def loop_refused(message_id: str) -> str:
    """Set once when a message is refused at the hop cap: it is dead-lettered once."""
    return f"{PREFIX}:hops:{message_id}:refused"


def workflow_cancelled(run_id: str) -> str:
    """Set when fail_fast cancels a run: its steps still queued are refused at routing."""
    return f"{PREFIX}:workflow:{run_id}:cancelled"


def accepted_seen() -> str:
    """Set of accepted messages whose routing task started, not yet noted in Postgres."""
    return f"{PREFIX}:accepted:seen"


def accepted_finished() -> str:
    """Set of accepted messages that reached a terminal state, not yet noted in Postgres."""
    return f"{PREFIX}:accepted:finished"


def reconcile_lock() -> str:
    """Lock held by the one worker reconciling accepted messages at a time."""
    return f"{PREFIX}:accepted:reconcile:lock"


def breaker(endpoint_id: str) -> str:
    """Hash of an endpoint's circuit breaker: state, epoch, failures, open_until, cooldown_s."""
    return f"{PREFIX}:breaker:{endpoint_id}"


def breaker_calls(endpoint_id: str) -> str:
    """Sorted set of the call keys the breaker counted in its window, scored by time (s)."""
    return f"{PREFIX}:breaker:{endpoint_id}:calls"


def breaker_failures(endpoint_id: str) -> str:
    """Sorted set of the failed call keys in the breaker's window, scored by time (s)."""
    return f"{PREFIX}:breaker:{endpoint_id}:failures"


def breaker_probes(endpoint_id: str) -> str:
    """Sorted set of the half-open probe calls admitted, scored by admission time (s)."""
    return f"{PREFIX}:breaker:{endpoint_id}:probes"


def ingress_batch_driver(batch_id: str) -> str:
    """Lease of the one ingress process driving a batch (its token, with a TTL)."""
    return f"{PREFIX}:ingress:batch:{batch_id}:driver"


def message_stream(message_id: str) -> str:
    """Stream of a streaming message's text deltas and call ends, as they happen (a Redis
    stream, trimmed and expiring: aimesh_tasks/streams)."""
    return f"{PREFIX}:stream:{message_id}"


def stream_gone(message_id: str) -> str:
    """Set (with a TTL) by the ingress when the client of a streaming message went away."""
    return f"{PREFIX}:stream:{message_id}:gone"


def streams_gone_channel() -> str:
    """Pub/sub channel the ingress announces a gone client on (the message id), so that a
    worker aborting calls on disconnect hears it at once."""
    return f"{PREFIX}:streams:gone"


def stream_reader_wake(reader_id: str) -> str:
    """Stream an ingress process's stream reader also reads, written to wake its blocking
    XREAD when a relay starts following a message (aimesh_tasks/streams/reader.py)."""
    return f"{PREFIX}:stream-reader:{reader_id}:wake"


def servers(endpoint_id: str) -> str:
    """Sorted set of the workers serving an endpoint they announced (`aimesh worker
    --serve`), each scored by its last heartbeat (epoch s); a clean stop removes it."""
    return f"{PREFIX}:servers:{endpoint_id}"


def hedge_call_key(message_id: str, lane: int) -> str:
    """The key of a hedge's call: lane 1.. of a raced message (its own ledger row); also
    its call task's id."""
    return f"{message_id}:hedge-{lane}"


def hedge_of_call_key(call_key: str) -> tuple[str, int] | None:
    """(message id, lane) of a hedge's call key or task id; None for any other."""
    message_id, _, lane = call_key.rpartition(":hedge-")
    return (message_id, int(lane)) if message_id and lane.isdigit() else None


def race_winner(message_id: str) -> str:
    """Set once (SET NX) by the call of a raced message that answered first: its lane."""
    return f"{PREFIX}:race:{message_id}:winner"


def race(message_id: str) -> str:
    """Hash of a raced message: hedges started and finished, and whether the primary's
    failure was delivered (closed) or left for a hedge still in flight (its error)."""
    return f"{PREFIX}:race:{message_id}"


def race_channel(message_id: str) -> str:
    """Pub/sub channel a race's win is announced on (payload: the message id), so that
    the workers of its other calls abort them at once."""
    return f"{PREFIX}:race:{message_id}:won"


RACE_CHANNEL_PATTERN = f"{PREFIX}:race:*:won"


def hedge_bucket(endpoint_id: str) -> str:
    """Hash of an endpoint's hedge budget: a token bucket (tokens) filled by the calls
    routed that could hedge to it, emptied by the hedges it takes."""
    return f"{PREFIX}:hedge:{endpoint_id}:bucket"
