"""The client side of SecAgg+, stage by stage, as Flower's `secaggplus_mod` runs it.

A `SecAggClient` answers one request per stage. Its whole state is `state()`, a dict of ints,
floats, bytes and lists of them (a Flower ConfigRecord holds it as is), so a ClientApp that is
rebuilt for every message keeps it in `context.state` between stages: `SecAggClient.from_state`.

Besides computing, the client checks each request the way a client must not trust its server:
its own keys come back unchanged, every source is a neighbour, enough neighbours are alive, and it
never hands out both the mask seed share and the key share of one node (nor its own key share).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

import numpy as np
from cryptography.fernet import InvalidToken
from flwr.common.secure_aggregation.crypto.shamir import create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    decrypt,
    encrypt,
    generate_shared_key,
)
from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

from fedpeft.secagg.options import SecAggError, SecAggOptions
from fedpeft.secagg.quant import add_mod, pairwise_seed, prg_mask, quantize_vector

Payload = dict[str, Any]  # values: int, float, str, bytes, lists of those; masked vectors: list[np.ndarray]

_NEXT = {Stage.SETUP: Stage.SHARE_KEYS, Stage.SHARE_KEYS: Stage.COLLECT_MASKED_VECTORS,
         Stage.COLLECT_MASKED_VECTORS: Stage.UNMASK}
_SECRETS = ("sk1", "sk2", "rd_seed")


def options_of(request: Mapping[str, Any]) -> SecAggOptions:
    """The SecAggOptions a setup request carries (ValueError if they are invalid)."""
    n, k = int(request[Key.SAMPLE_NUMBER]), int(request[Key.SHARE_NUMBER])
    target, mod = int(request[Key.TARGET_RANGE]), int(request[Key.MOD_RANGE])
    if target & (target - 1) or mod & (mod - 1):
        raise ValueError(f"target_range = {target} and mod_range = {mod} must be powers of 2")
    return SecAggOptions(num_clients=n, threshold=int(request[Key.THRESHOLD]), num_shares=k,
                         clip_range=float(request[Key.CLIPPING_RANGE]),
                         quantization_bits=target.bit_length() - 1, mod_bits=mod.bit_length() - 1)


def setup_request(options: SecAggOptions) -> Payload:
    """The setup request that carries `options` to a client (Flower's setup keys)."""
    return {Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: options.num_clients,
            Key.SHARE_NUMBER: options.neighbourhood_size, Key.THRESHOLD: options.threshold,
            Key.CLIPPING_RANGE: float(options.clip_range), Key.TARGET_RANGE: options.target_range,
            Key.MOD_RANGE: options.mod_range}


class SecAggClient:
    """One node's SecAgg+ state machine: setup -> share_keys -> collect_masked_vectors -> unmask."""

    def __init__(self, node_id: int) -> None:
        """A fresh client for `node_id` (Flower's node id: the id the server addresses messages to)."""
        self._s: dict[str, Any] = {"node_id": int(node_id), "stage": ""}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> SecAggClient:
        """The client whose `state()` this was."""
        client = cls(int(state["node_id"]))
        client._s = {k: (list(v) if isinstance(v, list) else v) for k, v in state.items()}
        return client

    def state(self) -> dict[str, Any]:
        """Everything the client must keep between stages, as ConfigRecord values (it holds secrets: keep it local)."""
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self._s.items()}

    @property
    def node_id(self) -> int:
        """This client's node id."""
        return int(self._s["node_id"])

    @property
    def stage(self) -> str:
        """The last stage answered ('' before setup)."""
        return str(self._s["stage"])

    def handle(self, request: Mapping[str, Any], arrays: Sequence[np.ndarray] | None = None,
               rounding_seed: int | None = None) -> Payload:
        """Answer a request of any stage (`arrays`: the client's vector, needed at collect_masked_vectors)."""
        stage = request.get(Key.STAGE)
        if stage == Stage.SETUP:
            return self.setup(request)
        if stage == Stage.SHARE_KEYS:
            return self.share_keys(request)
        if stage == Stage.COLLECT_MASKED_VECTORS:
            if arrays is None:
                raise ValueError("stage collect_masked_vectors needs the client's arrays")
            return self.collect_masked_vectors(request, arrays, rounding_seed)
        if stage == Stage.UNMASK:
            return self.unmask(request)
        raise SecAggError(str(stage), f"unknown stage {stage!r}", node_id=self.node_id)

    # ----- the four stages --------------------------------------------------------------------
    def setup(self, request: Mapping[str, Any]) -> Payload:
        """Stage 0: read the options, make two key pairs (masks, share encryption), return both public keys."""
        try:
            options = options_of(request)
        except (KeyError, TypeError, ValueError) as e:
            raise SecAggError(Stage.SETUP, f"invalid options: {e}", node_id=self.node_id) from e
        sk1, pk1 = generate_key_pairs()
        sk2, pk2 = generate_key_pairs()
        # a new setup starts a new round: whatever the previous round left is dropped
        config = {k: v for k, v in setup_request(options).items() if k != Key.STAGE}
        self._s = {**config, "node_id": self.node_id, "stage": Stage.SETUP,
                   "sk1": private_key_to_bytes(sk1), "pk1": public_key_to_bytes(pk1),
                   "sk2": private_key_to_bytes(sk2), "pk2": public_key_to_bytes(pk2)}
        return {Key.PUBLIC_KEY_1: self._s["pk1"], Key.PUBLIC_KEY_2: self._s["pk2"]}

    def share_keys(self, request: Mapping[str, Any]) -> Payload:
        """Stage 1: Shamir-share sk1 and a fresh mask seed b, one encrypted share for each neighbour."""
        self._enter(Stage.SHARE_KEYS)
        opts = self.options
        nids = [int(v) for v in request[Key.NODE_ID_LIST]]
        pk1s, pk2s = list(request[Key.PUBLIC_KEY_1]), list(request[Key.PUBLIC_KEY_2])
        me = self.node_id
        if not len(nids) == len(pk1s) == len(pk2s) or len(set(nids)) != len(nids):
            self._abort(Stage.SHARE_KEYS, "node ids and public keys do not pair up one to one")
        if not opts.threshold <= len(nids) <= opts.neighbourhood_size:
            self._abort(Stage.SHARE_KEYS, f"{len(nids)} neighbours (itself included), outside "
                        f"[threshold, num_shares] = [{opts.threshold}, {opts.neighbourhood_size}]",
                        alive=len(nids), needed=opts.threshold)
        keys = pk1s + pk2s
        if len(set(keys)) != len(keys):
            self._abort(Stage.SHARE_KEYS, "some public keys are identical")
        if me not in nids or (pk1s[nids.index(me)], pk2s[nids.index(me)]) != (self._s["pk1"], self._s["pk2"]):
            self._abort(Stage.SHARE_KEYS, "the request does not carry this client's own public keys")
        rd_seed = os.urandom(32)  # the self-mask seed b_u
        b_shares = create_shares(rd_seed, opts.threshold, len(nids))
        sk_shares = create_shares(self._s["sk1"], opts.threshold, len(nids))
        sk2 = bytes_to_private_key(self._s["sk2"])
        dsts, ctxts = [], []
        for nid, pk2, b_share, sk_share in zip(nids, pk2s, b_shares, sk_shares, strict=True):
            if nid == me:
                own_b, own_sk = b_share, sk_share
                continue
            key = generate_shared_key(sk2, bytes_to_public_key(pk2))
            dsts.append(nid)
            ctxts.append(encrypt(key, share_keys_plaintext_concat(me, nid, b_share, sk_share)))
        self._s.update({"stage": Stage.SHARE_KEYS, "rd_seed": rd_seed, "nbr_ids": nids, "nbr_pk1": pk1s,
                        "nbr_pk2": pk2s, "share_ids": [me], "b_shares": [own_b], "sk_shares": [own_sk]})
        return {Key.DESTINATION_LIST: dsts, Key.CIPHERTEXT_LIST: ctxts}

    def collect_masked_vectors(self, request: Mapping[str, Any], arrays: Sequence[np.ndarray],
                               rounding_seed: int | None = None) -> Payload:
        """Stage 2: keep the neighbours' shares; upload quantize(x) + PRG(b) ± PRG(s_uv) mod mod_range."""
        self._enter(Stage.COLLECT_MASKED_VECTORS)
        opts, me = self.options, self.node_id
        srcs = [int(v) for v in request[Key.SOURCE_LIST]]
        ctxts = list(request[Key.CIPHERTEXT_LIST])
        nbrs = dict(zip(self._s["nbr_ids"], zip(self._s["nbr_pk1"], self._s["nbr_pk2"], strict=True), strict=True))
        if len(srcs) != len(ctxts) or len(set(srcs)) != len(srcs) or me in srcs:
            self._abort(Stage.COLLECT_MASKED_VECTORS, "sources and ciphertexts do not pair up one to one")
        if not set(srcs) <= set(nbrs):
            self._abort(Stage.COLLECT_MASKED_VECTORS, f"shares from non-neighbours {sorted(set(srcs) - set(nbrs))}")
        if len(srcs) + 1 < opts.threshold:
            # too few neighbours left: any later drop would leave this client's secrets unrecoverable
            self._abort(Stage.COLLECT_MASKED_VECTORS, f"{len(srcs) + 1} live neighbours (itself included) "
                        f"< threshold = {opts.threshold}", alive=len(srcs) + 1, needed=opts.threshold)
        floats = [np.asarray(a) for a in arrays]
        if not all(np.all(np.isfinite(a)) for a in floats):
            raise ValueError("the vector to aggregate has NaN or infinite values")
        sk2 = bytes_to_private_key(self._s["sk2"])
        for src, ctxt in zip(srcs, ctxts, strict=True):
            try:
                plain = decrypt(generate_shared_key(sk2, bytes_to_public_key(nbrs[src][1])), ctxt)
            except InvalidToken:
                self._abort(Stage.COLLECT_MASKED_VECTORS, f"the share from node {src} does not decrypt")
            actual_src, dst, b_share, sk_share = share_keys_plaintext_separate(plain)
            if (actual_src, dst) != (src, me):
                self._abort(Stage.COLLECT_MASKED_VECTORS, f"a share routed as {src} -> {me} was sealed as "
                            f"{actual_src} -> {dst}")
            self._s["share_ids"].append(src)
            self._s["b_shares"].append(b_share)
            self._s["sk_shares"].append(sk_share)
        shapes = [a.shape for a in floats]
        masked = add_mod(quantize_vector(floats, opts, rounding_seed), prg_mask(self._s["rd_seed"], shapes, opts),
                         +1, opts)
        for src in srcs:
            # the larger id adds, the smaller subtracts: each pair's masks cancel in the sum
            seed = pairwise_seed(self._s["sk1"], nbrs[src][0])
            masked = add_mod(masked, prg_mask(seed, shapes, opts), +1 if me > src else -1, opts)
        # the pairwise partners are fixed now; the secrets themselves are no longer needed here
        self._s["stage"] = Stage.COLLECT_MASKED_VECTORS
        for k in _SECRETS:
            self._s.pop(k, None)
        return {Key.MASKED_PARAMETERS: [m.astype(opts.wire_dtype) for m in masked]}

    def unmask(self, request: Mapping[str, Any]) -> Payload:
        """Stage 3: the b-share of each live neighbour (itself included), the sk1-share of each dropped one."""
        self._enter(Stage.UNMASK)
        opts, me = self.options, self.node_id
        active = [int(v) for v in request[Key.ACTIVE_NODE_ID_LIST]]
        dead = [int(v) for v in request[Key.DEAD_NODE_ID_LIST]]
        held = dict.fromkeys(self._s["share_ids"])
        if len(set(active)) != len(active) or len(set(dead)) != len(dead):
            self._abort(Stage.UNMASK, "repeated node ids")
        if set(active) & set(dead):
            # both shares of one node would let the server strip that node's every mask
            self._abort(Stage.UNMASK, f"nodes {sorted(set(active) & set(dead))} are listed both live and dropped")
        if me not in active:
            self._abort(Stage.UNMASK, "this client is listed as dropped, yet its vector went up")
        if not set(active) | set(dead) <= set(held):
            self._abort(Stage.UNMASK, f"no shares held for nodes {sorted(set(active) | set(dead) - set(held))}")
        if len(active) < opts.threshold:
            self._abort(Stage.UNMASK, f"{len(active)} live neighbours < threshold = {opts.threshold}",
                        alive=len(active), needed=opts.threshold)
        index = {nid: i for i, nid in enumerate(self._s["share_ids"])}
        shares = [self._s["b_shares"][index[n]] for n in active] + [self._s["sk_shares"][index[n]] for n in dead]
        # one unmask per round: forget every share so a second request cannot obtain the other half
        self._s.update({"stage": Stage.UNMASK, "share_ids": [], "b_shares": [], "sk_shares": []})
        return {Key.NODE_ID_LIST: active + dead, Key.SHARE_LIST: shares}

    # ----- helpers ----------------------------------------------------------------------------
    @property
    def options(self) -> SecAggOptions:
        """The options the setup request carried."""
        if self.stage == "":
            raise SecAggError("", "no setup request seen yet", node_id=self.node_id)
        return options_of(self._s)

    def _enter(self, stage: str) -> None:
        """Refuse a stage out of order (only setup may come at any time)."""
        expected = _NEXT.get(self.stage, Stage.SETUP)
        if expected != stage:
            self._abort(stage, f"expected stage {expected!r} after {self.stage or 'nothing'!r}")

    def _abort(self, stage: str, message: str, *, alive: int | None = None,
               needed: int | None = None) -> NoReturn:
        """Raise SecAggError for this node."""
        raise SecAggError(stage, f"node {self.node_id}: {message}", alive=alive, needed=needed, node_id=self.node_id)
