"""Provider adapters behind one Protocol, found by kind in PROVIDERS."""

from aimesh_tasks.providers.anthropic import AnthropicMessages
from aimesh_tasks.providers.base import Completion, Provider, ProviderRequest
from aimesh_tasks.providers.cohere import CohereChat
from aimesh_tasks.providers.gemini import Gemini
from aimesh_tasks.providers.openai_compat import OpenAICompatible

PROVIDERS: dict[str, Provider] = {
    "openai": OpenAICompatible(),
    "cohere": CohereChat(),
    "gemini": Gemini(),
    "anthropic": AnthropicMessages(),
}

__all__ = ["PROVIDERS", "Completion", "Provider", "ProviderRequest"]
