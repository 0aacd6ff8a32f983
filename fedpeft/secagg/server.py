"""The server side of SecAgg+: route keys and shares, sum masked vectors, strip the masks, decode the sum.

The server sees public keys, ciphertexts it cannot open, masked vectors, and - at the end - the
shares it needs: the mask seed b_u of every client whose vector arrived, the mask key sk1_d of
every client that dropped after sharing its keys but before its vector arrived. Nothing else.

Usage, one round (the caller moves the payloads as Flower messages)::

    server = SecAggServer(options, node_ids, shapes, graph_seed=...)
    while server.stage != DONE:
        for nid, request in server.requests().items():   # send
            ...
        for nid, reply in replies:                         # whatever came back in time
            server.receive(nid, reply)                     # SecAggReplyError: malformed, not recorded
        server.close_stage()                               # the rest count as dropped; SecAggError: too few
    result = server.result()

Who counts as dropped where: U0 answered setup, U1 answered share_keys (and kept at least t live
neighbours), U2 uploaded a masked vector, U3 answered unmask. The sum covers U2.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    public_key_to_bytes,
)

from fedpeft.secagg.client import Payload, setup_request
from fedpeft.secagg.options import (
    SecAggError,
    SecAggOptions,
    SecAggReplyError,
    neighbourhoods,
    prune,
)
from fedpeft.secagg.quant import add_mod, dequantize_sum, pairwise_seed, prg_mask

DONE = "done"
_CURVE = "secp384r1"  # the curve of Flower's generate_key_pairs
_ORDER = (Stage.SETUP, Stage.SHARE_KEYS, Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK, DONE)


@dataclass
class SecAggResult:
    """What one secure aggregation yields: the sum over the clients whose vectors arrived, and who they were."""

    total: list[np.ndarray]  # float64, one array per input array: sum of the survivors' clipped vectors
    count: int  # how many clients the sum covers (|U2|)
    survivors: list[int]  # their node ids
    dropped: dict[str, list[int]] = field(default_factory=dict)  # stage -> node ids lost at that stage


class SecAggServer:
    """One round of SecAgg+ on the server: a stage at a time, requests out, replies in."""

    def __init__(self, options: SecAggOptions, node_ids: Sequence[int], shapes: Sequence[tuple[int, ...]], *,
                 graph_seed: int | None = None) -> None:
        """Start a round over `node_ids` (options.num_clients distinct ids) for vectors of arrays of `shapes`."""
        ids = [int(v) for v in node_ids]
        if len(set(ids)) != len(ids) or len(ids) != options.num_clients:
            raise ValueError(f"{len(set(ids))} distinct node ids for num_clients = {options.num_clients}")
        self.options = options
        self.graph = neighbourhoods(ids, options.neighbourhood_size, graph_seed)
        self.stage: str = Stage.SETUP
        self.members: set[int] = set(ids)  # the nodes still in the protocol
        self.dropped: dict[str, list[int]] = {}
        # given, not learnt from the first upload: one bad first upload would otherwise make every other refused
        self._shapes = [tuple(int(d) for d in s) for s in shapes]
        self._replies: dict[int, Any] = {}
        self._pk: dict[int, tuple[bytes, bytes]] = {}
        self._inbox: dict[int, dict[int, bytes]] = {}  # destination -> source -> ciphertext
        self._sharers: set[int] = set()  # U1
        self._sum: list[np.ndarray] | None = None
        self._result: SecAggResult | None = None

    # ----- the stage loop ---------------------------------------------------------------------
    def requests(self) -> dict[int, Payload]:
        """This stage's request for each node still in the protocol."""
        opts, stage = self.options, self.stage
        live = self.members
        if stage == Stage.SETUP:
            return {nid: setup_request(opts) for nid in sorted(live)}
        if stage == Stage.SHARE_KEYS:
            out = {}
            for nid in sorted(live):
                nbrs = sorted(self.graph[nid] & live)
                out[nid] = {Key.STAGE: stage, Key.NODE_ID_LIST: nbrs,
                            Key.PUBLIC_KEY_1: [self._pk[v][0] for v in nbrs],
                            Key.PUBLIC_KEY_2: [self._pk[v][1] for v in nbrs]}
            return out
        if stage == Stage.COLLECT_MASKED_VECTORS:
            out = {}
            for nid in sorted(live):
                srcs = sorted(v for v in self.graph[nid] & live if v != nid)
                out[nid] = {Key.STAGE: stage, Key.SOURCE_LIST: srcs,
                            Key.CIPHERTEXT_LIST: [self._inbox[nid][v] for v in srcs]}
            return out
        if stage == Stage.UNMASK:
            dead = self._sharers - live
            return {nid: {Key.STAGE: stage, Key.ACTIVE_NODE_ID_LIST: sorted(self.graph[nid] & live),
                          Key.DEAD_NODE_ID_LIST: sorted(self.graph[nid] & dead)} for nid in sorted(live)}
        raise SecAggError(stage, "the protocol is over: no more requests")

    def receive(self, node_id: int, reply: Mapping[str, Any]) -> None:
        """Check and record one node's reply to this stage's request (SecAggReplyError if malformed)."""
        nid = int(node_id)
        if self.stage == DONE:
            raise SecAggReplyError(f"node {nid}: the protocol is over")
        if nid not in self.members:
            raise SecAggReplyError(f"node {nid} is not in stage {self.stage!r} of this round")
        if nid in self._replies:
            raise SecAggReplyError(f"node {nid} already answered stage {self.stage!r}")
        try:
            check = {Stage.SETUP: self._check_keys, Stage.SHARE_KEYS: self._check_shares,
                     Stage.COLLECT_MASKED_VECTORS: self._check_masked, Stage.UNMASK: self._check_unmask}
            value = check[self.stage](nid, reply)
        except SecAggReplyError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise SecAggReplyError(f"node {nid}, stage {self.stage!r}: malformed reply ({e})") from e
        if self.stage == Stage.COLLECT_MASKED_VECTORS:
            # sum as the vectors come in: the server holds one running sum, never n vectors
            self._sum = value if self._sum is None else add_mod(self._sum, value, +1, self.options)
            value = True
        self._replies[nid] = value

    def close_stage(self) -> None:
        """End this stage: nodes without a recorded reply are dropped; SecAggError if too few are left."""
        stage, t = self.stage, self.options.threshold
        answered = set(self._replies)
        if stage == Stage.SETUP:
            self._pk = dict(self._replies)
            kept = prune(answered, self.graph, t)
        elif stage == Stage.SHARE_KEYS:
            for src, ciphertexts in self._replies.items():
                for dst, ctxt in ciphertexts.items():
                    self._inbox.setdefault(dst, {})[src] = ctxt
            kept = self._sharers = prune(answered, self.graph, t)
        elif stage in (Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK):
            kept = answered  # masks are committed now: a node with too few live neighbours cannot be left out
        else:
            raise SecAggError(stage, "the protocol is over")
        # nodes pruned for too few live neighbours count as dropped too
        self.dropped[stage] = sorted(self.members - kept)
        if len(kept) < t:
            pruned = f" ({len(kept)} with at least threshold live neighbours)" if len(kept) < len(answered) else ""
            # alive: who answered, or, when enough did, who kept enough live neighbours
            alive = len(answered) if len(answered) < t else len(kept)
            raise SecAggError(stage, f"{len(answered)} of {len(self.members)} clients answered{pruned}, fewer than "
                              f"threshold = {t}", alive=alive, needed=t)
        if stage == Stage.COLLECT_MASKED_VECTORS:
            self._check_recoverable(stage, kept, self._sharers)
        if stage == Stage.UNMASK:
            self._unmask_sum(self._replies)  # the sum covers U2 (self.members), not just who answered here
        else:
            self.members = kept
        self._replies = {}
        self.stage = _ORDER[_ORDER.index(stage) + 1]

    def step(self, replies: Mapping[int, Mapping[str, Any]]) -> list[tuple[int, str]]:
        """Receive a whole stage's replies and close it; returns (node id, why) for each reply refused."""
        refused = []
        for nid, reply in replies.items():
            try:
                self.receive(nid, reply)
            except SecAggReplyError as e:
                refused.append((int(nid), str(e)))
        self.close_stage()
        return refused

    def result(self) -> SecAggResult:
        """The decoded sum, once the unmask stage is closed."""
        if self._result is None:
            raise SecAggError(self.stage, "no result before the unmask stage has closed")
        return self._result

    def neighbours(self, node_id: int) -> frozenset[int]:
        """`node_id`'s neighbourhood in the SecAgg+ graph (itself included)."""
        return self.graph[int(node_id)]

    # ----- reply checks -----------------------------------------------------------------------
    def _check_keys(self, nid: int, reply: Mapping[str, Any]) -> tuple[bytes, bytes]:
        """Setup: two distinct, parseable public keys that no other node has sent."""
        pk1, pk2 = reply[Key.PUBLIC_KEY_1], reply[Key.PUBLIC_KEY_2]
        if not isinstance(pk1, bytes) or not isinstance(pk2, bytes):
            raise TypeError("public keys must be bytes")
        for pk in (pk1, pk2):  # parse: a key that does not load would break every neighbour's stage
            key = bytes_to_public_key(pk)
            if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != _CURVE:
                raise SecAggReplyError(f"node {nid}: a public key is not on {_CURVE}")
        seen = {k for pair in self._replies.values() for k in pair}
        if pk1 == pk2 or pk1 in seen or pk2 in seen:
            raise SecAggReplyError(f"node {nid}: public keys repeat")
        return pk1, pk2

    def _check_shares(self, nid: int, reply: Mapping[str, Any]) -> dict[int, bytes]:
        """Share_keys: exactly one ciphertext for every neighbour named in the request."""
        dsts = [int(v) for v in reply[Key.DESTINATION_LIST]]
        ctxts = list(reply[Key.CIPHERTEXT_LIST])
        expected = set(self.graph[nid] & self.members) - {nid}
        if len(dsts) != len(ctxts) or len(set(dsts)) != len(dsts) or set(dsts) != expected:
            # a share missing for v would leave v masking with nid but not nid with v: the sum would break
            raise SecAggReplyError(f"node {nid}: shares for {sorted(set(dsts))}, expected {sorted(expected)}")
        if not all(isinstance(c, bytes) for c in ctxts):
            raise TypeError("ciphertexts must be bytes")
        return dict(zip(dsts, ctxts, strict=True))

    def _check_masked(self, nid: int, reply: Mapping[str, Any]) -> list[np.ndarray]:
        """Collect: integer arrays of the round's shapes, every value in [0, mod_range)."""
        arrays = [np.asarray(a) for a in reply[Key.MASKED_PARAMETERS]]
        shapes = [a.shape for a in arrays]
        if shapes != self._shapes:
            raise SecAggReplyError(f"node {nid}: masked arrays of shapes {shapes}, expected {self._shapes}")
        for a in arrays:
            if a.dtype.kind not in "ui":
                raise SecAggReplyError(f"node {nid}: masked arrays must be integers, got {a.dtype}")
            if a.size and (int(a.min()) < 0 or int(a.max()) >= self.options.mod_range):
                raise SecAggReplyError(f"node {nid}: masked values outside [0, mod_range)")
        return [a.astype(np.int64) for a in arrays]

    def _check_unmask(self, nid: int, reply: Mapping[str, Any]) -> dict[int, bytes]:
        """Unmask: one share for exactly the nodes the request named."""
        nids = [int(v) for v in reply[Key.NODE_ID_LIST]]
        shares = list(reply[Key.SHARE_LIST])
        asked = self.graph[nid] & (self._sharers | self.members)
        if len(nids) != len(shares) or len(set(nids)) != len(nids) or set(nids) != asked:
            raise SecAggReplyError(f"node {nid}: shares for {sorted(nids)}, expected {sorted(asked)}")
        if not all(isinstance(s, bytes) for s in shares):
            raise TypeError("shares must be bytes")
        return dict(zip(nids, shares, strict=True))

    # ----- unmasking --------------------------------------------------------------------------
    def _check_recoverable(self, stage: str, survivors: set[int], sharers: set[int]) -> None:
        """Every secret the unmask stage must rebuild has at least t holders among the survivors."""
        t = self.options.threshold
        for nid in sorted(sharers):
            holders = len(self.graph[nid] & survivors)
            if holders < t:
                which = "mask seed" if nid in survivors else "mask key of dropped node"
                raise SecAggError(stage, f"{which} {nid} has {holders} live neighbours, fewer than threshold = {t}",
                                  alive=holders, needed=t, node_id=nid)

    def _unmask_sum(self, replies: Mapping[int, dict[int, bytes]]) -> None:
        """Rebuild b_u (survivors) and sk1_d (dropped), strip their masks, decode the sum."""
        opts, t = self.options, self.options.threshold
        survivors, dropped = self.members, self._sharers - self.members
        shares: dict[int, list[bytes]] = {nid: [] for nid in survivors | dropped}
        for held in replies.values():
            for owner, share in held.items():
                shares[owner].append(share)
        assert self._sum is not None  # close_stage saw at least t uploads
        total, shapes = self._sum, self._shapes
        for nid in sorted(survivors | dropped):
            if len(shares[nid]) < t:
                raise SecAggError(Stage.UNMASK, f"{len(shares[nid])} shares of node {nid} arrived, fewer than "
                                  f"threshold = {t}", alive=len(shares[nid]), needed=t, node_id=nid)
            # any t shares rebuild the secret; more only cost time
            secret = combine_shares(shares[nid][:t])
            if nid in survivors:
                total = add_mod(total, prg_mask(secret, shapes, opts), -1, opts)
                continue
            self._check_key(nid, secret)
            for v in sorted(self.graph[nid] & survivors):
                # v added +PRG(s) when v > nid, -PRG(s) otherwise: undo it
                seed = pairwise_seed(secret, self._pk[v][0])
                total = add_mod(total, prg_mask(seed, shapes, opts), -1 if v > nid else +1, opts)
        self._sum = None
        self._result = SecAggResult(total=dequantize_sum(total, len(survivors), opts), count=len(survivors),
                                    survivors=sorted(survivors), dropped=self.dropped)

    def _check_key(self, nid: int, secret: bytes) -> None:
        """The rebuilt sk1 of a dropped node must match the public key it sent (bad shares show up here)."""
        try:
            pk = public_key_to_bytes(bytes_to_private_key(secret).public_key())
        except ValueError as e:
            raise SecAggError(Stage.UNMASK, f"the rebuilt key of node {nid} does not load", node_id=nid) from e
        if pk != self._pk[nid][0]:
            raise SecAggError(Stage.UNMASK, f"the rebuilt key of node {nid} does not match its public key",
                              node_id=nid)
