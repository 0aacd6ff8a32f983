"""Secure aggregation in the round loop: SecAgg+'s four stages as message exchanges through the ledger grid.

`SecureRounds.run` takes the round's train messages from the strategy (which sampled the clients)
and runs, one `send_and_receive` each: setup, share_keys, collect (the train message plus the
client's forwarded ciphertexts and the public largest weight; the reply is the masked update) and
unmask. Only the decoded weighted mean update leaves this module: the strategy takes its server
step from it (`aggregate_secure`) and never sees one client's update. A client that fails, times
out, is refused by the grid, loses its reply or sends a malformed one drops out at that stage (with
its reason); too few left to go on (SecAggError) fails the round under the failure policy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.supercore import log

from fedpeft.app.server.protocol import RoundStrategy
from fedpeft.config import Config
from fedpeft.faults.server_side import ServerFaults
from fedpeft.ledger import LedgerGrid
from fedpeft.nodes import NodeDirectory
from fedpeft.secagg import DONE, SecAggError, SecAggReplyError, SecAggServer, Stage, weighted_mean_error_bound
from fedpeft.secagg.updates import (
    mean_update,
    round_options,
    vector_shapes,
)
from fedpeft.secagg.wire import (
    MAX_WEIGHT,
    SECAGG,
    from_content,
    message_type,
    to_content,
)
from fedpeft.seeding import derive_seed

COLLECT = Stage.COLLECT_MASKED_VECTORS


@dataclass
class SecureOutcome:
    """One round of secure aggregation: the mean update (None if the round failed) and what became of each client."""

    mean: dict[str, np.ndarray] | None
    failure: str | None
    survivors: list[int]  # client ids whose updates the sum covers
    replies: list[Message]  # their collect-stage replies (masked uploads)
    lost: list[tuple[int, str]] = field(default_factory=list)  # (client, why) for every client left out
    invalid: list[tuple[int, str]] = field(default_factory=list)  # replies the protocol's checks refused
    report: dict[str, Any] = field(default_factory=dict)  # entries for the round's metrics row


class SecureRounds:
    """Runs SecAgg+ for each round of a run: the stage messages, the reply checks, the decoded mean update."""

    def __init__(self, cfg: Config, strategy: RoundStrategy, grid: LedgerGrid, directory: NodeDirectory,
                 faults: ServerFaults | None, max_weight: float) -> None:
        self.cfg, self.strategy, self.grid, self.directory, self.faults = cfg, strategy, grid, directory, faults
        self.max_weight = float(max_weight)
        self.template = strategy.upload_template  # what every client uploads: the shapes of the masked vector

    def summary(self) -> None:
        """Log the settings."""
        s = self.cfg.secagg
        log(INFO, "secure aggregation (SecAgg+): threshold %s, num_shares %s, clip range %g, %d-bit quantization, "
            "public max weight %g", f"{s.threshold:g}", s.num_shares, s.clip_range, s.quantization_bits,
            self.max_weight)

    def run(self, rnd: int, msgs: list[Message]) -> SecureOutcome:
        """Run the four stages for the round whose train messages are `msgs` (one per sampled node)."""
        by_node = {m.metadata.dst_node_id: m for m in msgs}
        client_of = self.directory.client_of
        try:
            opts = round_options(self.cfg.secagg, len(msgs))
        except ValueError as err:
            return SecureOutcome(None, f"secure aggregation cannot run: {err}", [], [])
        server = SecAggServer(opts, list(by_node), vector_shapes(self.template),
                              graph_seed=derive_seed(self.cfg.sim.seed, rnd, "secagg-graph"))
        out = SecureOutcome(None, None, [], [])
        out.report = {"secagg_threshold": opts.threshold, "secagg_num_shares": opts.neighbourhood_size}
        late: list[tuple[int, str]] = []  # unmask-stage failures: their updates are in the sum all the same
        try:
            while server.stage != DONE:
                stage = server.stage
                lost, invalid = (late, late) if stage == Stage.UNMASK else (out.lost, out.invalid)
                sent = [self._message(stage, nid, req, by_node) for nid, req in server.requests().items()]
                for reply in self._exchange(rnd, stage, sent, lost):
                    nid = reply.metadata.src_node_id
                    try:
                        server.receive(nid, from_content(reply.content))
                    except (SecAggReplyError, KeyError, TypeError, ValueError) as err:
                        invalid.append((client_of(nid), f"secagg stage '{stage}': {err}"))
                        continue
                    if stage == COLLECT:
                        out.replies.append(reply)
                server.close_stage()
                accounted = {c for c, _ in lost + invalid}
                lost += [(client_of(n), f"left out at secagg stage '{stage}': too few live neighbours")
                         for n in server.dropped.get(stage, []) if client_of(n) not in accounted]
        except SecAggError as err:
            out.failure = str(err)
            out.report["secagg_failed_stage"] = err.stage
            return out
        if late:
            log(WARNING, "round %d: uploaded, then lost at the unmask stage (still in the sum): %s", rnd, late)
        result = server.result()
        out.mean, total_weight = mean_update(result.total, list(self.template), opts, self.max_weight)
        out.survivors = [client_of(n) for n in result.survivors]
        out.report.update({
            "secagg_survivors": result.count,
            "secagg_dropped": {stage: len(nodes) for stage, nodes in result.dropped.items()},
            "secagg_error_bound": weighted_mean_error_bound(opts, result.count, total_weight, self.max_weight)})
        log(INFO, "round %d: secure sum over %d of %d clients", rnd, result.count, len(msgs))
        return out

    def _message(self, stage: str, nid: int, request: dict, by_node: dict[int, Message]) -> Message:
        """One stage's message to one node; the collect stage's is the strategy's train message plus the request."""
        if stage != COLLECT:
            return Message(to_content(request), dst_node_id=nid, message_type=message_type(stage))
        train = by_node[nid]
        content = RecordDict({**dict(train.content.items()),
                              SECAGG: ConfigRecord({**request, MAX_WEIGHT: self.max_weight})})
        return Message(content, dst_node_id=nid, message_type=message_type(stage))

    def _exchange(self, rnd: int, stage: str, sent: list[Message], lost: list[tuple[int, str]]) -> list[Message]:
        """Send one stage's messages and return the usable replies; every other client is noted in `lost`."""
        client_of: Callable[[int], int] = self.directory.client_of
        replies = self.grid.send_and_receive(sent, timeout=self.cfg.sim.round_timeout_s)
        where = f"at secagg stage '{stage}'"
        lost += [(client_of(r.node_id), f"refused {where}: {r.reason}") for r in self.grid.refused]
        late = f"timed out {where}: no reply within sim.round_timeout_s = {self.cfg.sim.round_timeout_s:g} s"
        lost += [(client_of(n), late) for n in self.grid.timed_out]
        if stage == COLLECT and self.faults is not None:  # the plan's drops lose the masked upload in transit
            replies, dropped = self.faults.on_replies(rnd, replies, self.strategy.reference)
            lost += [(c, "reply lost in transit (injected drop)") for c in dropped]
        ok = []
        for r in replies:
            if r.has_error():
                lost.append((client_of(r.metadata.src_node_id), f"client failed {where}: {r.error.reason}"))
            else:
                ok.append(r)
        return ok
