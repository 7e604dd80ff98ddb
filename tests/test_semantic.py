"""Semantic cache: the guards (pure), then the real MiniLM model on real Redis.

Model tests skip, saying why, only when the `semantic` extra is not installed; CI installs
it. The quality gate is deterministic: a fixed labelled set, a fixed model, no timing.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from aimesh_tasks import keys
from aimesh_tasks.dedup import guards
from aimesh_tasks.redis_client import get_redis

PAIRS = Path(__file__).parent / "data" / "semantic_pairs.jsonl"


@pytest.mark.parametrize(("a", "b", "check"), [
    ("Convert 100 USD to EUR.", "Convert 150 USD to EUR.", "numbers"),
    ("Explain recursion to a ten-year-old.", "Explain recursion to a six-year-old.", "numbers"),
    ("Set the cache TTL to 5 minutes.", "Set the cache TTL to 5 hours.", "units"),
    ('Translate "thank you" into French.', 'Translate "good night" into French.', "quotes"),
    ("What is the capital of Australia?", "What is the capital of Austria?", "entities"),
    ("I am allergic to peanuts.", "I am not allergic to peanuts.", "negation"),
    ("Find hotels that allow pets.", "Find hotels that don't allow pets.", "negation"),
    ("Show all invoices that are paid.", "Show all invoices that are unpaid.", "negation"),
    ("Fly from Paris to London.", "Fly from London to Paris.", "direction"),
    ("Convert this JSON to YAML.", "Convert this YAML to JSON.", "direction"),
    ("Is a dolphin bigger than a shark?", "Is a shark bigger than a dolphin?", "direction"),
    ("Run the migration before the deploy.", "Run the deploy before the migration.",
     "direction"),
    ("Sort the list in ascending order.", "Sort the list in descending order.", "opposites"),
    ("What's the weather in Berlin today?", "What's the weather in Berlin tomorrow?", "time"),
    ("What's the best laptop for gaming?", "What's the best laptop for programming?", "swap"),
])
def test_guard_names_what_embeddings_miss(a: str, b: str, check: str) -> None:
    assert guards.why_not(a, b) == check
    assert guards.why_not(b, a) == check  # every check is symmetric


@pytest.mark.parametrize(("a", "b"), [
    ("What is the capital of France?", "Which city is the capital of France?"),
    ("Give me three tips for better sleep.", "What are 3 tips for sleeping better?"),
    ("What's Germany's GDP?", "What is the GDP of Germany?"),
    ("Translate this from English to German.", "Translate this from English into German."),
    ("Flights to London from Paris.", "Flights from Paris to London."),
    ("Summarise the key points of this transcript.", "Summarize the key points of this "
     "transcript."),
    ("Don't include images.", "Do not include images."),
    ("Convert 1,000 USD to EUR.", "Convert $1000 to EUR."),
])
def test_guard_lets_paraphrases_through(a: str, b: str) -> None:
    assert guards.why_not(a, b) is None


def test_guard_features_are_normalised() -> None:
    f = guards.features("Book two hundred seats for 30 minutes in Tokyo; the price is $5.50.")
    assert f.numbers == tuple(sorted(["200", "30", "5.5"]))
    assert f.units == {"min", "usd"}
    assert f.entities == {"tokyo"}
    assert guards.features("Isn't it not?").negations == 2


# --- real model, real Redis -----------------------------------------------------------

@pytest.fixture(scope="module")
def model() -> None:
    """The MiniLM model, loaded offline once; skipped only without the semantic extra."""
    pytest.importorskip("sentence_transformers", reason="the `semantic` extra is not "
                        'installed: pip install -e ".[semantic]"')
    from aimesh_tasks.dedup import embedding

    embedding.get_model()


@pytest.fixture()
def cache(model: None, servers: None) -> Iterator[object]:
    """A SemanticCache on this slot's live Redis db, flushed before and after."""
    from aimesh_tasks.dedup.semantic import SemanticCache

    get_redis().flushdb()
    yield SemanticCache()
    get_redis().flushdb()


def _scope() -> str:
    return f"agent:{uuid.uuid4().hex[:8]}"


