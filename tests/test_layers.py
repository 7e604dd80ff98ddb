"""Importing is free, and the delivery settings cannot be replaced by a stray module.

Each case runs in a fresh interpreter, so nothing this test process imported counts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PURE_CORE = [
    "aimesh_tasks", "aimesh_tasks.messages", "aimesh_tasks.errors", "aimesh_tasks.keys",
    "aimesh_tasks.settings", "aimesh_tasks.envelope", "aimesh_tasks.money",
    "aimesh_tasks.estimation", "aimesh_tasks.routing.scoring", "aimesh_tasks.dedup.request_key",
    "aimesh_tasks.workflows.dag", "aimesh_tasks.workflows.model", "aimesh_tasks.budgets.estimate",
    "aimesh_tasks.budgets.periods", "aimesh_tasks.providers", "aimesh_tasks.providers.base",
    "aimesh_tasks.pipeline.outcomes", "aimesh_tasks.policies.base",
    "aimesh_tasks.registry.url_policy", "aimesh_tasks.pools",
]


def _run(code: str, cwd: Path = ROOT, env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_pure_core_imports_build_no_app_and_open_no_connection() -> None:
    done = _run(f"""
        import json, socket, sys
        sys.modules["aimesh_tasks.app"] = None  # the Celery app is unavailable
        attempts = []
        def refuse(self, address, *a):
            attempts.append(repr(address))
            raise OSError("connections are refused in this test")
        socket.socket.connect = refuse
        socket.socket.connect_ex = refuse
        import importlib
        for name in {PURE_CORE!r}:
            importlib.import_module(name)
        from celery import _state
        print(json.dumps({{"apps": len(list(_state._apps)), "connects": attempts,
                           "app_module": "aimesh_tasks.app" in sys.modules
                                         and sys.modules["aimesh_tasks.app"] is not None}}))
    """)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {"apps": 0, "connects": [], "app_module": False}


def _conf_from(tmp_path: Path, source: str) -> tuple[dict[str, object], str]:
    (tmp_path / "celeryconfig.py").write_text(textwrap.dedent(source))
    done = _run("""
        import json
        from aimesh_tasks.app import app
        names = ["task_serializer", "accept_content", "task_acks_late",
                 "task_reject_on_worker_lost", "worker_send_task_events"]
        print(json.dumps({name: app.conf[name] for name in names}))
    """, cwd=tmp_path, env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


GUARANTEES = {"task_serializer": "json", "accept_content": ["json"], "task_acks_late": True,
              "task_reject_on_worker_lost": True}


def test_a_foreign_celeryconfig_is_ignored_loudly(tmp_path: Path) -> None:
    conf, stderr = _conf_from(tmp_path, """
        task_serializer = "pickle"
        accept_content = ["pickle", "json"]
        task_acks_late = False
        worker_send_task_events = True
    """)
    assert {k: conf[k] for k in GUARANTEES} == GUARANTEES
    assert conf["worker_send_task_events"] is False  # nothing of it applied
    assert f"ignoring {tmp_path / 'celeryconfig.py'}" in stderr
    assert "AIMESH_OVERRIDES" in stderr


def test_deployment_overrides_apply_but_never_to_the_guarantees(tmp_path: Path) -> None:
    conf, stderr = _conf_from(tmp_path, """
        AIMESH_OVERRIDES = True
        task_acks_late = False
        accept_content = ["pickle"]
        worker_send_task_events = True
    """)
    assert {k: conf[k] for k in GUARANTEES} == GUARANTEES
    assert conf["worker_send_task_events"] is True
    assert "ignoring task_acks_late = False" in stderr
    assert "ignoring accept_content = ['pickle']" in stderr


def test_every_error_a_producer_can_catch_is_exported() -> None:
    import inspect

    import aimesh_tasks
    from aimesh_tasks import envelope, errors

    tree = [cls for module in (errors, envelope) for _, cls in inspect.getmembers(module)
            if inspect.isclass(cls) and issubclass(cls, errors.AimeshError)
            and cls.__module__ == module.__name__]
    missing = sorted(cls.__name__ for cls in tree if cls.__name__ not in aimesh_tasks.__all__)
    assert not missing, f"errors not exported from aimesh_tasks: {missing}"
    for cls in tree:
        assert getattr(aimesh_tasks, cls.__name__) is cls
