"""Secure aggregation in real Flower + Ray runs: the same global as plain FedAvg, four charged stages, dropouts.

The pair of runs below (plain FedAvg, then FedAvg under `[secagg]`, same seed, sim.min_replies = 3
= the SecAgg threshold) meets an injected crash (before the masked upload) and an injected drop
(the masked upload lost in transit) in round 1, three such faults in round 2 (too few survivors:
the round fails, the run goes on) and none in round 3. Every SecAgg+ stage after setup needs the
state a node kept from the stage before in its Flower Context, so a run that completes also shows
that the simulation engine keeps a node's Context between the messages of one run.
"""

from __future__ import annotations

import csv
from collections import Counter, defaultdict
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from conftest import SMOKE

from fedpeft.app.recipe import load
from fedpeft.app.server.phases import ServerRound
from fedpeft.app.simulate import simulate
from fedpeft.codecs.endpoints import numpy_state
from fedpeft.ledger import LedgerGrid
from fedpeft.records import ARRAYS, num_examples
from fedpeft.rundir import RunDir
from fedpeft.secagg import weight_ratio
from fedpeft.secagg.updates import round_options
from fedpeft.secagg.wire import MASKED, MAX_WEIGHT, SECAGG
from strategies.base import AdapterStrategy
from strategies.fedavg import FedAvgAdapter

# seed 169 (FaultPlan): of the 5 sampled, round 1 has a crash and a drop, round 2 a crash and two drops, round 3 none
RUN = ["sim.rounds=3", "sim.seed=169", "sim.min_replies=3", 'partition.type="dirichlet"', "partition.alpha=1.0", "train.local_steps=5",
       "output.checkpoint_every=0", "faults.crash=0.15", "faults.drop=0.15"]
STAGE_TYPES = ["train.secagg_setup", "train.secagg_share_keys", "train", "train.secagg_unmask"]


@contextmanager
def _watch(secure: bool):
    """Record, in the server thread: each round's global, and what the strategy and the grid were handed."""
    seen: dict = {"globals": {}, "replies": {}, "strategy_calls": [], "reply_dtypes": Counter(), "max_weight": set()}
    checkpoint, send, combine = ServerRound.checkpoint, LedgerGrid.send_and_receive, FedAvgAdapter.combine

    def on_checkpoint(self, rnd, arrays):
        seen["globals"][rnd] = {k: v.copy() for k, v in numpy_state(arrays).items()}
        return checkpoint(self, rnd, arrays)

    def on_send(self, messages, *, timeout=None):
        messages = list(messages)
        seen["max_weight"].update(float(m.content[SECAGG][MAX_WEIGHT]) for m in messages
                                  if SECAGG in m.content.config_records and MAX_WEIGHT in m.content[SECAGG])
        replies = send(self, messages, timeout=timeout)
        for r in replies:  # every array that reached the server, whatever its message
            if not r.has_error():
                seen["reply_dtypes"].update(str(a.numpy().dtype) for rec in r.content.array_records.values()
                                            for a in rec.values())
        return replies

    def on_combine(self, rnd, valid):
        seen["replies"][rnd] = [(num_examples(m.content), numpy_state(m.content[ARRAYS])) for m in valid]
        return combine(self, rnd, valid)

    def refuse(name):
        def call(self, rnd, *args):
            seen["strategy_calls"].append(name)
            raise AssertionError(f"the strategy's {name} was called under secure aggregation")
        return call

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ServerRound, "checkpoint", on_checkpoint)
        mp.setattr(LedgerGrid, "send_and_receive", on_send)
        if secure:
            mp.setattr(AdapterStrategy, "accept", refuse("accept"))
            mp.setattr(FedAvgAdapter, "combine", refuse("combine"))
        else:
            mp.setattr(FedAvgAdapter, "combine", on_combine)
        yield seen


def _run(out: Path, extra: list[str], secure: bool) -> dict:
    cfg = load(SMOKE, [*RUN, *extra, f'output.dir="{out}"'])
    with _watch(secure) as seen:
        summary = simulate(cfg)
    run_dir = Path(summary["run_dir"])
    with (run_dir / "comm.csv").open() as f:
        ledger = list(csv.DictReader(f))
    return {"cfg": cfg, "summary": summary, "rows": RunDir(run_dir).metrics(), "ledger": ledger, **seen}


@pytest.fixture(scope="module")
def pair(tmp_path_factory, ray_session) -> dict:
    out = tmp_path_factory.mktemp("secagg")
    return {"plain": _run(out / "plain", [], False), "secure": _run(out / "secure", ["secagg.enabled=true"], True)}


def _max_diff(a: dict, b: dict) -> float:
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)


def test_round_one_global_is_the_weighted_mean_of_the_survivors_updates(pair):
    plain, secure = pair["plain"], pair["secure"]
    g0 = secure["globals"][0]
    assert _max_diff(g0, plain["globals"][0]) == 0  # both start from the same global
    # the survivors' own adapters, from the plain run (the same clients crash or lose their reply in both)
    survivors = plain["replies"][1]
    assert len(survivors) == 3 == secure["rows"][1]["secagg_survivors"]
    (max_w,) = secure["max_weight"]
    opts = round_options(secure["cfg"].secagg, 5)
    ratios = [weight_ratio(w, max_w, opts) for w, _ in survivors]
    assert len({w for w, _ in survivors}) == 3  # unequal weights: a wrong weighting would show
    c, bound = opts.clip_range, secure["rows"][1]["secagg_error_bound"]
    expected = {k: g0[k].astype(np.float64) + sum(r * np.clip(a[k] - g0[k].astype(np.float64), -c, c)
                                                  for r, (_, a) in zip(ratios, survivors)) / sum(ratios) for k in g0}
    eps32 = float(np.finfo(np.float32).eps)
    for k, want in expected.items():  # the quantization bound, plus the float32 rounding of the new global
        assert np.max(np.abs(secure["globals"][1][k] - want)) <= bound + eps32 * np.max(np.abs(want)), k
    unweighted = {k: g0[k] + sum(a[k] - g0[k] for _, a in survivors) / 3 for k in g0}
    assert _max_diff(unweighted, expected) > 100 * bound
    # plain FedAvg's example-weighted mean differs only by the weight ratios' snap to the grid and float32 sums
    snap = 2 * 3 * c / (opts.target_range * sum(ratios))
    assert _max_diff(secure["globals"][1], plain["globals"][1]) <= bound + snap + 8 * eps32


