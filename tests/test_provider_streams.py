"""Streamed answers in each provider's wire format, read by the adapters' pure parsers:
the SSE framing, documented event samples (tests/data/providers/*), cut streams and errors
reported inside a stream. No servers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aimesh_tasks.messages import AiMessage
from aimesh_tasks.providers import PROVIDERS
from aimesh_tasks.providers.base import StreamParser
from aimesh_tasks.providers.sse import IN_STREAM_ERROR_STATUS, SseDecoder, SseEvent, StreamFailed

DATA = Path(__file__).parent / "data" / "providers"
MESSAGE = AiMessage(agent_id="stream-agent", prompt="Say hello", max_tokens=32)


def events(raw: str) -> list[SseEvent]:
    """The events of an SSE body, through the decoder line by line (as aio hands them)."""
    decoder = SseDecoder()
    found = [e for line in raw.encode().split(b"\n") if (e := decoder.feed(line)) is not None]
    last = decoder.close()
    return [*found, *([last] if last is not None else [])]


def read(provider: str, raw: str) -> tuple[list[str], StreamParser]:
    """The non-empty text deltas of a stream, and the parser after reading it all."""
    parser = PROVIDERS[provider].stream_parser()
    deltas = [text for event in events(raw) if (text := parser.feed(event))]
    return deltas, parser


def cohere_sse(items: list[dict[str, object]]) -> str:
    """Cohere's documented stream (a JSON list of events) as it crosses the wire."""
    return "".join(f"event: {item['type']}\ndata: {json.dumps(item)}\n\n" for item in items)


def test_the_decoder_follows_the_event_stream_rules() -> None:
    raw = (": keep-alive\n\nevent: one\ndata: first\ndata:  second\n\r\n"
           "data:{\"a\": 1}\r\n\r\nid: 7\nretry: 10\n\ndata: tail")
    assert events(raw) == [SseEvent("one", "first\n second"), SseEvent("", '{"a": 1}'),
                           SseEvent("", "tail")]


def test_openai_chunks_with_the_usage_chunk() -> None:
    deltas, parser = read("openai", (DATA / "openai" / "stream_include_usage.sse").read_text())
    assert deltas == ["Hello", " there!"]
    done = parser.completion()
    assert parser.ended and done.text == "Hello there!" and done.finish_reason == "stop"
    assert (done.input_tokens, done.output_tokens, done.usage_known) == (19, 3, True)
    assert done.model == "gpt-4o-mini-2024-07-18"
    assert done.request_id == "chatcmpl-FixtureStream0001"


def test_an_openai_stream_cut_before_its_usage_chunk_has_no_usage() -> None:
    lines = (DATA / "openai" / "stream_include_usage.sse").read_text().split("\n\n")
    _, finished = read("openai", "\n\n".join(lines[:4]) + "\n\n")
    assert finished.ended and not finished.completion().usage_known
    _, cut = read("openai", "\n\n".join(lines[:2]) + "\n\n")
    assert not cut.ended and cut.completion().text == "Hello"


def test_anthropic_events_usage_from_start_and_delta() -> None:
    deltas, parser = read("anthropic", (DATA / "anthropic" / "stream.sse").read_text())
    assert deltas == ["Hello", "!"]
    done = parser.completion()
    assert parser.ended and done.finish_reason == "stop"
    assert (done.input_tokens, done.output_tokens, done.usage_known) == (25, 15, True)
    assert done.request_id == "msg_01FixtureStream000000005" and done.model == "claude-sonnet-4-5"


def test_anthropic_message_delta_with_input_figures_and_cache_counts() -> None:
    start = {"type": "message_start", "message": {
        "id": "msg_x", "type": "message", "role": "assistant", "content": [],
        "model": "claude-sonnet-4-5", "usage": {"input_tokens": 5, "output_tokens": 1}}}
    end = {"type": "message_delta", "delta": {"stop_reason": "max_tokens"},
           "usage": {"input_tokens": 5, "cache_read_input_tokens": 100,
                     "cache_creation_input_tokens": 0, "output_tokens": 32}}
    raw = "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n"
                  for e in (start, end, {"type": "message_stop"}))
    _, parser = read("anthropic", raw)
    done = parser.completion()
    assert (done.input_tokens, done.output_tokens, done.finish_reason) == (105, 32, "length")


