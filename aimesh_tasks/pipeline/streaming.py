"""A streaming message's call: made with streaming on, its text forwarded as it comes.

`StreamedCall` makes the provider call of a message with `stream` set through
`providers.http.stream_provider`, handing each delta to the message's stream
(aimesh_tasks/streams). When the client goes away (the ingress sets the gone flag):

| AIMESH_STREAM_ON_DISCONNECT | the call                                               |
|-----------------------------|--------------------------------------------------------|
| finish (default)            | goes on to its end; nothing more is forwarded; charged |
|                             | from the provider's final usage, as any call           |
| abort                       | is cancelled (the connection closed: the provider      |
|                             | stops); charged the usage the provider reported before |
|                             | the abort, else the reservation; ledger kind `aborted` |

A call that fails after text was forwarded ends the message: the client has text that
another call would not continue (`final`). Everything else about the call (lease,
journal before settle, one call per call key) is the plain call's (pipeline/call.py).
"""

from __future__ import annotations

import threading
from contextlib import nullcontext

from aimesh_tasks.budgets.estimate import Estimate, worst_case
from aimesh_tasks.errors import ProviderError
from aimesh_tasks.messages import AiMessage
from aimesh_tasks.money import call_cost_nusd
from aimesh_tasks.providers.base import Completion
from aimesh_tasks.providers.http import stream_provider
from aimesh_tasks.registry.endpoints import Endpoint
from aimesh_tasks.settings import get_settings
from aimesh_tasks.streams.watch import WATCH
from aimesh_tasks.streams.writer import Forwarder

ABORTED = "aborted"


class StreamedCall:
    """One streaming call of `message` at `endpoint` under `call_key` (see the module)."""

    def __init__(self, message: AiMessage, endpoint: Endpoint, call_key: str) -> None:
        self.message = message
        self.endpoint = endpoint
        self.call_key = call_key
        abort = get_settings().stream_on_disconnect == "abort"
        self.cancel = threading.Event() if abort else None
        self.forward = Forwarder(message.id, call_key, endpoint.id, endpoint.model,
                                 on_gone=self.cancel.set if self.cancel else None)

    def __call__(self) -> Completion:
        """Make the call (ProviderError as `call_provider`; `cancelled` when aborted)."""
        watching = (WATCH.watching(self.message.id, self.cancel) if self.cancel is not None
                    else nullcontext())
        with watching:
            return stream_provider(self.endpoint, self.message, self.call_key, self.forward,
                                   cancel=self.cancel)

    def final(self, error: ProviderError) -> ProviderError:
        """The error as the message's last, once text was forwarded (no retry, no
        fallback: their text would not continue the one the client has)."""
        if not self.forward.sent or error.action == "fail":
            return error
        return ProviderError(
            f"{error.message} (after {self.forward.sent} characters were streamed: a "
            "stream that has begun is not made again elsewhere)",
            {**error.fields, "action": "fail", "retryable": False, "endpoint_fault": True,
             "streamed_chars": self.forward.sent})


def aborted_charge(message: AiMessage, endpoint: Endpoint, error: ProviderError
                   ) -> Estimate | None:
    """What an aborted call is charged: the usage the provider reported before the abort,
    else the reservation (None: the call was not aborted)."""
    if error.fields.get("reason") != "cancelled":
        return None
    reported = error.fields.get("reported_usage")
    if not reported:
        return worst_case(message, endpoint)
    prompt, output = int(reported["input_tokens"]), int(reported["output_tokens"])
    return Estimate(prompt, output, call_cost_nusd(
        prompt, output, endpoint.input_nusd_per_1k, endpoint.output_nusd_per_1k))
