"""The first hour of a new user (issue 17), as they see it: the README's blocks run twice
on a scratch database, every CLI command refuses a bad setting in one line, and each
finding's fix is asserted on the message a user reads."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import create_engine, text
from typer.testing import CliRunner, Result

from aimesh_tasks.cli.demo import DEMO_ENDPOINTS, DEMO_PROVIDERS
from aimesh_tasks.cli.main import COMMANDS, cli, load_command
from aimesh_tasks.cli.nodes import default_node_name
from aimesh_tasks.registry import Endpoint
from aimesh_tasks.settings import reset_settings
from aimesh_tasks.simulator import RunningSimulator
from tests.conftest import DATABASE, PG_SERVER, SLOT, TEST_ENV
from tests.observability_parts import free_port, only_these_workers, samples, value
from tests.processes import AIMESH, ROOT, start_workers
from tests.waits import wait_until

Sim = Callable[..., RunningSimulator]
MakeEndpoint = Callable[..., Endpoint]
README = (ROOT / "README.md").read_text()
SCRATCH_DB = f"{PG_SERVER}/aimesh_first_hour_{SLOT}"
runner = CliRunner()
BAD_SETTINGS = {
    "AIMESH_DEDUP_TTL_SECS": "abc",
    "AIMESH_LOG_PROMPTS": "maybe",
    "AIMESH_TASK_SOFT_TIME_LIMIT_S": "100",  # above the hard limit, 90
    "AIMESH_DATABASE_URL": "not a url",
    "AIMESH_BROKER_URL": "localhost:6379",
    "AIMESH_WORKER_METRICS_PORT": "70000",
}


def run(*args: str) -> Result:
    """`aimesh ARGS` in this process."""
    return runner.invoke(cli, list(args))


def one_error_line(stderr: str, *needles: str) -> str:
    """The single `error: ...` line of a failed command (no traceback), with `needles`."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def user_env(**extra: str) -> dict[str, str]:
    """This process's environment without any AIMESH_* variable, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIMESH_")}
    return {**env, "COLUMNS": "200", "PATH": f"{Path(AIMESH).parent}:{env['PATH']}", **extra}


def aimesh(*args: str, env: dict[str, str], cwd: Path = ROOT, timeout_s: float = 120
           ) -> subprocess.CompletedProcess[str]:
    """`aimesh ARGS` as a user runs it: a fresh process."""
    return subprocess.run([AIMESH, *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout_s)


def _admin() -> Any:
    return create_engine(f"{PG_SERVER}/postgres".replace("postgresql://",
                                                         "postgresql+psycopg://"),
                         isolation_level="AUTOCOMMIT")


def drop_database(url: str) -> None:
    """Drop the database named in `url` (and close its connections) if it exists."""
    name = url.rsplit("/", 1)[1]
    engine = _admin()
    with engine.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


# --- the README --------------------------------------------------------------------------

BLOCKS = re.findall(r"^```(\w+)\n(.*?)^```", README, flags=re.S | re.M)
QUICK_START = ["python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/aimesh demo",
               "bash .ci/run"]


def test_readme_quick_start_is_what_ci_and_the_demo_tests_run() -> None:
    bash = [body.strip() for lang, body in BLOCKS if lang == "bash"]
    assert bash[:2] == QUICK_START
    ci = (ROOT / ".ci/run").read_text()
    assert 'pip install --quiet -e ".[test,semantic]"' in ci
    assert ci.rstrip().splitlines()[-1] == "python -m pytest"
    demo_tests = (ROOT / "tests/test_cli_demo.py").read_text()
    assert '[AIMESH, "demo", *args]' in demo_tests  # the demo line is a real subprocess there


def _scratch(body: str, env: dict[str, str], port: int) -> str:
    """A README block as it runs here: the exported URLs point at this run's scratch
    servers and the simulator port at a free one; everything else is as written."""
    def export(match: re.Match[str]) -> str:
        name = match.group(1)
        return f"export {name}={env[name]}" if name in env else match.group(0)

    body = re.sub(r"^export (AIMESH_\w+)=\S+", export, body, flags=re.M)
    return body.replace("127.0.0.1:8000", f"127.0.0.1:{port}").replace(
        "--simulate 8000", f"--simulate {port}")


def _run_block(lang: str, body: str, env: dict[str, str], cwd: Path) -> str:
    if lang == "yaml":
        name = body.splitlines()[0].removeprefix("#").strip()
        (cwd / name).write_text(body)
        return ""
    argv = ["bash", "-euo", "pipefail", "-c", body] if lang == "bash" else [
        sys.executable, "-c", body]
    try:
        done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True,
                              timeout=240)
    except subprocess.TimeoutExpired as exc:
        logs = {p.name: p.read_text(errors="replace")[-1500:]
                for p in (cwd / ".aimesh-cluster").glob("*.log")}
        pytest.fail(f"README {lang} block hung:\n{body}\n{exc.stdout!r}\n{exc.stderr!r}\n"
                    f"cluster logs: {logs}")
    assert done.returncode == 0, f"README {lang} block failed:\n{body}\n{done.stdout[-2000:]}" \
                                 f"\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return done.stdout + done.stderr


@pytest.fixture()
def scratch_servers(clean: None, tmp_path: Path) -> Iterator[dict[str, str]]:
    """A Redis of its own (started here, stopped by PID) and a scratch database that does
    not exist yet, so that only the README's own workers consume its messages. (Pausing
    the session's workers is not enough: a paused worker's pending BRPOP still takes a
    message off the queue, into a socket nobody reads until it resumes.)"""
    drop_database(SCRATCH_DB)
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(url), f"the README test's own redis-server on {port}")
        env = user_env(AIMESH_BROKER_URL=f"{url}/0", AIMESH_RESULT_BACKEND=f"{url}/0",
                       AIMESH_REDIS_URL=f"{url}/1", AIMESH_DATABASE_URL=SCRATCH_DB)
        yield env
    finally:
        server.kill()
        server.wait(10)
        drop_database(SCRATCH_DB)


def _answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_readme_blocks_run_as_pasted_and_again(scratch_servers: dict[str, str],
                                               tmp_path: Path) -> None:
    """Every bash, python and yaml block after the quick start, in README order, twice."""
    runnable = [(lang, body) for lang, body in BLOCKS if lang in ("bash", "python", "yaml")]
    runnable = [(lang, body) for lang, body in runnable if body.strip() not in QUICK_START]
    assert {lang for lang, _ in runnable} == {"bash", "python", "yaml"}
    port = free_port()
    outputs: list[str] = []
    try:
        for _ in range(2):
            outputs.append("\n".join(
                _run_block(lang, _scratch(body, scratch_servers, port), scratch_servers,
                           tmp_path) for lang, body in runnable))
    finally:
        aimesh("cluster", "down", env=scratch_servers, cwd=tmp_path)
    first, second = outputs
    assert "created database" in first and "created database" not in second
    assert "completed" in first  # a second run may be answered from the cache
    for each in outputs:
        assert "answer:" in each and "Audit trail" in each
        assert "Per endpoint" in each and "--- brief:" in each
        assert "budget of research-bot: " in each and "$30" in each
        assert re.search(r"research-bot\s+\d+/2000000", each), each[-3000:]
        assert "stopped 3 processes" in each
    assert "endpoint sim-openai is registered already" in second
    assert "agent research-bot is registered already" in second


# --- 8: settings --------------------------------------------------------------------------

def _command_paths() -> list[list[str]]:
    paths: list[list[str]] = []
    for name in COMMANDS:
        subcommands = getattr(load_command(name), "commands", None)
        paths += [[name, sub] for sub in subcommands] if subcommands else [[name]]
    return paths


def test_every_command_refuses_each_bad_setting_in_one_line() -> None:
    paths = _command_paths()
    assert len(paths) > 25 and ["workflow", "run"] in paths and ["demo"] in paths
    for variable, bad in BAD_SETTINGS.items():
        for path in paths:
            reset_settings()
            try:
                result = runner.invoke(cli, path, env={variable: bad})
            finally:
                reset_settings()
            assert result.exit_code == 2, (path, variable, result.output, result.exception)
            assert isinstance(result.exception, SystemExit), (path, variable, result.exception)
            line = one_error_line(result.stderr, variable)
            assert "Fix:" in line, line


def test_a_bad_setting_in_a_fresh_process_is_one_line_with_the_fix() -> None:
    done = aimesh("endpoints", "list", env=user_env(AIMESH_DEDUP_TTL_SECS="abc"))
    assert done.returncode == 2
    one_error_line(done.stderr, "AIMESH_DEDUP_TTL_SECS='abc'", "valid integer",
                   "Fix: set a whole number, or unset it for the default (300)")
    other = aimesh("agents", "list", env=user_env(
        AIMESH_DATABASE_URL="mysql://admin:hunter2@db/x"))
    assert other.returncode == 2
    one_error_line(other.stderr, "AIMESH_DATABASE_URL='mysql://admin:***@db/x'",
                   "not a database this runs on")


def test_postgres_scheme_is_accepted(clean: None) -> None:
    done = aimesh("agents", "add", "scheme-check", env=user_env(
        AIMESH_DATABASE_URL=DATABASE.replace("postgresql://", "postgres://")))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "added agent scheme-check"


# --- 5: a missing database ----------------------------------------------------------------

def test_db_upgrade_creates_a_missing_database_or_says_how(clean: None) -> None:
    drop_database(SCRATCH_DB)
    role = f"aimesh_first_hour_nocreate_{SLOT}"
    engine = _admin()
    with engine.connect() as connection:
        connection.execute(text(f'DROP ROLE IF EXISTS "{role}"'))
        connection.execute(text(f'CREATE ROLE "{role}" LOGIN NOCREATEDB'))
    try:
        as_role = SCRATCH_DB.replace("postgres@", f"{role}@")
        refused = aimesh("db", "upgrade", env=user_env(AIMESH_DATABASE_URL=as_role))
        assert refused.returncode == 2
        one_error_line(refused.stderr, "does not exist and could not be created",
                       f"createdb -h 127.0.0.1 -p 5432 -U {role} aimesh_first_hour_{SLOT}")
        elsewhere = aimesh("agents", "list", env=user_env(AIMESH_DATABASE_URL=as_role))
        one_error_line(elsewhere.stderr, "does not exist", "`aimesh db upgrade` creates it")
        made = aimesh("db", "upgrade", env=user_env(AIMESH_DATABASE_URL=SCRATCH_DB))
        assert made.returncode == 0, made.stderr
        assert made.stdout.splitlines()[0].startswith("created database")
        listed = aimesh("agents", "list", env=user_env(AIMESH_DATABASE_URL=SCRATCH_DB))
        assert listed.returncode == 0 and "no agents registered" in listed.stdout
    finally:
        drop_database(SCRATCH_DB)
        with engine.connect() as connection:
            connection.execute(text(f'DROP ROLE IF EXISTS "{role}"'))
        engine.dispose()


# --- 1: worker metrics, and a failing start-up hook ----------------------------------------

@pytest.mark.slow
def test_worker_metrics_work_without_a_multiproc_dir(clean: None, tmp_path: Path) -> None:
    from aimesh_tasks import submit
    from aimesh_tasks.errors import AimeshError

    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    temp = tmp_path / "tmp"
    temp.mkdir()
    port = free_port()
    [router] = start_workers([(f"fh-metrics-{uuid.uuid4().hex[:6]}",
                               ["--router", "-P", "prefork", "-c", "1"])],
                             {"AIMESH_WORKER_METRICS_PORT": str(port), "TMPDIR": str(temp)})
    try:
        [made] = list(temp.glob("aimesh-metrics-*"))  # the node's directory, made for it
        with only_these_workers({router.hostname}, []):
            pending = submit(agent_id="metrics-bot", prompt="hi", model="no-such-model")
            with pytest.raises(AimeshError, match="no endpoint"):
                pending.get(timeout=60)
        url = f"http://127.0.0.1:{port}/metrics"
        wait_until(lambda: value(samples(url), "aimesh_messages_total",
                                 outcome="unroutable", endpoint="none") >= 1,
                   "the pool child's count summed on the node's port",
                   seen=lambda: urllib.request.urlopen(url, timeout=5).read()[:500])
        assert list(made.glob("*.db"))  # the child wrote its samples there
    finally:
        router.stop()
    assert not made.exists()  # removed when the node stopped


@pytest.mark.slow
def test_a_failing_start_up_hook_stops_the_worker_with_one_error_line() -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = aimesh("worker", "--router", "-P", "threads", "-c", "1", "-n",
                      f"fh-hook-{uuid.uuid4().hex[:6]}@%h",
                      env={**os.environ, "AIMESH_WORKER_METRICS_PORT": str(port)})
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: the worker cannot start: AIMESH_WORKER_METRICS_PORT={port}: "
                      f"cannot serve /metrics on 0.0.0.0:{port} (Address already in use). "
                      "Fix: give each worker node on this host its own port, or set 0 to "
                      "serve none"], done.stderr[-2000:]
    assert "Traceback" not in done.stderr


# --- 6: node names ------------------------------------------------------------------------

def test_default_node_names_say_role_group_and_pid() -> None:
    assert default_node_name(True, None, None, pid=7) == "router-7@%h"
    assert default_node_name(False, "all", None, pid=7) == "endpoints-7@%h"
    assert default_node_name(False, "sim-a,Sim_B", None, pid=7) == "ep-sim-a-sim_b-7@%h"
    assert default_node_name(True, "all", "x", pid=7) == "router-endpoints-queues-7@%h"


@pytest.mark.slow
def test_two_workers_on_one_host_have_distinct_names(clean: None) -> None:
    from aimesh_tasks.app import app

    procs = [subprocess.Popen([AIMESH, "worker", *args, "-P", "threads", "-c", "1", "-l",
                               "WARNING"], env=dict(os.environ), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
             for args in (["--router"], ["--endpoints", "all"])]
    try:
        host = socket.gethostname()
        wanted = {f"router-{procs[0].pid}@{host}", f"endpoints-{procs[1].pid}@{host}"}
        wait_until(lambda: wanted <= {n for r in app.control.ping(timeout=0.5) or []
                                      for n in r}, f"pings from {wanted}")
    finally:
        for proc in procs:
            os.killpg(proc.pid, 15)
            proc.wait(30)


# --- 10: budgets --------------------------------------------------------------------------

def _budget(agent: str) -> dict[str, Any]:
    shown = run("budgets", "show", agent, "--json")
    assert shown.exit_code == 0, shown.output
    return dict(json.loads(shown.stdout))


def test_budgets_set_changes_only_what_is_given(clean: None) -> None:
    assert run("agents", "add", "budget-keeper").exit_code == 0
    assert run("budgets", "set", "budget-keeper", "--usd", "25", "--tokens", "1000",
               "--period", "monthly").exit_code == 0
    changed = run("budgets", "set", "budget-keeper", "--usd", "30")
    assert changed.stdout.strip() == "budget of budget-keeper: 1000 tokens, $30, period monthly"
    view = _budget("budget-keeper")
    assert (view["token_limit"], view["usd_limit"], view["period"]) == (1000, "30", "monthly")
    assert run("budgets", "set", "budget-keeper", "--clear-tokens").exit_code == 0
    assert (_budget("budget-keeper")["token_limit"], _budget("budget-keeper")["usd_limit"]) \
        == (None, "30")
    both = run("budgets", "set", "budget-keeper", "--clear-usd")
    assert both.exit_code == 2
    one_error_line(both.stderr, "a budget needs a limit")
    assert _budget("budget-keeper")["usd_limit"] == "30"


def test_budgets_show_keeps_whole_agent_ids_at_80_columns(clean: None) -> None:
    agents = ["research-bot-eu-west-primary", "research-bot-eu-west-secondary"]
    for agent in agents:
        assert run("agents", "add", agent).exit_code == 0
        assert run("budgets", "set", agent, "--usd", "12.5", "--tokens", "2000000").exit_code == 0
    done = aimesh("budgets", "show", env={**os.environ, "COLUMNS": "80", "TTY_COMPATIBLE": "1",
                                          "NO_COLOR": "1"})
    assert done.returncode == 0, done.stderr
    for agent in agents:
        assert agent in done.stdout, done.stdout
    visible = re.sub(r"\x1b\[[0-9;]*m", "", done.stdout)  # bold survives NO_COLOR
    assert max(len(line) for line in visible.splitlines()) <= 80, visible
    for agent in agents:
        assert re.search(rf"^\s*{agent}\s+0/2000000\s+0/12.5\s", visible, flags=re.M), visible


# --- 11: results and workflow answers -----------------------------------------------------

@pytest.mark.usefixtures("workers")
def test_result_shows_answer_endpoint_cost_attempts_and_audit(simulator: Sim,
                                                             endpoint: MakeEndpoint) -> None:
    only = endpoint(simulator(completion_tokens=5), "fh-result")
    sent = run("enqueue", "what", "is", "a", "queue", "--agent", "fh-result-bot", "--wait",
               "--json")
    assert sent.exit_code == 0, sent.output
    answer = json.loads(sent.stdout.strip().splitlines()[-1])
    shown = run("result", answer["message_id"])
    assert shown.exit_code == 0, shown.output
    for needle in (f"endpoint {only.id} (model sim-model)", f"cost ${answer['cost_usd']}",
                   "charged $", "answer:", answer["text"].splitlines()[0], "Attempts",
                   "Audit trail", "routed", "completed"):
        assert needle in shown.stdout, (needle, shown.stdout)
    full = json.loads(run("result", answer["message_id"], "--json").stdout)
    assert full["state"] == "SUCCESS" and full["result"]["text"] == answer["text"]
    assert [a["endpoint_id"] for a in full["record"]["attempts"]] == [only.id]
    assert {"routed", "completed"} <= {a["event"] for a in full["record"]["audit"]}
    assert full["record"]["charged_usd"] == "0"  # no budget: not metered
    one_error_line(run("result", "no-such-message").stderr, "no message 'no-such-message'")


@pytest.mark.usefixtures("workers")
def test_workflow_run_wait_prints_each_answer(simulator: Sim, endpoint: MakeEndpoint,
                                              tmp_path: Path) -> None:
    endpoint(simulator(completion_tokens=6), "fh-flow")
    flow = tmp_path / "flow.yaml"
    flow.write_text("name: two\nagent_id: fh-flow-bot\nsteps:\n  - id: first\n"
                    "    prompt: Say one thing.\n  - id: second\n    depends_on: [first]\n"
                    "    prompt: 'Repeat: {{ steps.first.text }}'\n")
    done = run("workflow", "run", str(flow), "--wait")
    assert done.exit_code == 0, done.output
    assert done.stdout.index("--- first:") < done.stdout.index("--- second:")
    as_json = run("workflow", "run", str(flow), "--wait", "--json")
    outputs = json.loads(as_json.stdout)["result"]["outputs"]
    assert set(outputs) == {"first", "second"} and all(outputs.values())
    assert outputs["first"] in done.stdout or outputs["first"].splitlines()[0] in done.stdout


# --- 13: counterfactuals as recorded --------------------------------------------------------

@pytest.mark.usefixtures("workers")
def test_report_counterfactuals_do_not_change_when_endpoints_do(simulator: Sim,
                                                               endpoint: MakeEndpoint) -> None:
    sim = simulator(completion_tokens=4)
    cheap = endpoint(sim, "fh-cheap", price_in="0.001", price_out="0.002")
    dear = endpoint(sim, "fh-dear", price_in="0.010", price_out="0.030")
    sent = runner.invoke(cli, ["enqueue", "--lines", "--agent", "fh-report", "--wait", "--json"],
                         input="".join(f"report {n} {'word ' * n}\n" for n in range(6)))
    assert sent.exit_code == 0, sent.output
    before = json.loads(run("report", "--json").stdout)
    keys = ("routed_cost_usd", "round_robin_cost_usd", "cheapest_cost_usd")
    assert before["round_robin_cost_usd"] != before["cheapest_cost_usd"]
    assert run("endpoints", "update", dear.id, "--input-price", "1", "--output-price",
               "2").exit_code == 0
    assert run("endpoints", "remove", cheap.id).exit_code == 0
    after = json.loads(run("report", "--json").stdout)
    assert {k: after[k] for k in keys} == {k: before[k] for k in keys}


# --- 12 and 16: the demo ------------------------------------------------------------------

SUMMARY = re.compile(r"(\d+) sent: (\d+) answered, (\d+) failed \((\d+) by a call, (\d+) of "
                     r"them after a fallback; (\d+) without one\), (\d+) refused by a budget")


@pytest.mark.slow
def test_demo_figures_agree_and_it_explains_and_cleans_up(tmp_path: Path) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    done = aimesh("demo", "--messages", "60", env=user_env(TMPDIR=str(temp)), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    summary = SUMMARY.search(out)
    assert summary, out
    sent, answered, failed, by_call, fallbacks, without, refused = map(int, summary.groups())
    assert sent == 60 == answered + failed + refused and answered == by_call + without
    total = re.search(r"^\s*total\s+(\d+)\s+(\d+)\s+(\d+)\s", out, flags=re.M)
    assert total and tuple(map(int, total.groups())) == (by_call, failed, fallbacks), out
    assert f"answered without a call: {without} " in out
    assert f"refused by a budget: {refused}" in out
    rows = {m[0]: int(m[1]) for m in re.findall(r"^\s*([a-z-]+-llm)\s+(\d+)\s", out, re.M)}
    assert set(rows) == {e[0] for e in DEMO_ENDPOINTS}, out  # every endpoint, idle ones too
    used = {DEMO_PROVIDERS[e] for e, answered_here in rows.items() if answered_here}
    assert len(used) >= 2, rows  # at least two wire formats answered
    assert "why routed costs" in out and "AIMESH_ROUTE_WEIGHT_COST=1" in out
    assert re.search(r"^next: .*aimesh cluster up", out, flags=re.M)
    assert list(temp.iterdir()) == [] and not (tmp_path / "aimesh.db").exists()


def _rabbitmq_vhost() -> str:
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 5672)) != 0:
            pytest.skip("RabbitMQ is not running on 127.0.0.1:5672 (rabbitmq-server)")
    vhost = f"aimesh_first_hour_{SLOT}"
    # A fresh vhost: a queue declared by an earlier run with other arguments (another
    # AIMESH_RABBIT_QUEUE_TYPE, an older release) is refused a second declaration.
    for argv in (["delete_vhost", vhost], ["add_vhost", vhost],
                 ["set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"]):
        subprocess.run(["rabbitmqctl", *argv], capture_output=True, timeout=60)
    return vhost


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_demo_on_rabbitmq_keeps_results_in_redis(clean: None, tmp_path: Path) -> None:
    broker = f"amqp://guest:guest@127.0.0.1:5672/{_rabbitmq_vhost()}"
    refused = aimesh("demo", "--broker", broker, "--db", DATABASE, env=user_env(), cwd=tmp_path)
    assert refused.returncode == 2 and "--redis" in refused.stderr, refused.stderr
    done = aimesh("demo", "--broker", broker, "--db", DATABASE, "--redis",
                  TEST_ENV["AIMESH_REDIS_URL"], "--messages", "30", "--json", env=user_env(),
                  cwd=tmp_path, timeout_s=240)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    answered = report["total"]["answered"] + report["cache"]["answers"]
    assert answered + report["total"]["failed"] + report["budget_rejections"] == 30
    assert report["total"]["answered"] > 0
    redis.Redis.from_url(TEST_ENV["AIMESH_REDIS_URL"]).flushdb()


# --- 15: small things ---------------------------------------------------------------------

def test_help_imports_no_heavy_module() -> None:
    probe = ("import json, sys\nsys.argv = ['aimesh', '--help']\n"
             "from aimesh_tasks.cli.main import main\ntry:\n    main()\nexcept SystemExit:\n"
             "    pass\nheavy = ('celery', 'kombu', 'sqlalchemy', 'pydantic', 'redis', 'httpx',\n"
             "         'aiohttp')\n"
             "print(json.dumps([m for m in heavy if m in sys.modules]))\n")
    done = subprocess.run([sys.executable, "-c", probe], env=user_env(), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
    for name, (_, _, summary) in COMMANDS.items():
        assert name in done.stdout and summary.split()[0] in done.stdout


def test_no_help_shows_a_bool_metavar() -> None:
    for path in [[], *_command_paths()]:
        shown = runner.invoke(cli, [*path, "--help"], env={"COLUMNS": "160"})
        assert shown.exit_code == 0, (path, shown.output)
        assert "<bool>" not in shown.stdout, (path, shown.stdout)


def test_errors_name_the_cli_flags(clean: None) -> None:
    args = ["endpoints", "add", "fh-flags", "--url", "http://127.0.0.1:9", "--model", "m",
            "--input-price", "0.001", "--output-price", "0.001"]
    bad = runner.invoke(cli, [*args[:7], "--input-price", "cheap", *args[9:]])
    line = one_error_line(bad.stderr, "--input-price")
    assert "input_usd_per_1k" not in line
    assert run(*args).exit_code == 0
    twice = one_error_line(run(*args).stderr, "already exists", "`aimesh endpoints update`")
    assert "update_endpoint" not in twice
    assert run(*args, "--exist-ok").stdout.startswith("endpoint fh-flags is registered already")


def test_a_broken_workflow_file_names_line_and_column(clean: None, tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\nagent_id: a\nsteps:\n  - id: a\n   prompt: x\n")
    one_error_line(run("workflow", "run", str(broken)).stderr, "not valid YAML",
                   "line 5, column 4", "started at line 4, column 3")


def test_endpoints_list_shows_the_base_url_and_the_key_variable(clean: None) -> None:
    assert run("endpoints", "add", "fh-listed", "--url", "http://127.0.0.1:9", "--model", "m",
               "--input-price", "0.001", "--output-price", "0.001", "--api-key-env",
               "FH_LISTED_KEY").exit_code == 0
    listed = run("endpoints", "list")
    row = next(line for line in listed.stdout.splitlines() if "fh-listed" in line)
    assert "http://127.0.0.1:9" in row and "env FH_LISTED_KEY" in row, listed.stdout


@pytest.mark.slow
def test_plain_celery_worker_with_clashing_settings_stops_with_one_error_line() -> None:
    celery = str(Path(AIMESH).with_name("celery"))
    done = subprocess.run([celery, "-A", "aimesh_tasks.app", "worker", "-Q", "fh-nothing",
                           "-P", "threads", "-c", "1", "-n", f"fh-clash-{uuid.uuid4().hex[:6]}@%h"],
                          env={**os.environ, "AIMESH_VISIBILITY_TIMEOUT_S": "60"}, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "AIMESH_VISIBILITY_TIMEOUT_S (60) must exceed" in errors[0]
