"""`aimesh demo`: the whole message path on this machine, in under a minute.

Embedded by default (in-memory broker, a worker thread, a throw-away SQLite file, an
in-process Redis); with `--broker` and `--db` the same run goes through real servers
and `aimesh worker` subprocesses that the demo starts and stops.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from contextlib import ExitStack
from datetime import datetime
from typing import Any

import typer
from rich.console import Console
from rich.progress import Progress

from aimesh_tasks.cli.report import print_report
from aimesh_tasks.cli.shell import check_servers, quiet_embedded_logs, stderr, stdout

DEMO_MODEL = "aimesh-demo-sim"
# (endpoint id, USD per 1k input, per 1k output, simulated latency ms, error rate)
DEMO_ENDPOINTS = [
    ("budget-llm", "0.0005", "0.0015", 60.0, 0.10),
    ("balanced-llm", "0.0030", "0.0060", 25.0, 0.0),
    ("premium-llm", "0.0150", "0.0600", 10.0, 0.0),
]
DEMO_AGENTS = {
    "research-bot": "demo: summarises sources",
    "support_agent": "demo: answers customers",
    "planner": "demo: breaks work into steps",
}
TOPICS = ["caching", "queues", "budgets", "routing", "retries"]
# The planner's budget runs out part-way through the demo (its refusals are in the report).
PLANNER_BUDGET_USD = "0.004"
REPEAT_SHARE = 0.3  # messages that repeat a common question: answered from cache or joined


def _configure(broker: str | None, db: str | None, redis_url: str | None) -> bool:
    """Point the settings at the servers given, or at a fresh embedded database; True if
    the demo runs on real servers."""
    from aimesh_tasks.redis_client import reset_redis_clients
    from aimesh_tasks.settings import reset_settings

    if (broker is None) != (db is None):
        raise typer.BadParameter("give --broker and --db together (or neither, to run "
                                 "embedded)", param_hint="--broker/--db")
    if broker is not None and db is not None:
        live = redis_url or os.environ.get("AIMESH_REDIS_URL", "").strip() or broker
        os.environ.update({"AIMESH_BROKER_URL": broker, "AIMESH_RESULT_BACKEND": broker,
                           "AIMESH_DATABASE_URL": db, "AIMESH_REDIS_URL": live})
    elif "AIMESH_DATABASE_URL" not in os.environ:
        # The demo owns its data: a throw-away SQLite file, unless the caller chose one.
        path = os.path.join(tempfile.mkdtemp(prefix="aimesh-demo-"), "demo.db")
        os.environ["AIMESH_DATABASE_URL"] = f"sqlite:///{path}"
    reset_settings()
    reset_redis_clients()
    quiet_embedded_logs()  # and in the demo's worker processes: the report is the output
    return broker is not None


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
                     input_usd_per_1k=price_in, output_usd_per_1k=price_out, capacity=16)
        stack.callback(remove_endpoint, endpoint_id)  # the simulator dies with the demo
        ids.append(endpoint_id)
    return ids


def _submit_all(count: int, console: Console) -> tuple[int, list[str]]:
    """Send `count` messages from the demo agents; (answered, failure reasons); a budget
    refusal is neither."""
    from aimesh_tasks import submit
    from aimesh_tasks.errors import BudgetExceeded

    rng = random.Random(7)
    agents = list(DEMO_AGENTS)
    pending = []
    for n in range(count):
        topic = rng.choice(TOPICS)
        unique = rng.random() >= REPEAT_SHARE
        prompt = f"Explain {topic} in one line (#{n})" if unique else f"Explain {topic}"
        pending.append(submit(agent_id=agents[n % len(agents)], model=DEMO_MODEL,
                              max_tokens=64, prompt=prompt))
    answered, failures = 0, []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("messages", total=count)
        for async_result in pending:
            try:
                async_result.get(timeout=60)
                answered += 1
            except BudgetExceeded:
                pass  # the planner's budget running out is part of the demo
            except Exception as exc:  # a failed message is part of the report, not a crash
                failures.append(f"{type(exc).__name__}: {exc}")
            progress.advance(task)
    return answered, failures


def _start_workers(stack: ExitStack, real: bool, endpoint_ids: list[str]) -> None:
    if real:
        from aimesh_tasks.cli.demo_cluster import demo_workers

        stderr().print("starting a router worker and an endpoint worker ...")
        stack.enter_context(demo_workers(endpoint_ids))
        return
    from aimesh_tasks.embedded import ensure_embedded_worker, stop_embedded_worker

    ensure_embedded_worker()
    stack.callback(stop_embedded_worker)


def _run(messages: int, real: bool) -> tuple[dict[str, Any], int, list[str], float]:
    from aimesh_tasks.messages import utcnow
    from aimesh_tasks.reporting import traffic_report

    with ExitStack() as stack:
        since: datetime = utcnow()
        if real:
            from aimesh_tasks.db.migrate import upgrade

            check_servers()
            upgrade()
        _register_agents()
        endpoint_ids = _start_endpoints(stack)
        _start_workers(stack, real, endpoint_ids)
        started = time.perf_counter()
        answered, failures = _submit_all(messages, stderr())
        elapsed_s = time.perf_counter() - started
        report = traffic_report(since=since)  # before the demo's endpoints are removed
    return report, answered, failures, elapsed_s


def demo(
    messages: int = typer.Option(200, "--messages", "-n", min=1, help="Messages to send."),
    broker: str = typer.Option(None, "--broker",
                               help="Run on this broker, e.g. redis://127.0.0.1:6379/0."),
    db: str = typer.Option(None, "--db", help="...and this database, e.g. "
                           "postgresql://postgres@127.0.0.1:5432/aimesh."),
    redis_url: str = typer.Option(None, "--redis", help="Redis for live figures (default: "
                                  "AIMESH_REDIS_URL, else the broker)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON object."),
) -> None:
    """Start three simulated endpoints (one cheap and flaky), send messages from three
    agents, then report where they went, what they cost against round-robin and
    always-cheapest, p50/p99 latency and fallbacks.

    Embedded (no servers) unless --broker and --db are given; then it starts and stops
    its own `aimesh worker` processes against them.
    """
    real = _configure(broker, db, redis_url)
    report, answered, failures, elapsed_s = _run(messages, real)
    if as_json:
        typer.echo(json.dumps(report))
        return
    console = stdout()
    print_report(report, console)
    console.print(
        f"{answered} answered, {len(failures)} failed, {report['total']['fallbacks']} after a "
        f"fallback, in {elapsed_s:.1f}s ({answered / elapsed_s:.0f} msgs/s)", highlight=False)
    if failures:
        console.print(f"first failure: {failures[0]}", highlight=False)
