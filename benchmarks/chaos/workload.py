"""A row's messages: submitted through the producer API, followed to a terminal result.

A message counts as accepted when `submit()` returned; one whose submit raised was
refused (visibly: the error type is counted), never lost. Outcomes are read from the
result backend, as its producer would: SUCCESS, FAILURE, or None while none is there.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

READY = ("SUCCESS", "FAILURE", "REVOKED")
POLL_S = 0.25


class Workload:
    """The messages of one row and what became of them."""

    def __init__(self, row: str) -> None:
        self.row = row
        self.tag = uuid.uuid4().hex[:8]
        self.accepted: list[str] = []
        self.refused: Counter[str] = Counter()
        self.refusals: dict[str, str] = {}  # the first message of each refusal type
        self.errors: Counter[str] = Counter()  # error types of FAILURE results
        self._outcomes: dict[str, str | None] = {}
        self.started = time.monotonic()
        self._count = 0

    def message(self, agent: str, **fields: Any) -> Any:
        """A new message with a prompt no other message of the run has."""
        from aimesh_tasks.messages import AiMessage

        self._count += 1
        fields.setdefault("max_tokens", 16)
        return AiMessage(agent_id=agent, prompt=f"chaos {self.row} {self.tag} #{self._count}",
                         **fields)

    def submit(self, agents: Iterable[str], count: int) -> list[str]:
        """Submit `count` messages, round-robin over `agents`; the accepted ids."""
        names = list(agents)
        ids = []
        for n in range(count):
            message = self.message(names[n % len(names)])
            if self.publish(message, partial(submit_message, message)):
                ids.append(message.id)
        return ids

    def publish(self, message: Any, send: Callable[[], Any]) -> bool:
        """Run `send` for `message`; track it as accepted, or count the refusal."""
        try:
            send()
        except Exception as exc:  # a refusal the producer sees: counted by type
            self.refused[type(exc).__name__] += 1
            self.refusals.setdefault(type(exc).__name__, str(exc)[:200])
            return False
        self.track(message.id)
        return True

    def track(self, message_id: str) -> None:
        """Follow a message (or workflow run) id published some other way."""
        self.accepted.append(message_id)
        self._outcomes[message_id] = None

    def outcomes(self) -> dict[str, str | None]:
        """Each accepted id's terminal state, or None; polls only the unfinished."""
        from celery.result import AsyncResult

        from aimesh_tasks.app import app

        for message_id, state in self._outcomes.items():
            if state is not None:
                continue
            try:
                result = AsyncResult(message_id, app=app)
                found = result.state
                if found in READY:
                    self._outcomes[message_id] = found
                    if found != "SUCCESS":
                        self.errors[type(result.result).__name__] += 1
            except Exception:  # the backend is away: still unfinished
                break
        return dict(self._outcomes)

    def finished(self) -> int:
        """How many accepted messages have a terminal result."""
        return sum(state is not None for state in self.outcomes().values())

    def wait_finished(self, count: int, bound_s: float, tick: Callable[[], None]) -> bool:
        """Wait until `count` messages finished (calling `tick` every poll); False if the
        bound passed first."""
        deadline = time.monotonic() + bound_s
        while self.finished() < count:
            if time.monotonic() > deadline:
                return False
            tick()
            time.sleep(POLL_S)
        return True

    def drain(self, bound_s: float, tick: Callable[[], None]) -> float | None:
        """Wait until every accepted message finished; seconds since the row started,
        or None if some were still unfinished after `bound_s`."""
        if self.wait_finished(len(self.accepted), bound_s, tick):
            return time.monotonic() - self.started
        return None


def submit_message(message: Any) -> Any:
    """`aimesh_tasks.submit()` of one message."""
    from aimesh_tasks.producer import submit

    return submit(message)