def test_model_loads_offline_from_the_package(model: None) -> None:
    from aimesh_tasks.dedup import embedding

    assert embedding.model_path().name == "model"
    vector = embedding.embed_one("hello")
    assert vector.shape == (384,) and abs(float(vector @ vector) - 1) < 1e-5


def test_paraphrase_hits_near_misses_do_not(cache: object) -> None:
    from aimesh_tasks.dedup.semantic import SemanticCache

    assert isinstance(cache, SemanticCache)
    scope = _scope()
    cache.store(scope, "Convert 100 USD to EUR.", "r-convert", 60)
    cache.store(scope, "I am allergic to peanuts; suggest a snack.", "r-allergy", 60)
    cache.store(scope, "Find flights from Paris to London next Friday.", "r-flight", 60)
    hit = cache.lookup(scope, "Convert 100 USD into EUR.")
    assert hit is not None and hit.result_key == "r-convert" and hit.score >= cache.threshold
    assert cache.lookup(scope, "Convert 150 USD to EUR.") is None
    assert cache.lookup(scope, "I am not allergic to peanuts; suggest a snack.") is None
    assert cache.lookup(scope, "Find flights from London to Paris next Friday.") is None
    hit = cache.lookup(scope, "Search for flights from Paris to London next Friday.")
    assert hit is not None and hit.result_key == "r-flight"
    assert int(get_redis().hget(keys.dedup_counters(), "semantic_hits") or 0) == 2


def test_another_scope_is_never_a_candidate(cache: object) -> None:
    from aimesh_tasks.dedup.semantic import SemanticCache

    assert isinstance(cache, SemanticCache)
    mine, theirs = _scope(), _scope()
    cache.store(theirs, "What is the capital of France?", "r-theirs", 60)
    assert cache.lookup(mine, "What is the capital of France?") is None
    cache.store(mine, "Which city is the capital of France?", "r-mine", 60)
    hit = cache.lookup(mine, "What is the capital of France?")
    assert hit is not None and hit.result_key == "r-mine"


class _Clock:
    """Stands in for the `time` module of aimesh_tasks.dedup.semantic: real time plus an
    offset the test moves, so an entry's TTL passes without waiting for it."""

    def __init__(self) -> None:
        self.offset_s = 0.0

    def time(self) -> float:
        return time.time() + self.offset_s


def test_ttl_expiry_removes_the_entry(cache: object, monkeypatch: pytest.MonkeyPatch) -> None:
    from aimesh_tasks.dedup import semantic

    assert isinstance(cache, semantic.SemanticCache)
    clock = _Clock()
    monkeypatch.setattr(semantic, "time", clock)
    scope, question = _scope(), "How can I reverse a list in Python?"
    cache.store(scope, "How do I reverse a list in Python?", "r-1", 60)
    assert 0 < get_redis().ttl(keys.semantic_index(scope)) <= 60  # Redis drops it too
    clock.offset_s = 55
    assert cache.lookup(scope, question) is not None  # still live near the end of its TTL
    clock.offset_s = 61
    assert cache.lookup(scope, question) is None
    assert get_redis().zcard(keys.semantic_index(scope)) == 0


def test_quality_gate_on_the_labelled_set(model: None) -> None:
    from aimesh_tasks.dedup import embedding
    from aimesh_tasks.dedup.semantic import DEFAULT_THRESHOLD

    pairs = [json.loads(line) for line in PAIRS.read_text().splitlines() if line.strip()]
    assert len(pairs) >= 200
    a = embedding.embed([p["a"] for p in pairs])
    b = embedding.embed([p["b"] for p in pairs])
    cosines = (a * b).sum(axis=1)
    predicted = [float(c) >= DEFAULT_THRESHOLD and guards.compatible(p["a"], p["b"])
                 for c, p in zip(cosines, pairs, strict=True)]
    true_hits = sum(hit and p["same"] for hit, p in zip(predicted, pairs, strict=True))
    precision = true_hits / max(1, sum(predicted))
    recall = true_hits / sum(p["same"] for p in pairs)
    assert precision >= 0.98, f"precision {precision:.3f} at {DEFAULT_THRESHOLD}"
    assert recall >= 0.6, f"recall {recall:.3f} at {DEFAULT_THRESHOLD}"
