"""The dedup request key and cache scope (pure; no servers needed)."""

from __future__ import annotations

from aimesh_tasks.dedup.request_key import cache_scope, request_key
from aimesh_tasks.messages import parse_message


def test_request_key_covers_what_shapes_the_answer_and_nothing_else() -> None:
    base = {"agent_id": "a", "prompt": "What is the capital of France?", "max_tokens": 50}
    key = request_key(parse_message(base), "agent:a")
    assert key == request_key(parse_message({**base, "priority": 9, "metadata": {"x": 1}}),
                              "agent:a")
    for change in ({"max_tokens": 51}, {"temperature": 0.7}, {"model": "m"},
                   {"prompt": "What is the capital of Spain?"}, {"stop": ["\n"]}):
        assert request_key(parse_message({**base, **change}), "agent:a") != key
    assert request_key(parse_message(base), "agent:b") != key
    assert len(key) == 64  # blake3, hex


def test_cache_groups_are_opt_in_per_member() -> None:
    groups = {"team": frozenset({"a", "b"})}
    member = parse_message({"agent_id": "a", "prompt": "x", "cache_group": "team"})
    outsider = parse_message({"agent_id": "c", "prompt": "x", "cache_group": "team"})
    assert cache_scope(member, groups) == "group:team"
    assert cache_scope(outsider, groups) == "agent:c"  # naming a group is not joining it
