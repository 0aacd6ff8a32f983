"""A run's log file: Flower's and Ray's log lines, stray output and tracebacks go to `<run dir>/run.log`.

While a run runs without `--verbose`, nothing but fedpeft's own progress display reaches the
terminal: the `flwr` and `ray` loggers lose their console handlers and gain a file handler, and
anything else written to `sys.stdout` / `sys.stderr` from any thread (Ray's "(raylet) A worker died…"
notices, warnings, a thread's uncaught exception) is written to the same file. With `verbose`,
the console keeps everything it showed before and the file gets a copy of the log records.
"""

from __future__ import annotations

import io
import logging
import re
import sys
import threading
import traceback
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

LOGGERS = ("flwr", "ray", "fedpeft", "py.warnings")
FORMAT = "%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class _RunLogHandler(logging.FileHandler):
    """A file handler whose format stays fedpeft's (ray.init re-formats every handler of the `ray` logger)."""

    def __init__(self, path: Path, level: int) -> None:
        super().__init__(path, encoding="utf-8")
        super().setFormatter(logging.Formatter(FORMAT))
        self.setLevel(level)

    def setFormatter(self, fmt: logging.Formatter | None) -> None:  # noqa: N802 (logging's name)
        pass

    def format(self, record: logging.LogRecord) -> str:
        return _ANSI.sub("", super().format(record))


class _LineStream(io.TextIOBase):
    """A text stream that writes every complete line to a logger (thread-safe, line-buffered)."""

    def __init__(self, logger: logging.Logger, level: int) -> None:
        super().__init__()
        self._logger, self._level = logger, level
        self._buf = ""
        self._lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        with self._lock:
            self._buf += s
            *lines, self._buf = self._buf.split("\n")
        for line in lines:
            if line.strip():
                self._logger.log(self._level, line.rstrip())
        return len(s)

    def flush(self) -> None:
        with self._lock:
            rest, self._buf = self._buf, ""
        if rest.strip():
            self._logger.log(self._level, rest.rstrip())

    def isatty(self) -> bool:
        return False


def _is_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)


@contextmanager
def run_log(path: Path, verbose: bool = False) -> Iterator[logging.Handler]:
    """Send Flower's and Ray's logs (and, unless `verbose`, all other output) to `path` while the block runs."""
    handler = _RunLogHandler(path, logging.DEBUG if verbose else logging.INFO)
    saved: dict[str, tuple[list[logging.Handler], int, bool]] = {}
    for name in LOGGERS:
        lg = logging.getLogger(name)
        saved[name] = (list(lg.handlers), lg.level, lg.propagate)
        if not verbose:
            for h in [h for h in lg.handlers if _is_console(h)]:
                lg.removeHandler(h)
        lg.addHandler(handler)
        lg.propagate = False
        if lg.level == logging.NOTSET or lg.level > logging.INFO:
            lg.setLevel(logging.INFO)
    output = logging.getLogger("fedpeft.output")
    streams = (sys.stdout, sys.stderr)
    captured_warnings = False
    if not verbose:
        saved.setdefault("fedpeft.output", (list(output.handlers), output.level, output.propagate))
        output.handlers = [handler]
        output.propagate = False
        output.setLevel(logging.INFO)
        sys.stdout = _LineStream(output, logging.INFO)
        sys.stderr = _LineStream(output, logging.WARNING)
        logging.captureWarnings(True)
        captured_warnings = True
    try:
        yield handler
    finally:
        if not verbose:
            for s in (sys.stdout, sys.stderr):
                if isinstance(s, _LineStream):
                    s.flush()
            sys.stdout, sys.stderr = streams
        if captured_warnings:
            logging.captureWarnings(False)
        for name, (handlers, level, propagate) in saved.items():
            lg = logging.getLogger(name)
            lg.handlers = handlers
            lg.setLevel(level)
            lg.propagate = propagate
        handler.close()


def write_traceback(path: Path, err: BaseException, header: str = "") -> None:
    """Append `err`'s full traceback (no local variables) to the file at `path`."""
    with open(path, "a", encoding="utf-8") as f:
        if header:
            f.write(header.rstrip("\n") + "\n")
        f.write("".join(traceback.format_exception(err)))


