"""A counting TCP relay on loopback between SuperNodes and the SuperLink, for checking the byte ledger.

The relay forwards bytes unchanged and counts them per direction. Without TLS it also follows the
HTTP/1.1 exchanges of Flower's Fleet API (one request, then its response, per connection), so the
bytes can be split into: message objects (the bodies of `push-object` requests and `pull-object`
responses, which is what the ledger charges), the protobuf wrapping around them, HTTP headers, and the
other Fleet calls (heartbeats, polling, run and app download). With TLS it reads TLS record headers
instead, to report the handshake bytes and the per-record framing.
"""

from __future__ import annotations

import socket
import threading
from collections import defaultdict
from collections import deque
from dataclasses import dataclass, field

UP, DOWN = "up", "down"  # node -> SuperLink, SuperLink -> node
TLS_HEADER = 5
TLS13_RECORD_EXTRA = 17  # AEAD tag (16) + inner content type (1) inside each TLS 1.3 application-data record


@dataclass
class HttpMessage:
    """One HTTP/1.1 request or response as it crossed the wire."""

    start_line: str
    head_bytes: int  # start line + headers + blank line
    wire_body_bytes: int  # body as sent (including any chunked framing)
    body: bytes  # body after de-chunking


class HttpStream:
    """Incremental parser for one direction of an HTTP/1.1 connection (Content-Length or chunked bodies)."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.messages: list[HttpMessage] = []
        self.broken = False  # set if the stream is not HTTP/1.1 (e.g. TLS): counting then falls back to totals

    def feed(self, data: bytes) -> list[HttpMessage]:
        """Add bytes; return the messages completed by them."""
        if self.broken:
            return []
        self.buf += data
        done = []
        while True:
            msg = self._take()
            if msg is None:
                break
            done.append(msg)
        self.messages += done
        return done

    def _take(self) -> HttpMessage | None:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > 65536:
                self.broken = True
            return None
        head = bytes(self.buf[: end + 4])
        lines = head.decode("latin-1").split("\r\n")
        if not (lines[0].startswith("HTTP/1.") or lines[0].endswith("HTTP/1.1")):
            self.broken = True
            return None
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        pos = end + 4
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body, p = bytearray(), pos
            while True:
                eol = self.buf.find(b"\r\n", p)
                if eol < 0:
                    return None
                size = int(bytes(self.buf[p:eol]).split(b";")[0], 16)
                if size == 0:
                    trailer_end = self.buf.find(b"\r\n\r\n", eol)
                    if trailer_end < 0 and self.buf[eol + 2: eol + 4] != b"\r\n":
                        return None
                    p = eol + 4 if self.buf[eol + 2: eol + 4] == b"\r\n" else trailer_end + 4
                    break
                if len(self.buf) < eol + 2 + size + 2:
                    return None
                body += self.buf[eol + 2: eol + 2 + size]
                p = eol + 2 + size + 2
            msg = HttpMessage(lines[0], len(head), p - pos, bytes(body))
            del self.buf[:p]
            return msg
        n = int(headers.get("content-length", "0"))
        if len(self.buf) < pos + n:
            return None
        msg = HttpMessage(lines[0], len(head), n, bytes(self.buf[pos: pos + n]))
        del self.buf[: pos + n]
        return msg


class TlsStream:
    """Counts TLS records in one direction: handshake/alert/CCS bytes vs application data and its framing."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.records = 0
        self.app_records = 0
        self.handshake_bytes = 0  # everything that is not application data (type 23), headers included
        self.app_record_bytes = 0  # application-data records, headers included
        self.broken = False

    def feed(self, data: bytes) -> None:
        """Add bytes and count every complete record."""
        if self.broken:
            return
        self.buf += data
        while len(self.buf) >= TLS_HEADER:
            ctype, length = self.buf[0], int.from_bytes(self.buf[3:5], "big")
            if ctype not in (20, 21, 22, 23):
                self.broken = True
                return
            if len(self.buf) < TLS_HEADER + length:
                return
            self.records += 1
            if ctype == 23:
                self.app_records += 1
                self.app_record_bytes += TLS_HEADER + length
            else:
                self.handshake_bytes += TLS_HEADER + length
            del self.buf[: TLS_HEADER + length]


def endpoint(start_line: str) -> str:
    """The Fleet call of a request line (`POST /v1/fleet/push-object HTTP/1.1` -> `push-object`)."""
    parts = start_line.split()
    return parts[1].rstrip("/").rsplit("/", 1)[-1] if len(parts) >= 2 else "?"


@dataclass
class Counts:
    """Totals over every connection through the relay."""

    tcp: dict[str, int] = field(default_factory=lambda: {UP: 0, DOWN: 0})
    connections: int = 0
    calls: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    objects: dict[str, int] = field(default_factory=lambda: {UP: 0, DOWN: 0})
    object_count: dict[str, int] = field(default_factory=lambda: {UP: 0, DOWN: 0})
    tls: dict[str, dict[str, int]] = field(default_factory=lambda: {d: defaultdict(int) for d in (UP, DOWN)})


