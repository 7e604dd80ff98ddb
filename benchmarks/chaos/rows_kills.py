"""Rows that kill workers: a pool child at each phase of a message, the whole worker,
and a warm shutdown under load.

Phase kills are exact, never timed: a failpoint (aimesh_tasks.failpoints) pauses the
victim's task after its reservation (routing) or after its journal (before settle),
and the relay (chaos/relay.py) holds its provider call before the request leaves or
after the provider answered. Victims are killed one at a time, each once, while
background messages flow; the failpoint stays set until the victim finished, so its
redelivery passes.
"""

from __future__ import annotations

from collections.abc import Callable

from aimesh_tasks.messages import AiMessage
from benchmarks.chaos.cluster import VICTIM
from benchmarks.chaos.relay import Phase
from benchmarks.chaos.runner import PREFORK, Row, RowRun
from benchmarks.chaos.workload import submit_message

VICTIM_BOUND_S = 120
KillOne = Callable[[RowRun, AiMessage], None]


def _victims(run: RowRun) -> int:
    return max(2, run.size // 20)


def _with_victims(run: RowRun, kill_one: KillOne) -> None:
    """Background messages between victims; each victim killed once by `kill_one`."""
    victims = _victims(run)
    per = max(1, (run.size - victims) // (victims + 1))
    for _ in range(victims):
        run.submit(per)
        victim = run.work.message(VICTIM)
        kill_one(run, victim)
    run.submit(max(0, run.size - victims - per * victims))


def _wait_victim(run: RowRun, message_id: str) -> None:
    from celery.result import AsyncResult

    from aimesh_tasks.app import app

    try:
        run.wait(lambda: AsyncResult(message_id, app=app).ready(),
                 f"victim {message_id} to finish after its kill", VICTIM_BOUND_S)
    except RuntimeError as exc:
        run.problems.append(str(exc))


def _at_failpoint(point: str) -> KillOne:
    def kill_one(run: RowRun, victim: AiMessage) -> None:
        from aimesh_tasks import keys
        from aimesh_tasks.redis_client import get_redis

        redis = get_redis()
        run.work.publish(victim, lambda: submit_message(victim))
        message_id = victim.id
        pid = run.wait(lambda: redis.get(keys.failpoint(point)),
                       f"victim {message_id} to pause at {point}")
        run.kill_child(int(pid), f"paused at {point}")
        _wait_victim(run, message_id)
        redis.delete(keys.failpoint(point))  # armed again for the next victim

    return kill_one


def _at_relay(phase: Phase) -> KillOne:
    def kill_one(run: RowRun, victim: AiMessage) -> None:
        holds = run.cluster.holds
        message_id = victim.id
        holds.arm(message_id, phase)
        run.work.publish(victim, lambda: submit_message(victim))
        held = holds.wait_held(VICTIM_BOUND_S)
        pid = run.wait(held.caller_pid, f"the process calling for {held.call_key}")
        run.kill_child(pid, f"calling {held.call_key}")
        holds.disarm()
        _wait_victim(run, message_id)

    return kill_one


def _failpoint_env(point: str) -> dict[str, str]:
    return {"AIMESH_FAILPOINTS": f"{point}@{VICTIM}=300"}


def kill_whole_worker(run: RowRun) -> None:
    """SIGKILL the endpoint worker's whole process group while calls are in flight and
    start a new one at once (a replacement pod), a few times over."""
    kills = 3 if run.size >= 100 else 2
    run.submit(run.size)
    worker = run.cluster.worker("endpoints")
    for n in range(kills):
        run.wait(lambda: (run.cluster.endpoints.in_flight() >= 2
                          or run.work.finished() == len(run.work.accepted)),
                 "calls in flight")
        if run.work.finished() == len(run.work.accepted):
            run.notes.append(f"all finished before kill {n + 1}")
            return
        worker.kill()
        worker.start()
        run.cluster.wait_ready(worker)
    run.notes.append(f"endpoint worker SIGKILLed {kills} times")


def warm_shutdown(run: RowRun) -> None:
    """SIGTERM the endpoint worker while its pool is busy; start another once it exits.
    The visibility timeout is 600 s and the drain bound 240 s: work that came back only
    through the visibility timeout would show as lost."""
    run.submit(run.size)
    worker = run.cluster.worker("endpoints")
    run.wait_finished(run.size // 4)
    run.wait(lambda: run.cluster.endpoints.in_flight() >= 3, "three calls in flight")
    worker.terminate()
    status = worker.wait_exit(120)
    run.notes.append(f"endpoint worker exited {status} after SIGTERM")
    worker.start()
    run.cluster.wait_ready(worker)


LONG_VISIBILITY = {"AIMESH_VISIBILITY_TIMEOUT_S": "600", "AIMESH_RESERVATION_TIMEOUT_S": "700"}

ROWS = [
    Row("kill-route", "router child SIGKILLed after its reservation, before the hand-off",
        lambda run: _with_victims(run, _at_failpoint("after_reserve")),
        env=_failpoint_env("after_reserve")),
    Row("kill-before-call", "endpoint child SIGKILLed with its request held (never sent)",
        lambda run: _with_victims(run, _at_relay("request"))),
    Row("kill-during-call", "endpoint child SIGKILLed with the provider's answer held",
        lambda run: _with_victims(run, _at_relay("answer"))),
    Row("kill-before-settle", "endpoint child SIGKILLed after the journal, before settle",
        lambda run: _with_victims(run, _at_failpoint("before_settle")),
        env=_failpoint_env("before_settle")),
    Row("kill-worker", "endpoint worker (threads) SIGKILLed whole under load, restarted",
        kill_whole_worker, endpoints=["--endpoints", "all", "-P", "threads", "-c", "4"],
        sims={"a": {"latency_ms": 400}}),
    Row("sigterm", "warm shutdown (SIGTERM) of the endpoint worker under load",
        warm_shutdown, endpoints=list(PREFORK), sims={"a": {"latency_ms": 500}},
        env=LONG_VISIBILITY, drain_bound_s=240),
]
