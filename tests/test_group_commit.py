"""Group commit (aimesh_tasks/budgets/group_commit.py) on its own: threads and a gate,
no servers. Every wait is for an event; the bounds only turn a hang into a failure."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from aimesh_tasks.budgets.group_commit import GroupCommit
from tests.waits import wait_until


class GatedApply:
    """An `apply` that records each batch and holds the first one (or all) until opened."""

    def __init__(self, fail_first: bool = False, hold_all: bool = False) -> None:
        self.batches: list[list[str]] = []
        self.first_in = threading.Event()
        self.open = threading.Event()
        self.fail_first = fail_first
        self.hold_all = hold_all

    def __call__(self, ops: Sequence[str]) -> list[str]:
        self.batches.append(list(ops))
        if self.hold_all:
            assert self.open.wait(30), "the test never opened the gate"
        elif len(self.batches) == 1:
            self.first_in.set()
            assert self.open.wait(30), "the test never opened the gate"
            if self.fail_first:
                raise ConnectionError("the batch's connection was lost")
        return [f"done {op}" for op in ops]


def _queued(group: GroupCommit[str, str], n: int) -> bool:
    return len(group._queue) == n


def _start(pool: ThreadPoolExecutor, group: GroupCommit[str, str], ops: list[str]
           ) -> list[Future[str]]:
    """Submit `ops` one after the other, each queued before the next is sent."""
    futures = []
    for n, op in enumerate(ops, start=1):
        futures.append(pool.submit(group.run, op))
        wait_until(lambda n=n: _queued(group, n), f"{n} operation(s) queued")  # type: ignore[misc]
    return futures


def test_operations_that_arrive_during_a_batch_go_together_in_arrival_order() -> None:
    apply = GatedApply()
    group: GroupCommit[str, str] = GroupCommit(apply)
    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(group.run, "a")
        assert apply.first_in.wait(30)
        later = _start(pool, group, ["b", "c", "d", "e"])
        apply.open.set()
        assert first.result(30) == "done a"
        assert [f.result(30) for f in later] == ["done b", "done c", "done d", "done e"]
    assert apply.batches == [["a"], ["b", "c", "d", "e"]]


def test_a_failed_batch_fails_each_of_its_callers_and_the_next_batch_still_runs() -> None:
    apply = GatedApply(fail_first=True)
    group: GroupCommit[str, str] = GroupCommit(apply)
    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(group.run, "a")
        assert apply.first_in.wait(30)
        later = _start(pool, group, ["b", "c"])
        apply.open.set()
        with pytest.raises(ConnectionError, match="connection was lost"):
            first.result(30)
        assert [f.result(30) for f in later] == ["done b", "done c"]
    assert group.run("d") == "done d"  # the lead was handed on, and back when all left
    assert apply.batches == [["a"], ["b", "c"], ["d"]]


def test_batches_are_at_most_max_batch_operations() -> None:
    apply = GatedApply()
    group: GroupCommit[str, str] = GroupCommit(apply, max_batch=2)
    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(group.run, "a")
        assert apply.first_in.wait(30)
        later = _start(pool, group, ["b", "c", "d"])
        apply.open.set()
        assert [f.result(30) for f in [first, *later]] == ["done a", "done b", "done c",
                                                           "done d"]
    assert apply.batches == [["a"], ["b", "c"], ["d"]]


def test_an_apply_that_answers_the_wrong_count_fails_the_batch_loudly() -> None:
    group: GroupCommit[str, str] = GroupCommit(lambda ops: [])
    with pytest.raises(RuntimeError, match="0 outcomes for a batch of 1"):
        group.run("a")


def test_with_two_in_parallel_a_second_batch_goes_while_the_first_is_applied() -> None:
    apply = GatedApply(hold_all=True)
    group: GroupCommit[str, str] = GroupCommit(apply, parallel=2)
    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(group.run, "a")
        wait_until(lambda: apply.batches == [["a"]], "the first batch being applied")
        second = pool.submit(group.run, "b")  # a second leader: its batch goes at once
        wait_until(lambda: apply.batches == [["a"], ["b"]], "the second batch being applied")
        later = _start(pool, group, ["c", "d"])  # both batches in flight: these queue
        apply.open.set()
        assert [f.result(30) for f in [first, second, *later]] == [
            "done a", "done b", "done c", "done d"]
    assert apply.batches == [["a"], ["b"], ["c", "d"]]


def test_a_second_batch_waits_until_overlap_at_operations_are_queued() -> None:
    apply = GatedApply(hold_all=True)
    group: GroupCommit[str, str] = GroupCommit(apply, parallel=2, overlap_at=3)
    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(group.run, "a")
        wait_until(lambda: apply.batches == [["a"]], "the first batch being applied")
        waiting = _start(pool, group, ["b", "c"])  # fewer than 3: they wait for "a"
        assert apply.batches == [["a"]]
        third = pool.submit(group.run, "d")  # the third queued: a batch goes beside "a"
        wait_until(lambda: apply.batches == [["a"], ["b", "c", "d"]],
                   "the second batch being applied")
        apply.open.set()
        assert [f.result(30) for f in [first, *waiting, third]] == [
            "done a", "done b", "done c", "done d"]


def test_below_overlap_at_the_waiting_operations_go_when_the_batch_ends() -> None:
    apply = GatedApply()
    group: GroupCommit[str, str] = GroupCommit(apply, parallel=2, overlap_at=3)
    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(group.run, "a")
        assert apply.first_in.wait(30)
        later = _start(pool, group, ["b", "c"])
        apply.open.set()
        assert [f.result(30) for f in [first, *later]] == ["done a", "done b", "done c"]
    assert apply.batches == [["a"], ["b", "c"]]