class CountingRelay:
    """Forward 127.0.0.1:<port> to `target`, counting bytes (see the module docstring)."""

    def __init__(self, target_host: str, target_port: int, host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))  # a free port chosen by the OS
        self.sock.listen(64)
        self.address = f"{host}:{self.sock.getsockname()[1]}"
        self.counts = Counts()
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []

    def start(self) -> "CountingRelay":
        """Start accepting connections in a background thread."""
        t = threading.Thread(target=self._accept, name="wire-relay", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def stop(self) -> None:
        """Stop accepting, close every connection, and wait for the relay threads."""
        self._stop.set()
        try:
            self.sock.close()
        except OSError:
            pass
        with self.lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()
        for t in self._threads:
            t.join(5)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.counts.connections += 1
                self._conns += [client, upstream]
            pending: deque[str] = deque()  # endpoints of requests awaiting their response
            for src, dst, direction in ((client, upstream, UP), (upstream, client, DOWN)):
                t = threading.Thread(target=self._pump, args=(src, dst, direction, pending), daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str, pending: deque) -> None:
        http, tls = HttpStream(), TlsStream()
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                # Count before forwarding: a request's endpoint must be queued before the server can
                # answer it, or the response thread would find no request to pair the response with.
                with self.lock:
                    self.counts.tcp[direction] += len(data)
                    tls.feed(data)
                    for msg in http.feed(data):
                        self._count_http(msg, direction, pending)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self.lock:
                if not tls.broken:
                    t = self.counts.tls[direction]
                    t["records"] += tls.records
                    t["app_records"] += tls.app_records
                    t["handshake_bytes"] += tls.handshake_bytes
                    t["app_record_bytes"] += tls.app_record_bytes
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def _count_http(self, msg: HttpMessage, direction: str, pending: deque) -> None:
        from flwr.proto.message_pb2 import PullObjectResponse, PushObjectRequest

        if direction == UP:
            name = endpoint(msg.start_line)
            pending.append(name)
        else:
            name = pending.popleft() if pending else "?"
        c = self.counts.calls[name]
        c["calls" if direction == UP else "responses"] += 1
        c[f"{direction}_head"] += msg.head_bytes
        c[f"{direction}_body"] += msg.wire_body_bytes
        content = b""
        if direction == UP and name == "push-object":
            content = PushObjectRequest.FromString(msg.body).object_content
        elif direction == DOWN and name == "pull-object":
            content = PullObjectResponse.FromString(msg.body).object_content
        if content:
            self.counts.objects[direction] += len(content)
            self.counts.object_count[direction] += 1

    def report(self) -> dict:
        """Plain-dict totals: TCP bytes, object bytes, per-call HTTP bytes, TLS record figures."""
        with self.lock:
            c = self.counts
            return {
                "tcp": dict(c.tcp),
                "connections": c.connections,
                "objects": dict(c.objects),
                "object_count": dict(c.object_count),
                "calls": {k: dict(v) for k, v in sorted(c.calls.items())},
                "tls": {d: dict(v) for d, v in c.tls.items()},
            }


def ledger_totals(run_dir) -> dict[str, int]:
    """Bytes per direction in a run's `comm.csv` (every round, round 0's node queries included)."""
    import csv
    from pathlib import Path

    out = {UP: 0, DOWN: 0}
    with (Path(run_dir) / "comm.csv").open() as f:
        for row in csv.DictReader(f):
            out[row["direction"]] += int(row["bytes"])
    return out


def compare_with_ledger(wire: dict, run_dir) -> dict[str, object]:
    """Ledger bytes vs relay-counted bytes, with the protocol overhead split out (figures for a report)."""
    ledger = ledger_totals(run_dir)
    out: dict[str, object] = {}
    calls = wire.get("calls", {})
    tcp_total = wire["tcp"][UP] + wire["tcp"][DOWN]
    for d in (DOWN, UP):
        led, obj = ledger[d], wire["objects"][d]
        out[f"ledger {d} B"] = led
        if calls:  # with TLS the relay sees ciphertext only: no payload split
            out[f"wire message objects {d} B"] = obj
            out[f"payload difference {d}"] = f"{100.0 * (obj - led) / led:+.3f} %" if led else "n/a"
    out["TCP connections"] = wire.get("connections", 0)
    if calls:
        objects = wire["objects"][UP] + wire["objects"][DOWN]
        wrap = calls.get("push-object", {}).get("up_body", 0) + calls.get("pull-object", {}).get("down_body", 0) - objects
        heads = sum(c.get("up_head", 0) + c.get("down_head", 0) for c in calls.values())
        transfer = sum(c.get(f"{d}_head", 0) + c.get(f"{d}_body", 0) for name in ("push-object", "pull-object")
                       for c in [calls.get(name, {})] for d in (UP, DOWN))
        other = sum(c.get("up_body", 0) + c.get("down_body", 0) for n, c in calls.items()
                    if n not in ("push-object", "pull-object"))
        fab = calls.get("get-fab", {}).get("down_body", 0)
        out["TCP bytes, both directions"] = tcp_total
        out["HTTP requests"] = sum(c.get("calls", 0) for c in calls.values())
        out["protobuf wrapping of objects B"] = wrap
        out["HTTP headers B"] = heads
        out["object push/pull calls (headers + bodies) B"] = transfer
        out["other Fleet calls (bodies) B"] = other
        out["of which app download (get-fab) B"] = fab
        out["overhead of object transfer vs payload"] = f"{100.0 * (transfer - objects) / max(objects, 1):.1f} %"
    tls = wire.get("tls", {})
    if any(tls.get(d) for d in (UP, DOWN)):
        recs = sum(tls[d].get("records", 0) for d in (UP, DOWN))
        app = sum(tls[d].get("app_records", 0) for d in (UP, DOWN))
        clear = sum(tls[d].get("handshake_bytes", 0) for d in (UP, DOWN))
        framing = app * (TLS_HEADER + TLS13_RECORD_EXTRA)
        out["TCP bytes, both directions"] = tcp_total
        out["TLS records (application-data records)"] = f"{recs} ({app})"
        out["TLS unencrypted handshake records B"] = clear
        out["TLS record framing (5 B header + 17 B tag/type per application record) B"] = framing
        out["TLS overhead B (handshake in clear + framing)"] = clear + framing
    return out
