"""Semantic intent routing: which route a message is for, by sentence embeddings.

A message's last user turn is embedded (MiniLM, dedup/embedding.py, from the `[semantic]`
extra, loaded offline) and scored against each route's example intents; a route's score is
its nearest example's cosine. Then, in `pick` (pure):

    best below AIMESH_INTENT_MIN_SCORE  → the best route's fallback, else NoRouteMatches
    top two closer than the threshold   → Ambiguous, naming both and their scores
    otherwise                           → the best route

Example embeddings are computed once per process for each set of intents (a route whose
intents change is embedded again); the message's text is embedded once per message.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from aimesh_tasks.errors import Ambiguous, NoRouteMatches
from aimesh_tasks.governance.routes import Route
from aimesh_tasks.messages import AiMessage

if TYPE_CHECKING:  # numpy and the model come with the optional [semantic] extra
    from aimesh_tasks.dedup.embedding import Vectors

Via = Literal["name", "intent", "fallback"]
SCORE_PLACES = 4
POLICY = "routes"  # the policy whose refusals these are (governance/route_policy.py)


@dataclass(frozen=True, slots=True)
class IntentMatch:
    """The route a message goes to, how it was chosen, and every route's score."""

    route: str
    via: Via
    scores: dict[str, float]


def intent_text(message: AiMessage) -> str:
    """The text matched against intents: the last user turn (else the last message)."""
    users = [m for m in message.messages if m.role == "user"]
    return (users or message.messages)[-1].text()


def pick(scores: Mapping[str, float], routes: Mapping[str, Route], *, min_score: float,
         ambiguity_threshold: float) -> IntentMatch:
    """The route for a message with these scores (pure); Ambiguous or NoRouteMatches."""
    shown = {name: round(score, SCORE_PLACES) for name, score in scores.items()}
    ranked = sorted(scores.items(), key=lambda item: (-item[1], item[0]))
    if not ranked:
        raise NoRouteMatches("no route has example intents to match this message against; "
                             "name a route in metadata 'aimesh.route'", scores={}, policy=POLICY)
    best, best_score = ranked[0]
    if best_score < min_score:
        fallback = routes[best].fallback
        if fallback is None:
            raise NoRouteMatches(
                f"no route matches this message: the closest, '{best}', scores "
                f"{best_score:.3f}, under the minimum {min_score:g} "
                "(AIMESH_INTENT_MIN_SCORE), and has no fallback route", scores=shown, policy=POLICY)
        return IntentMatch(fallback, "fallback", shown)
    if len(ranked) > 1 and best_score - ranked[1][1] < ambiguity_threshold:
        second, second_score = ranked[1]
        raise Ambiguous(
            f"the message matches routes '{best}' ({best_score:.3f}) and '{second}' "
            f"({second_score:.3f}) too closely to choose (within {ambiguity_threshold:g}, "
            "AIMESH_INTENT_AMBIGUITY_THRESHOLD); name the route in metadata 'aimesh.route'",
            routes=[best, second], scores={best: shown[best], second: shown[second]},
            policy=POLICY)
    return IntentMatch(best, "intent", shown)


class IntentIndex:
    """Each route's example embeddings, computed once per set of intents."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._vectors: dict[tuple[str, ...], Vectors] = {}

    def _examples(self, intents: tuple[str, ...]) -> Vectors:
        found = self._vectors.get(intents)
        if found is None:
            from aimesh_tasks.dedup.embedding import embed

            with self._lock:
                found = self._vectors.setdefault(intents, embed(list(intents)))
        return found

    def scores(self, text: str, routes: Mapping[str, Route]) -> dict[str, float]:
        """Every route with intents, scored against `text` (its nearest example's cosine)."""
        from aimesh_tasks.dedup.embedding import embed_one

        with_intents = {name: r for name, r in routes.items() if r.intents}
        if not with_intents:
            return {}
        vector = embed_one(text)
        return {name: float((self._examples(r.intents) @ vector).max())
                for name, r in with_intents.items()}


INDEX = IntentIndex()
