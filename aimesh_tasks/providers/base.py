"""The one interface every provider adapter implements.

An adapter only translates: an AiMessage into the provider's HTTP request, and the
provider's JSON answer into a Completion. Transport, timeouts, error mapping and
connection reuse are shared (providers/http.py), so a new provider is one file plus
one line in the PROVIDERS dict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from aimesh_tasks.messages import AiMessage


@dataclass(frozen=True, slots=True)
class ProviderRequest:
    """One HTTP request to a provider."""

    path: str
    json: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Completion:
    """What a provider answered, with usage from the provider's own usage fields."""

    text: str
    input_tokens: int
    output_tokens: int
    model: str
    finish_reason: str | None = None
    request_id: str | None = None


class Provider(Protocol):
    """Translate to and from one provider's wire format."""

    def build_request(self, model: str, message: AiMessage, api_key: str | None) -> ProviderRequest:
        """The HTTP request asking `model` to answer `message`."""
        ...

    def parse_response(self, body: dict[str, Any]) -> Completion:
        """The completion in a successful response body; ValueError if it is malformed."""
        ...
