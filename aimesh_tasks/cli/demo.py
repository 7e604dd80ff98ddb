"""`aimesh demo`: the whole message path on this machine, in under a minute.

Embedded by default (in-memory broker, a worker thread, a throw-away SQLite file removed
afterwards, an in-process Redis); with `--broker` and `--db` the same run goes through
real servers and `aimesh worker` subprocesses that the demo starts and stops. The three
endpoints speak three wire formats (OpenAI, Anthropic, Gemini), each served by the
simulator.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from contextlib import ExitStack
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import typer

from aimesh_tasks.cli.report import print_report
from aimesh_tasks.cli.shell import check_servers, quiet_embedded_logs, stderr, stdout

if TYPE_CHECKING:
    from rich.console import Console

DEMO_MODEL = "aimesh-demo-sim"
# (endpoint id, USD per 1k input, per 1k output, simulated latency ms, error rate)
DEMO_ENDPOINTS = [
    ("budget-llm", "0.0005", "0.0015", 60.0, 0.10),
    ("balanced-llm", "0.0030", "0.0060", 25.0, 0.0),
    ("premium-llm", "0.0150", "0.0600", 10.0, 0.0),
]
# The wire format of each: the simulator answers all of them on every port.
DEMO_PROVIDERS = {"budget-llm": "openai", "balanced-llm": "anthropic", "premium-llm": "gemini"}
# Anthropic and Gemini refuse a call without a key, as the real APIs do; the simulator
# takes any value. Endpoints name the variable that holds the key, never the key.
DEMO_KEY_ENV = "DEMO_SIMULATOR_KEY"
DEMO_AGENTS = {
    "research-bot": "demo: summarises sources",
    "support_agent": "demo: answers customers",
    "planner": "demo: breaks work into steps",
}
TOPICS = ["caching", "queues", "budgets", "routing", "retries"]
# The planner's budget runs out part-way through the demo (its refusals are in the report).
PLANNER_BUDGET_USD = "0.004"
REPEAT_SHARE = 0.3  # messages that repeat a common question: answered from cache or joined
AMQP = ("amqp://", "amqps://", "pyamqp://")
NEXT_STEP = ("next: run the same on Redis and Postgres with workers of your own: README, "
             "\"Running the cluster\" (`aimesh db upgrade`, `aimesh cluster up`), or "
             "`aimesh demo --broker redis://127.0.0.1:6379/0 --db "
             "postgresql://postgres@127.0.0.1:5432/aimesh`")


def _servers(broker: str, db: str, redis_url: str | None, result_backend: str | None
             ) -> dict[str, str]:
    """The AIMESH_* variables for a run on real servers. A RabbitMQ broker cannot keep
    results or live figures: both go to Redis then."""
    amqp = broker.startswith(AMQP)
    live = redis_url or os.environ.get("AIMESH_REDIS_URL", "").strip() or (
        None if amqp else broker)
    if live is None:
        raise typer.BadParameter(
            "with a RabbitMQ broker the demo needs Redis for live figures and results: add "
            "--redis redis://127.0.0.1:6379/0", param_hint="--redis")
    backend = (result_backend or os.environ.get("AIMESH_RESULT_BACKEND", "").strip()
               or (live if amqp else broker))
    return {"AIMESH_BROKER_URL": broker, "AIMESH_RESULT_BACKEND": backend,
            "AIMESH_DATABASE_URL": db, "AIMESH_REDIS_URL": live}


def _configure(broker: str | None, db: str | None, redis_url: str | None,
               result_backend: str | None, stack: ExitStack) -> bool:
    """Point the settings at the servers given, or at a fresh embedded database (removed
    when `stack` closes); True if the demo runs on real servers."""
    from aimesh_tasks.redis_client import reset_redis_clients
    from aimesh_tasks.settings import reset_settings

    if (broker is None) != (db is None):
        raise typer.BadParameter("give --broker and --db together (or neither, to run "
                                 "embedded)", param_hint="--broker/--db")
    if broker is not None and db is not None:
        os.environ.update(_servers(broker, db, redis_url, result_backend))
    elif "AIMESH_DATABASE_URL" not in os.environ:
        # The demo owns its data: a throw-away SQLite file, unless the caller chose one.
        folder = tempfile.mkdtemp(prefix="aimesh-demo-")
        stack.callback(_remove_database, folder)
        os.environ["AIMESH_DATABASE_URL"] = f"sqlite:///{os.path.join(folder, 'demo.db')}"
    os.environ.setdefault(DEMO_KEY_ENV, "demo-key-for-the-simulator")
    reset_settings()
    reset_redis_clients()
    quiet_embedded_logs()  # and in the demo's worker processes: the report is the output
    return broker is not None


def _remove_database(folder: str) -> None:
    from aimesh_tasks.db import dispose_engines

    dispose_engines()  # close the SQLite file (and its WAL) before it goes
    shutil.rmtree(folder, ignore_errors=True)


def _register_agents() -> None:
    from aimesh_tasks.budgets import set_budget
    from aimesh_tasks.errors import NotFound
    from aimesh_tasks.governance import add_agent, get_agent

    for agent_id, description in DEMO_AGENTS.items():
        try:
            get_agent(agent_id)
        except NotFound:
            add_agent(agent_id, description)
    set_budget("planner", usd=PLANNER_BUDGET_USD)


def _replace_leftover(endpoint_id: str) -> None:
    from aimesh_tasks.errors import InvalidInput, NotFound
    from aimesh_tasks.registry import get_endpoint, remove_endpoint

    try:
        found = get_endpoint(endpoint_id)
    except NotFound:
        return
    if found.model != DEMO_MODEL:
        raise InvalidInput(f"endpoint '{endpoint_id}' exists and is not the demo's (model "
                           f"'{found.model}'); the demo needs this id: run it on another "
                           "database", field="id", errors=[])
    remove_endpoint(endpoint_id)


def _start_endpoints(stack: ExitStack) -> list[str]:
    from aimesh_tasks.registry import add_endpoint, remove_endpoint
    from aimesh_tasks.simulator import SimulatorConfig, start_simulator

    ids = []
    for seed, (endpoint_id, price_in, price_out, latency_ms, error_rate) in enumerate(
        DEMO_ENDPOINTS
    ):
        sim = stack.enter_context(start_simulator(SimulatorConfig(
            latency_ms=latency_ms, jitter_ms=latency_ms / 2, error_rate=error_rate, seed=seed,
            completion_tokens=48,
        )))
        _replace_leftover(endpoint_id)
        add_endpoint(id=endpoint_id, base_url=sim.url, model=DEMO_MODEL,
                     provider=DEMO_PROVIDERS[endpoint_id], api_key_env=DEMO_KEY_ENV,
                     input_usd_per_1k=price_in, output_usd_per_1k=price_out, capacity=16)
        stack.callback(remove_endpoint, endpoint_id)  # the simulator dies with the demo
        ids.append(endpoint_id)
    return ids


def _submit_all(count: int, console: Console) -> list[str]:
    """Send `count` messages from the demo agents and wait for each; the reasons of those
    that failed (a budget refusal included: the report counts each kind)."""
    from rich.progress import Progress

    from aimesh_tasks import submit

    rng = random.Random(7)
    agents = list(DEMO_AGENTS)
    pending = []
    for n in range(count):
        topic = rng.choice(TOPICS)
        unique = rng.random() >= REPEAT_SHARE
        prompt = f"Explain {topic} in one line (#{n})" if unique else f"Explain {topic}"
        pending.append(submit(agent_id=agents[n % len(agents)], model=DEMO_MODEL,
                              max_tokens=64, prompt=prompt))
    failures = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("messages", total=count)
        for async_result in pending:
            try:
                async_result.get(timeout=60)
            except Exception as exc:  # a failed message is part of the report, not a crash
                failures.append(f"{type(exc).__name__}: {exc}")
            progress.advance(task)
    return failures


def _start_workers(stack: ExitStack, real: bool, endpoint_ids: list[str]) -> None:
    if real:
        from aimesh_tasks.cli.demo_cluster import demo_workers

        stderr().print("starting a router worker and an endpoint worker ...")
        stack.enter_context(demo_workers(endpoint_ids))
        return
    from aimesh_tasks.embedded import ensure_embedded_worker, stop_embedded_worker

    ensure_embedded_worker()
    stack.callback(stop_embedded_worker)


def _prepare_database() -> None:
    from aimesh_tasks.cli.db import ensure_database
    from aimesh_tasks.db.migrate import upgrade
    from aimesh_tasks.settings import get_settings

    check_servers()
    ensure_database(get_settings().database_url)
    upgrade()


def _run(messages: int, real: bool) -> tuple[dict[str, Any], list[str], float]:
    from aimesh_tasks.messages import utcnow
    from aimesh_tasks.reporting import traffic_report

    with ExitStack() as run:
        since: datetime = utcnow()
        if real:
            _prepare_database()
        _register_agents()
        endpoint_ids = _start_endpoints(run)
        _start_workers(run, real, endpoint_ids)
        started = time.perf_counter()
        failures = _submit_all(messages, stderr())
        elapsed_s = time.perf_counter() - started
        report = traffic_report(since=since)
    return report, failures, elapsed_s


def tradeoff_line(report: dict[str, Any], weights: tuple[float, float, float]) -> str | None:
    """Why routing paid more than always-cheapest: what the weights bought (latency)."""
    routed, cheapest = Decimal(report["routed_cost_usd"]), Decimal(report["cheapest_cost_usd"])
    cheap_id, _, _, _, error_rate = min(DEMO_ENDPOINTS,
                                        key=lambda e: Decimal(e[1]) + Decimal(e[2]))
    at_cheap = report["endpoints"].get(cheap_id, {}).get("p50_ms")
    if not cheapest or report["total"]["p50_ms"] is None or at_cheap is None:
        return None
    cost, load, latency = weights
    return (f"why routed costs {routed / cheapest:.1f}x always-cheapest: the score weighs "
            f"cost {cost:g}, load {load:g} and latency {latency:g} (AIMESH_ROUTE_WEIGHT_*), "
            "trading price for speed and spare capacity (p50 "
            f"{report['total']['p50_ms']:.0f} ms as routed, {at_cheap:.0f} ms at {cheap_id}, "
            f"which also fails {error_rate:.0%} of calls); AIMESH_ROUTE_WEIGHT_COST=1 with "
            "the other two at 0 routes on price alone")


def summary_line(report: dict[str, Any], sent: int, elapsed_s: float) -> str:
    """Where every message ended, from the same records as the tables above."""
    total, cache = report["total"], report["cache"]
    answered = total["answered"] + cache["answers"]
    return (f"{sent} sent: {answered} answered, {total['failed']} failed ({total['answered']} "
            f"by a call, {total['fallbacks']} of them after a fallback; {cache['answers']} "
            f"without one), {report['budget_rejections']} refused by a budget; in "
            f"{elapsed_s:.1f}s ({answered / elapsed_s:.0f} msgs/s)")


def _print(report: dict[str, Any], failures: list[str], messages: int, elapsed_s: float
           ) -> None:
    from aimesh_tasks.settings import get_settings

    console = stdout()
    print_report(report, console, endpoints=[e[0] for e in DEMO_ENDPOINTS])
    tradeoff = tradeoff_line(report, get_settings().route_weights)
    for line in ([tradeoff] if tradeoff else []) + [summary_line(report, messages, elapsed_s)]:
        console.print(line, highlight=False)
    if report["total"]["failed"] and failures:
        others = [f for f in failures if not f.startswith("BudgetExceeded")]
        console.print(f"first failure: {(others or failures)[0]}", highlight=False)
    console.print(NEXT_STEP, highlight=False)


def demo(
    messages: int = typer.Option(200, "--messages", "-n", min=1, help="Messages to send."),
    broker: str = typer.Option(None, "--broker",
                               help="Run on this broker, e.g. redis://127.0.0.1:6379/0 or "
                                    "amqp://guest:guest@127.0.0.1:5672//."),
    db: str = typer.Option(None, "--db", help="...and this database, e.g. "
                           "postgresql://postgres@127.0.0.1:5432/aimesh (made if missing)."),
    redis_url: str = typer.Option(None, "--redis", help="Redis for live figures (default: "
                                  "AIMESH_REDIS_URL, else a Redis broker)."),
    result_backend: str = typer.Option(
        None, "--result-backend", help="Where results go (default: AIMESH_RESULT_BACKEND, "
        "else a Redis broker, else --redis: RabbitMQ keeps no results)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON object."),
) -> None:
    """Start three simulated endpoints (OpenAI, Anthropic and Gemini formats; one cheap and
    flaky), send messages from three agents, then report where they went, what they
    cost against round-robin and always-cheapest, p50/p99 latency and fallbacks.

    Embedded (no servers, nothing left behind) unless --broker and --db are given; then
    it starts and stops its own `aimesh worker` processes against them.
    """
    with ExitStack() as stack:
        real = _configure(broker, db, redis_url, result_backend, stack)
        report, failures, elapsed_s = _run(messages, real)
    if as_json:
        typer.echo(json.dumps(report))
        return
    _print(report, failures, messages, elapsed_s)
