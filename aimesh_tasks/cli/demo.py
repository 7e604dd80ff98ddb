"""`aimesh demo`: the whole message path on this machine, embedded, in under a minute."""

from __future__ import annotations

import os
import random
import tempfile
import time
from contextlib import ExitStack
from typing import Any

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

console = Console()

# (endpoint id, USD per 1k input, per 1k output, simulated latency ms, error rate)
DEMO_ENDPOINTS = [
    ("budget-llm", "0.0005", "0.0015", 60.0, 0.10),
    ("balanced-llm", "0.0030", "0.0060", 25.0, 0.0),
    ("premium-llm", "0.0150", "0.0600", 10.0, 0.0),
]
DEMO_AGENTS = ["research-bot", "support_agent", "planner"]


def _use_fresh_embedded_database() -> None:
    # The demo owns its data: a throw-away SQLite file, unless the caller chose a database.
    if "AIMESH_DATABASE_URL" not in os.environ:
        path = os.path.join(tempfile.mkdtemp(prefix="aimesh-demo-"), "demo.db")
        os.environ["AIMESH_DATABASE_URL"] = f"sqlite:///{path}"


def _start_endpoints(stack: ExitStack) -> None:
    from aimesh_tasks.registry import add_endpoint
    from aimesh_tasks.simulator import SimulatorConfig, start_simulator

    for seed, (endpoint_id, price_in, price_out, latency_ms, error_rate) in enumerate(
        DEMO_ENDPOINTS
    ):
        sim = stack.enter_context(start_simulator(SimulatorConfig(
            latency_ms=latency_ms, jitter_ms=latency_ms / 2, error_rate=error_rate, seed=seed,
            completion_tokens=48,
        )))
        add_endpoint(id=endpoint_id, base_url=sim.url, model="sim-model",
                     input_usd_per_1k=price_in, output_usd_per_1k=price_out, capacity=16)


def _submit_all(count: int) -> tuple[list[dict[str, Any]], list[str]]:
    from aimesh_tasks import submit

    rng = random.Random(7)
    pending = []
    for n in range(count):
        agent = DEMO_AGENTS[n % len(DEMO_AGENTS)]
        topic = rng.choice(["caching", "queues", "budgets", "routing", "retries"])
        pending.append(submit(agent_id=agent, prompt=f"Explain {topic} in one line (#{n})",
                              max_tokens=64))
    results, failures = [], []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("messages", total=count)
        for async_result in pending:
            try:
                results.append(async_result.get(timeout=60))
            except Exception as exc:  # a failed message is part of the report, not a crash
                failures.append(f"{type(exc).__name__}: {exc}")
            progress.advance(task)
    return results, failures


def _print_report(elapsed_s: float, results: list[dict[str, Any]], failures: list[str]) -> None:
    from aimesh_tasks.reporting import traffic_report

    report = traffic_report()
    table = Table("endpoint", "messages", "failed calls", "tokens in/out", "cost $", "p50 ms",
                  "p99 ms", title="Where the messages went")
    for endpoint_id, g in report["endpoints"].items():
        table.add_row(endpoint_id, str(g["messages"]), str(g["failures"]),
                      f"{g['input_tokens']}/{g['output_tokens']}", g["cost_usd"],
                      f"{g['p50_ms'] or 0:.1f}", f"{g['p99_ms'] or 0:.1f}")
    console.print(table)
    fallbacks = sum(1 for r in results if len(r["attempts"]) > 1)
    console.print(
        f"{len(results)} answered, {len(failures)} failed, {fallbacks} after a fallback, "
        f"in {elapsed_s:.1f}s ({len(results) / elapsed_s:.0f} msgs/s)\n"
        f"cost: ${report['total']['cost_usd']} routed, vs ${report['round_robin_cost_usd']} "
        f"round-robin, ${report['cheapest_cost_usd']} always-cheapest"
    )


def demo(
    messages: int = typer.Option(200, "--messages", "-n", help="How many messages to send."),
) -> None:
    """Run three simulated endpoints, route messages to them, print the report."""
    _use_fresh_embedded_database()
    from aimesh_tasks.embedded import ensure_embedded_worker, stop_embedded_worker

    with ExitStack() as stack:
        ensure_embedded_worker()
        stack.callback(stop_embedded_worker)
        _start_endpoints(stack)
        started = time.perf_counter()
        results, failures = _submit_all(messages)
        _print_report(time.perf_counter() - started, results, failures)
    if failures:
        console.print(f"first failure: {failures[0]}")
