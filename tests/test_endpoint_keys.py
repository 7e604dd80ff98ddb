"""Endpoint keys and upstream errors a user can act on (issue 12 item 8, issue 17 items 2,
3, 4, 9): keys named by variable or file and read at call time, a missing key said at
start-up, in `endpoints list` and as `key_missing` before any request; base URLs that end
in the API prefix; the provider's error text, redacted, in the error and the audit;
`aimesh endpoints test`; an endpoint's 400 that falls back and counts against its health;
`aimesh worker --endpoints` refusing unknown ids. Real Redis, Postgres, workers and the
simulator."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from typer.testing import CliRunner, Result

from aimesh_tasks import keys, outbox, submit
from aimesh_tasks.cli.main import cli
from aimesh_tasks.db import AuditRow, session_scope
from aimesh_tasks.errors import AllEndpointsFailed, InvalidInput, ProviderError
from aimesh_tasks.messages import AiMessage
from aimesh_tasks.providers import PROVIDERS, aio
from aimesh_tasks.providers import http as upstream
from aimesh_tasks.providers.credentials import api_key, looks_like_key, missing_reason, redact
from aimesh_tasks.registry import Endpoint, add_endpoint, get_endpoint, update_endpoint
from aimesh_tasks.registry.key_reports import workers_missing_keys
from aimesh_tasks.registry.live import read_figures
from aimesh_tasks.simulator import RunningSimulator
from tests.processes import WorkerProcess, start_workers
from tests.waits import wait_until

Sim = Callable[..., RunningSimulator]
MakeEndpoint = Callable[..., Endpoint]
runner = CliRunner()
UNSET_ENV = "AIMESH_TEST_KEY_NEVER_SET"
PASTED_KEY = "sk-proj-" + "Zq9xK2mP7vR4tW8yB3nC6hJ1"


def run(*args: str) -> Result:
    return runner.invoke(cli, list(args))


def one_line_error(result: Result, *needles: str) -> str:
    """Exit 2, one `error: ...` line on stderr, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _message(**fields: Any) -> AiMessage:
    return AiMessage(agent_id="keys-unit", prompt=fields.pop("prompt", "hello"), max_tokens=8,
                     **fields)


def _ep(**fields: Any) -> Endpoint:
    base = {"id": "unit-ep", "provider": "openai", "base_url": "http://127.0.0.1:9",
            "model": "m", "api_key_env": None, "input_nusd_per_1k": 1, "output_nusd_per_1k": 1,
            "capacity": 1, "tags": frozenset(), "enabled": True}
    return Endpoint(**{**base, **fields})


# --- pure: keys, credentials, redaction --------------------------------------------------

def test_key_missing_key_format_is_pinned() -> None:
    assert keys.key_missing("e-1") == "aimesh:keys:missing:e-1"


def test_env_key_is_read_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    ep = _ep(api_key_env="AIMESH_TEST_KEY_ENV")
    monkeypatch.delenv("AIMESH_TEST_KEY_ENV", raising=False)
    assert missing_reason(ep) == "environment variable AIMESH_TEST_KEY_ENV is not set"
    monkeypatch.setenv("AIMESH_TEST_KEY_ENV", "")
    assert missing_reason(ep) == "environment variable AIMESH_TEST_KEY_ENV is empty"
    monkeypatch.setenv("AIMESH_TEST_KEY_ENV", "first-key-value")
    assert api_key(ep) == "first-key-value" and missing_reason(ep) is None
    monkeypatch.setenv("AIMESH_TEST_KEY_ENV", "second-key-value")
    assert api_key(ep) == "second-key-value"
    assert api_key(_ep()) is None and missing_reason(_ep()) is None  # needs no key


def test_key_file_is_reread_when_a_secret_mount_swaps_it(tmp_path: Path) -> None:
    """As a Kubernetes Secret volume does: the file is a symlink into a data directory
    that is replaced by swapping a `..data` symlink."""
    def publish(value: str, name: str) -> None:
        (tmp_path / name).mkdir()
        (tmp_path / name / "api-key").write_text(value + "\n")
        (tmp_path / "..data.tmp").symlink_to(name)
        os.replace(tmp_path / "..data.tmp", tmp_path / "..data")

    key_file = tmp_path / "api-key"
    ep = _ep(api_key_file=str(key_file))
    assert missing_reason(ep) == f"file {key_file} does not exist on this worker"
    publish("key-version-one", "v1")
    key_file.symlink_to("..data/api-key")
    assert api_key(ep) == "key-version-one"  # the trailing newline is not part of the key
    publish("key-version-two", "v2")
    assert api_key(ep) == "key-version-two"
    (tmp_path / "v2" / "api-key").write_text("   \n")
    assert missing_reason(ep) == f"file {key_file} is empty"


