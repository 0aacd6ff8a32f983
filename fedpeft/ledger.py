"""The communication ledger: bytes of every message, as Flower serializes it for the wire.

Flower 1.41 moves a message as a tree of content-addressed objects (Message, RecordDict,
ArrayRecord/ConfigRecord/MetricRecord, Array, ArrayChunk); each unique object is pushed once as
its deflated bytes. A message's size here is the sum of those deflated objects, taken from
Flower's own `deflate()`, so identical chunks within one message count once, exactly as sent.
"""

from __future__ import annotations

import csv
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Message
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, no_object_id_recompute

from fedpeft.reply_screen import reply_limit, screen

ENVELOPE = "_envelope"
KIB = 1 << 10  # binary units throughout: KiB = 1,024 B
MIB = 1 << 20  # the unit every byte figure is shown in (`fedpeft simulate`, reports, the budget)
COLUMNS = ["round", "client_id", "node_id", "direction", "message_type", "record", "bytes"]


def format_bytes(n: float, decimals: int = 3) -> str:
    """A byte count in MiB with its unit, e.g. "35.063 MiB"."""
    return f"{n / MIB:,.{decimals}f} MiB"


def message_bytes(msg: Message) -> int:
    """Total bytes of `msg` as Flower serializes it (unique deflated objects)."""
    with no_object_id_recompute():
        return sum(_sizes(msg, {}).values())


def dense_message_bytes(msg: Message) -> int:
    """Bytes `msg` would take were no two of its arrays identical (each array's objects counted in full).

    A reply carries the tensors of the message it answers, but after training none is identical to
    another any more, whereas a first download sends LoRA's zero-initialized B matrices once.
    """
    total = message_bytes(msg)
    for record in msg.content.array_records.values() if msg.has_content() else []:
        arrays = list(record.values())
        once = {oid: obj for a in arrays for oid, obj in get_all_nested_objects(a).items()}
        total += sum(_tree_bytes(a) for a in arrays) - sum(len(obj.deflate()) for obj in once.values())
    return total


def _tree_bytes(obj) -> int:
    return sum(len(o.deflate()) for o in get_all_nested_objects(obj).values())


def _sizes(obj, cache: dict[str, int]) -> dict[str, int]:
    """Deflated size of every unique object under `obj` (post-order), keyed by object id.

    `cache` maps object ids to sizes already measured: messages that share records (every
    download of a round carries the same RecordDict) measure them once. Call inside
    `no_object_id_recompute()` so each object id is computed once, not once per ancestor.
    """
    out: dict[str, int] = {}
    for oid, o in get_all_nested_objects(obj).items():
        size = cache.get(oid)
        if size is None:
            size = cache[oid] = len(o.deflate())
        out[oid] = size
    return out


def record_bytes(msg: Message, cache: dict[str, int] | None = None) -> dict[str, int]:
    """Bytes of `msg` split by record name; message and RecordDict framing go to `_envelope`.

    The parts add up to `message_bytes(msg)` exactly. `cache` (object id → size) may be shared
    by the messages of one batch.
    """
    cache = {} if cache is None else cache
    with no_object_id_recompute():
        seen: set[str] = set()
        out: dict[str, int] = {}
        if msg.has_content():
            for name, record in msg.content.items():
                total = 0
                for oid, size in _sizes(record, cache).items():
                    if oid not in seen:
                        seen.add(oid)
                        total += size
                out[name] = total
        envelope = 0
        for oid, size in _sizes(msg, cache).items():
            if oid not in seen:
                envelope += size
        out[ENVELOPE] = envelope
    return out


@dataclass
class LedgerRow:
    """One record of one message crossing the wire."""

    round: int
    client_id: int
    node_id: int
    direction: str
    message_type: str
    record: str
    bytes: int


