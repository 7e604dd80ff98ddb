"""One typed settings object: every AIMESH_* variable, its type, default and meaning.

With nothing set, the defaults are the embedded mode: an in-memory Celery broker with an
in-process worker thread, a SQLite file database and an in-process Redis-compatible store.

| variable                          | default             | meaning                           |
|-----------------------------------|---------------------|-----------------------------------|
| AIMESH_BROKER_URL                 | memory://localhost/ | Celery broker (redis://, amqp://) |
| AIMESH_RESULT_BACKEND             | cache+memory://     | Celery result backend             |
| AIMESH_DATABASE_URL               | sqlite:///aimesh.db | endpoints, agents, decisions      |
| AIMESH_REDIS_URL                  | memory://           | live figures; memory:// = in-proc |
| AIMESH_DEDUP_TTL_SECS             | 300                 | cache TTL (also DEDUP_TTL_SECS)   |
| AIMESH_CACHE_GROUPS               | (empty)             | 'group=agent-a,agent-b;...'       |
| AIMESH_SEMANTIC_AGENTS            | (empty)             | semantic cache on for: ids or '*' |
| AIMESH_SEMANTIC_THRESHOLD         | 0.85                | cosine a semantic candidate needs |
| AIMESH_SINGLE_FLIGHT_LEASE_S      | 120                 | a silent leader is replaced after |
| AIMESH_ROUTE_WEIGHT_COST          | 0.4                 | weight of normalised cost         |
| AIMESH_ROUTE_WEIGHT_LOAD          | 0.3                 | weight of normalised load         |
| AIMESH_ROUTE_WEIGHT_LATENCY       | 0.3                 | weight of normalised p50 latency  |
| AIMESH_TASK_SOFT_TIME_LIMIT_S     | 60                  | soft time limit of every task     |
| AIMESH_TASK_TIME_LIMIT_S          | 90                  | hard limit: the worker child dies |
| AIMESH_VISIBILITY_TIMEOUT_S       | 300                 | Redis redelivery of unacked msgs  |
| AIMESH_MAX_DELIVERIES             | 5                   | deliveries, then dead-lettered    |
| AIMESH_RABBIT_QUEUE_TYPE          | quorum              | RabbitMQ queues: quorum / classic |
| AIMESH_PROVIDER_TIMEOUT_S         | 30                  | read timeout of an upstream call  |
| AIMESH_PROVIDER_CONNECT_TIMEOUT_S | 5                   | connect timeout of an upstream call|
| AIMESH_PROVIDER_CONNECTIONS_PER_URL | 1000              | open connections per provider URL |
| AIMESH_MAX_TOKENS_CAP             | 32768               | largest max_tokens of a message   |
| AIMESH_MAX_PAYLOAD_BYTES          | 262144              | largest chat payload, in bytes    |
| AIMESH_LIVE_WINDOW                | 200                 | calls kept for p50/p99/error rate |
| AIMESH_UNHEALTHY_AFTER_FAILURES   | 5                   | consecutive failures = down       |
| AIMESH_HEALTH_RETRY_S             | 30                  | a down endpoint is retried after  |
| AIMESH_EMBEDDED_CONCURRENCY       | 8                   | threads of the embedded worker    |
| AIMESH_WORKER_FOLLOW_ENDPOINTS    | false               | worker follows all endpoint queues|
| AIMESH_FOLLOW_INTERVAL_S          | 1.0                 | registry check for endpoint queues|
| AIMESH_RESERVATION_TIMEOUT_S      | 600                 | held reservations are reaped after|
| AIMESH_REAPER_INTERVAL_S          | 60                  | how often each worker reaps       |
| AIMESH_OUTBOX_FLUSH_INTERVAL_S    | 1.0                 | outbox → database flush period    |
| AIMESH_FAILPOINTS                 | (empty)             | tests: 'name@agent=s' pauses      |
| AIMESH_LOG_LEVEL                  | INFO                | level of the aimesh_tasks loggers |
| AIMESH_LOG_PROMPTS                | false               | put prompt text in decision logs  |
| AIMESH_WORKER_METRICS_PORT        | 0                   | worker node /metrics port; 0 = off|
| AIMESH_METRICS_AGENT_LABELS       | 0                   | agents labelled per process; 0=off|
| AIMESH_FLOWER_BASIC_AUTH          | (empty)             | 'user:password' for aimesh flower |
| AIMESH_WORKFLOW_MAX_STEPS         | 500                 | most steps in one workflow        |
| AIMESH_POLICIES                   | (empty)             | extra policies 'pkg.mod:Class,...'|
| AIMESH_TRANSIENT_RETRIES          | 8                   | task retries on a Redis/PG outage |
| AIMESH_REDIS_TIMEOUT_S            | 5                   | socket timeout of the Redis client|
| AIMESH_REDIS_MAX_CONNECTIONS      | 0                   | per process; 0 = from concurrency |
| AIMESH_ACCEPTED_LOG               | true                | accepted messages kept in Postgres|
| AIMESH_DURABLE_ANSWERS            | true                | a settled call keeps its answer   |
| AIMESH_REPUBLISH_AFTER_S          | 300                 | unseen accepted msg re-published  |
| AIMESH_RECONCILE_INTERVAL_S       | 10                  | how often workers reconcile       |
| AIMESH_DB_STATEMENT_TIMEOUT_S     | 30                  | Postgres statement_timeout; 0=off |
| AIMESH_DB_LOCK_TIMEOUT_S          | 5                   | Postgres lock_timeout; 0 = off    |
| AIMESH_DB_POOL_SIZE               | 10                  | Postgres connections per process  |
| AIMESH_DB_POOL_TIMEOUT_S          | 30                  | wait for a free one, then an error|
| AIMESH_INTENT_MIN_SCORE           | 0.40                | intent routing: least best score  |
| AIMESH_INTENT_AMBIGUITY_THRESHOLD | 0.05                | top two closer than this: 409     |
| AIMESH_MAX_HOPS                   | 8                   | agent-to-agent hops before refusal|
| AIMESH_HOPS_TTL_S                 | 86400               | a message's hop count is kept for |
| AIMESH_INGRESS_MAX_BODY_BYTES     | 1048576             | ingress: largest JSON body (413)  |
| AIMESH_INGRESS_MAX_FILE_BYTES     | 52428800            | ingress: largest /v1/files upload |
| AIMESH_INGRESS_WAIT_S             | 600                 | ingress: a sync request waits up to|
| AIMESH_INGRESS_KEY_CACHE_S        | 0.5                 | ingress: API key checks cached for|
| AIMESH_INGRESS_RESULT_POLL_S      | 1.0                 | ingress: result re-read if no news|
| AIMESH_INGRESS_JWT_ISSUER         | (empty)             | ingress: JWT `iss`; empty = off   |
| AIMESH_INGRESS_JWT_AUDIENCE       | (empty)             | ingress: JWT `aud` required       |
| AIMESH_INGRESS_JWT_ALGORITHMS     | RS256               | ingress: allowed algs, one family |
| AIMESH_INGRESS_JWT_KEY            | (empty)             | ingress: public key PEM or secret |
| AIMESH_INGRESS_JWT_AGENT_CLAIM    | sub                 | ingress: claim naming the agent   |
| AIMESH_STREAM_ON_DISCONNECT       | finish              | client gone: 'finish' or 'abort'  |
| AIMESH_STREAM_MAXLEN              | 1024                | entries kept per message stream   |
| AIMESH_STREAM_TTL_S               | 300                 | a message stream outlives its last|
| AIMESH_RETRY_MAX_ATTEMPTS         | 2                   | same-endpoint retries (429/503/529)|
| AIMESH_RETRY_BASE_S               | 0.5                 | first backoff window (full jitter)|
| AIMESH_RETRY_MAX_DELAY_S          | 30                  | longest wait; longer: fall back   |
| AIMESH_RETRY_MAX_TOTAL_DELAY_S    | 60                  | all retry waits of one message    |
| AIMESH_RETRY_SLEEP_MAX_S          | 1                   | shorter waits sleep in the worker |
| AIMESH_BREAKER_ENABLED            | true                | circuit breaker per endpoint      |
| AIMESH_BREAKER_FAILURES           | 5                   | consecutive failures: open        |
| AIMESH_BREAKER_FAILURE_RATE       | 0.5                 | or failure share above this, over |
| AIMESH_BREAKER_MIN_CALLS          | 20                  | at least this many calls, in      |
| AIMESH_BREAKER_WINDOW_S           | 60                  | a sliding window this long        |
| AIMESH_BREAKER_COOLDOWN_S         | 30                  | open this long, then half-open    |
| AIMESH_BREAKER_COOLDOWN_MAX_S     | 120                 | cap of the doubling cooldown      |
| AIMESH_BREAKER_PROBES             | 1                   | half-open probe calls, cluster-wide|
| AIMESH_BREAKER_ALL_OPEN           | fail                | all open: 'fail' or 'soonest'     |
| AIMESH_HEDGE_ENABLED              | true                | hedged requests (the model race)  |
| AIMESH_HEDGE_AGENTS               | (empty)             | agents' default hedge: a=p95,b=300|
| AIMESH_HEDGE_BUDGET_RATIO         | 0.1                 | extra calls per call, per endpoint|
| AIMESH_HEDGE_BUDGET_BURST         | 10                  | hedges an endpoint's bucket holds |
| AIMESH_HEDGE_BUDGET_WINDOW_S      | 60                  | an idle bucket is full again after|
| AIMESH_HEDGE_P95_DEFAULT_MS       | 1000                | 'p95' before an endpoint has one  |
| AIMESH_HEDGE_P95_FLOOR_X          | 1.5                 | 'p95' at least this many p50s     |
| AIMESH_HEDGE_P95_CAP_X            | 4                   | 'p95' at most this many p50s      |
| AIMESH_UPSTREAM_ALLOW_PRIVATE     | 127.0.0.0/8,::1     | private nets upstreams may reach  |
| AIMESH_REGISTRATION_TOKENS        | (empty)             | sha256 of accepted worker tokens  |
| AIMESH_REGISTRATION_TOKEN         | (empty)             | the token this worker announces by|
| AIMESH_SERVE_HEARTBEAT_S          | 1.0                 | serving worker's heartbeat period |
| AIMESH_SERVE_DOWN_AFTER_S         | 5.0                 | no heartbeat this long: not routed|
| AIMESH_WORKER_SERVES              | (empty)             | set by `aimesh worker --serve`    |
"""

