"""Servers a chaos row may kill: its own Redis, its own Postgres, worker subprocesses.

Each is started here, on a port given by the caller, and every signal goes to a PID this
module started (a process, or its process group), never to a process found by name.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("AIMESH_CHAOS_BIN", str(ROOT / ".venv" / "bin")))
START_BOUND_S = 60


def wait_for(probe: Callable[[], bool], what: str, bound_s: float) -> None:
    """Poll `probe` until true; RuntimeError naming `what` after `bound_s`."""
    deadline = time.monotonic() + bound_s
    while not probe():
        if time.monotonic() > deadline:
            raise RuntimeError(f"waited {bound_s:g} s for {what}")
        time.sleep(0.05)


def port_open(port: int) -> bool:
    """Something accepts TCP connections on 127.0.0.1:port."""
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class RedisServer:
    """`redis-server` on 127.0.0.1:port with its data in its own directory."""

    def __init__(self, port: int, workdir: Path, *, aof: bool = True) -> None:
        self.port = port
        self.dir = workdir / f"redis-{port}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.aof = aof
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{port}"

    def start(self) -> None:
        """Start (or restart: an AOF on disk is loaded) and wait until it answers."""
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.dir), "--save", "", "--appendonly",
                "yes" if self.aof else "no", "--appendfsync", "everysec",
                "--maxmemory-policy", "noeviction", "--protected-mode", "no"]
        log = (self.dir / "redis.log").open("ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_for(self.answers, f"redis-server on port {self.port}", START_BOUND_S)

    def answers(self) -> bool:
        """The server replies to PING."""
        import redis

        try:
            return bool(redis.Redis(port=self.port, socket_timeout=1).ping())
        except redis.RedisError:
            return False

    def kill(self) -> None:
        """SIGKILL the server (what it had not written to its AOF is gone)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def pause(self) -> None:
        """SIGSTOP: connections stay open, nothing is answered."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after pause()."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def wipe(self) -> None:
        """Forget the data on disk (the server must be stopped)."""
        for child in self.dir.iterdir():
            if child.name != "redis.log":
                shutil.rmtree(child) if child.is_dir() else child.unlink()

    def stop(self) -> None:
        """Stop for good (SIGCONT first, in case it was paused)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)


def _as_postgres_user(args: list[str]) -> list[str]:
    # initdb and postgres refuse to run as root; run them as the `postgres` account.
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


class PostgresServer:
    """A throwaway Postgres cluster (`initdb` + `pg_ctl`) on 127.0.0.1:port, trust auth."""

    def __init__(self, port: int, workdir: Path) -> None:
        self.port = port
        self.home = Path(tempfile.mkdtemp(prefix=f"pg-{port}-", dir=workdir))
        self.data = self.home / "data"
        self.url = f"postgresql://postgres@127.0.0.1:{port}/chaos"
        if os.geteuid() == 0:
            shutil.chown(self.home, "postgres")

    def init(self) -> None:
        """initdb, start, and create the `chaos` database."""
        subprocess.run(_as_postgres_user(["initdb", "-D", str(self.data), "-A", "trust",
                                          "-U", "postgres", "--no-sync", "-E", "UTF8"]),
                       check=True, capture_output=True)
        self.start()
        subprocess.run(_as_postgres_user(["createdb", "-h", "127.0.0.1", "-p", str(self.port),
                                          "-U", "postgres", "chaos"]),
                       check=True, capture_output=True)

    def _ctl(self, *args: str) -> None:
        subprocess.run(_as_postgres_user(["pg_ctl", "-D", str(self.data), *args]),
                       check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        """Start and wait until it accepts connections."""
        options = (f"-p {self.port} -k {self.home} -c listen_addresses=127.0.0.1 "
                   "-c fsync=off -c max_connections=300 -c synchronous_commit=off")
        self._ctl("-o", options, "-l", str(self.home / "pg.log"), "-w", "start")

    def pid(self) -> int:
        """The postmaster's PID (first line of postmaster.pid)."""
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def stop(self, mode: str = "fast") -> None:
        """pg_ctl stop: `fast` disconnects every client; `immediate` is a crash."""
        self._ctl("-m", mode, "-w", "stop")

    def destroy(self) -> None:
        """Stop if running and delete the cluster's files."""
        if (self.data / "postmaster.pid").exists():
            try:
                self.stop("immediate")
            except subprocess.CalledProcessError:
                os.kill(self.pid(), signal.SIGKILL)
        shutil.rmtree(self.home, ignore_errors=True)


class Worker:
    """A worker subprocess (`aimesh worker ...` or `celery -A aimesh_tasks.app worker ...`)
    in its own process group; `hostname` is its Celery node name."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], logdir: Path) -> None:
        self.name = name
        self.args = args
        self.env = env
        self.log = logdir / f"{name}.log"
        self.hostname = f"{name}@{socket.gethostname()}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.exits: list[int] = []  # exit statuses of earlier incarnations

    def start(self) -> None:
        """Start the process (again, after it exited or was killed)."""
        plain = self.args[:1] == ["celery"]
        command = ([str(BIN / "celery"), "-A", "aimesh_tasks.app", "worker"] if plain
                   else [str(BIN / "aimesh"), "worker"])
        log = self.log.open("ab")
        self.proc = subprocess.Popen(
            [*command, "-n", self.hostname, "-l", "INFO", *self.args[plain:]],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            cwd=ROOT)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        """The main process has not exited."""
        return self.proc is not None and self.proc.poll() is None

    def children(self) -> list[int]:
        """PIDs of the main process's children (prefork pool processes)."""
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.pid:
                found.append(int(stat.parent.name))
        return found

    def kill(self) -> None:
        """SIGKILL the whole process group (a machine or pod gone), and reap it."""
        assert self.proc is not None
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.exits.append(self.proc.wait(30))

    def terminate(self) -> None:
        """SIGTERM to the main process only: Celery's warm shutdown."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)

    def wait_exit(self, bound_s: float) -> int:
        """Wait for the main process to exit; its status."""
        assert self.proc is not None
        status = self.proc.wait(bound_s)
        self.exits.append(status)
        return status

    def stop(self) -> None:
        """SIGTERM the group, SIGKILL what is left after 20 s."""
        if not self.alive():
            return
        assert self.proc is not None
        os.killpg(self.pid, signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.pid, signal.SIGKILL)
            self.proc.wait(10)

    def log_tail(self, chars: int = 2000) -> str:
        """The end of the worker's log."""
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""