def test_an_anthropic_error_event_is_classified_like_a_failed_answer() -> None:
    raw = (DATA / "anthropic" / "stream.sse").read_text().split("event: content_block_stop")[0]
    raw += ('event: error\ndata: {"type": "error", "error": {"type": "overloaded_error", '
            '"message": "Overloaded"}}\n\n')
    parser = PROVIDERS["anthropic"].stream_parser()
    with pytest.raises(StreamFailed) as failed:
        for event in events(raw):
            parser.feed(event)
    assert parser.completion().text == "Hello!" and not parser.ended
    verdict = PROVIDERS["anthropic"].classify_error(IN_STREAM_ERROR_STATUS, failed.value.body, {})
    assert (verdict.action, verdict.reason) == ("retry", "overloaded")


def test_gemini_chunks_the_last_usage_counts_thinking_as_output() -> None:
    deltas, parser = read("gemini", (DATA / "gemini" / "stream_events.txt").read_text())
    assert len(deltas) == 2 and deltas[1] == ", hold functionality, sound, high scores, etc."
    done = parser.completion()
    assert parser.ended and done.finish_reason == "stop"
    assert (done.input_tokens, done.output_tokens) == (4, 5947 + 2042)
    assert done.model == "gemini-2.5-flash" and done.request_id == "IZI2acSKMoWl0-kPmYj2yQc"


def test_gemini_crlf_frames_and_an_error_chunk() -> None:
    first = (DATA / "gemini" / "stream_events.txt").read_text().split("\n\n")[0]
    parser = PROVIDERS["gemini"].stream_parser()
    error = {"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}}
    with pytest.raises(StreamFailed) as failed:
        for event in events(f"{first}\r\n\r\ndata: {json.dumps(error)}\r\n\r\n"):
            parser.feed(event)
    assert parser.completion().text.startswith("Okay, let's create") and not parser.ended
    verdict = PROVIDERS["gemini"].classify_error(IN_STREAM_ERROR_STATUS, failed.value.body, {})
    assert verdict.action == "retry"


def test_cohere_documented_stream() -> None:
    documented = json.loads((DATA / "cohere" / "chat_stream.json").read_text())
    deltas, parser = read("cohere", cohere_sse(documented))
    expected = "".join(e["delta"]["message"]["content"]["text"] for e in documented
                       if e["type"] == "content-delta")
    assert "".join(deltas) == expected and len(deltas) > 1
    done = parser.completion()
    assert parser.ended and done.finish_reason == "stop"
    assert (done.input_tokens, done.output_tokens, done.usage_known) == (3, 9, True)
    assert done.request_id == documented[0]["id"]


def test_cohere_stream_without_usage_and_cut_streams() -> None:
    documented = json.loads((DATA / "cohere" / "chat_stream.json").read_text())
    no_usage = [*documented[:-1], {"type": "message-end", "delta": {"finish_reason": "MAX_TOKENS"}}]
    _, parser = read("cohere", cohere_sse(no_usage))
    assert parser.ended and parser.completion().finish_reason == "length"
    assert not parser.completion().usage_known
    _, cut = read("cohere", cohere_sse(documented[:3]))
    assert not cut.ended


@pytest.mark.parametrize("provider", sorted(PROVIDERS))
def test_malformed_events_are_value_errors(provider: str) -> None:
    parser = PROVIDERS[provider].stream_parser()
    with pytest.raises(ValueError, match="not JSON"):
        parser.feed(SseEvent("content_block_delta", "{not json"))


def test_stream_requests_ask_for_events_in_each_format() -> None:
    openai = PROVIDERS["openai"].build_stream_request("gpt", MESSAGE, "k")
    assert openai.json["stream"] is True and openai.json["stream_options"] == {
        "include_usage": True}
    assert openai.path == "/v1/chat/completions" and openai.json["max_tokens"] == 32
    for name in ("anthropic", "cohere"):
        request = PROVIDERS[name].build_stream_request("m", MESSAGE, "k")
        plain = PROVIDERS[name].build_request("m", MESSAGE, "k")
        assert request.json == {**plain.json, "stream": True}
        assert request.headers == plain.headers and request.path == plain.path
    gemini = PROVIDERS["gemini"].build_stream_request("models/gemini-2.5-flash", MESSAGE, "k")
    assert gemini.path == "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    assert gemini.json == PROVIDERS["gemini"].build_request("gemini-2.5-flash", MESSAGE, "k").json
