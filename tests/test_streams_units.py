"""The pieces of streaming through the queue that need no servers: stream entries, the
relay's text bookkeeping, the chunk shapes, and AiMessage.stream at the edge."""

from __future__ import annotations

import json

import pytest

from aimesh_tasks.errors import BudgetExceeded, InvalidMessage, ProviderError, error_from_dict
from aimesh_tasks.ingress.openai_shapes import Chunks, chunks
from aimesh_tasks.ingress.relay import Diverged, RelayText
from aimesh_tasks.messages import AiMessage, parse_message
from aimesh_tasks.streams.entries import STREAM_VERSION, Delta, End, Failure, Start, decode, encode

RESULT = {"message_id": "m1", "agent_id": "a", "text": "one two three four five six",
          "finish_reason": "stop", "endpoint_id": "e", "model": "sim", "input_tokens": 7,
          "output_tokens": 6, "cost_usd": "0.001", "charged_usd": "0.001", "cached": False,
          "dedup": False, "queue_wait_ms": 1.0, "processing_ms": 2.0,
          "usage_estimated": False, "finished_at": "2026-01-01T00:00:00+00:00"}


@pytest.mark.parametrize("entry", [
    Start("m1:0", "ep", "sim"), Delta("m1:0", 12, "héllo "), End(RESULT),
    Failure({"code": "provider_error", "message": "x", "status": 500})])
def test_entries_round_trip_with_their_version(entry: Start | Delta | End | Failure) -> None:
    raw = encode(entry)
    assert json.loads(raw)["v"] == STREAM_VERSION
    assert decode(raw) == entry


@pytest.mark.parametrize(("raw", "says"), [
    ('{"v": 2, "kind": "delta", "call": "c", "at": 0, "text": "x"}', "version 2"),
    ('{"v": 1, "kind": "gossip"}', "unknown kind"),
    ('{"v": 1, "kind": "delta", "call": "c"}', "wrong fields"),
    ("not json", "not a stream entry")])
def test_entries_a_release_cannot_read_are_refused_by_name(raw: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        decode(raw)


def test_relay_text_sends_each_character_once_and_fills_gaps_from_the_end() -> None:
    text = RelayText()
    assert text.offer(0, "one ") == "one "
    assert text.offer(4, "two ") == "two "
    assert text.offer(0, "one two three") == "three"  # a replay from the start
    assert text.offer(20, "six") == ""  # past a gap: nothing yet
    assert text.complete("one two three four five six") == " four five six"
    assert text.sent == "one two three four five six"


def test_relay_text_refuses_text_that_does_not_continue_what_was_sent() -> None:
    text = RelayText()
    text.offer(0, "one two")
    with pytest.raises(Diverged):
        text.offer(0, "ten twenty")
    with pytest.raises(Diverged):
        text.complete("one too many")


def test_chunks_of_a_whole_answer_and_of_a_live_one_share_one_shape() -> None:
    whole = chunks(RESULT, include_usage=True)
    live = Chunks("m1", "sim", whole[0]["created"], include_usage=True)
    pieces = [c["choices"][0]["delta"].get("content") for c in whole[1:-2]]
    assert "".join(pieces) == RESULT["text"] and len(pieces) > 1
    assert whole[0] == live.role() and whole[1] == live.text(pieces[0])
    assert whole[-2:] == live.ending(RESULT)
    assert whole[-1]["choices"] == [] and whole[-1]["usage"]["total_tokens"] == 13
    assert all(c["usage"] is None for c in whole[:-1])
    assert "usage" not in Chunks("m1", "sim", 0, include_usage=False).role()


def test_stream_is_a_strict_boolean_of_the_message() -> None:
    assert parse_message({"agent_id": "a", "prompt": "p", "stream": True}).stream
    assert AiMessage(agent_id="a", prompt="p").to_json_dict()["stream"] is False
    with pytest.raises(InvalidMessage, match="stream"):
        parse_message({"agent_id": "a", "prompt": "p", "stream": "yes"})


def test_an_error_rebuilt_from_its_dict_keeps_its_class_and_fields() -> None:
    error = BudgetExceeded("no budget left", agent_id="a", needed_tokens=10)
    rebuilt = error_from_dict(error.to_dict())
    assert type(rebuilt) is BudgetExceeded and rebuilt.needed == 10
    assert rebuilt.to_dict() == error.to_dict()
    assert type(error_from_dict({"code": "provider_error", "message": "m"})) is ProviderError
    assert error_from_dict({"code": "from-the-future", "message": "m"}).message == "m"


def test_a_failure_counts_against_the_endpoint_unless_it_is_the_messages_own() -> None:
    assert ProviderError("x", action="fallback").endpoint_fault
    assert not ProviderError("x", action="fail").endpoint_fault
    assert ProviderError("x", action="fail", endpoint_fault=True).endpoint_fault


def test_without_a_redis_server_the_ingress_has_no_stream_reader(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from aimesh_tasks.settings import reset_settings
    from aimesh_tasks.streams.reader import StreamReader

    monkeypatch.setenv("AIMESH_REDIS_URL", "memory://")
    reset_settings()
    try:
        assert StreamReader.for_settings() is None  # streams are cut from the final text
    finally:
        monkeypatch.undo()
        reset_settings()
