"""The `aimesh` command line: every command through typer's CliRunner on the real Redis,
Postgres and worker subprocesses, `enqueue --wait` and an unreachable broker as real
subprocesses, and bad input as one `error:` line with a non-zero exit."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from typing import Any

import pytest
from celery.result import AsyncResult
from sqlalchemy import select
from typer.testing import CliRunner, Result

from aimesh_tasks import __version__, outbox
from aimesh_tasks.cli.main import cli
from aimesh_tasks.db import CallAttemptRow, session_scope
from aimesh_tasks.governance import get_agent
from aimesh_tasks.registry import Endpoint, get_endpoint, list_endpoints
from aimesh_tasks.simulator import RunningSimulator
from tests.processes import AIMESH, ROOT

Sim = Callable[..., RunningSimulator]
MakeEndpoint = Callable[..., Endpoint]
runner = CliRunner()


def run(*args: str, input: str | None = None) -> Result:
    """Invoke `aimesh ARGS` in this process."""
    return runner.invoke(cli, list(args), input=input)


def assert_one_line_error(result: Result, *needles: str) -> str:
    """Exit 2, exactly one `error: ...` line on stderr naming the problem, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def attempts_of(message_ids: list[str]) -> list[CallAttemptRow]:
    """The call attempts recorded for these messages (outbox drained first)."""
    outbox.flush(wait_s=10)
    with session_scope() as session:
        return list(session.scalars(select(CallAttemptRow).where(
            CallAttemptRow.message_id.in_(message_ids)).order_by(CallAttemptRow.id)))


def usd_cost(input_tokens: int, output_tokens: int, price_in: str, price_out: str) -> Decimal:
    """A call's cost in USD, rounded up to the nano-USD, computed here independently."""
    exact = (input_tokens * Decimal(price_in) + output_tokens * Decimal(price_out)) / 1000
    return exact.quantize(Decimal("1e-9"), rounding=ROUND_CEILING).normalize()


# --- version and help ---------------------------------------------------------------------

