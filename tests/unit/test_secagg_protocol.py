"""SecAgg+ protocol core (fedpeft.secagg): exact sums through dropouts, masking, refusals, weighted means.

Every payload and every client state goes through Flower's records and protobuf between the
parties (`_wire`), as a message would: the server object only ever holds what the stages send.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

from fedpeft.secagg import (
    DONE,
    Key,
    SecAggClient,
    SecAggError,
    SecAggOptions,
    SecAggReplyError,
    SecAggServer,
    Stage,
    clipped_sum,
    error_bound,
    measure_error,
    neighbourhoods,
    weight_ratio,
    weighted_mean,
    weighted_mean_error_bound,
    with_weight,
)
from fedpeft.secagg.quant import dequantize_sum, quantize_vector

SHAPES = [(3, 4), (5,)]
SETUP, SHARE, COLLECT, UNMASK = Stage.SETUP, Stage.SHARE_KEYS, Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK


def _ids(n: int) -> list[int]:
    # Flower node ids are uint64: include ones above 2**63 so the records must carry them as such
    return [(1 << 63) + 17 * i + 5 if i % 2 else 1000 + 31 * i for i in range(n)]


def _vectors(ids: list[int], seed: int = 0, scale: float = 3.0, shapes=SHAPES) -> dict[int, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {nid: [(rng.normal(size=s) * scale).astype(np.float32) for s in shapes] for nid in ids}


def _wire(payload: dict) -> dict:
    """The payload after a trip through a Flower RecordDict and its protobuf form."""
    arrays = {k: v for k, v in payload.items() if isinstance(v, list) and v and isinstance(v[0], np.ndarray)}
    config = {k: v for k, v in payload.items() if k not in arrays}
    rd = RecordDict({"cfg": ConfigRecord(config), **{k: ArrayRecord(v) for k, v in arrays.items()}})
    back = recorddict_from_proto(recorddict_to_proto(rd))
    out = dict(back["cfg"])
    out.update({k: back[k].to_numpy_ndarrays() for k in arrays})
    return out


class Round:
    """Server and clients of one round; the clients are rebuilt from their (wired) state at every stage."""

    def __init__(self, opts: SecAggOptions, vectors: dict[int, list[np.ndarray]], graph_seed: int = 3) -> None:
        self.opts, self.vectors = opts, vectors
        shapes = [np.shape(a) for a in next(iter(vectors.values()))]
        self.server = SecAggServer(opts, list(vectors), shapes, graph_seed=graph_seed)
        self.states = {nid: SecAggClient(nid).state() for nid in vectors}
        self.seen: dict[str, dict[int, dict]] = {}  # stage -> node -> the reply as the server received it

    def client(self, nid: int) -> SecAggClient:
        return SecAggClient.from_state(_wire(self.states[nid]))

    def stage(self, drop: set[int] = frozenset()) -> list[tuple[int, str]]:
        stage, replies = self.server.stage, {}
        for nid, request in self.server.requests().items():
            if nid in drop:
                continue
            c = self.client(nid)
            replies[nid] = _wire(c.handle(_wire(request), self.vectors[nid], rounding_seed=nid % 1000))
            self.states[nid] = c.state()
        self.seen[stage] = replies
        return self.server.step(replies)

    def run(self, drops: dict[str, set[int]] | None = None):
        drops = drops or {}
        while self.server.stage != DONE:
            assert self.stage(drops.get(self.server.stage, set())) == []
        return self.server.result()

    def plain_sum(self, nids) -> list[np.ndarray]:
        """The decoded sum the same clients' quantized vectors give without any masking."""
        levels = [quantize_vector(self.vectors[n], self.opts, n % 1000) for n in nids]
        return dequantize_sum([np.sum(p, axis=0) for p in zip(*levels, strict=True)], len(levels), self.opts)