def test_dropouts_are_accounted_as_in_the_plain_run_and_too_few_survivors_fail_the_round(pair):
    plain, secure = pair["plain"], pair["secure"]
    for p, s in zip(plain["rows"][1:], secure["rows"][1:]):
        assert s["sampled"] == p["sampled"] == 5 and s["accepted"] == p["accepted"]
        assert {(r["client_id"], r.get("injected")) for r in s.get("rejections", [])} == \
               {(r["client_id"], r.get("injected")) for r in p.get("rejections", [])}
    one, two, three = secure["rows"][1:]
    kinds = {r["injected"]: r["reason"] for r in one["rejections"]}
    assert set(kinds) == {"crash", "drop"} and "at secagg stage 'collect_masked_vectors'" in kinds["crash"]
    assert "lost in transit" in kinds["drop"] and one["accepted"] + one["rejected"] == 5
    assert one["secagg_dropped"] == {"setup": 0, "share_keys": 0, "collect_masked_vectors": 2, "unmask": 0}
    # round 2: 2 of 5 masked uploads arrive, fewer than the threshold of 3: the round fails, the global stays
    assert "secure aggregation aborted at stage 'collect_masked_vectors'" in two["round_failed"]
    assert "2 of 5 clients answered, fewer than threshold = 3" in two["round_failed"]
    assert "sim.min_replies needs 3" in plain["rows"][2]["round_failed"]
    assert two["accepted"] == 0 and two["rejected"] == 3 and two["secagg_failed_stage"] == "collect_masked_vectors"
    assert _max_diff(secure["globals"][2], secure["globals"][1]) == 0 == _max_diff(plain["globals"][2],
                                                                                   plain["globals"][1])
    assert (two["accuracy"], two["loss"]) == (one["accuracy"], one["loss"])
    # the failure policy (sim.max_failed_rounds = 0) goes on: round 3 has no fault and stays close to plain FedAvg
    assert "round_failed" not in three and three.get("rejections") is None and three["accepted"] == 5
    assert secure["summary"]["rounds_completed"] == 3 and "stopped" not in secure["summary"]
    assert _max_diff(secure["globals"][3], plain["globals"][3]) < 1e-4
    assert abs(three["loss"] - plain["rows"][3]["loss"]) < 1e-3


def test_the_server_never_receives_an_unmasked_update(pair):
    secure = pair["secure"]
    assert secure["strategy_calls"] == []  # neither accept nor combine ever ran
    assert set(secure["reply_dtypes"]) == {"uint32"} and sum(secure["reply_dtypes"].values()) > 0
    assert pair["plain"]["reply_dtypes"].keys() == {"float32"}
    for row in secure["ledger"]:
        if row["direction"] == "up":
            allowed = {MASKED, "_envelope"} if row["message_type"] == "train" else {SECAGG, "_envelope"}
            assert row["record"] in allowed, row


def test_comm_csv_charges_each_stage_in_both_directions(pair):
    ledger = pair["secure"]["ledger"]
    messages: dict = defaultdict(Counter)
    stage_bytes: dict = defaultdict(int)
    for row in ledger:
        if int(row["round"]) >= 1:
            stage_bytes[(row["message_type"], row["direction"])] += int(row["bytes"])
            if row["record"] == "_envelope":
                messages[int(row["round"])][(row["message_type"], row["direction"])] += 1
    assert {t for t, _ in stage_bytes} == set(STAGE_TYPES) and all(b > 0 for b in stage_bytes.values())
    # round 1: 5 sampled; 5 answer setup and share_keys; of 5 train messages 1 crashes (an error reply) and 1 is
    # lost after the ledger charged it; the 3 survivors alone get the unmask request
    assert messages[1] == {("train.secagg_setup", "down"): 5, ("train.secagg_setup", "up"): 5,
                           ("train.secagg_share_keys", "down"): 5, ("train.secagg_share_keys", "up"): 5,
                           ("train", "down"): 5, ("train", "up"): 5,
                           ("train.secagg_unmask", "down"): 3, ("train.secagg_unmask", "up"): 3}
    # round 2 aborts after the collect stage: no unmask messages; round 3 has no fault
    assert ("train.secagg_unmask", "down") not in messages[2] and messages[2][("train", "up")] == 5
    assert all(n == 5 for n in messages[3].values()) and len(messages[3]) == 8
    # a masked upload is incompressible: at least 4 bytes a value (uint32), as many values as the adapter
    values = sum(v.size for v in pair["secure"]["globals"][0].values()) + 1  # + the weight channel
    masked = [int(r["bytes"]) for r in ledger if r["record"] == MASKED]
    assert len(masked) == 4 + 4 + 5 and min(masked) >= 4 * values  # lost uploads were charged: they were sent
    rows = pair["secure"]["rows"]
    totals = {d: sum(int(r["bytes"]) for r in ledger if r["direction"] == d and int(r["round"]) >= 1)
              for d in ("down", "up")}
    assert totals == {"down": sum(r["bytes_down"] for r in rows), "up": sum(r["bytes_up"] for r in rows)}

