"""A gate in front of a simulated provider: requests pass at once, answers wait for `open()`.

Register an endpoint at `gate.url` instead of the simulator's URL. Every request reaches
the simulator, which answers it; the answer's bytes stop at the gate. So a test can hold
a provider call at one exact phase (the provider has answered, the caller still waits),
wait for that event (`wait_held`), learn which process is making the call (`caller_pid`,
from the kernel's socket table), SIGKILL it there, and then let answers through. Nothing
races the clock: the call stays held however slow the machine is.

Linux only (it reads /proc to map a connection to its process).
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlsplit

from tests.waits import wait_until

CHUNK_BYTES = 65536


class Gate:
    """A TCP relay to one upstream URL that holds upstream-to-caller bytes while closed."""

    def __init__(self, upstream_url: str) -> None:
        parts = urlsplit(upstream_url)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._open = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._held: list[int] = []  # callers' source ports, in the order their answers came
        self._closed = False
        threading.Thread(target=self._accept, name="test-gate", daemon=True).start()

    def held(self) -> list[int]:
        """Source ports of the callers whose answer is held here right now."""
        with self._lock:
            return list(self._held)

    def wait_held(self, count: int = 1, timeout_s: float = 60) -> list[int]:
        """Wait until `count` answers are held; fail the test naming what was held."""
        def enough() -> list[int] | None:
            held = self.held()
            return held if len(held) >= count else None

        return wait_until(enough, f"{count} provider answer(s) held at the gate", timeout_s,
                          seen=self.held)

    def caller_pid(self, port: int) -> int:
        """The process whose socket on local port `port` is connected to this gate."""
        pid = pid_of_connection(port, self.port)
        assert pid is not None, f"no process holds the connection from port {port}"
        return pid

    def open(self) -> None:
        """Let every held and later answer through."""
        self._open.set()

    def close(self) -> None:
        """Stop accepting and drop every connection."""
        with self._lock:
            self._closed = True
            sockets, self._sockets = self._sockets, []
        self._open.set()
        for sock in [self._listener, *sockets]:
            _shut(sock)

    def _accept(self) -> None:
        while True:
            try:
                caller, (_, port) = self._listener.accept()
                upstream = socket.create_connection(self._upstream)
            except OSError:
                return
            with self._lock:
                if self._closed:
                    _shut(caller)
                    _shut(upstream)
                    return
                self._sockets += [caller, upstream]
            threading.Thread(target=self._pump, args=(caller, upstream, None),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, caller, port),
                             daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, held_port: int | None) -> None:
        """Copy bytes until either side closes; answers (held_port set) wait for open()."""
        try:
            while data := source.recv(CHUNK_BYTES):
                if held_port is not None and not self._open.is_set():
                    with self._lock:
                        self._held.append(held_port)
                    self._open.wait()
                    with self._lock:
                        self._held.remove(held_port)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            _shut(source)
            _shut(sink)


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