def test_missing_key_fails_before_any_request_naming_the_variable(simulator: Sim) -> None:
    sim = simulator()
    ep = _ep(base_url=sim.url, api_key_env=UNSET_ENV)
    with pytest.raises(ProviderError) as caught:
        upstream.call_provider(ep, _message(), "unit:1")
    error = caught.value
    assert (error.fields["reason"], error.action, error.status) == ("key_missing", "fallback",
                                                                    None)
    assert f"environment variable {UNSET_ENV} is not set" in error.message
    assert "--api-key-env" in error.message and error.endpoint_id == "unit-ep"
    assert sim.stats()["calls"] == 0


def test_looks_like_key_tells_names_from_keys() -> None:
    for name in ("OPENAI_API_KEY", "MY_COMPANY_OPENAI_PRODUCTION_API_KEY_V2", "KEY"):
        assert not looks_like_key(name), name
    for key in (PASTED_KEY, "sk-ant-api03-abc123", "AIzaSyD-abcdefghijklmnop12345",
                "q3bxWq8Tz7PLmNc4Rk2Vy9Hs6Jd1Fa0GeXuBoCiA"):
        assert looks_like_key(key), key


def test_error_excerpt_redacts_the_key_and_key_like_tokens() -> None:
    used = "plain-looking-key-used"
    body = {"error": {"message": f"Incorrect API key provided: {used} (also {PASTED_KEY}). "
                                 "See https://platform.openai.com/account/api-keys.",
                      "type": "invalid_request_error", "code": "invalid_api_key"}}
    response = aio.Response(401, {"content-type": "application/json"}, json.dumps(body).encode())
    error = upstream._status_error(_ep(), PROVIDERS["openai"], response, used)
    for text in (error.message, error.fields["detail"]):
        assert used not in text and PASTED_KEY not in text
        assert "Incorrect API key provided: <redacted>" in text
        assert "platform.openai.com/account/api-keys" in text  # the useful part stays
    assert (error.fields["reason"], error.action) == ("auth", "fallback")
    assert redact("Authorization: Bearer abcdefgh123", None) == "Authorization: <redacted>"


# --- registry and CLI: key sources, URLs ------------------------------------------------

def test_a_pasted_key_is_refused_saying_to_pass_the_name(clean: None) -> None:
    line = one_line_error(run("endpoints", "add", "k-ep", "--url", "http://127.0.0.1:9",
                              "--model", "m", "--input-price", "0", "--output-price", "0",
                              "--api-key-env", PASTED_KEY),
                          "--api-key-env", "looks like an API key", "*name*")
    assert PASTED_KEY not in line and "pattern" not in line
    one_line_error(run("endpoints", "add", "k-ep", "--url", "http://127.0.0.1:9", "--model",
                       "m", "--input-price", "0", "--output-price", "0", "--api-key-env",
                       "openai-key"), "--api-key-env", "'openai-key' is not an environment "
                                                     "variable name")
    one_line_error(run("endpoints", "add", "k-ep", "--url", "http://127.0.0.1:9", "--model",
                       "m", "--input-price", "0", "--output-price", "0", "--api-key-file",
                       "secrets/key"), "--api-key-file", "absolute file path")
    with pytest.raises(InvalidInput, match="api_key_env or api_key_file, not both"):
        add_endpoint(id="k-ep", base_url="http://127.0.0.1:9", model="m",
                     input_usd_per_1k="0", output_usd_per_1k="0", api_key_env="A_KEY",
                     api_key_file="/run/key")


