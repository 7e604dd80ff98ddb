"""Semantic cache quality and lookup latency: precision/recall on the labelled pairs, and
lookup time at 1k and 10k cached entries in real Redis.

    python benchmarks/semantic_eval.py [--redis-url redis://127.0.0.1:6379/3] [--lookups 30]

Quality: every pair of `tests/data/semantic_pairs.jsonl` is embedded with MiniLM; a pair
counts as a predicted hit when its cosine is at or above the threshold (cosine alone), and
when it also passes `guards.compatible` (cosine + guard). Precision = true hits / predicted
hits, recall = true hits / pairs labelled same, at thresholds 0.75 to 0.97 by 0.01.

Latency: one scope is filled with N entries (random unit vectors, stored in the cache's
own format, so no 10k embeddings are computed), then `lookup()` is timed on prompts of the
labelled set (embedding + one Redis round trip + cosine + guard); `fetch+score` is the
same without the query embedding. The bench's scope is deleted afterwards; nothing else
in the Redis db is touched. JSON last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import redis

from aimesh_tasks import keys
from aimesh_tasks.dedup import embedding, guards
from aimesh_tasks.dedup.semantic import DEFAULT_THRESHOLD, SemanticCache

PAIRS = Path(__file__).resolve().parents[1] / "tests" / "data" / "semantic_pairs.jsonl"
THRESHOLDS = [round(0.75 + 0.01 * i, 2) for i in range(23)]


def load_pairs(path: Path = PAIRS) -> list[dict[str, Any]]:
    """The labelled pairs: {"a", "b", "same", "kind"} per line."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def score_pairs(pairs: list[dict[str, Any]]) -> tuple[list[float], list[bool]]:
    """Cosine of each pair, and whether the guard accepts it."""
    a = embedding.embed([p["a"] for p in pairs])
    b = embedding.embed([p["b"] for p in pairs])
    cosines = [float(x) for x in (a * b).sum(axis=1)]
    return cosines, [guards.compatible(p["a"], p["b"]) for p in pairs]


def precision_recall(cosines: list[float], accepted: list[bool], same: list[bool],
                     threshold: float) -> tuple[float, float]:
    """Precision and recall of 'hit = cosine >= threshold and accepted'."""
    predicted = [c >= threshold and ok for c, ok in zip(cosines, accepted, strict=True)]
    true_hits = sum(p and s for p, s in zip(predicted, same, strict=True))
    return true_hits / max(1, sum(predicted)), true_hits / max(1, sum(same))


def quality(pairs: list[dict[str, Any]]) -> list[dict[str, float]]:
    """The precision/recall table, cosine alone and cosine + guard, per threshold."""
    cosines, accepted = score_pairs(pairs)
    same = [bool(p["same"]) for p in pairs]
    rows = []
    for threshold in THRESHOLDS:
        p_cos, r_cos = precision_recall(cosines, [True] * len(pairs), same, threshold)
        p_g, r_g = precision_recall(cosines, accepted, same, threshold)
        rows.append({"threshold": threshold, "precision_cosine": round(p_cos, 3),
                     "recall_cosine": round(r_cos, 3), "precision_guard": round(p_g, 3),
                     "recall_guard": round(r_g, 3)})
    return rows


def fill(cache: SemanticCache, scope: str, size: int) -> None:
    """Store `size` entries with random unit vectors in the cache's own format."""
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((size, embedding.DIMENSIONS)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    for i in range(size):
        cache.store_vector(scope, f"cached prompt number {i}", vectors[i], f"r{i}", 600)


def time_lookups(cache: SemanticCache, scope: str, prompts: list[str]) -> dict[str, float]:
    """p50/p99 of lookup() and of fetch+score alone, in ms."""
    full, fetch = [], []
    for prompt in prompts:
        started = time.perf_counter()
        cache.lookup(scope, prompt)
        full.append((time.perf_counter() - started) * 1000)
        query = embedding.embed_one(prompt)
        started = time.perf_counter()
        cache.best(query, prompt, cache._fetch(scope))
        fetch.append((time.perf_counter() - started) * 1000)
    full.sort()
    return {"lookup_p50_ms": round(statistics.median(full), 2),
            "lookup_p99_ms": round(full[int(0.99 * (len(full) - 1))], 2),
            "fetch_score_p50_ms": round(statistics.median(fetch), 2)}


def drop_scope(client: redis.Redis, scope: str) -> None:
    """Delete the bench's own keys (and only those)."""
    names = list(client.scan_iter(match=keys.semantic_entry(scope, "*"), count=1000))
    for start in range(0, len(names), 1000):
        client.delete(*names[start:start + 1000])
    client.delete(keys.semantic_index(scope))


def latency(url: str, prompts: list[str]) -> dict[str, dict[str, float]]:
    """Lookup latency at 1k and 10k entries in one scope of a real Redis."""
    client = redis.Redis.from_url(url, decode_responses=True)
    cache = SemanticCache(client=client)
    figures = {}
    for size in (1000, 10_000):
        scope = f"bench-{uuid.uuid4().hex[:8]}"
        try:
            fill(cache, scope, size)
            figures[str(size)] = time_lookups(cache, scope, prompts)
        finally:
            drop_scope(client, scope)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/3")
    parser.add_argument("--lookups", type=int, default=30)
    args = parser.parse_args()
    pairs = load_pairs()
    table = quality(pairs)
    print(f"{len(pairs)} pairs ({sum(p['same'] for p in pairs)} same)")
    print("thresh  P(cos)  R(cos)  P(cos+guard)  R(cos+guard)")
    for row in table:
        print(f"{row['threshold']:.2f}    {row['precision_cosine']:.3f}   "
              f"{row['recall_cosine']:.3f}   {row['precision_guard']:.3f}         "
              f"{row['recall_guard']:.3f}")
    figures = latency(args.redis_url, [p["a"] for p in pairs[: args.lookups]])
    for size, row in figures.items():
        print(f"{size} entries: {row}")
    default = next(r for r in table if r["threshold"] == DEFAULT_THRESHOLD)
    print(json.dumps({"pairs": len(pairs), "default_threshold": DEFAULT_THRESHOLD,
                      "at_default": default, "table": table, "latency": figures}))


if __name__ == "__main__":
    main()