def _package_root() -> Path:
    return Path(__file__).resolve().parents[2]


def _short(filename: str) -> str:
    """A file name relative to the working directory, fedpeft's folder, site-packages or the standard library."""
    import sysconfig

    p = Path(filename)
    paths = sysconfig.get_paths()
    for base in (paths.get("purelib"), paths.get("platlib"), paths.get("stdlib"), Path.cwd(), _package_root()):
        if not base:
            continue
        try:
            return str(p.resolve().relative_to(Path(base).resolve()))
        except (ValueError, OSError):
            continue
    return filename


def _is_own(filename: str) -> bool:
    root = _package_root()
    try:
        rel = Path(filename).resolve().relative_to(root)
    except (ValueError, OSError):
        return False
    return rel.parts[:1] in (("fedpeft",), ("clients",), ("strategies",))


def origin(err: BaseException) -> str:
    """Where `err` was raised, `file:line in function`, plus fedpeft's last frame when it was raised in a library."""
    frames = traceback.extract_tb(err.__traceback__) if err.__traceback__ else []
    if not frames:
        return "(no traceback)"
    last = frames[-1]
    where = f"{_short(last.filename)}:{last.lineno} in {last.name}"
    own = [f for f in frames if _is_own(f.filename)]
    if not _is_own(last.filename):
        if own:
            where += f" (called from {_short(own[-1].filename)}:{own[-1].lineno} in {own[-1].name})"
    return where


def error_text(err: BaseException, max_lines: int = 4, max_chars: int = 400) -> str:
    """`Type: message`, cut to a few lines (the full message is in the log file)."""
    msg = str(err).strip()
    lines = msg.splitlines()
    cut = "\n".join(lines[:max_lines])
    if len(cut) > max_chars:
        cut = cut[:max_chars].rstrip()
    if cut != msg:
        cut += " …"
    name = type(err).__name__
    return f"{name}: {cut}" if cut else name


_CLIENT_APP_RAISED = "Exception ClientAppException occurred. Message:"
_FLOWER_ERROR = re.compile(r"<class '(?:[\w.]+\.)?(\w+)'>:<'?(.*)", re.S)


def reason_group(reason: str) -> str:
    """A rejection reason without the details that differ between clients, to count alike reasons together."""
    text = reason.strip()
    prefix = ""
    if text.startswith("client failed:"):
        prefix, text = "client failed: ", text[len("client failed:"):].strip()
    m = _FLOWER_ERROR.match(text)
    if m:  # Flower's error reason for an exception in a ClientApp or a dead worker: "<class 'x.Y'>:<'msg'>"
        name, msg = m.group(1), m.group(2).strip()
        if msg.startswith(_CLIENT_APP_RAISED):  # the ClientApp raised: Flower keeps only str(exception)
            name, msg = "the ClientApp raised", msg[len(_CLIENT_APP_RAISED):].strip()
        text = f"{name}: {msg}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    first = lines[0].rstrip("'>").strip() if lines else ""
    if len(first) > 120:
        first = first[:117] + "…"
    return prefix + first


def group_rejections(rows: list[dict[str, Any]]) -> list[tuple[str, int, list[int]]]:
    """(reason, count, client ids) over every round's `rejections`, most frequent first."""
    counts: Counter[str] = Counter()
    clients: dict[str, set[int]] = defaultdict(set)
    for row in rows:
        for r in row.get("rejections") or []:
            key = reason_group(str(r.get("reason", "")))
            counts[key] += 1
            clients[key].add(int(r.get("client_id", -1)))
    return [(k, n, sorted(clients[k])) for k, n in counts.most_common()]


def round_failures(row: dict[str, Any]) -> tuple[int, int]:
    """(failed, rejected) replies of one round: failed = the client raised or its worker died."""
    reasons = [str(r.get("reason", "")) for r in row.get("rejections") or []]
    failed = sum(1 for r in reasons if r.startswith("client failed"))
    total = int(row.get("rejected") or 0)
    return failed, max(total - failed, 0)