from __future__ import annotations

import ipaddress
import re
from functools import lru_cache
from typing import Any, Literal

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from aimesh_tasks.errors import ConfigError

MEMORY_URL = "memory://"
_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)
_PASSWORD = re.compile(r"(://[^:/@]*:)[^@]*@")
_DATABASES = ("postgresql", "postgresql+psycopg", "sqlite", "sqlite+pysqlite")
# The fix an error message suggests, by the type of the setting.
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_KINDS = {int: "a whole number", float: "a number", bool: "true or false", str: "a text value"}


class Settings(BaseSettings):
    """Every AIMESH_* variable; invalid values fail at start-up naming the variable."""

    model_config = SettingsConfigDict(env_prefix="AIMESH_", extra="ignore", frozen=True)

    broker_url: str = Field("memory://localhost/", description="Celery broker URL.")
    result_backend: str = Field("cache+memory://", description="Celery result backend URL.")
    database_url: str = Field("sqlite:///aimesh.db", description="SQLAlchemy database URL.")
    redis_url: str = Field(MEMORY_URL, description="Redis for live figures and dedup.")
    dedup_ttl_secs: int = Field(
        300,
        ge=0,
        validation_alias=AliasChoices("AIMESH_DEDUP_TTL_SECS", "DEDUP_TTL_SECS"),
        description="Result-cache TTL in seconds (DEDUP_TTL_SECS is the original name).",
    )
    cache_groups: str = Field(
        "", description="Agents sharing cached answers: 'group=agent-a,agent-b;other=...'."
    )
    semantic_agents: str = Field(
        "", description="Agents with the semantic cache on: comma-separated ids, or '*'."
    )
    semantic_threshold: float = Field(
        0.85, gt=0, le=1, description="Cosine similarity a semantic candidate needs."
    )
    single_flight_lease_s: float = Field(
        120, gt=0, description="A single-flight leader that has not finished by then is replaced."
    )
    route_weight_cost: float = Field(0.4, ge=0, description="Weight of cost in the score.")
    route_weight_load: float = Field(0.3, ge=0, description="Weight of load in the score.")
    route_weight_latency: float = Field(0.3, ge=0, description="Weight of latency.")
    task_soft_time_limit_s: float = Field(60, gt=0, description="Soft time limit per task.")
    task_time_limit_s: float = Field(90, gt=0, description="Hard time limit per task.")
    visibility_timeout_s: int = Field(
        300, gt=0,
        description="Broker redelivery of unacked messages (Redis); above the hard time limit, "
                    "and small: what a killed worker held comes back after it.")
    max_deliveries: int = Field(
        5, ge=1, le=1000,
        description="Deliveries of one task message before it is dead-lettered instead of run "
        "again (a task whose worker dies on every delivery would otherwise loop forever).",
    )
    rabbit_queue_type: Literal["quorum", "classic"] = Field(
        "quorum",
        description="RabbitMQ only: the type of every task queue. quorum: durable, replicated "
        "when clustered, a delivery limit and a dead-letter exchange, no priorities before "
        "RabbitMQ 4.0 (FIFO); classic: priorities 0-9, no delivery limit on the broker "
        "(aimesh_tasks/rabbit/queues.py).",
    )
    provider_timeout_s: float = Field(30, gt=0, description="Read timeout of an upstream call.")
    provider_connect_timeout_s: float = Field(5, gt=0, description="Connect timeout upstream.")
    provider_connections_per_url: int = Field(
        1000, ge=1,
        description="Connections a process keeps open to one provider base URL (keep-alive); "
                    "a call finding them all busy waits for one, at most its read timeout.")
    max_tokens_cap: int = Field(32768, gt=0, description="Largest max_tokens allowed.")
    max_payload_bytes: int = Field(262144, gt=0, description="Largest message payload.")
    live_window: int = Field(200, ge=10, le=10000, description="Calls kept for live figures.")
    unhealthy_after_failures: int = Field(5, ge=1, description="Failures that mark it down.")
    health_retry_s: float = Field(30, ge=0, description="A down endpoint is retried after.")
    embedded_concurrency: int = Field(8, ge=1, description="Embedded worker threads.")
    worker_follow_endpoints: bool = Field(
        False, description="Workers consume every enabled endpoint's queue, following changes."
    )
    follow_interval_s: float = Field(
        1.0, gt=0, description="How often workers check the registry for endpoint queues."
    )
    reservation_timeout_s: float = Field(
        600, gt=0,
        description="A budget reservation held this long is reaped (after any redelivery: "
                    "above the visibility timeout plus the hard time limit).")
    reaper_interval_s: float = Field(60, gt=0, description="How often workers run the reaper.")
    # A flush costs about the same for 20 records as for 1,000 (one statement), so a longer
    # period is less CPU per message (0.2 s: ~7 % of a worker's CPU at 0 ms provider
    # latency, issue 18). Readers of these tables flush first, so none waits for it.
    outbox_flush_interval_s: float = Field(
        1.0, gt=0, description="How often each worker moves outbox records to the database."
    )
    failpoints: str = Field(
        "", description="Test hook: 'name@agent=seconds,...' pauses once at a named point."
    )
    log_level: str = Field("INFO", description="Log level of aimesh_tasks loggers.")
    log_prompts: bool = Field(
        False, description="Put prompt text in the decision logs (off: prompts never logged)."
    )
    worker_metrics_port: int = Field(
        0, ge=0, le=65535,
        description="Each worker node serves Prometheus /metrics on this port; 0 = off.",
    )
    metrics_agent_labels: int = Field(
        0, ge=0, le=1000,
        description="Distinct agent ids given their own metric label per process (others: "
        "'_other'); 0 = no per-agent metrics.",
    )
    flower_basic_auth: SecretStr | None = Field(
        None, description="'user:password[,user:password]' that `aimesh flower` requires."
    )
    workflow_max_steps: int = Field(
        500, ge=1, le=10000, description="Most steps one workflow may have; more is refused."
    )
    policies: str = Field(
        "", description="Extra message-path policies: 'package.module:ClassName,...'."
    )
    redis_timeout_s: float = Field(
        5, gt=0, description="Socket timeout of the Redis client (live figures, dedup, leases), "
                             "and the longest wait for a free connection of its pool.")
    redis_max_connections: int = Field(
        0, ge=0,
        description="Most connections one process's Redis client opens (a thread finding "
                    "them busy waits for one); 0 = one per task the process runs at once plus "
                    "16, at most 64 (100 outside a worker): aimesh_tasks/pools.py.")
    transient_retries: int = Field(
        8, ge=0, le=100,
        description="Retries of a task after a transient Redis/Postgres error, with backoff.",
    )
    accepted_log: bool = Field(
        True,
        description="Keep every accepted message in Postgres until it finishes, and have "
        "workers re-publish those the broker lost (off in embedded mode).")
    durable_answers: bool = Field(
        True,
        description="A metered call's settlement in Postgres keeps its journal entry (the "
        "answer text, or the failure) until the reservation timeout plus a day, so a Redis "
        "that lost its data does not make the call again (pipeline/durable.py).")
    republish_after_s: float = Field(
        300, gt=0,
        description="An accepted message no worker has seen this long (or seen and not "
        "finished this long plus the hard time limit) is re-published; set it above the "
        "longest wait in a queue.")
    reconcile_interval_s: float = Field(
        10, gt=0, description="How often workers reconcile the accepted messages.")
    db_statement_timeout_s: float = Field(
        30, ge=0, description="Postgres statement_timeout of every connection; 0 = none.")
    db_lock_timeout_s: float = Field(
        5, ge=0, description="Postgres lock_timeout of every connection; 0 = none.")
    db_pool_size: int = Field(
        10, ge=1, le=1000,
        description="Most Postgres connections one process opens per engine, kept once "
                    "opened: a task holds one for a statement, so a thousand threads share "
                    "them; the server's max_connections is shared by every process.")
    db_pool_timeout_s: float = Field(
        30, gt=0,
        description="A task waits this long for a free Postgres connection of its process, "
                    "then fails (and is retried) with an error naming AIMESH_DB_POOL_SIZE.")
    intent_min_score: float = Field(
        0.40, ge=-1, le=1,
        description="Intent routing: a best route scoring below this sends the message to "
        "that route's fallback (or refuses it: no route matches).")
    intent_ambiguity_threshold: float = Field(
        0.05, ge=0, le=2,
        description="Intent routing: top two routes closer than this are refused as "
        "ambiguous (409) instead of guessed.")
    max_hops: int = Field(
        8, ge=1, le=1000,
        description="Most agent-to-agent hops (a message fed from another message's output, "
        "metadata 'aimesh.parent_id') before the chain is refused and dead-lettered.")
    hops_ttl_s: int = Field(
        86400, ge=60, description="How long a message's hop count is kept for its children.")
    ingress_max_body_bytes: int = Field(
        1_048_576, ge=1024,
        description="Largest request body the ingress reads; a larger one is refused (413) "
        "before it is parsed.")
    ingress_max_file_bytes: int = Field(
        52_428_800, ge=1024, description="Largest upload to the ingress's POST /v1/files.")
    ingress_wait_s: float = Field(
        600, gt=0, description="Longest a synchronous ingress request waits for its answer "
        "(then 504 with the message id to poll; the message stays queued).")
    ingress_key_cache_s: float = Field(
        0.5, ge=0, le=1,
        description="How long an ingress process trusts an API key check (a revoked key is "
        "refused by every process after at most this long).")
    ingress_result_poll_s: float = Field(
        1.0, gt=0, description="Besides the result backend's pub/sub, the ingress re-reads a "
        "waited result this often (a missed publish costs at most this much).")
    ingress_jwt_issuer: str = Field(
        "", description="JWT bearer tokens are accepted when set: the `iss` they must carry.")
    ingress_jwt_audience: str = Field("", description="The `aud` a JWT must carry.")
    ingress_jwt_algorithms: str = Field(
        "RS256", description="Comma-separated JWT algorithms accepted, all of one family "
        "(HS*, or asymmetric RS/PS/ES/EdDSA); 'none' is never accepted.")
    ingress_jwt_key: SecretStr | None = Field(
        None, description="The JWT verification key: a PEM public key (asymmetric "
        "algorithms) or the shared secret (HS*).")
    ingress_jwt_agent_claim: str = Field(
        "sub", min_length=1, description="The JWT claim that names the agent.")
    stream_on_disconnect: Literal["finish", "abort"] = Field(
        "finish", description="A streaming call whose client went away: 'finish' it (charged "
        "from the provider's final usage) or 'abort' it (the connection is closed; charged "
        "the final usage if it came, else the reservation, flagged 'aborted').")
    stream_maxlen: int = Field(
        1024, ge=16, description="Entries a message's delta stream keeps (XADD MAXLEN ~); a "
        "reader that falls further behind gets the rest from the final result.")
    stream_ttl_s: int = Field(
        300, ge=10, description="A message's delta stream expires this long after its last "
        "entry.")
    retry_max_attempts: int = Field(
        2, ge=0, le=20,
        description="Retries of a call at the same endpoint after a short overload (429, 503, "
        "529), each a new call; 0 = fall back at once.")
    retry_base_s: float = Field(0.5, gt=0, description="First backoff window, in seconds.")
    retry_max_delay_s: float = Field(
        30, gt=0, description="Longest single retry wait; a longer Retry-After falls back.")
    retry_max_total_delay_s: float = Field(
        60, ge=0, description="All retry waits of one message together, in seconds.")
    retry_sleep_max_s: float = Field(
        1, ge=0, description="Retry waits up to this sleep in the worker; longer ones "
        "re-publish the call with a countdown.")
    breaker_enabled: bool = Field(True, description="A circuit breaker per endpoint.")
    breaker_failures: int = Field(5, ge=1, description="Consecutive failures that open it.")
    breaker_failure_rate: float = Field(
        0.5, gt=0, le=1, description="A failure share above this over the window opens it.")
    breaker_min_calls: int = Field(20, ge=1, description="Calls the failure share needs.")
    breaker_window_s: float = Field(60, gt=0, description="Sliding window of the share.")
    breaker_cooldown_s: float = Field(30, gt=0, description="Open this long, then half-open.")
    breaker_cooldown_max_s: float = Field(
        120, gt=0, description="Cap of the cooldown, doubled by every failed probe.")
    breaker_probes: int = Field(
        1, ge=1, le=100, description="Probe calls admitted in half-open, cluster-wide.")
    breaker_all_open: Literal["fail", "soonest"] = Field(
        "fail", description="Every candidate's breaker open: fail fast ('fail'), or send to "
        "the endpoint whose cooldown ends first ('soonest').")
    hedge_enabled: bool = Field(
        True, description="Hedged requests: a message (or agent) asking for a hedge races a "
        "slow call with one at the next-ranked endpoint (resilience/hedging.py).")
    hedge_agents: str = Field(
        "", description="Agents' default hedge, comma-separated agent=when[:max_extra], when "
        "'p95' or milliseconds (0 races at once): 'research-bot=p95,chat-bot=300:2'. A "
        "message's own `hedge` wins.")
    hedge_budget_ratio: float = Field(
        0.1, gt=0, le=1, description="Hedges an endpoint may take per hedgeable call routed "
        "to race it (a token bucket per endpoint in Redis): 0.1 = at most 10 % extra calls.")
    hedge_budget_burst: float = Field(
        10, ge=1, description="Most hedges an endpoint's bucket holds (it starts full).")
    hedge_budget_window_s: float = Field(
        60, gt=0, description="An endpoint's hedge bucket untouched this long is full again.")
    hedge_p95_default_ms: int = Field(
        1000, ge=0, description="The delay of a hedge 'after': 'p95' while the endpoint has no "
        "live p95 yet (no successful call in its window).")
    hedge_p95_floor_x: float = Field(
        1.5, ge=1, description="A hedge 'after': 'p95' waits at least this many times the "
        "endpoint's live p50: a call only a little slower than the median is no tail "
        "(see resilience/hedging.py).")
    hedge_p95_cap_x: float = Field(
        4, ge=1, description="A hedge 'after': 'p95' waits at most this many times the "
        "endpoint's live p50: a call that much slower than the median is in the tail, "
        "whatever the window's 95th sample says (see resilience/hedging.py).")

    upstream_allow_private: str = Field(
        "127.0.0.0/8,::1",
        description="Loopback and private networks an upstream URL may reach, comma-separated "
        "('10.0.0.0/8,127.0.0.1'); empty: none. Link-local and cloud metadata addresses are "
        "never allowed (aimesh_tasks/registry/url_policy.py).")
    registration_tokens: SecretStr | None = Field(
        None, description="The worker registration tokens this cluster accepts, as "
        "comma-separated sha256 hex digests (printf %s TOKEN | sha256sum); empty: every "
        "announcement is refused.")
    registration_token: SecretStr | None = Field(
        None, description="The registration token this worker presents when it announces the "
        "endpoints it serves (`aimesh worker --serve`).")
    serve_heartbeat_s: float = Field(
        1.0, gt=0, description="How often a worker serving announced endpoints says it lives.")
    serve_down_after_s: float = Field(
        5.0, gt=0, description="A self-registered endpoint none of whose workers has beaten "
        "for this long is not routed to.")
    worker_serves: str = Field(
        "", description="The endpoint ids this worker announced and serves (set by `aimesh "
        "worker --serve`; only they call a self-registered endpoint).")

    @field_validator("upstream_allow_private")
    @classmethod
    def _networks(cls, value: str) -> str:
        for entry in _items(value):
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"'{entry[:64]}' is not a network. Fix: list networks such as "
                                 "'127.0.0.0/8,10.20.0.0/16,fd12::/16', or leave it empty for "
                                 "none") from None
        return value

    @field_validator("registration_tokens")
    @classmethod
    def _token_hashes(cls, value: SecretStr | None) -> SecretStr | None:
        for n, entry in enumerate(_items(value.get_secret_value() if value else ""), 1):
            if not _SHA256_HEX.match(entry.lower()):  # never echoed: it may be a token itself
                raise ValueError(f"entry {n} is not a sha256 hex digest (64 hex characters). "
                                 "Fix: list the digest of each token, never the token: "
                                 "printf %s \"$TOKEN\" | sha256sum")
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        return database_url(value)

    @field_validator("broker_url", "result_backend", "redis_url")
    @classmethod
    def _server_url(cls, value: str) -> str:
        if not _SCHEME.match(value):
            raise ValueError("not a URL. Fix: give one such as redis://127.0.0.1:6379/0")
        return value

    @model_validator(mode="after")
    def _limits_are_ordered(self) -> Settings:
        if self.task_soft_time_limit_s >= self.task_time_limit_s:
            raise ValueError(
                "AIMESH_TASK_SOFT_TIME_LIMIT_S must be below AIMESH_TASK_TIME_LIMIT_S "
                f"({self.task_soft_time_limit_s:g} >= {self.task_time_limit_s:g}). Fix: lower "
                "the soft limit or raise the hard one (defaults 60 and 90)"
            )
        if self.reservation_timeout_s <= self.visibility_timeout_s + self.task_time_limit_s:
            raise ValueError(
                f"AIMESH_RESERVATION_TIMEOUT_S ({self.reservation_timeout_s:g}) must exceed "
                f"AIMESH_VISIBILITY_TIMEOUT_S + AIMESH_TASK_TIME_LIMIT_S "
                f"({self.visibility_timeout_s + self.task_time_limit_s:g}): a reservation is "
                "reaped only after every redelivery of its task has had its chance")
        if self.route_weight_cost + self.route_weight_load + self.route_weight_latency <= 0:
            raise ValueError("AIMESH_ROUTE_WEIGHT_*: at least one weight must be above 0")
        if self.serve_down_after_s < 2 * self.serve_heartbeat_s:
            raise ValueError(
                f"AIMESH_SERVE_DOWN_AFTER_S ({self.serve_down_after_s:g}) must be at least twice "
                f"AIMESH_SERVE_HEARTBEAT_S ({self.serve_heartbeat_s:g}): one late heartbeat "
                "would otherwise take a live endpoint out of routing")
        if self.breaker_cooldown_s > self.breaker_cooldown_max_s:
            raise ValueError(
                f"AIMESH_BREAKER_COOLDOWN_S ({self.breaker_cooldown_s:g}) must not exceed "
                f"AIMESH_BREAKER_COOLDOWN_MAX_S ({self.breaker_cooldown_max_s:g})")
        parse_hedge_agents(self.hedge_agents)  # a bad one is refused at start, named
        return self

    @property
    def hedge_agent_defaults(self) -> dict[str, dict[str, Any]]:
        """AIMESH_HEDGE_AGENTS as {agent: hedge dict} (an AiMessage `hedge`'s shape)."""
        return parse_hedge_agents(self.hedge_agents)

    @property
    def embedded(self) -> bool:
        """True when the broker is in-process: one process, no servers."""
        return self.broker_url.startswith(MEMORY_URL)

    @property
    def cache_group_members(self) -> dict[str, frozenset[str]]:
        """AIMESH_CACHE_GROUPS as {group: agents}."""
        groups: dict[str, frozenset[str]] = {}
        for item in filter(None, self.cache_groups.split(";")):
            name, _, members = item.partition("=")
            groups[name.strip()] = frozenset(m.strip() for m in members.split(",") if m.strip())
        return groups

    @property
    def upstream_private_networks(self) -> list[str]:
        """AIMESH_UPSTREAM_ALLOW_PRIVATE as a list of networks (empty: none)."""
        return _items(self.upstream_allow_private)

    @property
    def registration_token_hashes(self) -> list[str]:
        """AIMESH_REGISTRATION_TOKENS as lower-case sha256 hex digests."""
        raw = self.registration_tokens.get_secret_value() if self.registration_tokens else ""
        return [entry.lower() for entry in _items(raw)]

    @property
    def served_endpoints(self) -> frozenset[str]:
        """AIMESH_WORKER_SERVES as a set of endpoint ids."""
        return frozenset(_items(self.worker_serves))

    @property
    def route_weights(self) -> tuple[float, float, float]:
        """(cost, load, latency) weights."""
        return (self.route_weight_cost, self.route_weight_load, self.route_weight_latency)


