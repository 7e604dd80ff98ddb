"""Hearing at once that a streaming call's client left (worker side, abort mode).

With AIMESH_STREAM_ON_DISCONNECT=abort a call is aborted when its client leaves, also
while the provider sends nothing (the forwarder only looks at the gone flag when it
forwards a delta). The ingress PUBLISHes the message id on `keys.streams_gone_channel()`
when it sets the flag; one subscriber thread per worker process sets the cancel event of
every call of that message watched here (aimesh_tasks/flag_watch.py: `watching` checks the
flag itself once the subscription is live, so a client that left before the call began is
seen too).
"""

from __future__ import annotations

from aimesh_tasks import keys
from aimesh_tasks.flag_watch import FlagWatch


class GoneWatch(FlagWatch):
    """The cancel events of the streaming calls in flight in this process, by message."""

    def __init__(self) -> None:
        super().__init__("streams", keys.streams_gone_channel(), keys.stream_gone)


WATCH = GoneWatch()
