"""What a step of the message path decided, as values the task shells map to Celery.

Routing gives one of `Hit` (answered without a call: exact or semantic cache), `Joined`
(an identical message is in flight; its leader answers this one), `HandOff` (call the
envelope's first endpoint on its queue), `Requeue` (a policy asked the message to wait:
route it again after `countdown_s`) or `Refused` (a policy, the budget or routing said
no). A call gives `Done`, `Fallback` (hand the envelope on: to the next endpoint,
or to the same one for a retry, after `countdown_s`), `Retry` (run this call again after
`countdown_s`) or `Failed`; a call of a raced (hedged) message may also give `Lost`
(another call of its race answers the message) or `AnswerFor` (a hedge's answer, or the
race's failure, stored as the message's result: pipeline/race.py).

| outcome   | the shell                                                         |
|-----------|-------------------------------------------------------------------|
| Hit, Done | returns the result                                                |
| Joined    | returns, storing nothing (the leader stores this task's result)   |
| HandOff,  | publishes the call task on the endpoint's queue under this id     |
| Fallback  | (a Fallback's countdown: short ones sleep first, longer ones are  |
|           | a countdown on the published task)                                |
| Retry     | publishes this task again with a countdown                        |
| Requeue   | the same, not counted as a retry (a wait, not a failure)          |
| HandOff's | each also published on its endpoint's queue after its countdown,  |
| hedges    | under its own task id                                             |
| Refused,  | raises the error, or returns {"error": ...} when the envelope asks |
| Failed    | for errors as results (workflow steps)                            |
| Lost      | returns, storing nothing (the race's answer is the message's)     |
| AnswerFor | stores the result or error under the message's id, returns nothing|
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aimesh_tasks.envelope import Envelope
from aimesh_tasks.errors import AimeshError


@dataclass(frozen=True, slots=True)
class Hit:
    """Answered without a call; `result` is the AiResult dict."""

    result: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Joined:
    """Following an identical message in flight; its leader stores this one's result."""


@dataclass(frozen=True, slots=True)
class Hedge:
    """A hedge of a handed-off message: its own envelope (one call, lane 1..), published
    `countdown_s` after the hand-off."""

    envelope: Envelope
    countdown_s: float


@dataclass(frozen=True, slots=True)
class HandOff:
    """Call `envelope.route[0]` on its queue (and publish the hedges, if any)."""

    envelope: Envelope
    hedges: tuple[Hedge, ...] = ()


@dataclass(frozen=True, slots=True)
class Refused:
    """Stopped before any call (`error` says by what)."""

    error: AimeshError


@dataclass(frozen=True, slots=True)
class Done:
    """The call answered (or an earlier delivery's journalled answer was found)."""

    result: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Fallback:
    """The call failed in a way another endpoint may not, or a policy asked for the same
    endpoint again: call `envelope.route[0]` (a new attempt) after `countdown_s`."""

    envelope: Envelope
    countdown_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Retry:
    """Run the same call task again after `countdown_s` (a lease held elsewhere, a
    transient outage)."""

    countdown_s: float
    reason: str


@dataclass(frozen=True, slots=True)
class Requeue:
    """Route this message again after `countdown_s` (a policy's wait, e.g. for a free
    slot of a rate limit that queues); nothing was admitted, reserved or handed off."""

    countdown_s: float
    reason: str


@dataclass(frozen=True, slots=True)
class Failed:
    """The message failed for good."""

    error: AimeshError


@dataclass(frozen=True, slots=True)
class Lost:
    """A call of a raced message that is not (or no longer) the message's answer: another
    call won, a hedge was not fired, or a failure another call of the race delivers."""

    reason: str


@dataclass(frozen=True, slots=True)
class AnswerFor:
    """A hedge ends its message: `result` (an AiResult dict) or `error` is stored under
    `task_id` (the message's id, whose AsyncResult the producer holds)."""

    task_id: str
    result: dict[str, Any] | None = None
    error: AimeshError | None = None


RouteOutcome = Hit | Joined | HandOff | Requeue | Refused
CallOutcome = Done | Fallback | Retry | Failed | Lost | AnswerFor