def test_update_changes_switches_and_clears_the_key_source(clean: None) -> None:
    assert run("endpoints", "add", "k-ep", "--url", "http://127.0.0.1:9", "--model", "m",
               "--input-price", "0", "--output-price", "0").exit_code == 0
    assert run("endpoints", "update", "k-ep", "--api-key-env", "UPSTREAM_KEY").exit_code == 0
    assert (get_endpoint("k-ep").api_key_env, get_endpoint("k-ep").api_key_file) == (
        "UPSTREAM_KEY", None)
    listed = run("endpoints", "list").stdout
    assert "env UPSTREAM_KEY" in listed
    assert run("endpoints", "update", "k-ep", "--api-key-file", "/run/secrets/k").exit_code == 0
    assert (get_endpoint("k-ep").api_key_env, get_endpoint("k-ep").api_key_file) == (
        None, "/run/secrets/k")
    assert run("endpoints", "update", "k-ep", "--no-api-key").exit_code == 0
    assert (get_endpoint("k-ep").api_key_env, get_endpoint("k-ep").api_key_file) == (None, None)
    one_line_error(run("endpoints", "update", "k-ep", "--api-key-env", PASTED_KEY),
                   "looks like an API key")
    one_line_error(run("endpoints", "update", "k-ep", "--no-api-key", "--api-key-env", "K"),
                   "--no-api-key")
    update_endpoint("k-ep", api_key_env="OTHER_KEY")
    assert get_endpoint("k-ep").api_key_env == "OTHER_KEY"


@pytest.mark.parametrize(("provider", "given", "stored"), [
    ("openai", "http://127.0.0.1:9/v1", "http://127.0.0.1:9"),
    ("openai", "https://gw.example/openai/v1/", "https://gw.example/openai"),
    ("anthropic", "https://api.anthropic.com/v1", "https://api.anthropic.com"),
    ("gemini", "https://generativelanguage.googleapis.com/v1beta",
     "https://generativelanguage.googleapis.com"),
    ("cohere", "https://api.cohere.com/v2", "https://api.cohere.com"),
])
def test_a_base_url_ending_in_the_api_prefix_is_stored_without_it(
    clean: None, provider: str, given: str, stored: str
) -> None:
    result = run("endpoints", "add", "u-ep", "--url", given, "--model", "m", "--provider",
                 provider, "--input-price", "0", "--output-price", "0")
    assert result.exit_code == 0, result.output
    assert get_endpoint("u-ep").base_url == stored
    assert f"note: stored the base URL as {stored}" in result.stdout


def test_a_base_url_with_the_api_path_or_another_version_is_refused_with_the_fix(
    clean: None
) -> None:
    one_line_error(run("endpoints", "add", "u-ep", "--url",
                       "http://127.0.0.1:9/v1/chat/completions", "--model", "m",
                       "--input-price", "0", "--output-price", "0"),
                   "--url", "give the server's base URL 'http://127.0.0.1:9'")
    one_line_error(run("endpoints", "add", "u-ep", "--url", "http://127.0.0.1:9/v1",
                       "--provider", "gemini", "--model", "m", "--input-price", "0",
                       "--output-price", "0"),
                   "--url", "/v1beta/models/", "give 'http://127.0.0.1:9'")


def test_the_url_habit_of_the_sdks_reaches_the_simulator(simulator: Sim, clean: None) -> None:
    sim = simulator()
    assert run("endpoints", "add", "v1-ep", "--url", sim.url + "/v1", "--model", "sim-model",
               "--input-price", "0.001", "--output-price", "0.001").exit_code == 0
    done = run("endpoints", "test", "v1-ep")
    assert done.exit_code == 0, done.output
    assert "ok: HTTP 200" in done.stdout and sim.stats()["calls"] == 1


# --- aimesh endpoints test ----------------------------------------------------------------

def test_endpoints_test_reports_status_latency_tokens(simulator: Sim, endpoint: MakeEndpoint
                                                      ) -> None:
    sim = simulator(completion_tokens=5)
    ep = endpoint(sim, "probe-ok")
    done = run("endpoints", "test", ep.id, "--json")
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    [call] = sim.calls()
    assert report["ok"] is True and report["status"] == 200 and report["latency_ms"] > 0
    assert (report["input_tokens"], report["output_tokens"]) == (call["prompt_tokens"],
                                                                 call["completion_tokens"])
    text = run("endpoints", "test", ep.id).stdout
    assert f"endpoint {ep.id}: openai model sim-model at {sim.url}" in text
    assert "ok: HTTP 200 in" in text and "output tokens" in text


def test_endpoints_test_shows_the_classified_error_and_the_providers_text(
    simulator: Sim, endpoint: MakeEndpoint
) -> None:
    sim = simulator(known_models=["real-model"])
    ep = endpoint(sim, "probe-typo", model="reel-model")
    done = run("endpoints", "test", ep.id)
    assert done.exit_code == 1, done.output
    assert "failed: HTTP 404" in done.stdout and "unknown_model (action fallback" in done.stdout
    assert "The model `reel-model` does not exist" in done.stdout
    assert "Traceback" not in done.output


