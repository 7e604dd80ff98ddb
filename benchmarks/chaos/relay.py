"""A TCP relay in front of a simulated provider that can stop one chosen call at a phase.

Endpoints are registered at a relay's URL (one relay per simulator; the relays of a row
share one `Holds`, since a message may be routed to any endpoint). A relay reads the
HTTP/1.1 requests passing through each connection (keep-alive: many per connection)
and holds the first request of the message `Holds.arm()` names, at one phase:

- `request`: the request is never forwarded (the caller has claimed the call; the
  provider never sees it);
- `answer`: the request is forwarded and the provider answers; the answer's bytes stop
  here (the provider has billed; the caller still waits).

`Holds.wait_held()` returns when that call is held, `Held.caller_pid()` names the
process making it (from the kernel's socket table), and once the caller is killed and
the hold disarmed its connection is dropped. Later calls of the same message pass.
Nothing races the clock: a held call stays held however slow the machine is. Linux only.
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

CHUNK_BYTES = 65536
CALL_KEY_HEADER = b"x-aimesh-call-key"
Phase = Literal["request", "answer"]


@dataclass
class Held:
    """A call stopped at a relay: its call key, the relay's port and the caller's."""

    call_key: str
    relay_port: int
    caller_port: int

    def caller_pid(self) -> int | None:
        """The process whose socket is the caller's end of the held connection."""
        return pid_of_connection(self.caller_port, self.relay_port)


class Holds:
    """Which call the relays hold, shared by every relay of a row (a message may be
    routed to any endpoint)."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._phase: Phase | None = None
        self._target: str | None = None  # message id whose first call is held
        self._held: Held | None = None
        self._done: set[str] = set()  # messages whose first call was already held
        self.closed = False

    def arm(self, message_id: str, phase: Phase) -> None:
        """Hold the next call of `message_id` at `phase` (one target at a time)."""
        with self._lock:
            self._phase, self._target, self._held = phase, message_id, None

    def wait_held(self, bound_s: float) -> Held:
        """Wait until the armed call is held; RuntimeError after `bound_s`."""
        with self._lock:
            if not self._lock.wait_for(lambda: self._held is not None, bound_s):
                raise RuntimeError(f"no call of message {self._target} reached a relay "
                                   f"in {bound_s:g} s")
            assert self._held is not None
            return self._held

    def disarm(self) -> None:
        """Stop holding; a held connection is dropped (its caller should be dead)."""
        with self._lock:
            self._phase, self._target, self._held = None, None, None
            self._lock.notify_all()

    def close(self) -> None:
        """Release everything for good."""
        with self._lock:
            self.closed = True
            self._lock.notify_all()

    def should_hold(self, call_key: str) -> Phase | None:
        """The phase to hold this request at, if it is the target's first call."""
        with self._lock:
            message_id = call_key.split(":", 1)[0]
            if self._target != message_id or message_id in self._done:
                return None
            self._done.add(message_id)
            return self._phase

    def note_held(self, held: Held) -> None:
        """A relay holds the target's call now."""
        with self._lock:
            self._held = held
            self._lock.notify_all()

    def wait_released(self) -> None:
        """Block a relay thread until the held call is disarmed."""
        with self._lock:
            self._lock.wait_for(lambda: self._held is None or self.closed)


class Relay:
    """Relay 127.0.0.1:<port> to `upstream_url`, holding what `holds` says."""

    def __init__(self, upstream_url: str, holds: Holds) -> None:
        parts = urlsplit(upstream_url)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.holds = holds
        threading.Thread(target=self._accept, name="chaos-relay", daemon=True).start()

    def close(self) -> None:
        """Stop accepting."""
        _shut(self._listener)

    def _accept(self) -> None:
        while True:
            try:
                caller, (_, port) = self._listener.accept()
                upstream = socket.create_connection(self._upstream)
            except OSError:
                return
            pair = _Pair(self, caller, upstream, port)
            threading.Thread(target=pair.requests, daemon=True).start()
            threading.Thread(target=pair.answers, daemon=True).start()


class _Pair:
    """One caller connection and its upstream connection."""

    def __init__(self, relay: Relay, caller: socket.socket, upstream: socket.socket,
                 port: int) -> None:
        self.relay, self.caller, self.upstream, self.port = relay, caller, upstream, port
        self.hold_answer: str | None = None  # call key whose answer is to be held

    def requests(self) -> None:
        """Caller → upstream, one parsed request at a time."""
        buffer = b""
        try:
            while True:
                head, buffer = _read_until(self.caller, buffer, b"\r\n\r\n")
                length = _content_length(head)
                body, buffer = _read_exactly(self.caller, buffer, length)
                key = _call_key(head)
                phase = self.relay.holds.should_hold(key) if key else None
                if phase == "request":
                    self._hold(key)
                    break
                if phase == "answer":
                    self.hold_answer = key
                self.upstream.sendall(head + body)
        except OSError:
            pass
        self._close()

    def answers(self) -> None:
        """Upstream → caller; bytes of a held answer wait until the relay is disarmed."""
        try:
            while data := self.upstream.recv(CHUNK_BYTES):
                if self.hold_answer is not None:
                    self._hold(self.hold_answer)
                    break  # the caller was killed: drop the connection
                self.caller.sendall(data)
        except OSError:
            pass
        self._close()

    def _hold(self, call_key: str) -> None:
        holds = self.relay.holds
        holds.note_held(Held(call_key, self.relay.port, self.port))
        holds.wait_released()

    def _close(self) -> None:
        _shut(self.caller)
        _shut(self.upstream)


def _read_until(sock: socket.socket, buffer: bytes, marker: bytes) -> tuple[bytes, bytes]:
    while marker not in buffer:
        data = sock.recv(CHUNK_BYTES)
        if not data:
            raise OSError("connection closed")
        buffer += data
    head, _, rest = buffer.partition(marker)
    return head + marker, rest


def _read_exactly(sock: socket.socket, buffer: bytes, length: int) -> tuple[bytes, bytes]:
    while len(buffer) < length:
        data = sock.recv(CHUNK_BYTES)
        if not data:
            raise OSError("connection closed")
        buffer += data
    return buffer[:length], buffer[length:]


def _header(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        field, _, value = line.partition(b":")
        if field.strip().lower() == name:
            return value.strip()
    return None


def _content_length(head: bytes) -> int:
    value = _header(head, b"content-length")
    return int(value) if value else 0


def _call_key(head: bytes) -> str:
    value = _header(head, CALL_KEY_HEADER)
    return value.decode() if value else ""


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def pid_of_connection(local_port: int, remote_port: int) -> int | None:
    """The pid owning the IPv4 TCP socket 127.0.0.1:local_port -> :remote_port, if any."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1].split(":")[1], fields[2].split(":")[1]
        if int(local, 16) == local_port and int(remote, 16) == remote_port:
            inode = fields[9]
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd) == target for fd in fd_dir.iterdir()):
                return int(fd_dir.parent.name)
        except OSError:  # the process ended, or is not ours to read
            continue
    return None