def parse_hedge_agents(value: str) -> dict[str, dict[str, Any]]:
    """AIMESH_HEDGE_AGENTS ('agent=when[:max_extra],...') as {agent: hedge dict};
    ValueError naming the setting and the form for an entry that is not one."""
    found: dict[str, dict[str, Any]] = {}
    for item in _items(value):
        agent, _, spec = item.partition("=")
        when, _, extra = spec.strip().partition(":")
        if not agent.strip() or not (when == "p95" or when.isdigit()) or not (
                extra == "" or extra.isdigit()):
            raise ValueError(
                f"AIMESH_HEDGE_AGENTS: '{item}' is not agent=when[:max_extra], when 'p95' "
                "or milliseconds (e.g. 'research-bot=p95,chat-bot=300:2')")
        hedge: dict[str, Any] = ({"after": "p95"} if when == "p95"
                                 else {"after_ms": int(when)})
        found[agent.strip()] = {**hedge, "max_extra": int(extra or 1)}
    return found


def _items(value: str) -> list[str]:
    """The non-empty, stripped entries of a comma-separated setting."""
    return [item.strip() for item in value.split(",") if item.strip()]


def database_url(value: str) -> str:
    """A database URL as SQLAlchemy reads it; ValueError with the fix if it is none, or
    one of a kind this project does not run on (Postgres, and SQLite for embedded use)."""
    fix = " Fix: give one such as postgresql://user@host:5432/aimesh or sqlite:///aimesh.db"
    if not _SCHEME.match(value):
        raise ValueError("not a database URL." + fix)
    # `postgres://` is what Heroku, Render and many tools print; SQLAlchemy only knows the
    # dialect as `postgresql`, so the common spelling is accepted and corrected.
    url = re.sub(r"^postgres(?=[:+])", "postgresql", value, flags=re.IGNORECASE)
    scheme = url.split("://", 1)[0].lower()
    if scheme not in _DATABASES:
        raise ValueError(f"'{scheme}' is not a database this runs on (Postgres via psycopg, "
                         "or SQLite)." + fix)
    return url


