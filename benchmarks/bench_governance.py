"""What governance adds to routing one message, and how well intents classify.

    python benchmarks/bench_governance.py [--messages 300] [--repeats 3]

Routes messages with `pipeline.routing.route` in this process (real Redis and Postgres,
no worker, no provider call: the outcome is the hand-off), in bench_spine.py's terms of
the router's work per message, four ways, interleaved per repeat:

    baseline   the budget policy only, no routes defined
    governed   loop cap + route named in metadata + ACL (listed agent) + rate limit + budget
    keyed      the same, each message sent with an API key that has limits of its own
               (the key's windows join the agent's in the one admission script)
    intent     as governed, the route chosen by the message's intent (one MiniLM embedding)

and reports each one's p50 per message, the added p50 over the baseline, and what the
per-key check adds (keyed against governed, the two alternated message by message). Then the
intent classifier's accuracy and lookup p50 on tests/data/intents_labelled.yaml. Prints
one JSON line last. Needs Redis and Postgres on loopback (Redis dbs 2/3 by default,
AIMESH_BENCH_DBS="b,l"; the Postgres database aimesh_bench, created if missing).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

os.environ["AIMESH_LOG_LEVEL"] = "WARNING"
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Redis dbs and the Postgres database by AIMESH_BENCH_DBS (benchmarks/places.py).
from benchmarks.places import BENCH_DB, BROKER_DB, LIVE_DB, REDIS, create_database  # noqa: E402, I001

import redis  # noqa: E402
import yaml  # noqa: E402
from sqlalchemy import inspect  # noqa: E402

from aimesh_tasks.api_keys import create_key  # noqa: E402
from aimesh_tasks.app import app  # noqa: E402
from aimesh_tasks.db import Base, get_engine  # noqa: E402
from aimesh_tasks.db.migrate import upgrade  # noqa: E402
from aimesh_tasks.errors import Ambiguous, NoRouteMatches  # noqa: E402
from aimesh_tasks.governance import add_agent  # noqa: E402
from aimesh_tasks.governance.acl import RouteAcl  # noqa: E402
from aimesh_tasks.governance.intents import INDEX, pick  # noqa: E402
from aimesh_tasks.governance.limits import RateLimit, set_rate_limit  # noqa: E402
from aimesh_tasks.governance.loop_cap import LoopCap  # noqa: E402
from aimesh_tasks.governance.rate_limit import RateLimits  # noqa: E402
from aimesh_tasks.governance.route_policy import RouteSelection  # noqa: E402
from aimesh_tasks.governance.spec_file import apply_spec, parse_spec  # noqa: E402
from aimesh_tasks.governance.version import bump_version  # noqa: E402
from aimesh_tasks.messages import AiMessage  # noqa: E402
from aimesh_tasks.pipeline import routing  # noqa: E402
from aimesh_tasks.pipeline.outcomes import HandOff  # noqa: E402
from aimesh_tasks.policies import Policies  # noqa: E402
from aimesh_tasks.policies.budget import BudgetAdmission  # noqa: E402
from aimesh_tasks.registry import add_endpoint  # noqa: E402

LABELLED = ROOT / "tests" / "data" / "intents_labelled.yaml"
AGENT = "bench-agent"


def prepare() -> dict[str, Any]:
    """Create, migrate and empty the benchmark database and Redis dbs; one endpoint per
    route of the labelled set; the agent, listed on every route, with a high rate limit."""
    create_database()
    upgrade(BENCH_DB)
    with get_engine().begin() as connection:
        present = set(inspect(connection).get_table_names())
        names = ", ".join(t.name for t in Base.metadata.sorted_tables if t.name in present)
        connection.exec_driver_sql(f"TRUNCATE {names}")
    for db in (BROKER_DB, LIVE_DB):
        redis.Redis.from_url(f"{REDIS}/{db}").flushdb()
    spec: dict[str, Any] = yaml.safe_load(LABELLED.read_text())
    for route in spec["routes"]:
        add_endpoint(id=f"bench-{route['name']}", base_url="http://127.0.0.1:9",
                     model="sim-model", input_usd_per_1k="0.001", output_usd_per_1k="0.002",
                     tags=[route["name"]], capacity=100_000)
        route["allowed"] = [AGENT]
    add_agent(AGENT)
    set_rate_limit(RateLimit(AGENT, requests_per_minute=10_000_000,
                             tokens_per_minute=10_000_000_000))
    key = create_key(AGENT, limits=RateLimit("", requests_per_minute=10_000_000,
                                             tokens_per_minute=10_000_000_000))
    spec["api_key"] = key.info.prefix
    return spec


def _clear_routes() -> None:
    with get_engine().begin() as connection:
        connection.exec_driver_sql("DELETE FROM routes")
    bump_version()


def _time(policies: Policies, messages: list[AiMessage]) -> list[float]:
    took = []
    for message in messages:
        started = time.perf_counter()
        outcome = routing.route(app, message, policies=policies)
        took.append((time.perf_counter() - started) * 1000)
        assert isinstance(outcome, HandOff), outcome
    return took


def _messages(n: int, kind: str, api_key: str | None = None) -> list[AiMessage]:
    prompts = ["Can I get my money back for last month's invoice, order {}?",
               "Will it snow in Denver on day {}?", "Why does my build {} not compile?"]
    metadata: dict[str, Any] = {} if kind == "intent" else {"aimesh.route": "billing"}
    if api_key is not None:
        metadata["aimesh.api_key"] = api_key
    return [AiMessage(agent_id=AGENT, prompt=prompts[i % 3].format(uuid.uuid4().hex[:8]),
                      max_tokens=16, metadata=metadata) for i in range(n)]


def measure_path(spec: dict[str, Any], n: int, repeats: int) -> dict[str, float]:
    """p50 per message of each variant, interleaved per repeat."""
    baseline = Policies([BudgetAdmission()])
    governed = Policies([LoopCap(), RouteSelection(), RouteAcl(), RateLimits(),
                         BudgetAdmission()])
    times: dict[str, list[float]] = {"baseline": [], "governed": [], "keyed": [], "intent": []}
    key = spec["api_key"]
    for _ in range(repeats):
        _clear_routes()
        _time(baseline, _messages(20, "named"))  # warm the registry cache
        times["baseline"] += _time(baseline, _messages(n, "named"))
        apply_spec({"routes": spec["routes"]})
        _time(governed, _messages(20, "intent"))  # warm the model and route embeddings
        # Key off and on, message by message: a busy machine's drift hits both alike.
        for plain, keyed in zip(_messages(n, "named"), _messages(n, "named", key),
                                strict=True):
            times["governed"] += _time(governed, [plain])
            times["keyed"] += _time(governed, [keyed])
        times["intent"] += _time(governed, _messages(n, "intent"))
    p50 = {k: statistics.median(v) for k, v in times.items()}
    return {"baseline_p50_ms": round(p50["baseline"], 3),
            "governed_p50_ms": round(p50["governed"], 3),
            "keyed_p50_ms": round(p50["keyed"], 3),
            "intent_p50_ms": round(p50["intent"], 3),
            "governed_added_p50_ms": round(p50["governed"] - p50["baseline"], 3),
            "key_check_added_p50_ms": round(p50["keyed"] - p50["governed"], 3),
            "intent_added_p50_ms": round(p50["intent"] - p50["baseline"], 3)}


def measure_intents(spec: dict[str, Any]) -> dict[str, Any]:
    """Accuracy and lookup p50 of the classifier on the labelled set."""
    routes = {r.name: r for r in parse_spec({"routes": spec["routes"]}).routes}
    INDEX.scores("warm up", routes)
    right, took = 0, []
    for case in spec["cases"]:
        started = time.perf_counter()
        try:
            match = pick(INDEX.scores(case["prompt"], routes), routes, min_score=0.40,
                         ambiguity_threshold=0.05)
            got = "fallback" if match.via == "fallback" else match.route
        except Ambiguous:
            got = "ambiguous"
        except NoRouteMatches:
            got = "none"
        took.append((time.perf_counter() - started) * 1000)
        right += got == case["expect"]
    return {"intent_cases": len(spec["cases"]), "intent_right": right,
            "intent_accuracy": round(right / len(spec["cases"]), 3),
            "intent_lookup_p50_ms": round(statistics.median(took), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    spec = prepare()
    figures = {"messages": args.messages, "repeats": args.repeats,
               **measure_path(spec, args.messages, args.repeats), **measure_intents(spec)}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
