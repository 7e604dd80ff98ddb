"""Rows of bad input and bad answers: poison on the queues, duplicate deliveries at
volume, provider faults (malformed JSON, missing usage, a hang past the soft time
limit), and faults in the middle of workflows' chords."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from functools import partial
from typing import Any

from benchmarks.chaos.cluster import AGENTS, WORKFLOW_AGENT
from benchmarks.chaos.runner import ROUTER, THREADS, Row, RowRun

HOLDING = "chaos.holding"  # no worker consumes it
POISON_TASK = "chaos.poison"
CHEAP_AND_DEAR = {"a": {"latency_ms": 50, "price_in": "0.001", "price_out": "0.002"},
                  "b": {"latency_ms": 50, "price_in": "0.004", "price_out": "0.008"}}


def _broker() -> Any:
    import redis

    from aimesh_tasks.settings import get_settings

    return redis.Redis.from_url(get_settings().broker_url)


# --- poison ------------------------------------------------------------------------------


def _poison(run: RowRun) -> None:
    """Bad bytes on the route queue and an endpoint queue, an unknown task and a task
    that kills its worker process on every delivery, in the middle of the load."""
    from aimesh_tasks.app import app
    from aimesh_tasks.keys import ROUTE_QUEUE, endpoint_queue

    run.submit(run.size // 2)
    queues = [ROUTE_QUEUE, *(endpoint_queue(e) for e in run.cluster.endpoints.sims)]
    broker = _broker()
    for queue in queues:
        broker.lpush(queue, b'{"broken": ', b'{"hello": "world"}')
        app.send_task("chaos.no-such-task", (), queue=queue, task_id=uuid.uuid4().hex)
    poisoned = app.send_task(POISON_TASK, (), queue=ROUTE_QUEUE, task_id=uuid.uuid4().hex)
    run.submit(run.size - run.size // 2)
    run.wait(poisoned.ready, "the poison task to be dead-lettered", 180)
    expected = 3 * len(queues) + 1
    run.wait(lambda: _dead_letters() >= expected, f"{expected} dead letters", 60)
    run.notes.append(f"{_dead_letters()} dead letters for {expected} poison items; poison "
                     f"task result: {type(poisoned.result).__name__}")
    dead = [w.name for w in run.cluster.workers if not w.alive()]
    if dead:
        run.problems.append(f"workers stopped by poison: {dead}")


def _dead_letters() -> int:
    from aimesh_tasks.delivery import dead_letters

    return len(dead_letters.list_entries(limit=1000))


# --- duplicates --------------------------------------------------------------------------


def _duplicates(run: RowRun) -> None:
    """A third of the messages published twice at once (a producer's retry), a third as
    byte-identical copies on the route queue, a third on their endpoint's queue (what a
    visibility-timeout redelivery makes)."""
    third = run.size // 3
    copied: dict[str, list[str]] = {"aimesh.route": [], "aimesh.call": []}
    for n, send in enumerate([_published_twice] * third + [_copies_on_route] * third
                             + [_copies_on_endpoint] * (run.size - 2 * third)):
        message = run.work.message(AGENTS[n % len(AGENTS)])
        if run.work.publish(message, partial(send, message)):
            task = "aimesh.call" if send is _copies_on_endpoint else "aimesh.route"
            copied[task].append(message.id)
    run.after.append(lambda: _check_delivered_twice(run, copied))


def _check_delivered_twice(run: RowRun, copied: dict[str, list[str]]) -> None:
    """Every duplicate did reach a worker: two deliveries of its task in the logs."""
    logs = "".join(w.log.read_text(errors="replace") for w in run.cluster.workers)
    for task, ids in copied.items():
        once = [i for i in ids if logs.count(f"{task}[{i}] received") < 2]
        if once:
            run.problems.append(f"{len(once)} duplicates of {task} delivered once: {once[:3]}")
    run.notes.append(f"{sum(map(len, copied.values()))} messages each delivered twice")


def _published_twice(message: Any) -> None:
    from aimesh_tasks.tasks import route_message

    route_message.apply_async((message.to_json_dict(),))
    route_message.apply_async((message.to_json_dict(),))


def _copies_on_route(message: Any) -> None:
    from aimesh_tasks.keys import ROUTE_QUEUE
    from aimesh_tasks.tasks import route_message

    _copies_on(ROUTE_QUEUE, partial(route_message.apply_async, (message.to_json_dict(),),
                                    queue=HOLDING))


def _copies_on(queue: str, publish: Callable[[], Any]) -> None:
    """Publish one task message to the holding queue, then push two byte-identical
    copies of it onto `queue`'s list of the same priority (kombu's Redis transport keeps
    one list per priority step: `<queue>`, or `<queue>\x06\x16<step>`)."""
    broker = _broker()
    publish()
    held = [key for key in broker.keys(HOLDING.encode() + b"*") if broker.llen(key)]
    if len(held) != 1:
        raise RuntimeError(f"the task message did not reach the holding queue ({held})")
    raw = broker.rpop(held[0])
    broker.lpush(queue.encode() + held[0][len(HOLDING):], raw, raw)


def _copies_on_endpoint(message: Any) -> None:
    from aimesh_tasks.app import app
    from aimesh_tasks.keys import endpoint_queue
    from aimesh_tasks.pipeline import routing
    from aimesh_tasks.pipeline.outcomes import HandOff
    from aimesh_tasks.tasks.call import call_signature

    routed = routing.route(app, message)  # routed here; the call task copied
    if not isinstance(routed, HandOff):
        raise RuntimeError(f"routing gave {type(routed).__name__}, not a hand-off")
    queue = endpoint_queue(routed.envelope.route[0]["id"])
    _copies_on(queue, partial(call_signature(routed.envelope).apply_async,
                              task_id=message.id, queue=HOLDING))


# --- provider faults ---------------------------------------------------------------------


def _load(run: RowRun) -> None:
    run.submit(run.size)


def _hang(run: RowRun) -> None:
    """Every call to the cheap endpoint hangs past the soft time limit (prefork: the
    threads pool enforces no time limit at all)."""
    run.submit(min(run.size, 12))


HANG_ENV = {"AIMESH_TASK_SOFT_TIME_LIMIT_S": "8", "AIMESH_TASK_TIME_LIMIT_S": "12",
            "AIMESH_VISIBILITY_TIMEOUT_S": "20", "AIMESH_RESERVATION_TIMEOUT_S": "40",
            "AIMESH_PROVIDER_TIMEOUT_S": "30"}


# --- chords ------------------------------------------------------------------------------


def _workflow(run: RowRun, n: int) -> Any:
    from aimesh_tasks.workflows import Step, Workflow

    header = [Step(id=f"h{k}", prompt=f"chaos chord {run.work.tag} {n} header {k}",
                   max_tokens=16) for k in range(3)]
    gather = Step(id="gather", prompt="All: " + " ".join(
        f"{{{{ steps.h{k}.text }}}}" for k in range(3)), max_tokens=16,
        depends_on=[s.id for s in header])
    return Workflow(agent_id=WORKFLOW_AGENT, steps=[*header, gather])


def _workflows(run: RowRun) -> int:
    return max(2, run.size // 20)


def _submit_run(run: RowRun, n: int, run_id: str) -> None:
    from aimesh_tasks.workflows import submit_workflow

    submit_workflow(_workflow(run, n), run_id=run_id)
    run.work.track(run_id)


def _chord_kill(run: RowRun) -> None:
    """In every workflow, the worker child calling its first header step is SIGKILLed
    with the provider's answer held."""
    holds = run.cluster.holds
    for n in range(_workflows(run)):
        run_id = uuid.uuid4().hex
        holds.arm(f"{run_id}.h0", "answer")
        _submit_run(run, n, run_id)
        held = holds.wait_held(120)
        run.kill_child(run.wait(held.caller_pid, "the header step's caller"), held.call_key)
        holds.disarm()
    run.notes.append(f"{_workflows(run)} header-step callers SIGKILLed")


