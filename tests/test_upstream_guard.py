"""Upstream URLs a cluster must never call (issue 19 item 5), on real parts.

Each disallowed form is refused before any connection: when an operator adds it, when a
worker announces it, and at the call itself (a row stored before the policy, a name
that resolves to a refused address when the call connects); a redirect is never
followed. A listening socket on 127.0.0.1 stands for what must not be reached (Redis on
127.0.0.1:6379, say) and counts every connection made to it. The cloud metadata address
cannot be listened on here: its spellings are refused by rule (`metadata`) before a
socket is opened, which the refusal's reason and the empty registry show.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from typer.testing import CliRunner

from aimesh_tasks import submit
from aimesh_tasks.cli.main import cli
from aimesh_tasks.db import EndpointRow, session_scope
from aimesh_tasks.errors import InvalidInput, ProviderError
from aimesh_tasks.messages import AiMessage
from aimesh_tasks.providers.http import call_provider
from aimesh_tasks.registry import Endpoint, add_endpoint, get_endpoint, list_endpoints
from aimesh_tasks.registry.announce import announce, parse_announcement
from aimesh_tasks.registry.registration import token_digest
from aimesh_tasks.registry.url_policy import UpstreamURLRefused
from aimesh_tasks.settings import reset_settings
from aimesh_tasks.simulator import RunningSimulator
from tests.processes import ROOT

Sim = Callable[..., RunningSimulator]
MakeEndpoint = Callable[..., Endpoint]
TOKEN = "guard-registration-" + "p4Lm8sQz1xVb"
METADATA_FORMS = ["http://169.254.169.254", "http://169.254.169.254:80/latest",
                  "http://2852039166", "http://0xa9fea9fe", "http://0xA9.0xFE.0xA9.0xFE",
                  "http://0251.0376.0251.0376", "http://169.254.43518",
                  "http://[::ffff:169.254.169.254]", "http://[fd00:ec2::254]",
                  "http://metadata.google.internal"]


class Listener:
    """A TCP socket on 127.0.0.1 that counts the connections made to it (and closes each,
    so a caller that did connect fails at once instead of waiting)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._accept, name="test-listener", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


class Redirector:
    """An allowed upstream that answers every POST with a redirect to `location`."""

    def __init__(self, location: str, status: int = 307) -> None:
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                outer.requests += 1
                self.rfile.read(int(self.headers.get("content-length") or 0))
                self.send_response(status)
                self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def listener() -> Iterator[Listener]:
    made = Listener()
    yield made
    made.close()


@pytest.fixture()
def no_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """No private network is allowed: loopback is refused like any other."""
    monkeypatch.setenv("AIMESH_UPSTREAM_ALLOW_PRIVATE", "")
    reset_settings()


def _add(url: str) -> InvalidInput:
    """The refusal of `url` by add_endpoint: the policy's (UpstreamURLRefused, with its
    `reason`), or the endpoint spec's own check of its form."""
    with pytest.raises(InvalidInput) as caught:
        add_endpoint(id=f"guard-{uuid.uuid4().hex[:6]}", base_url=url, model="m",
                     input_usd_per_1k="0", output_usd_per_1k="0")
    assert caught.value.field == "base_url"
    return caught.value


def _reason(refused: InvalidInput) -> str:
    assert isinstance(refused, UpstreamURLRefused), refused.message
    return refused.reason


def _store_unchecked(url: str) -> Endpoint:
    """A row as a registry from before the policy may hold it: written around the checks."""
    endpoint_id = f"old-{uuid.uuid4().hex[:6]}"
    with session_scope() as session:
        session.add(EndpointRow(id=endpoint_id, provider="openai", base_url=url, model="m",
                                api_key_env=None, api_key_file=None, input_nusd_per_1k=0,
                                output_nusd_per_1k=0, capacity=4, max_output_tokens=None,
                                tags=[], enabled=True))
    return get_endpoint(endpoint_id)


def _call(endpoint: Endpoint) -> ProviderError:
    message = AiMessage(agent_id="guard-agent", prompt="hello", max_tokens=8)
    with pytest.raises(ProviderError) as caught:
        call_provider(endpoint, message, f"guard:{message.id}")
    return caught.value


# --- registration --------------------------------------------------------------------------


def test_credentials_in_the_url_are_refused_before_any_connection(
    clean: None, listener: Listener
) -> None:
    refused = _add(f"http://user:hunter2@127.0.0.1:{listener.port}")
    assert "credentials" in refused.message and "hunter2" not in refused.message
    result = CliRunner().invoke(cli, ["endpoints", "add", "guard-cli", "--url",
                                      f"http://u:hunter2@127.0.0.1:{listener.port}",
                                      "--model", "m", "--input-price", "0",
                                      "--output-price", "0"])
    assert result.exit_code == 2 and result.stderr.startswith("error: --url: ")
    assert "credentials" in result.stderr and "hunter2" not in result.output + result.stderr
    assert list_endpoints() == [] and listener.connections == 0


@pytest.mark.parametrize("url", METADATA_FORMS)
def test_every_spelling_of_the_metadata_address_is_refused(clean: None, url: str) -> None:
    assert _reason(_add(url)) == "metadata"
    assert list_endpoints() == []


