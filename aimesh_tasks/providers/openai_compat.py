"""OpenAI-compatible Chat Completions (OpenAI, vLLM, Ollama, LiteLLM, Groq, the simulator)."""

from __future__ import annotations

from typing import Any

from aimesh_tasks.messages import AiMessage
from aimesh_tasks.providers.base import Completion, ProviderRequest

_OPTIONAL_PARAMETERS = ("temperature", "top_p", "stop")


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

    def parse_response(self, body: dict[str, Any]) -> Completion:
        """Text of the first choice, and the provider's usage figures."""
        try:
            choice = body["choices"][0]
            usage = body["usage"]
            return Completion(
                text=choice["message"].get("content") or "",
                input_tokens=int(usage["prompt_tokens"]),
                output_tokens=int(usage["completion_tokens"]),
                model=str(body.get("model", "")),
                finish_reason=choice.get("finish_reason"),
                request_id=body.get("id"),
            )
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed chat completion: missing or bad {exc}") from exc