def test_endpoints_test_with_no_key_in_this_shell_says_which_and_calls_nothing(
    simulator: Sim, endpoint: MakeEndpoint
) -> None:
    sim = simulator()
    ep = endpoint(sim, "probe-nokey", provider="anthropic", api_key_env=UNSET_ENV)
    done = run("endpoints", "test", ep.id)
    assert done.exit_code == 1, done.output
    assert "failed: no HTTP answer" in done.stdout and "key_missing" in done.stdout
    assert f"environment variable {UNSET_ENV} is not set" in done.stdout
    assert sim.stats()["calls"] == 0


# --- aimesh worker --endpoints ------------------------------------------------------------

def test_worker_with_an_unknown_endpoint_is_refused_listing_the_known(
    simulator: Sim, endpoint: MakeEndpoint
) -> None:
    ep = endpoint(simulator(), "known")
    line = one_line_error(run("worker", "--endpoints", f"{ep.id},nope"), "--endpoints",
                          "no endpoint 'nope'", f"known: {ep.id}")
    assert ep.id + "'" not in line.split("known:")[0]  # only the unknown one is named


# --- through workers ----------------------------------------------------------------------

def _failed_audit(message_id: str) -> AuditRow:
    outbox.flush(wait_s=10)
    with session_scope() as session:
        row = session.scalars(select(AuditRow).where(AuditRow.message_id == message_id,
                                                     AuditRow.event == "failed")).one()
        session.expunge(row)
        return row


@pytest.mark.slow
def test_an_endpoints_400_falls_back_and_counts_against_its_health(
    workers: list[WorkerProcess], simulator: Sim, endpoint: MakeEndpoint
) -> None:
    """A gateway answering an unknown model with 400 (LiteLLM's body) is the endpoint's
    fault: every message falls back to the healthy endpoint until the bad one is down."""
    gateway = simulator(known_models=["other-model"], unknown_model_status=400)
    bad = endpoint(gateway, "typo", price_in="0.0001", price_out="0.0001")
    good = endpoint(simulator(), "healthy", price_in="0.01", price_out="0.01")
    for n in range(5):  # AIMESH_UNHEALTHY_AFTER_FAILURES consecutive failures
        result = submit(agent_id="keys-fallback", prompt=f"fall back {n}",
                        max_tokens=8).get(timeout=60)
        assert result["endpoint_id"] == good.id
        failed, ok = result["attempts"]
        assert failed["endpoint_id"] == bad.id and ok["ok"] is True
        assert (failed["error"]["status"], failed["error"]["reason"],
                failed["error"]["action"]) == (400, "unknown_model", "fallback")
        assert "Invalid model name passed in model=sim-model" in failed["error"]["detail"]
    figures, _ = read_figures([bad.id, good.id])
    assert (figures[bad.id].calls, figures[bad.id].error_rate, figures[bad.id].health) == (
        5, 1.0, "down")
    assert figures[good.id].health == "up"
    after = submit(agent_id="keys-fallback", prompt="bad one is down",
                   max_tokens=8).get(timeout=60)
    assert [a["endpoint_id"] for a in after["attempts"]] == [good.id]


@pytest.mark.slow
def test_a_400_that_is_the_messages_fault_neither_falls_back_nor_counts_against_health(
    workers: list[WorkerProcess], simulator: Sim, endpoint: MakeEndpoint
) -> None:
    """The simulated OpenAI format takes string contents only: content parts are the
    message's fault there (400 invalid_request_error), so the next endpoint is not tried."""
    first_sim, second_sim = simulator(), simulator()
    first = endpoint(first_sim, "strict", price_in="0.0001", price_out="0.0001")
    endpoint(second_sim, "spare", price_in="0.01", price_out="0.01")
    parts = [{"role": "user", "content": [{"type": "text", "text": "in parts"}]}]
    pending = submit(agent_id="keys-fail", messages=parts, max_tokens=8)
    with pytest.raises(ProviderError) as caught:
        pending.get(timeout=60)
    error = caught.value
    assert (error.status, error.action, error.fields["reason"]) == (400, "fail", "bad_request")
    assert "messages[0].content must be a string" in error.message
    assert second_sim.stats()["calls"] == 0 and first_sim.stats()["calls"] == 1
    figures, _ = read_figures([first.id])
    assert (figures[first.id].calls, figures[first.id].error_rate,
            figures[first.id].health) == (1, 0.0, "up")