def _shown(name: str, value: Any) -> str:
    """The bad value as an error may show it: secrets never, URL passwords masked."""
    field = Settings.model_fields.get(name)
    if field is not None and field.annotation in (SecretStr, SecretStr | None):
        return "(hidden)"
    return repr(_PASSWORD.sub(r"\1***@", str(value)))


def _fix(name: str) -> str:
    field = Settings.model_fields[name]
    kind = _KINDS.get(field.annotation, "a valid value")  # type: ignore[arg-type]
    default = field.default
    shown = "empty" if default in ("", None) else str(default).lower() if isinstance(
        default, bool) else f"{default}"
    what = (field.description or "").rstrip(".")
    return f"Fix: set {kind}, or unset it for the default ({shown}); it is: {what[:1].lower()}" \
        f"{what[1:]}"


def describe_error(error: Any) -> tuple[str, str]:
    """(variable, one line: the variable, its bad value, the problem and the fix) for one
    pydantic error of Settings()."""
    reason = str(error["msg"]).removeprefix("Value error, ")
    where = ".".join(str(p) for p in error["loc"])
    if not where:  # a rule across settings: the message names the variables
        variable = reason.split(" ", 1)[0].rstrip(":")
        fix = "" if "Fix:" in reason else ". Fix: change one of the variables it names"
        return variable, reason + fix
    field = where.lower().removeprefix("aimesh_")
    variable = where if where.startswith("AIMESH_") else f"AIMESH_{where.upper()}"
    line = f"{variable}={_shown(field, error.get('input'))}: {reason}"
    if "Fix:" not in reason and field in Settings.model_fields:
        line += f". {_fix(field)}"
    return variable, line


def load_settings() -> Settings:
    """Read the environment into a Settings, or raise ConfigError naming the variable,
    the value's problem and the fix in one line."""
    try:
        return Settings()
    except ValidationError as exc:
        variable, line = describe_error(exc.errors()[0])
        raise ConfigError(line, setting=variable) from exc


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once on first use (never at import)."""
    return load_settings()


def reset_settings() -> None:
    """Forget the cached settings so the next get_settings() reads the environment again."""
    get_settings.cache_clear()