class CommLedger:
    """Collects ledger rows; `flush` resolves client ids and appends new rows to the CSV file."""

    def __init__(self, path: Path | None, client_of: Callable[[int], int], resume: bool = False) -> None:
        """A new ledger file at `path`; with `resume`, the rows already in it (a resumed run) are taken up."""
        self.path = path
        self.client_of = client_of
        self.round = 0
        self.rows: list[LedgerRow] = []
        self._flushed = 0
        self._largest: dict[tuple[int, str], int] = {}  # (round, direction) -> largest message
        self._lock = threading.Lock()
        if path is not None and resume:
            self._take_up(path)
        elif path is not None:
            with path.open("w", newline="") as f:
                csv.writer(f).writerow(COLUMNS)

    def _take_up(self, path: Path) -> None:
        with path.open(newline="") as f:
            self.rows = [LedgerRow(int(r["round"]), int(r["client_id"]), int(r["node_id"]), r["direction"],
                                   r["message_type"], r["record"], int(r["bytes"])) for r in csv.DictReader(f)]
        self._flushed = len(self.rows)
        per_message: dict[tuple[int, str, int], int] = defaultdict(int)  # one message per node, round and direction
        for r in self.rows:
            per_message[(r.round, r.direction, r.node_id)] += r.bytes
        for (rnd, direction, _), n in per_message.items():
            self._largest[(rnd, direction)] = max(self._largest.get((rnd, direction), 0), n)

    def charge(self, msg: Message, direction: str, cache: dict[str, int] | None = None) -> int:
        """Record every record of `msg` for the current round; returns the message's bytes.

        `cache` (object id → size) may be shared by a batch of messages sent together.
        """
        node = msg.metadata.dst_node_id if direction == "down" else msg.metadata.src_node_id
        rows = [
            LedgerRow(self.round, -1, node, direction, msg.metadata.message_type, name, size)
            for name, size in record_bytes(msg, cache).items()
        ]
        total = sum(r.bytes for r in rows)
        key = (self.round, direction)
        with self._lock:
            self.rows.extend(rows)
            self._largest[key] = max(self._largest.get(key, 0), total)
        return total

    def flush(self) -> None:
        """Resolve client ids of new rows and append them to the CSV file."""
        with self._lock:
            new = self.rows[self._flushed :]
            for r in new:
                r.client_id = self.client_of(r.node_id)
            if self.path is not None and new:
                with self.path.open("a", newline="") as f:
                    w = csv.writer(f)
                    for r in new:
                        w.writerow([r.round, r.client_id, r.node_id, r.direction, r.message_type, r.record, r.bytes])
            self._flushed = len(self.rows)

    def totals(self, round_: int | None = None) -> dict[str, int]:
        """Bytes down and up, for one round or the whole run."""
        out = {"down": 0, "up": 0}
        for r in self.rows:
            if round_ is None or r.round == round_:
                out[r.direction] += r.bytes
        return out

    def largest_message(self, direction: str, first_round: int = 0) -> int:
        """Bytes of the largest single message charged in `direction` in rounds >= `first_round` (0 if none)."""
        with self._lock:
            return max((n for (rnd, d), n in self._largest.items() if d == direction and rnd >= first_round), default=0)

    def per_client(self) -> dict[int, dict[str, int]]:
        """Bytes down and up per client over the whole run."""
        out: dict[int, dict[str, int]] = defaultdict(lambda: {"down": 0, "up": 0})
        for r in self.rows:
            out[r.client_id][r.direction] += r.bytes
        return dict(out)


class RunInterrupted(RuntimeError):
    """The run was asked to stop (Ctrl-C, or the engine shut down) while waiting for replies."""


class LedgerGrid:
    """A Flower Grid that charges every message it sends and receives to a ledger.

    `send_and_receive` pushes and pulls through the wrapped grid's own calls, and also stops
    waiting when `stop` is set, so an interrupted run ends promptly instead of at its timeout.
    """

    def __init__(self, grid, ledger: CommLedger, stop: threading.Event | None = None, poll_s: float = 0.05,
                 max_reply_mib: float = 0.0) -> None:
        self._grid = grid
        self.ledger = ledger
        self.stop = stop or threading.Event()
        self.poll_s = poll_s
        self.max_reply_mib = max_reply_mib
        self.refused: list = []  # replies screened out as messages (fedpeft.reply_screen.Screened)
        self.timed_out: list[int] = []  # nodes whose reply had not come when the round timed out

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Send `messages`, wait for the replies (or the timeout), charge both directions, screen the replies.

        Replies that do not answer this round's messages, repeat one, or are oversized are kept out
        of the result (charged all the same: they crossed the wire) and listed in `refused`; the
        nodes still silent at the timeout are listed in `timed_out` (their late replies are never
        read, nor charged).
        """
        if self.stop.is_set():
            raise RunInterrupted("stopped before sending")
        messages = list(messages)
        sizes: dict[str, int] = {}  # the round's downloads share their records: each is measured once
        largest = max((self.ledger.charge(m, "down", sizes) for m in messages), default=0)
        ids = list(self._grid.push_messages(messages))
        sent = dict(zip(ids, messages))
        pending = set(ids)
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            if self.stop.is_set():
                raise RunInterrupted("stopped while waiting for client replies")
            got = list(self._grid.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if deadline is not None and time.monotonic() >= deadline:
                break
            if pending and not got:
                time.sleep(self.poll_s)
        self.timed_out = [sent[i].metadata.dst_node_id for i in pending]
        # Replies in the order their messages were sent, not of arrival: aggregation sums them in
        # this order, so floating-point results (and the ledger's rows) do not depend on timing.
        order = {msg_id: i for i, msg_id in enumerate(ids)}
        replies.sort(key=lambda r: order.get(r.metadata.reply_to_message_id, len(order)))
        # The SuperLink's own error replies (a node it finds unavailable) never crossed a SuperNode's link.
        charged = [0 if r.metadata.src_node_id == SUPERLINK_NODE_ID else self.ledger.charge(r, "up") for r in replies]
        ok, self.refused = screen(sent, replies, charged, reply_limit(self.max_reply_mib, largest))
        return ok

    def __getattr__(self, name: str):
        return getattr(self._grid, name)