@pytest.mark.slow
def test_the_providers_error_text_reaches_the_error_the_attempts_and_the_audit(
    workers: list[WorkerProcess], simulator: Sim, endpoint: MakeEndpoint
) -> None:
    first = endpoint(simulator(known_models=["x"]), "typo-a", model="gpt-typo")
    second = endpoint(simulator(known_models=["x"]), "typo-b", model="gpt-typo")
    pending = submit(agent_id="keys-audit", prompt="which model?", max_tokens=8,
                     model="gpt-typo")
    with pytest.raises(AllEndpointsFailed) as caught:
        pending.get(timeout=60)
    error = caught.value
    assert {a["endpoint_id"] for a in error.fields["attempts"]} == {first.id, second.id}
    for attempt in error.fields["attempts"]:
        assert attempt["error"]["detail"] == ("The model `gpt-typo` does not exist or you do "
                                              "not have access to it.")
    assert "does not exist or you do not have access" in error.message
    audit = _failed_audit(pending.id)
    assert audit.reason is not None and "The model `gpt-typo` does not exist" in audit.reason


@pytest.mark.slow
def test_a_worker_without_the_key_says_so_and_the_call_falls_back_before_any_request(
    workers: list[WorkerProcess], simulator: Sim, endpoint: MakeEndpoint, tmp_path: Path
) -> None:
    following = workers[1]
    claude_sim, backup_sim = simulator(), simulator()
    key_file = tmp_path / "claude-key"
    claude = endpoint(claude_sim, "claude-nokey", provider="anthropic", price_in="0.0001",
                      price_out="0.0001", api_key_file=str(key_file))
    backup = endpoint(backup_sim, "backup", price_in="0.01", price_out="0.01")

    def missing_on() -> list[str] | None:
        return workers_missing_keys([claude.id])[claude.id] or None

    assert following.hostname in wait_until(missing_on, "the key-missing report")
    warned = f"endpoint '{claude.id}': API key missing on this worker: file {key_file} does " \
             "not exist on this worker"
    wait_until(lambda: warned in following.log.read_text(), "the key-missing log line")
    listed = run("endpoints", "list").stdout
    assert f"endpoint {claude.id}: key missing on this worker: " in listed
    assert following.hostname in listed.split(f"endpoint {claude.id}: key missing")[1]
    [row] = [json.loads(line) for line in run("endpoints", "list", "--json").stdout.splitlines()
             if json.loads(line)["id"] == claude.id]
    assert following.hostname in row["key_missing_on"]

    result = submit(agent_id="keys-missing", prompt="hello", max_tokens=8).get(timeout=60)
    assert [(a["endpoint_id"], a["ok"]) for a in result["attempts"]] == [
        (claude.id, False), (backup.id, True)]
    assert result["attempts"][0]["error"]["reason"] == "key_missing"
    assert claude_sim.stats()["calls"] == 0  # no request was sent without the key

    key_file.write_text(f"sk-ant-test-{uuid.uuid4().hex}\n")
    wait_until(lambda: following.hostname not in workers_missing_keys([claude.id])[claude.id],
               "the worker to find the key file")
    answered = submit(agent_id="keys-missing", prompt="hello again",
                      max_tokens=8).get(timeout=60)
    assert answered["endpoint_id"] == claude.id  # the simulator refuses a request sans key
    assert following.log.read_text().count(warned) == 1


@pytest.mark.slow
def test_a_worker_for_named_endpoints_warns_at_start_up_and_withdraws_when_stopped(
    workers: list[WorkerProcess], simulator: Sim, endpoint: MakeEndpoint
) -> None:
    ep = endpoint(simulator(), "named-nokey", api_key_env=UNSET_ENV)
    [named] = start_workers([(f"keys-named-{uuid.uuid4().hex[:6]}",
                              ["--endpoints", ep.id, "-P", "threads", "-c", "1"])])
    try:
        warned = (f"endpoint '{ep.id}': API key missing on this worker: environment variable "
                  f"{UNSET_ENV} is not set")
        wait_until(lambda: warned in named.log.read_text(), "the start-up warning")
        wait_until(lambda: named.hostname in workers_missing_keys([ep.id])[ep.id],
                   "the named worker's report")
    finally:
        named.stop()
    assert named.hostname not in workers_missing_keys([ep.id])[ep.id]
    assert named.log.read_text().count(warned) == 1