def _assert_sum(result, rnd: Round, survivors: list[int]) -> None:
    assert result.survivors == sorted(survivors) and result.count == len(survivors)
    exact = clipped_sum([rnd.vectors[n] for n in survivors], rnd.opts)
    bound = error_bound(rnd.opts, len(survivors))
    for got, want, plain in zip(result.total, exact, rnd.plain_sum(survivors), strict=True):
        assert got.shape == want.shape and got.dtype == np.float64
        assert np.max(np.abs(got - want)) <= bound
        np.testing.assert_array_equal(got, plain)  # masks cancel exactly: only quantization differs


# ----- (a) no dropouts --------------------------------------------------------------------------

@pytest.mark.parametrize("n,t", [(5, 3), (8, 5)])
def test_sum_without_dropouts(n, t):
    ids = _ids(n)
    rnd = Round(SecAggOptions(num_clients=n, threshold=t, clip_range=4.0), _vectors(ids, scale=3.0))
    result = rnd.run()
    _assert_sum(result, rnd, ids)
    assert result.dropped == {SETUP: [], SHARE: [], COLLECT: [], UNMASK: []}
    # values beyond the clip range were present, so the clipping itself was exercised
    assert any(np.abs(a).max() > 4.0 for v in rnd.vectors.values() for a in v)


# ----- (b) the server never sees an unmasked vector ----------------------------------------------

def test_server_sees_only_masked_vectors():
    ids = _ids(6)
    opts = SecAggOptions(num_clients=6, threshold=4)
    rnd = Round(opts, _vectors(ids, seed=1, shapes=[(64, 64), (5,)]))
    for _ in range(3):
        rnd.stage()
    masked = rnd.seen[COLLECT]
    own_levels = {}
    for nid, reply in masked.items():
        levels = quantize_vector(rnd.vectors[nid], opts, nid % 1000)  # what this client quantized to
        own_levels[nid] = levels
        flat_m = np.concatenate([a.reshape(-1) for a in reply[Key.MASKED_PARAMETERS]]).astype(np.float64)
        flat_q = np.concatenate([a.reshape(-1) for a in levels]).astype(np.float64)
        assert reply[Key.MASKED_PARAMETERS][0].dtype == np.uint32  # 4 bytes a value, as float32
        assert np.mean(flat_m != flat_q) > 0.999
        assert abs(np.corrcoef(flat_m, flat_q)[0, 1]) < 0.1
        assert abs(flat_m.mean() / opts.mod_range - 0.5) < 0.02  # uniform over the ring
    # the server's only vector state is the running sum, still masked by every self mask
    held = [v for v in vars(rnd.server).values() if isinstance(v, list) and v and isinstance(v[0], np.ndarray)]
    assert len(held) == 1
    true_levels = [np.sum(p, axis=0) % opts.mod_range for p in zip(*own_levels.values(), strict=True)]
    assert np.mean(held[0][0] != true_levels[0]) > 0.999
    rnd.stage()
    _assert_sum(rnd.server.result(), rnd, ids)


def test_client_state_keeps_no_secret_after_upload():
    ids = _ids(5)
    rnd = Round(SecAggOptions(num_clients=5, threshold=3), _vectors(ids))
    for _ in range(3):
        rnd.stage()
    state = rnd.states[ids[0]]
    assert not {"sk1", "sk2", "rd_seed"} & set(state)
    rnd.stage()
    assert rnd.states[ids[0]]["b_shares"] == [] and rnd.states[ids[0]]["sk_shares"] == []


# ----- (c) dropouts after share_keys, (d) in unmask ----------------------------------------------

def test_dropouts_before_upload_up_to_n_minus_t():
    ids = _ids(8)
    rnd = Round(SecAggOptions(num_clients=8, threshold=5), _vectors(ids, seed=2))
    gone = set(ids[1:4])  # n - t = 3 clients send their shares, then vanish
    result = rnd.run({COLLECT: gone})
    _assert_sum(result, rnd, [n for n in ids if n not in gone])
    assert result.dropped[COLLECT] == sorted(gone)


