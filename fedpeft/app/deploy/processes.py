"""Start Flower processes, remember their PIDs, and stop every one of them by PID."""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (the OS picks it: bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Wait until something accepts connections on (host, port); fail early if `proc` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited with code {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


@dataclass
class Started:
    """One process this group started: its name, Popen handle and log file."""

    name: str
    proc: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        """The process id."""
        return self.proc.pid


def _descendants(pid: int) -> list[int]:
    """PIDs of every live descendant of `pid` (read from /proc; empty where /proc is missing)."""
    children: dict[int, list[int]] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (tells a PID apart from a later reuse of it)."""
    st = _stat(pid)
    return int(st[19]) if st else None


def pid_alive(pid: int, started: int | None = None) -> bool:
    """Whether this PID is alive, not a zombie, and (if `started` is given) still the same process."""
    st = _stat(pid)
    if st is None:
        return False
    return st[0] != "Z" and (started is None or int(st[19]) == started)


@dataclass
class ProcessGroup:
    """Processes started for one local deployment; `stop()` ends each by PID (terminate, wait, kill)."""

    log_dir: Path
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    started: list[Started] = field(default_factory=list)
    seen_pids: dict[int, int | None] = field(default_factory=dict)  # PID -> start time

    def __post_init__(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        atexit.register(self.stop)

    def start(self, name: str, argv: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> Started:
        """Start `argv` in its own session with output to `<log_dir>/<name>.log`; remember its PID.

        `env` replaces the group's environment for this process only."""
        log = self.log_dir / f"{name}.log"
        with open(log, "ab") as fh:
            # A session of its own: Ctrl-C in the terminal does not reach it, and stop() controls its end.
            proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=self.env if env is None else env,
                                    cwd=cwd, start_new_session=True)
        s = Started(name, proc, log)
        self.started.append(s)
        self.seen_pids[proc.pid] = start_time(proc.pid)
        return s

    def note_children(self) -> None:
        """Remember the PIDs of processes that Flower started under ours (SuperExec, ServerApp, ClientApps)."""
        for s in self.started:
            if s.proc.poll() is None:
                self.seen_pids.update({p: start_time(p) for p in _descendants(s.pid)})

    def stop_one(self, s: Started, grace: float = 10.0) -> int | None:
        """Stop one started process and whatever it started, by PID; return its exit code."""
        kids = {p: start_time(p) for p in _descendants(s.pid)} if s.proc.poll() is None else {}
        self.seen_pids.update(kids)
        if s.proc.poll() is None:
            s.proc.terminate()
            try:
                s.proc.wait(grace)
            except subprocess.TimeoutExpired:
                s.proc.kill()
                s.proc.wait(grace)
        _end_pids(kids, grace)
        return s.proc.returncode

    def stop(self, grace: float = 10.0) -> None:
        """Stop every process this group started (last started first), and any child of theirs still alive."""
        self.note_children()
        for s in reversed(self.started):
            self.stop_one(s, grace)
        _end_pids(self.seen_pids, grace)

    def alive(self) -> list[int]:
        """PIDs started by this group, or seen as their children, that are still alive."""
        return [p for p, t in sorted(self.seen_pids.items()) if pid_alive(p, t)]


def _end_pids(pids: dict[int, int | None], grace: float) -> None:
    """SIGTERM each PID that is still the process we saw, wait up to `grace` seconds, then SIGKILL what is left."""
    live = [p for p, t in pids.items() if pid_alive(p, t)]
    for p in live:
        try:
            os.kill(p, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.monotonic() + grace
    while live and time.monotonic() < deadline:
        live = [p for p in live if pid_alive(p, pids[p])]
        time.sleep(0.1)
    for p in live:
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass
