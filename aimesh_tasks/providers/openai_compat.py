"""OpenAI-compatible Chat Completions (OpenAI, vLLM, Ollama, LiteLLM, Groq, the simulator).

Error bodies are `{"error": {"message", "type", "param", "code"}}`; rate-limit headers are
`x-ratelimit-remaining-requests`, `x-ratelimit-remaining-tokens` and
`x-ratelimit-reset-requests` (a duration such as '1s' or '6m0s').

Streamed (`stream: true` with `stream_options.include_usage`), the answer is `data:` lines
of `chat.completion.chunk` objects: the text in `choices[0].delta.content`, the
`finish_reason` on the last chunk with a choice, then one chunk with `choices: []` and the
whole call's `usage` (every other chunk has `usage: null`), then `data: [DONE]`. A stream
cut before the usage chunk has no usage: it is charged at the reservation, flagged, like
an answer without usage. An `{"error": ...}` chunk is an error reported in the stream.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aimesh_tasks.messages import AiMessage
from aimesh_tasks.providers.base import (
    Completion,
    ErrorClass,
    ProviderRequest,
    RateLimits,
    duration_s,
    excerpt,
    int_header,
    status_class,
)
from aimesh_tasks.providers.sse import ParsedStream, SseEvent, StreamFailed, count

DONE = "[DONE]"

_OPTIONAL_PARAMETERS = ("temperature", "top_p", "stop")
# A 400/404 whose code says the endpoint (its model or key), not the message, is wrong.
_ENDPOINT_CODES = frozenset({"model_not_found", "invalid_api_key", "invalid_model"})
_QUOTA_CODES = frozenset({"insufficient_quota", "billing_hard_limit_reached"})


def _error_fields(body: Any) -> tuple[str, str]:
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return "", excerpt(error) if isinstance(error, str) else ""
    return str(error.get("code") or error.get("type") or ""), excerpt(error.get("message", ""))


class OpenAICompatible:
    """POST {base_url}/v1/chat/completions, usage from `usage.prompt/completion_tokens`."""

    path = "/v1/chat/completions"

    def build_request(self, model: str, message: AiMessage, api_key: str | None) -> ProviderRequest:
        """A non-streaming chat completion request."""
        body: dict[str, Any] = {
            "model": model,
            "messages": message.chat(),
            "max_tokens": message.max_tokens,
        }
        for name in _OPTIONAL_PARAMETERS:
            value = getattr(message, name)
            if value is not None:
                body[name] = value
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        return ProviderRequest(path=self.path, json=body, headers=headers)

    def build_stream_request(self, model: str, message: AiMessage, api_key: str | None
                             ) -> ProviderRequest:
        """A streaming chat completion request, asking for the usage chunk."""
        return self.build_request(model, message, api_key).streaming(
            stream=True, stream_options={"include_usage": True})

    def stream_parser(self) -> OpenAIStream:
        """A parser of one stream of chat.completion.chunk events."""
        return OpenAIStream()

    def parse_response(self, body: dict[str, Any]) -> Completion:
        """Text of the first choice, and the provider's usage figures."""
        try:
            choice = body["choices"][0]
            usage = body.get("usage")
            usage = usage if isinstance(usage, dict) and "prompt_tokens" in usage else None
            return Completion(
                text=choice["message"].get("content") or "",
                input_tokens=int(usage["prompt_tokens"]) if usage else 0,
                output_tokens=int(usage.get("completion_tokens") or 0) if usage else 0,
                model=str(body.get("model", "")),
                finish_reason=choice.get("finish_reason"),
                request_id=body.get("id"),
                usage_known=usage is not None,
            )
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"malformed chat completion: missing or bad {exc}") from exc

    def classify_error(self, status: int, body: Any, headers: Mapping[str, str]) -> ErrorClass:
        """By status, refined by the error code: an unknown model or a bad key is the
        endpoint's fault (fall back); an exhausted quota is not worth a retry here."""
        code, detail = _error_fields(body)
        # Gateways (LiteLLM) answer an unknown model with 400 and the word only in the text.
        if code in _ENDPOINT_CODES or (status == 400 and "invalid model name" in detail.lower()):
            return ErrorClass("fallback", "auth" if "key" in code else "unknown_model", detail)
        if status == 429 and code in _QUOTA_CODES:
            return ErrorClass("fallback", "quota_exhausted", detail)
        return status_class(status, detail)

    def rate_limits(self, headers: Mapping[str, str]) -> RateLimits:
        """x-ratelimit-remaining-requests/-tokens and x-ratelimit-reset-requests."""
        return RateLimits(
            requests_remaining=int_header(headers, "x-ratelimit-remaining-requests"),
            tokens_remaining=int_header(headers, "x-ratelimit-remaining-tokens"),
            reset_s=duration_s(headers.get("x-ratelimit-reset-requests")),
        )


class OpenAIStream(ParsedStream):
    """The chunks of one streamed chat completion (see the module docstring)."""

    @property
    def ended(self) -> bool:
        """[DONE] arrived, or a finish reason did (a server that sends no [DONE])."""
        return self.state.ended or self.state.finish_reason is not None

    def feed(self, event: SseEvent) -> str:
        """The content delta of one chunk."""
        if event.data.strip() == DONE:
            self.state.ended = True
            return ""
        chunk = event.json()
        if chunk.get("error") is not None:
            raise StreamFailed(chunk)
        state = self.state
        state.model = str(chunk.get("model") or state.model)
        state.request_id = chunk.get("id") or state.request_id
        usage = chunk.get("usage")
        if isinstance(usage, dict) and "prompt_tokens" in usage:
            state.usage(count(usage["prompt_tokens"], "prompt_tokens"),
                        count(usage.get("completion_tokens"), "completion_tokens"))
        choices = chunk.get("choices") or []
        if not isinstance(choices, list) or not choices:
            return ""
        choice = choices[0]
        if not isinstance(choice, dict):
            raise ValueError("malformed stream: choices[0] is not an object")
        if choice.get("finish_reason"):
            state.finish_reason = str(choice["finish_reason"])
        content = (choice.get("delta") or {}).get("content")
        if content is not None and not isinstance(content, str):
            raise ValueError("malformed stream: delta.content is not a string")
        return state.add(content or "")