def test_dropouts_at_every_stage():
    ids = _ids(8)
    rnd = Round(SecAggOptions(num_clients=8, threshold=5), _vectors(ids, seed=3))
    drops = {SETUP: {ids[0]}, SHARE: {ids[1]}, COLLECT: {ids[2]}}
    result = rnd.run(drops)
    _assert_sum(result, rnd, ids[3:])
    assert result.dropped == {SETUP: [ids[0]], SHARE: [ids[1]], COLLECT: [ids[2]], UNMASK: []}


def test_dropouts_in_unmask_leaving_threshold():
    ids = _ids(8)
    rnd = Round(SecAggOptions(num_clients=8, threshold=5), _vectors(ids, seed=4))
    result = rnd.run({COLLECT: {ids[0], ids[5]}, UNMASK: {ids[3]}})
    # the sum covers every uploaded vector, also that of the node silent at unmask
    _assert_sum(result, rnd, [n for n in ids if n not in {ids[0], ids[5]}])
    assert result.dropped[UNMASK] == [ids[3]]


# ----- (e) too few survivors -------------------------------------------------------------------

@pytest.mark.parametrize("drops,stage,alive", [
    ({SETUP: {0, 1, 2}}, SETUP, 3),
    ({COLLECT: {0, 1, 2}}, COLLECT, 3),
    ({COLLECT: {0, 1}, UNMASK: {2}}, UNMASK, 3),
])
def test_too_few_survivors_raise(drops, stage, alive):
    ids = _ids(6)
    rnd = Round(SecAggOptions(num_clients=6, threshold=4), _vectors(ids))
    with pytest.raises(SecAggError) as err:
        rnd.run({s: {ids[i] for i in idx} for s, idx in drops.items()})
    e = err.value
    assert (e.stage, e.alive, e.needed) == (stage, alive, 4)
    assert f"stage '{stage}'" in str(e) and f"{alive} of" in str(e) and "threshold = 4" in str(e)
    assert rnd.server.stage == stage


def test_sparse_neighbourhood_too_thin_raises():
    ids = _ids(7)
    opts = SecAggOptions(num_clients=7, threshold=2, num_shares=3)
    rnd = Round(opts, _vectors(ids))
    u = ids[0]
    others = sorted(rnd.server.neighbours(u) - {u})
    with pytest.raises(SecAggError) as err:
        rnd.run({COLLECT: set(others)})  # both of u's neighbours vanish after sharing keys
    assert err.value.stage == COLLECT and err.value.needed == 2 and err.value.alive < 2


def test_sparse_neighbourhood_pruned_before_masking():
    ids = _ids(7)
    opts = SecAggOptions(num_clients=7, threshold=2, num_shares=3)
    rnd = Round(opts, _vectors(ids, seed=5))
    u = ids[0]
    others = rnd.server.neighbours(u) - {u}
    result = rnd.run({SETUP: set(others)})  # u is left alone: it is left out, the others go on
    survivors = [n for n in ids if n not in others and n != u]
    _assert_sum(result, rnd, survivors)
    assert result.dropped[SETUP] == sorted(others | {u})


# ----- (f) options -----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    ({"num_clients": 2, "threshold": 2}, "num_clients = 2"),
    ({"num_clients": 6, "threshold": 7}, r"threshold = 7 > num_shares = 6"),
    ({"num_clients": 8, "threshold": 5, "num_shares": 5, "mod_bits": 32}, None),
    ({"num_clients": 8, "threshold": 6, "num_shares": 5}, r"threshold = 6 > num_shares = 5"),
    ({"num_clients": 6, "threshold": 3}, r"threshold = 3: must exceed num_shares / 2 = 3"),
    ({"num_clients": 6, "threshold": 1}, "threshold = 1"),
    ({"num_clients": 8, "threshold": 3, "num_shares": 4}, "num_shares = 4: must be odd"),
    ({"num_clients": 8, "threshold": 5, "num_shares": 9}, r"num_shares = 9: must lie in \[3, num_clients = 8\]"),
    ({"num_clients": 8, "threshold": 5, "clip_range": 0.0}, "clip_range = 0.0"),
    ({"num_clients": 8, "threshold": 5, "clip_range": float("inf")}, "clip_range = inf"),
    ({"num_clients": 8, "threshold": 5, "quantization_bits": 31}, "quantization_bits = 31"),
    ({"num_clients": 8, "threshold": 5, "quantization_bits": 22, "mod_bits": 22}, "mod_bits = 22"),
    ({"num_clients": 1024, "threshold": 600}, r"1024 \* 2\*\*22 >= 2\*\*mod_bits = 2\*\*32: the sum would overflow"),
])
def test_options_validation(kwargs, match):
    if match is None:
        opts = SecAggOptions(**kwargs)
        assert (opts.target_range, opts.mod_range, opts.step) == (1 << 22, 1 << 32, 16 / (1 << 22))
        return
    with pytest.raises(ValueError, match=match):
        SecAggOptions(**kwargs)


