"""The shapes that travel between hops of the message path (pure: no I/O).

An `Envelope` is the one argument of a call task: the message as it was accepted, the
ranked route still to try, the attempts made so far, whether the agent is metered, the
single-flight it leads, what it was charged so far, and how its outcome is delivered.
It has a version field, so that a worker of the next release can read what this one
queued (and refuse, with a clear error, what it cannot read).

    envelope.to_json() -> dict  (JSON-safe task argument)
    Envelope.from_json(data)    (InvalidEnvelope if it is not one)
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal, NotRequired, TypedDict

from aimesh_tasks import keys
from aimesh_tasks.errors import InvalidInput

ENVELOPE_VERSION = 1
Reply = Literal["raise", "result"]


class InvalidEnvelope(InvalidInput):
    """A call task's argument is not an envelope this release can read."""

    code = "invalid_envelope"


class RouteEntry(TypedDict):
    """One endpoint of a route as it travels (prices in nano-USD per 1k tokens)."""

    id: str
    provider: str
    base_url: str
    model: str
    api_key_env: str | None
    input_nusd_per_1k: int
    output_nusd_per_1k: int
    capacity: int
    tags: list[str]
    enabled: bool
    max_output_tokens: int | None
    api_key_file: NotRequired[str | None]  # absent in envelopes queued before 0005
    origin: NotRequired[str]  # 'operator' or 'announced'; absent before 0013: 'operator'


# In the attempt record of a call the path retried at the same endpoint: the wait, in
# seconds, before the retry (aimesh_tasks/resilience/retry.py).
RETRIED_AFTER = "retried_after_s"


class AttemptRecord(TypedDict, total=False):
    """One call made for the message (see messages.Attempt)."""

    endpoint_id: str
    ok: bool
    latency_ms: float
    error: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class Flight:
    """The single-flight a leading message ends when it has its answer: the request key,
    the leader's fencing token, whether and how long to cache the answer, the cache
    scope, and the prompt text for the semantic cache (when on for the agent)."""

    key: str
    token: str
    store: bool
    ttl_s: int
    scope: str
    semantic_text: str | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"key": self.key, "token": self.token, "store": self.store,
                                "ttl_s": self.ttl_s, "scope": self.scope}
        if self.semantic_text is not None:
            data["semantic_text"] = self.semantic_text
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Flight:
        return cls(key=str(data["key"]), token=str(data["token"]), store=bool(data["store"]),
                   ttl_s=int(data["ttl_s"]), scope=str(data["scope"]),
                   semantic_text=data.get("semantic_text"))


@dataclass(frozen=True, slots=True)
class Envelope:
    """What a call task carries. `route[0]` is the endpoint to call now; `attempts`
    has one record per call already made (so `len(attempts)` numbers this call);
    `charged_nusd` sums what the agent was charged for the message so far; `reply`
    says whether a refusal or failure is raised ('raise') or returned as
    {"error": ...} ('result', for workflow steps). `lane` is set for a raced (hedged)
    message: 0 for its primary call and the primary's retries and fallbacks, 1.. for
    each hedge (one call, under `keys.hedge_call_key`; pipeline/race.py)."""

    message: dict[str, Any]
    route: list[RouteEntry]
    attempts: list[AttemptRecord] = field(default_factory=list)
    metered: bool = False
    flight: Flight | None = None
    started_at: str | None = None
    charged_nusd: int = 0
    reply: Reply = "raise"
    queue_position: int | None = None
    lane: int | None = None
    v: int = ENVELOPE_VERSION

    @property
    def message_id(self) -> str:
        return str(self.message["id"])

    @property
    def attempt_no(self) -> int:
        """The number of the call this envelope makes now (0 for the first)."""
        return len(self.attempts)

    @property
    def call_key(self) -> str:
        """The key of the call this envelope makes now (a hedge's has its lane in it)."""
        if self.lane:
            return keys.hedge_call_key(self.message_id, self.lane)
        return keys.call_key(self.message_id, self.attempt_no)

    def next_hop(self, attempt: AttemptRecord, charged_nusd: int, started_at: str
                 ) -> Envelope:
        """The envelope for the next endpoint of the route, after `attempt`."""
        return replace(self, route=self.route[1:], attempts=[*self.attempts, attempt],
                       charged_nusd=charged_nusd, started_at=started_at)

    def retry_hop(self, attempt: AttemptRecord, charged_nusd: int, started_at: str
                  ) -> Envelope:
        """The envelope for the same endpoint again (a retry: a new attempt), after
        `attempt`."""
        return replace(self, attempts=[*self.attempts, attempt], charged_nusd=charged_nusd,
                       started_at=started_at)

    def to_json(self) -> dict[str, Any]:
        """The JSON-safe task argument."""
        return {
            "v": self.v, "message": self.message, "route": list(self.route),
            "attempts": list(self.attempts), "metered": self.metered,
            "flight": self.flight.to_json() if self.flight is not None else None,
            "started_at": self.started_at, "charged_nusd": self.charged_nusd,
            "reply": self.reply, "queue_position": self.queue_position,
            **({"lane": self.lane} if self.lane is not None else {}),
        }

    @classmethod
    def from_json(cls, data: Any) -> Envelope:
        """Read a task argument; InvalidEnvelope names what is wrong with it."""
        if not isinstance(data, dict):
            raise InvalidEnvelope(f"envelope: expected a JSON object, got "
                                  f"{type(data).__name__}", field="envelope")
        version = data.get("v")
        if version != ENVELOPE_VERSION:
            raise InvalidEnvelope(
                f"envelope: version {version!r} is not one this worker reads "
                f"({ENVELOPE_VERSION}); upgrade the worker", field="v")
        try:
            route, message = list(data["route"]), dict(data["message"])
            flight = data.get("flight")
            reply = data.get("reply", "raise")
            if reply not in ("raise", "result") or not route:
                raise ValueError("reply must be 'raise' or 'result', route non-empty")
            return cls(
                message=message, route=route, attempts=list(data.get("attempts") or []),
                metered=bool(data.get("metered", False)),
                flight=Flight.from_json(flight) if flight else None,
                started_at=data.get("started_at"),
                charged_nusd=int(data.get("charged_nusd", 0)), reply=reply,
                queue_position=(None if data.get("queue_position") is None
                                else int(data["queue_position"])),
                lane=None if data.get("lane") is None else int(data["lane"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidEnvelope(f"envelope: {exc}", field="envelope") from None
