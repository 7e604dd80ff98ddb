"""Streamed answers of every wire format, from the simulator over real HTTP into the
adapters' parsers: event by event (a paused stream has already delivered its text), what a
stream the client cuts off is billed, and streams without usage. No Redis or Postgres."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from aimesh_tasks.messages import AiMessage
from aimesh_tasks.providers import PROVIDERS
from aimesh_tasks.providers.base import Completion, StreamParser
from aimesh_tasks.providers.sse import SseDecoder
from aimesh_tasks.simulator import RunningSimulator, SimulatorConfig, start_simulator
from tests.waits import wait_until

FORMATS = sorted(PROVIDERS)
MESSAGE = AiMessage(agent_id="stream-agent", messages=[
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Tell me about streams"}], max_tokens=64)
WORDS = 12


@contextmanager
def running(**config: Any) -> Iterator[RunningSimulator]:
    with start_simulator(SimulatorConfig(completion_tokens=WORDS, **config)) as sim:
        yield sim


class Reading:
    """A stream being read: `deltas` gives the text as the parser reads it off the wire,
    line by line; `parser` holds what it read."""

    def __init__(self, lines: Iterator[str], parser: StreamParser) -> None:
        self.parser = parser
        self.deltas = self._deltas(lines)

    def _deltas(self, lines: Iterator[str]) -> Iterator[str]:
        decoder = SseDecoder()
        for line in lines:
            event = decoder.feed(line.encode())
            if event is not None and (text := self.parser.feed(event)):
                yield text
        last = decoder.close()
        if last is not None and (text := self.parser.feed(last)):
            yield text


@contextmanager
def open_stream(sim: RunningSimulator, provider: str) -> Iterator[Reading]:
    """The adapter's streaming request to the simulator, being read."""
    adapter = PROVIDERS[provider]
    request = adapter.build_stream_request("sim-model", MESSAGE, "sim-key")
    with httpx.Client(base_url=sim.url, timeout=30) as client, client.stream(
            "POST", request.path, json=request.json, headers=request.headers) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        yield Reading(response.iter_lines(), adapter.stream_parser())


def whole(sim: RunningSimulator, provider: str) -> Completion:
    """The same message answered without streaming."""
    adapter = PROVIDERS[provider]
    request = adapter.build_request("sim-model", MESSAGE, "sim-key")
    reply = httpx.post(sim.url + request.path, json=request.json, headers=request.headers)
    return adapter.parse_response(reply.json())


@pytest.mark.parametrize("provider", FORMATS)
def test_each_format_streams_its_text_before_the_call_ends(provider: str) -> None:
    with running(hold_after_words=WORDS) as sim:  # every word, then the tail waits
        plain = whole(sim, provider)
        with open_stream(sim, provider) as reading:
            first = [next(reading.deltas) for _ in range(WORDS - 1)]
            wait_until(lambda: sim.held() == 1, "the stream paused at its tail")
            assert not reading.parser.ended and len(sim.calls()) == 1  # the stream is open
            assert sim.release() == 1
            rest = list(reading.deltas)
        calls = sim.calls()
    streamed = reading.parser.completion()
    assert reading.parser.ended and "".join(first + rest) == streamed.text == plain.text
    assert (streamed.input_tokens, streamed.output_tokens) == (plain.input_tokens, WORDS)
    assert streamed.usage_known and streamed.finish_reason == plain.finish_reason == "stop"
    assert calls[-1] == {**calls[0], "n": 2}  # billed as the whole answer


@pytest.mark.parametrize("provider", FORMATS)
def test_a_stream_cut_by_the_client_is_billed_the_words_written(provider: str) -> None:
    with running(hold_after_words=5) as sim:
        with open_stream(sim, provider) as reading:
            got = [next(reading.deltas) for _ in range(5)]
            wait_until(lambda: sim.held() == 1, "the stream paused after 5 words")
        # The client has gone: the paused stream sees it and is billed what it wrote.
        [call] = wait_until(lambda: [c for c in sim.calls() if c.get("disconnected")] or None,
                            "the simulator to log the disconnect", seen=sim.calls)
        stats = sim.stats()
    assert len(got) == 5 and call["completion_tokens"] == 5 and call["status"] == 200
    assert call["prompt_tokens"] > 0 and stats["disconnected"] == 1
    assert stats["completion_tokens"] == 5


@pytest.mark.parametrize("provider", FORMATS)
def test_a_stream_without_usage(provider: str) -> None:
    with running(no_usage_rate=1) as sim, open_stream(sim, provider) as reading:
        text = "".join(reading.deltas)
    done = reading.parser.completion()
    assert reading.parser.ended and done.text == text and len(text.split()) == WORDS
    assert not done.usage_known


def test_release_wakes_only_the_streams_paused_now() -> None:
    with running(hold_after_words=0) as sim:
        assert sim.release() == 0
        with open_stream(sim, "openai") as reading:
            wait_until(lambda: sim.held() == 1, "the stream paused before its first word")
            sim.release()
            assert len(list(reading.deltas)) == WORDS
        assert sim.held() == 0


def test_stream_pacing_fields_are_checked_by_name() -> None:
    with pytest.raises(ValueError, match="word_interval_ms"):
        SimulatorConfig(word_interval_ms=-1)
    with pytest.raises(ValueError, match="hold_after_words"):
        SimulatorConfig(hold_after_words=-1)
    with running() as sim:
        assert sim.configure(word_interval_ms=5, hold_after_words=2)["word_interval_ms"] == 5