def test_server_refuses_wrong_node_count():
    with pytest.raises(ValueError, match="5 distinct node ids for num_clients = 6"):
        SecAggServer(SecAggOptions(num_clients=6, threshold=4), [1, 2, 3, 4, 5, 5], SHAPES)


# ----- (g) weighted mean -----------------------------------------------------------------------

def test_weighted_mean_through_secure_sum():
    ids = _ids(6)
    opts = SecAggOptions(num_clients=6, threshold=4, clip_range=8.0)
    max_weight = 128.0
    weights = dict(zip(ids, [3, 10, 50, 100, 128, 1], strict=True))  # w / 128 lies on the grid exactly
    raw = _vectors(ids, seed=6, scale=2.0)
    rnd = Round(opts, {n: with_weight(raw[n], weights[n], max_weight, opts) for n in ids})
    result = rnd.run({COLLECT: {ids[1]}})
    alive = [n for n in ids if n != ids[1]]
    mean, total_w = weighted_mean(result.total, opts, max_weight)
    assert total_w == sum(weights[n] for n in alive)  # the weight channel is exact
    bound = weighted_mean_error_bound(opts, len(alive), total_w, max_weight)
    for k, got in enumerate(mean):
        want = sum(weights[n] * raw[n][k].astype(np.float64) for n in alive) / total_w
        assert np.max(np.abs(got - want)) <= bound


def test_weight_ratio_snaps_and_refuses():
    opts = SecAggOptions(num_clients=5, threshold=3, clip_range=3.0)
    for w in (0.0, 7.3, 99.99, 100.0):
        r = weight_ratio(w, 100.0, opts)
        assert abs(r - w / 100.0) <= 1 / opts.target_range
        assert abs(r * opts.clip_range / opts.step - round(r * opts.clip_range / opts.step)) < 1e-6
    for bad in (-1.0, 100.5, float("nan")):
        with pytest.raises(ValueError, match=r"max_weight = 100\.0"):
            weight_ratio(bad, 100.0, opts)
    with pytest.raises(ValueError, match="sum to 0"):
        weighted_mean([np.zeros(3), np.zeros(1)], opts, 100.0)


# ----- (h) SecAgg+ graph -----------------------------------------------------------------------

def test_neighbour_graph_is_flowers_ring():
    ids = _ids(8)
    g = neighbourhoods(ids, 5, seed=9)
    assert all(len(g[u]) == 5 and u in g[u] for u in ids)
    assert all((v in g[u]) == (u in g[v]) for u in ids for v in ids)
    assert g == neighbourhoods(list(reversed(ids)), 5, seed=9)  # seeded: reproducible, order-free
    assert g != neighbourhoods(ids, 5, seed=10)
    assert all(nb == frozenset(ids) for nb in neighbourhoods(ids, 8, seed=9).values())


def test_sparse_graph_gives_the_classic_sum():
    ids = _ids(8)
    vecs = _vectors(ids, seed=7)
    classic = Round(SecAggOptions(num_clients=8, threshold=5), vecs).run()
    sparse_round = Round(SecAggOptions(num_clients=8, threshold=3, num_shares=5), vecs)
    sparse = sparse_round.run()
    for a, b in zip(classic.total, sparse.total, strict=True):
        np.testing.assert_array_equal(a, b)
    # each client shared keys with its 4 neighbours only
    assert all(len(r[Key.DESTINATION_LIST]) == 4 for r in sparse_round.seen[SHARE].values())
    dropped = Round(SecAggOptions(num_clients=8, threshold=3, num_shares=5), vecs)
    # at most 2 of any 5-node neighbourhood gone: every secret keeps t = 3 holders
    _assert_sum(dropped.run({COLLECT: {ids[2]}, UNMASK: {ids[0]}}), dropped, [n for n in ids if n != ids[2]])