def test_version_prints_the_package_version() -> None:
    result = run("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"aimesh-tasks {__version__}"


def test_help_lists_every_command_and_how_to_start() -> None:
    result = run("--help")
    assert result.exit_code == 0
    for command in ("enqueue", "endpoints", "agents", "report", "demo", "worker", "db",
                    "simulate"):
        assert command in result.stdout
    assert "aimesh demo" in result.stdout and "Exit codes" in result.stdout
    enqueue_help = run("enqueue", "--help").stdout
    assert "--jsonl" in enqueue_help and "--wait" in enqueue_help and "Examples" in enqueue_help


# --- endpoints ----------------------------------------------------------------------------

def test_endpoints_add_list_update_disable_enable_remove(clean: None) -> None:
    added = run("endpoints", "add", "cli-ep", "--url", "http://127.0.0.1:9/", "--model", "m1",
                "--input-price", "0.001", "--output-price", "0.002", "--capacity", "7",
                "--tags", "chat,code")
    assert added.exit_code == 0, added.output
    ep = get_endpoint("cli-ep")
    assert (ep.base_url, ep.model, ep.capacity, ep.tags) == (
        "http://127.0.0.1:9", "m1", 7, frozenset({"chat", "code"}))
    assert ep.input_nusd_per_1k == 1_000_000 and ep.output_nusd_per_1k == 2_000_000

    listed = run("endpoints", "list", "--json")
    [line] = listed.stdout.strip().splitlines()
    row = json.loads(line)
    assert row["id"] == "cli-ep" and row["input_usd_per_1k"] == "0.001"
    assert row["live"]["in_flight"] == 0 and row["live"]["health"] == "unknown"
    table = run("endpoints", "list").stdout
    assert "cli-ep" in table and "0.001/0.002" in table and "p50/p99" in table

    assert run("endpoints", "update", "cli-ep", "--capacity", "9", "--output-price",
               "0.003").exit_code == 0
    ep = get_endpoint("cli-ep")
    assert ep.capacity == 9 and ep.output_nusd_per_1k == 3_000_000 and ep.model == "m1"

    assert run("endpoints", "disable", "cli-ep").exit_code == 0
    assert get_endpoint("cli-ep").enabled is False
    assert run("endpoints", "enable", "cli-ep").exit_code == 0
    assert get_endpoint("cli-ep").enabled is True
    assert run("endpoints", "remove", "cli-ep").exit_code == 0
    assert list_endpoints() == []
    assert "no endpoints registered" in run("endpoints", "list").stdout


@pytest.mark.parametrize("command", [
    ["update", "ghost-ep", "--capacity", "3"], ["disable", "ghost-ep"], ["enable", "ghost-ep"],
    ["remove", "ghost-ep"],
])
def test_unknown_endpoint_is_one_line_error(clean: None, command: list[str]) -> None:
    assert_one_line_error(run("endpoints", *command), "endpoint 'ghost-ep' not found")


def test_bad_endpoint_input_names_the_field(clean: None) -> None:
    bad_price = run("endpoints", "add", "ep-x", "--url", "http://127.0.0.1:9", "--model", "m",
                    "--input-price", "cheap", "--output-price", "0.001")
    assert_one_line_error(bad_price, "--input-price", "'cheap' is not a decimal number")
    bad_url = run("endpoints", "add", "ep-x", "--url", "ftp://host", "--model", "m",
                  "--input-price", "0.001", "--output-price", "0.001")
    assert_one_line_error(bad_url, "--url", "ftp://host")
    assert list_endpoints() == []
    run("endpoints", "add", "ep-x", "--url", "http://127.0.0.1:9", "--model", "m",
        "--input-price", "0.001", "--output-price", "0.001")
    assert_one_line_error(run("endpoints", "update", "ep-x"), "nothing to change")
    assert_one_line_error(run("endpoints", "add", "ep-x", "--url", "http://127.0.0.1:9",
                              "--model", "m", "--input-price", "0.001", "--output-price",
                              "0.001"), "already exists")


# --- agents -------------------------------------------------------------------------------

def test_agents_add_list_show(clean: None) -> None:
    assert run("agents", "list").stdout.startswith("no agents registered")
    added = run("agents", "add", "research-bot", "--description", "reads papers")
    assert added.exit_code == 0 and "research-bot" in added.stdout
    assert run("agents", "add", "support_agent").exit_code == 0
    assert get_agent("research-bot").description == "reads papers"
    rows = [json.loads(line) for line in run("agents", "list", "--json").stdout.splitlines()]
    assert [(r["id"], r["description"], r["enabled"]) for r in rows] == [
        ("research-bot", "reads papers", True), ("support_agent", "", True)]
    assert "research-bot" in run("agents", "list").stdout
    shown = json.loads(run("agents", "show", "support_agent").stdout)
    assert shown["id"] == "support_agent" and shown["created_at"]


@pytest.mark.parametrize("bad_id", ["Research Bot", "bot--two", "9lives", "x" * 65])
def test_agents_add_refuses_a_bad_id_naming_the_rule(clean: None, bad_id: str) -> None:
    assert_one_line_error(run("agents", "add", bad_id), "agent_id")
    assert run("agents", "list", "--json").stdout == ""


def test_agents_duplicate_and_unknown_are_one_line_errors(clean: None) -> None:
    assert run("agents", "add", "planner").exit_code == 0
    assert_one_line_error(run("agents", "add", "planner"), "already registered")
    assert_one_line_error(run("agents", "show", "nobody"), "agent 'nobody' is not registered",
                          "aimesh agents add nobody")


# --- enqueue ------------------------------------------------------------------------------

def _json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.mark.usefixtures("workers")
def test_enqueue_prompt_wait_json_matches_the_recorded_call(
    simulator: Sim, endpoint: MakeEndpoint
) -> None:
    only = endpoint(simulator(completion_tokens=9), "cli-only", price_in="0.001",
                    price_out="0.002")
    result = run("enqueue", "Say", "hello", "--agent", "cli-test", "--max-tokens", "32",
                 "--wait", "--json")
    assert result.exit_code == 0, result.output
    [answer] = _json_lines(result.stdout)
    assert answer["endpoint_id"] == only.id and answer["agent_id"] == "cli-test"
    assert answer["output_tokens"] == 9 and answer["cached"] is False
    [row] = attempts_of([answer["message_id"]])
    assert (row.endpoint_id, row.ok, row.input_tokens, row.output_tokens) == (
        only.id, True, answer["input_tokens"], 9)
    assert Decimal(answer["cost_usd"]) == usd_cost(row.input_tokens, 9, "0.001", "0.002")
    assert "1 answered, 0 failed" in result.stderr


@pytest.mark.usefixtures("workers")
def test_enqueue_wait_table_shows_endpoint_tokens_cost_cached_latency(
    simulator: Sim, endpoint: MakeEndpoint
) -> None:
    only = endpoint(simulator(completion_tokens=7), "cli-table")
    result = run("enqueue", "Hello table", "--wait")
    assert result.exit_code == 0, result.output
    for header in ("endpoint", "tokens in/out", "cost $", "cached", "latency ms"):
        assert header in result.stdout
    assert only.id in result.stdout and "/7" in result.stdout


@pytest.mark.usefixtures("workers")
def test_enqueue_jsonl_reports_bad_lines_and_still_sends_the_others(
    simulator: Sim, endpoint: MakeEndpoint, tmp_path: Path
) -> None:
    only = endpoint(simulator(completion_tokens=5), "cli-jsonl")
    batch = tmp_path / "batch.jsonl"
    batch.write_text("\n".join([
        json.dumps({"agent_id": "jsonl-a", "prompt": "first"}),
        '{"agent_id": "jsonl-a", "prompt": ',  # truncated JSON
        json.dumps({"agent_id": "Bad Agent", "prompt": "refused"}),
        "",
        json.dumps({"agent_id": "jsonl-b", "messages": [{"role": "user", "content": "x"}],
                    "max_tokens": 16, "metadata": {"ticket": 42}}),
        json.dumps({"prompt": "no agent: filled by --agent"}),
        json.dumps({"agent_id": "jsonl-a", "prompt": "p", "colour": "red"}),
    ]) + "\n")
    result = run("enqueue", "--jsonl", str(batch), "--agent", "jsonl-default", "--wait",
                 "--json")
    assert result.exit_code == 1, result.output
    lines = _json_lines(result.stdout)
    assert [line.get("source", "") for line in lines if "error" in line] == [
        "line 2", "line 3", "line 7"]
    errors = {line["source"]: line["error"] for line in lines if "error" in line}
    assert errors["line 2"].startswith("not JSON")
    assert errors["line 3"].startswith("agent_id:") and "kebab" in errors["line 3"]
    assert errors["line 7"].startswith("colour: unknown field")
    answered = [line for line in lines if "error" not in line]
    assert [a["agent_id"] for a in answered] == ["jsonl-a", "jsonl-b", "jsonl-default"]
    assert answered[1]["metadata"] == {"ticket": 42}
    rows = attempts_of([a["message_id"] for a in answered])
    assert sorted(r.message_id for r in rows) == sorted(a["message_id"] for a in answered)
    assert {r.endpoint_id for r in rows} == {only.id} and all(r.ok for r in rows)
    assert "3 answered, 3 failed" in result.stderr


@pytest.mark.usefixtures("workers")
def test_enqueue_without_wait_prints_ids_that_resolve(
    simulator: Sim, endpoint: MakeEndpoint, tmp_path: Path
) -> None:
    only = endpoint(simulator(), "cli-nowait")
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("A prompt from a file\nwith two lines\n")
    from_file = run("enqueue", "--file", str(prompt_file), "--agent", "file-bot")
    assert from_file.exit_code == 0, from_file.output
    [message_id] = from_file.stdout.split()
    assert AsyncResult(message_id).get(timeout=30)["endpoint_id"] == only.id
    from_stdin = run("enqueue", "--lines", input="one\n\ntwo\nthree\n")
    assert from_stdin.exit_code == 0, from_stdin.output
    ids = from_stdin.stdout.split()
    assert len(ids) == 3
    results = [AsyncResult(i).get(timeout=30) for i in ids]
    assert {r["agent_id"] for r in results} == {"cli"}
    assert len(attempts_of(ids)) == 3


@pytest.mark.usefixtures("workers")
def test_enqueue_failed_message_exits_1_and_says_why(
    simulator: Sim, endpoint: MakeEndpoint
) -> None:
    endpoint(simulator(), "cli-model-a", model="model-a")
    result = run("enqueue", "hi", "--model", "model-b", "--wait", "--json")
    assert result.exit_code == 1, result.output
    [line] = _json_lines(result.stdout)
    assert line["message_id"] and "model-b" in line["error"]


def test_enqueue_missing_file_and_no_input_are_one_line_errors(clean: None) -> None:
    assert_one_line_error(run("enqueue", "--file", "/nonexistent/prompt.txt"),
                          "--file", "/nonexistent/prompt.txt", "No such file")
    assert_one_line_error(run("enqueue", "--jsonl", "/nonexistent/b.jsonl"), "--jsonl")
    assert_one_line_error(run("enqueue", "--lines", input="\n\n"), "nothing to send")
    assert_one_line_error(run("enqueue", "hi", "--jsonl", "x.jsonl"), "give one input")


def _subprocess_env(**overrides: str) -> dict[str, str]:
    return {**os.environ, "COLUMNS": "200", **overrides}


@pytest.mark.slow
@pytest.mark.usefixtures("workers")
def test_enqueue_wait_as_a_real_subprocess(simulator: Sim, endpoint: MakeEndpoint) -> None:
    only = endpoint(simulator(completion_tokens=4), "cli-proc")
    done = subprocess.run([AIMESH, "enqueue", "From", "a", "shell", "--agent", "shell-bot",
                           "--wait", "--json"], env=_subprocess_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    [answer] = _json_lines(done.stdout)
    assert answer["endpoint_id"] == only.id and answer["output_tokens"] == 4
    [row] = attempts_of([answer["message_id"]])
    assert row.ok and row.agent_id == "shell-bot"


@pytest.mark.slow
def test_unreachable_broker_is_one_line_naming_the_url(tmp_path: Path) -> None:
    broker = "redis://127.0.0.1:1/0"
    done = subprocess.run(
        [AIMESH, "enqueue", "hello", "--wait"],
        env=_subprocess_env(AIMESH_BROKER_URL=broker, AIMESH_RESULT_BACKEND=broker),
        cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach the broker at "
                                                   f"{broker}"), done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


# --- report -------------------------------------------------------------------------------

def _send(count: int, agent: str) -> list[dict[str, Any]]:
    result = run("enqueue", "--lines", "--agent", agent, "--wait", "--json",
                 input="".join(f"report prompt {'word ' * 5 * n}\n" for n in range(count)))
    assert result.exit_code == 0, result.output
    return _json_lines(result.stdout)


@pytest.mark.usefixtures("workers")
def test_report_figures_match_the_recorded_calls_and_prices(
    simulator: Sim, endpoint: MakeEndpoint
) -> None:
    sim = simulator(completion_tokens=6)
    cheap = endpoint(sim, "a-cheap", price_in="0.001", price_out="0.002")
    dear = endpoint(sim, "b-dear", price_in="0.010", price_out="0.030")
    answers = _send(4, "report-one") + _send(2, "report-two")
    result = run("report", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    rows = attempts_of([a["message_id"] for a in answers])
    assert len(rows) == 6 and {r.endpoint_id for r in rows} == {cheap.id}
    assert len({r.input_tokens for r in rows}) == 4  # prompts differ: the policy order matters
    routed = sum((usd_cost(r.input_tokens, r.output_tokens, "0.001", "0.002") for r in rows),
                 Decimal(0))
    at_dear = [usd_cost(r.input_tokens, r.output_tokens, "0.010", "0.030") for r in rows]
    at_cheap = [usd_cost(r.input_tokens, r.output_tokens, "0.001", "0.002") for r in rows]
    # round-robin over the two eligible endpoints, in id order: cheap, dear, cheap, ...
    round_robin = sum(at_cheap[0::2], Decimal(0)) + sum(at_dear[1::2], Decimal(0))
    assert Decimal(report["routed_cost_usd"]) == routed
    assert Decimal(report["cheapest_cost_usd"]) == routed
    assert Decimal(report["round_robin_cost_usd"]) == round_robin
    figures = report["endpoints"][cheap.id]
    assert figures["answered"] == 6 and figures["failed_calls"] == 0
    assert figures["input_tokens"] == sum(r.input_tokens for r in rows)
    assert figures["output_tokens"] == 36
    latencies = sorted(r.latency_ms for r in rows)
    assert figures["p50_ms"] == latencies[2] and figures["p99_ms"] == latencies[5]
    assert dear.id not in report["endpoints"]
    assert report["agents"]["report-one"]["answered"] == 4
    assert report["agents"]["report-two"]["answered"] == 2
    assert report["total"]["answered"] == 6 and report["total"]["failed"] == 0

    only_two = json.loads(run("report", "--json", "--agent", "report-two").stdout)
    assert list(only_two["agents"]) == ["report-two"]
    assert only_two["endpoints"][cheap.id]["answered"] == 2
    future = run("report", "--since", "2999-01-01T00:00:00Z")
    assert future.exit_code == 0 and "no traffic recorded" in future.stdout
    table = run("report", "--since", "1h").stdout
    assert cheap.id in table and "report-one" in table and "round-robin" in table


@pytest.mark.usefixtures("workers")
def test_report_counts_failures_fallbacks_and_unroutable(
    simulator: Sim, endpoint: MakeEndpoint
) -> None:
    broken = endpoint(simulator(error_rate=1.0), "a-broken", price_in="0.0001",
                      price_out="0.0001")
    good = endpoint(simulator(), "b-good")
    answers = _send(2, "flaky-user")
    assert all(len(a["attempts"]) == 2 for a in answers)
    failed = run("enqueue", "x", "--agent", "lost-user", "--model", "no-such-model", "--wait")
    assert failed.exit_code == 1
    report = json.loads(run("report", "--json").stdout)
    assert report["endpoints"][broken.id]["failed_calls"] == 2
    assert report["endpoints"][broken.id]["answered"] == 0
    assert report["endpoints"][good.id]["answered"] == 2
    assert report["agents"]["flaky-user"]["fallbacks"] == 2
    lost = report["agents"]["lost-user"]
    assert (lost["answered"], lost["failed"], lost["unroutable"]) == (0, 1, 1)
    assert report["total"]["failed"] == 1 and report["total"]["unroutable"] == 1


def test_report_bad_since_is_one_line_error(clean: None) -> None:
    assert_one_line_error(run("report", "--since", "yesterday"), "--since", "'yesterday'")


# --- demo (the runs themselves are subprocesses: tests/test_cli_demo.py) -------------------

def test_demo_broker_without_db_is_a_usage_error() -> None:
    result = run("demo", "--broker", "redis://127.0.0.1:6379/0")
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert "give --broker and --db together" in result.output
    assert "Traceback" not in result.output