def _chord_redis_restart(run: RowRun) -> None:
    """Redis killed and restarted (AOF on) while chords are half done."""
    count = _workflows(run)
    for n in range(count):
        _submit_run(run, n, uuid.uuid4().hex)
    run.wait(lambda: run.cluster.endpoints.answered() >= count * 2, "header steps answered")
    run.cluster.redis.kill()
    time.sleep(3)  # the outage itself
    run.cluster.redis.start()
    run.notes.append("Redis killed and restarted mid-chord")


def check_chords(run: RowRun) -> None:
    """Every run terminal in the database, no chord bookkeeping key left growing."""
    from sqlalchemy import select

    from aimesh_tasks.db import WorkflowRunRow, session_scope

    with session_scope() as session:
        statuses = dict(session.execute(select(WorkflowRunRow.id, WorkflowRunRow.status)).all())
    open_runs = [r for r, s in statuses.items() if s not in ("done", "failed")]
    if open_runs:
        run.problems.append(f"{len(open_runs)} workflow runs not terminal: {open_runs[:3]}")
    broker = _broker()
    left = [k.decode() for k in broker.scan_iter("celery-taskset-meta-*")
            if k.endswith((b".j", b".t", b".s")) or broker.ttl(k) < 0]
    if left:
        run.problems.append(f"{len(left)} chord keys left: {left[:3]}")
    run.notes.append(f"workflow runs: {sorted(statuses.values())}")


def _then_check(fault: Any) -> Any:
    def row(run: RowRun) -> None:
        fault(run)
        run.after.append(lambda: check_chords(run))

    return row


INPUT_ROWS = [
    Row("poison", "poison envelopes on two queues, an unknown task, a task that kills "
        "its worker", _poison, router=[*ROUTER, "-I", "benchmarks.chaos.poison"]),
    Row("duplicates", "each message published twice / copied twice onto the route queue "
        "/ onto its endpoint queue", _duplicates, endpoints=list(THREADS),
        sims={"a": {"latency_ms": 200}}),
]

FAULT_ROWS = [
    Row("provider-malformed", "30 % of the cheap endpoint's answers are truncated JSON",
        _load, sims={**CHEAP_AND_DEAR, "a": {**CHEAP_AND_DEAR["a"], "malformed_rate": 0.3}}),
    Row("provider-no-usage", "30 % of the answers carry no usage", _load,
        sims={**CHEAP_AND_DEAR, "a": {**CHEAP_AND_DEAR["a"], "no_usage_rate": 0.3}}),
    Row("provider-hang", "the cheap endpoint answers after 10 s, past the 8 s soft limit",
        _hang, endpoints=["--endpoints", "all", "-P", "prefork", "-c", "4"],
        sims={**CHEAP_AND_DEAR, "a": {**CHEAP_AND_DEAR["a"], "latency_ms": 10_000}},
        env=HANG_ENV),
    Row("chord-kill", "a chord header step's worker child SIGKILLed mid-call, every run",
        _then_check(_chord_kill), audited=False),
    Row("chord-redis-restart", "Redis kill -9 and restart (AOF on) mid-chord",
        _then_check(_chord_redis_restart), endpoints=list(THREADS),
        sims={"a": {"latency_ms": 300}}, audited=False),
]