# ----- the client refuses what a client must refuse ---------------------------------------------

def _after(rnd: Round, stages: int) -> None:
    for _ in range(stages):
        rnd.stage()


def test_client_refuses_to_reveal_both_secrets():
    ids = _ids(5)
    rnd = Round(SecAggOptions(num_clients=5, threshold=3), _vectors(ids))
    _after(rnd, 3)
    u, v = ids[0], ids[1]
    both = {Key.STAGE: UNMASK, Key.ACTIVE_NODE_ID_LIST: ids, Key.DEAD_NODE_ID_LIST: [v]}
    with pytest.raises(SecAggError, match="listed both live and dropped"):
        rnd.client(u).unmask(both)
    own = {Key.STAGE: UNMASK, Key.ACTIVE_NODE_ID_LIST: ids[1:], Key.DEAD_NODE_ID_LIST: [u]}
    with pytest.raises(SecAggError, match="listed as dropped"):
        rnd.client(u).unmask(own)
    few = {Key.STAGE: UNMASK, Key.ACTIVE_NODE_ID_LIST: [u, v], Key.DEAD_NODE_ID_LIST: ids[2:]}
    with pytest.raises(SecAggError, match="2 live neighbours < threshold = 3"):
        rnd.client(u).unmask(few)
    client = rnd.client(u)
    client.unmask({Key.STAGE: UNMASK, Key.ACTIVE_NODE_ID_LIST: ids, Key.DEAD_NODE_ID_LIST: []})
    with pytest.raises(SecAggError, match="expected stage 'setup'"):  # one unmask a round
        client.unmask({Key.STAGE: UNMASK, Key.ACTIVE_NODE_ID_LIST: ids[1:], Key.DEAD_NODE_ID_LIST: []})


def test_client_checks_keys_and_routing():
    ids = _ids(5)
    rnd = Round(SecAggOptions(num_clients=5, threshold=3), _vectors(ids))
    _after(rnd, 1)
    u = ids[0]
    request = rnd.server.requests()[u]
    forged = dict(request, **{Key.PUBLIC_KEY_1: list(reversed(request[Key.PUBLIC_KEY_1]))})
    with pytest.raises(SecAggError, match="own public keys"):
        rnd.client(u).share_keys(forged)
    with pytest.raises(SecAggError, match="expected stage 'share_keys'"):
        rnd.client(u).unmask({Key.STAGE: UNMASK, Key.ACTIVE_NODE_ID_LIST: ids, Key.DEAD_NODE_ID_LIST: []})
    _after(rnd, 1)
    request = rnd.server.requests()[u]
    srcs, ctxts = request[Key.SOURCE_LIST], request[Key.CIPHERTEXT_LIST]
    swapped = dict(request, **{Key.CIPHERTEXT_LIST: [ctxts[1], ctxts[0], *ctxts[2:]]})
    with pytest.raises(SecAggError, match=r"does not decrypt|sealed as"):
        rnd.client(u).collect_masked_vectors(swapped, rnd.vectors[u])
    stranger = dict(request, **{Key.SOURCE_LIST: [srcs[0] + 1, *srcs[1:]]})
    with pytest.raises(SecAggError, match="non-neighbours"):
        rnd.client(u).collect_masked_vectors(stranger, rnd.vectors[u])
    with pytest.raises(ValueError, match="NaN"):
        rnd.client(u).collect_masked_vectors(request, [np.full((3, 4), np.nan), np.zeros(5)])
    bad_setup = {**rnd.server.options.__dict__}  # not a setup request at all
    with pytest.raises(SecAggError, match="invalid options"):
        SecAggClient(u).setup(dict(bad_setup, stage=SETUP))


