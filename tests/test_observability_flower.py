"""`aimesh flower` on loopback: nothing without credentials (UI, API, /metrics), the
workers with them, and the password in no output."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.observability_parts import wait_for
from tests.processes import AIMESH, ROOT, WorkerProcess

pytestmark = pytest.mark.slow
PASSWORD = f"pw-{uuid.uuid4().hex}"


def _status(url: str, auth: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture()
def flower(workers: list[WorkerProcess]) -> Iterator[tuple[str, Path]]:
    log = Path(f"/tmp/aimesh-test-flower-{uuid.uuid4().hex[:6]}.log")
    with log.open("w") as out:
        proc = subprocess.Popen(
            [AIMESH, "flower", "--port", "0", "--address", "127.0.0.1"], stdout=out,
            stderr=subprocess.STDOUT, cwd=ROOT,
            env={**os.environ, "AIMESH_FLOWER_BASIC_AUTH": f"admin:{PASSWORD}"})
    found: list[str] = []

    def listening() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"aimesh flower exited: {log.read_text()[-2000:]}")
        found[:] = re.findall(r"Visit me at (http://127\.0\.0\.1:\d+)", log.read_text())
        return bool(found)

    wait_for(listening, what="flower listening")
    yield found[0], log
    proc.terminate()
    proc.wait(10)


def test_flower_refuses_everything_without_credentials(
    flower: tuple[str, Path], workers: list[WorkerProcess]
) -> None:
    url, log = flower
    for path in ("/", "/workers", "/tasks", "/api/workers", "/api/tasks", "/metrics"):
        assert _status(url + path)[0] == 401, path
        assert _status(url + path, auth=f"admin:not-{PASSWORD}")[0] == 401, path
    assert _status(url + "/metrics", auth=f"admin:{PASSWORD}")[0] == 200
    assert _status(url + "/", auth=f"admin:{PASSWORD}")[0] == 200

    def listed() -> bool:
        status, body = _status(url + "/api/workers?refresh=1", auth=f"admin:{PASSWORD}")
        return status == 200 and all(w.hostname in body.decode() for w in workers)

    wait_for(listed, what="the workers listed by the Flower API")
    assert PASSWORD not in log.read_text()


def test_flower_will_not_start_without_credentials() -> None:
    env = {k: v for k, v in os.environ.items() if k != "AIMESH_FLOWER_BASIC_AUTH"}
    done = subprocess.run([AIMESH, "flower", "--port", "0"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "AIMESH_FLOWER_BASIC_AUTH" in done.stderr