def test_loopback_in_any_spelling_is_refused_unless_allowed(
    clean: None, listener: Listener, no_loopback: None
) -> None:
    for spelled in ("127.0.0.1", "2130706433", "0x7f000001", "127.1", "0177.0.0.1",
                    "[::ffff:127.0.0.1]", "localhost"):
        refused = _add(f"http://{spelled}:{listener.port}")
        assert _reason(refused) == "loopback", (spelled, refused.message)
        assert "AIMESH_UPSTREAM_ALLOW_PRIVATE" in refused.message
    assert _reason(_add("http://10.1.2.3:8000")) == "private"
    assert list_endpoints() == [] and listener.connections == 0


def test_an_announcement_passes_the_same_policy_and_must_resolve(
    clean: None, listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIMESH_REGISTRATION_TOKENS", token_digest(TOKEN))
    monkeypatch.setenv("AIMESH_REGISTRATION_TOKEN", TOKEN)
    reset_settings()
    fields = {"id": "guard-announced", "model": "m", "input_usd_per_1k": "0",
              "output_usd_per_1k": "0"}
    with pytest.raises(InvalidInput, match="base_url: must not carry credentials"):
        parse_announcement({**fields, "base_url": f"http://a:b@127.0.0.1:{listener.port}"})
    for url, reason in [("http://0xa9fea9fe", "metadata"), ("http://10.0.0.7:8000", "private"),
                        ("http://no-such-host.invalid:8000", "unresolvable")]:
        with pytest.raises(UpstreamURLRefused) as caught:
            announce([parse_announcement({**fields, "base_url": url})], worker="guard")
        assert caught.value.reason == reason, url
    assert list_endpoints() == [] and listener.connections == 0


def test_an_operators_url_that_does_not_resolve_here_is_accepted_with_a_note(
    clean: None
) -> None:
    result = CliRunner().invoke(cli, ["endpoints", "add", "guard-remote", "--url",
                                      "http://vllm.cluster.invalid:8000", "--model", "m",
                                      "--input-price", "0", "--output-price", "0"])
    assert result.exit_code == 0, result.output
    assert "does not resolve from here; its workers resolve it when they call it" in result.stdout


# --- at the call ---------------------------------------------------------------------------


def test_a_stored_url_the_policy_refuses_is_never_called(
    clean: None, listener: Listener, no_loopback: None
) -> None:
    for url, reason in [(f"http://user:pw@127.0.0.1:{listener.port}", "credentials"),
                        (f"http://2130706433:{listener.port}", "loopback"),
                        ("http://169.254.169.254", "metadata")]:
        error = _call(_store_unchecked(url))
        assert (error.fields["reason"], error.fields["detail"]) == ("upstream_refused", reason)
        assert error.fields["called"] is False and error.fields["action"] == "fallback"
    assert listener.connections == 0


def test_a_name_resolving_to_a_refused_address_is_refused_when_the_call_connects(
    listener: Listener
) -> None:
    # A fresh process: the connection pool and its resolver start with these settings.
    code = textwrap.dedent(f"""
        import json
        from aimesh_tasks.providers import aio
        from aimesh_tasks.registry.url_policy import UpstreamURLRefused
        try:
            aio.post("http://localhost:{listener.port}", "/v1/chat/completions", {{}}, {{}},
                     connect_s=5, read_s=5)
            print(json.dumps({{"called": True}}))
        except UpstreamURLRefused as exc:
            print(json.dumps({{"reason": exc.reason, "address": exc.fields["address"]}}))
    """)
    env = {**os.environ, "AIMESH_UPSTREAM_ALLOW_PRIVATE": "", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["reason"] == "loopback" and seen["address"] in ("127.0.0.1", "::1"), seen
    assert listener.connections == 0


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_redirect_is_never_followed(clean: None, listener: Listener, status: int) -> None:
    target = f"http://127.0.0.1:{listener.port}/v1/chat/completions"
    redirector = Redirector(target, status)
    try:
        error = _call(add_endpoint(id=f"redirects-{status}", base_url=redirector.url,
                                   model="m", input_usd_per_1k="0", output_usd_per_1k="0"))
    finally:
        redirector.close()
    assert (error.fields["reason"], error.fields["status"]) == ("redirect", status)
    assert error.fields["action"] == "fallback" and target in error.message
    assert redirector.requests == 1 and listener.connections == 0


def test_through_a_worker_a_redirect_falls_back_to_the_next_endpoint(
    workers: Any, simulator: Sim, endpoint: MakeEndpoint, listener: Listener
) -> None:
    redirector = Redirector(f"http://127.0.0.1:{listener.port}/")
    try:
        bounced = endpoint(redirector, "redirects", price_in="0", price_out="0")
        other = endpoint(simulator(), "after-redirect", price_in="0.01", price_out="0.02")
        answer = submit(agent_id="guard-agent", prompt=f"redirected {uuid.uuid4()}",
                        max_tokens=8).get(timeout=60)
    finally:
        redirector.close()
    assert answer["endpoint_id"] == other.id
    first = answer["attempts"][0]
    assert first["endpoint_id"] == bounced.id and first["error"]["reason"] == "redirect"
    assert listener.connections == 0