# ----- the server refuses malformed replies; the node then counts as dropped ---------------------

def test_malformed_masked_vector_counts_as_dropout():
    ids = _ids(6)
    rnd = Round(SecAggOptions(num_clients=6, threshold=4), _vectors(ids, seed=8))
    _after(rnd, 2)
    server, replies = rnd.server, {}
    for nid, request in server.requests().items():
        c = rnd.client(nid)
        replies[nid] = c.handle(request, rnd.vectors[nid], rounding_seed=nid % 1000)
        rnd.states[nid] = c.state()
    bad, big = ids[0], ids[1]
    replies[bad] = {Key.MASKED_PARAMETERS: [np.zeros((4, 3), np.uint32), np.zeros(5, np.uint32)]}
    replies[big] = {Key.MASKED_PARAMETERS: [np.full((3, 4), 1 << 33, np.int64), np.zeros(5, np.int64)]}
    refused = server.step(replies)
    assert [n for n, _ in refused] == [bad, big]
    assert "shapes" in refused[0][1] and "outside [0, mod_range)" in refused[1][1]
    with pytest.raises(SecAggReplyError, match="not in stage"):
        server.receive(bad, {})
    rnd.stage()
    _assert_sum(server.result(), rnd, [n for n in ids if n not in (bad, big)])


def test_server_refuses_duplicate_and_incomplete_replies():
    ids = _ids(5)
    rnd = Round(SecAggOptions(num_clients=5, threshold=3), _vectors(ids))
    _after(rnd, 1)
    u = ids[0]
    c = rnd.client(u)
    reply = c.share_keys(rnd.server.requests()[u])
    short = {Key.DESTINATION_LIST: reply[Key.DESTINATION_LIST][1:], Key.CIPHERTEXT_LIST: reply[Key.CIPHERTEXT_LIST][1:]}
    with pytest.raises(SecAggReplyError, match="expected"):
        rnd.server.receive(u, short)
    rnd.server.receive(u, reply)
    with pytest.raises(SecAggReplyError, match="already answered"):
        rnd.server.receive(u, reply)
    with pytest.raises(SecAggReplyError, match="malformed"):
        rnd.server.receive(ids[1], {"nothing": 1})


# ----- quantization error -----------------------------------------------------------------------

def test_quantization_error_measured_within_bound():
    opts = SecAggOptions(num_clients=8, threshold=5, clip_range=1.0, quantization_bits=8)  # coarse: visible error
    vecs = list(_vectors(_ids(8), seed=11, scale=0.7, shapes=[(50, 20), (7,)]).values())
    err = measure_error(vecs, opts, rounding_seeds=range(8))
    assert 0 < err <= error_bound(opts, 8)
    assert error_bound(opts, 8) == pytest.approx(8 * 2.0 / 256, rel=1e-9)


def test_quantization_leaves_global_rng_alone():
    opts = SecAggOptions(num_clients=5, threshold=3)
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    a = quantize_vector([np.linspace(-1, 1, 40)], opts, rounding_seed=5)
    b = quantize_vector([np.linspace(-1, 1, 40)], opts, rounding_seed=5)
    np.testing.assert_array_equal(np.random.get_state()[1], before)
    np.testing.assert_array_equal(a[0], b[0])


def test_masks_depend_on_every_bit_of_the_seed():
    """Seeds that differ only past their first 32 bits give unrelated masks (Flower's PRG keeps 32 bits)."""
    from fedpeft.secagg.quant import prg_mask

    opts = SecAggOptions(num_clients=5, threshold=3)
    a = prg_mask(bytes(31) + b"\x01", [(64,)], opts)[0]
    b = prg_mask(bytes(31) + b"\x02", [(64,)], opts)[0]
    assert (a != b).mean() > 0.9 and a.min() >= 0 and a.max() < opts.mod_range
    with pytest.raises(ValueError, match="128 bits"):
        prg_mask(b"short", [(4,)], opts)
