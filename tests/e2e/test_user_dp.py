"""User-level DP: Flower's DP wrappers around fedpeft strategies clip each update, ε equals Opacus's accountant."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from opacus.accountants import PRVAccountant, RDPAccountant
from peft import PeftModel
from safetensors.torch import load_file

from fedpeft.adapters import adapter_state
from fedpeft.config import ConfigError
from fedpeft.app.recipe import load, validate
from fedpeft.models import build_model
from fedpeft.nodes import NodeDirectory
from fedpeft.privacy.user_level import with_user_dp
from strategies.base import AdapterStrategy
from strategies import get_strategy_class

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "simulations" / "smoke.toml"
NODES = {101: 0, 102: 1, 103: 2, 104: 3}


def _cfg(codecs: dict | None = None, **user) -> object:
    return validate({
        "codecs": codecs or {},
        "model": {"source": "tiny", "tiny": {"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1,
                                             "intermediate_size": 8}},
        "adapter": {"type": "lora", "r": 2, "target_modules": ["query"]},
        "sim": {"num_clients": 4, "clients_per_round": 2, "rounds": 3},
        "dp": {"user": {"enabled": True, **user}},
    })


class _Grid:
    """The one thing a strategy asks the grid for when it samples: which nodes are online."""

    def get_node_ids(self) -> list[int]:
        return list(NODES)


@pytest.fixture(autouse=True)
def _identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 1


def _strategy(cfg) -> AdapterStrategy:
    model = build_model(cfg, num_labels=2)
    return with_user_dp(get_strategy_class(cfg.method.name)(cfg, NodeDirectory(NODES), model), cfg)


def _replies(msgs: list[Message], updates: list[dict[str, np.ndarray]], examples: list[int]) -> list[Message]:
    """Each sampled client's reply: the global it was sent plus its update (as the ClientApp builds it)."""
    out = []
    for msg, upd, n in zip(msgs, updates, examples):
        sent = msg.content["arrays"]
        arrays = ArrayRecord({k: torch.from_numpy(sent[k].numpy() + upd[k]) for k in sent})
        out.append(Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": n})}), reply_to=msg))
    return out


def _update(template: ArrayRecord, scale: float, seed: int) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    return {k: (scale * g.standard_normal(template[k].shape)).astype(np.float32) for k in template}


def _norm(update: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in update.values())))


# ----- sampling and accounting ---------------------------------------------------------------------
def _round(s, rnd, arrays, scale=0.1, reply=None):
    """Configure a round, build each sampled client's reply (those `reply` keeps), aggregate it."""
    msgs = list(s.configure_train(rnd, arrays, ConfigRecord(), _Grid()))
    msgs = [m for i, m in enumerate(msgs) if reply is None or i in reply]
    new, _ = s.aggregate_train(rnd, _replies(msgs, [_update(arrays, scale, rnd * 10 + i) for i in range(len(msgs))],
                                             [5] * len(msgs)))
    return msgs, new


def test_clients_are_sampled_by_poisson_at_the_accounted_rate():
    s = _strategy(_cfg(noise_multiplier=1.3))
    counts = [len(s.sample(rnd, _Grid())) for rnd in range(1, 2001)]
    picked = np.bincount([s.directory.client_of(n) for rnd in range(1, 401) for n in s.sample(rnd, _Grid())], minlength=4)
    # Each client independently with q = 2/4: the count per round varies (Binomial(4, 1/2)), mean 2.
    assert set(counts) == {0, 1, 2, 3, 4}
    assert abs(np.mean(counts) - 2.0) < 0.1 and abs(np.var(counts) - 1.0) < 0.15
    assert all(abs(c / 400 - 0.5) < 0.1 for c in picked)
    assert s.release.report()["user_sampling"] == "poisson" and s.release.report()["user_adjacency"] == "add/remove one user"


@pytest.mark.parametrize("mechanism,cls", [("rdp", RDPAccountant), ("prv", PRVAccountant)])
def test_user_epsilon_equals_opacus_accountant_for_client_rate_and_rounds(mechanism, cls):
    cfg = _cfg(noise_multiplier=1.3, accountant=mechanism)
    s = _strategy(cfg)
    arrays, acc = s.initial_arrays(), cls()
    for rnd in range(1, 4):
        _, new = _round(s, rnd, arrays)
        arrays = new if new is not None else arrays
        acc.step(noise_multiplier=1.3, sample_rate=2 / 4)  # one release per round at q = 2 of 4 clients
        p = s.release.report()
        assert p["user_releases"] == rnd and p["user_sample_rate"] == 0.5 and p["user_delta"] == 1 / 40
        assert p["user_epsilon"] == pytest.approx(acc.get_epsilon(delta=1 / 40), rel=1e-9)


@pytest.mark.parametrize("nm,q,rounds,delta", [(0.56, 0.1, 12, 1e-3), (1.0, 0.01, 500, 1e-5), (1.3, 0.5, 3, 1 / 40),
                                               (0.8, 0.05, 100, 1e-4)])
def test_user_epsilon_matches_an_independent_accountant_for_poisson_sampling(nm, q, rounds, delta):
    """Opacus's RDP accountant (what fedpeft reports) against Google's dp_accounting, Poisson-subsampled Gaussian."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    from fedpeft.privacy.user_level import UserPlan, epsilon

    reported = epsilon(UserPlan(noise_multiplier=nm, sample_rate=q, delta=delta, accountant="rdp",
                                expected_clients=10), rounds)
    ref = RdpAccountant()
    ref.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(nm)), rounds)
    assert reported == pytest.approx(ref.get_epsilon(delta), rel=0.01)


def test_target_epsilon_is_met_after_the_configured_rounds():
    cfg = _cfg(target_epsilon=3.0)
    nm = _strategy(cfg).release.plan.noise_multiplier
    acc = RDPAccountant()
    acc.history = [(nm, 0.5, 3)]
    assert 2.9 <= acc.get_epsilon(delta=1 / 40) <= 3.0


def test_a_round_whose_replies_are_all_rejected_is_still_accounted():
    """The mechanism ran for the sampled clients; a failed round leaves the model unchanged but ε counts it."""
    s = _strategy(_cfg(noise_multiplier=1.0))
    arrays = s.initial_arrays()
    rnd = next(r for r in range(1, 50) if s.sample(r, _Grid()))
    msgs = list(s.configure_train(rnd, arrays, ConfigRecord(), _Grid()))
    bad = _replies(msgs, [{k: np.full(arrays[k].shape, np.nan, np.float32) for k in arrays}] * len(msgs),
                   [5] * len(msgs))
    assert s.aggregate_train(rnd, bad) == (None, None)
    assert s.release.report()["user_releases"] == 1 and s.release.report()["user_epsilon"] > 0
    assert len(s.pop_rejections()) == len(msgs) and s.failure


def test_a_round_that_samples_no_client_fails_with_the_reason():
    s = _strategy(_cfg(noise_multiplier=1.0))
    arrays = s.initial_arrays()
    rnd = next(r for r in range(1, 200) if not s.sample(r, _Grid()))
    assert list(s.configure_train(rnd, arrays, ConfigRecord(), _Grid())) == []
    assert s.aggregate_train(rnd, []) == (None, None)
    assert "drew no client" in s.failure and s.release.report()["user_releases"] == 0


# ----- noise: a fixed denominator ---------------------------------------------------------------------
def _wide_cfg(**user):
    """A model with enough adapter values (~6k) to measure a noise std."""
    return validate({
        "model": {"source": "tiny", "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                                             "intermediate_size": 64}},
        "adapter": {"type": "lora", "r": 16, "target_modules": ["query", "value"]},
        "sim": {"num_clients": 8, "clients_per_round": 4, "rounds": 3},
        "dp": {"user": {"enabled": True, **user}},
    })


def test_noise_per_client_is_unchanged_when_half_the_sampled_clients_fail():
    """Zero updates: the release minus the global is pure noise; its std stays σC/m (m = expected count)."""
    nm, bound = 2.0, 0.5
    stds, sampled = {}, {}
    for label, keep in (("all", None), ("half", "half")):
        s = _strategy8(_wide_cfg(noise_multiplier=nm, clipping_norm=bound))
        arrays = s.initial_arrays()
        rnd = next(r for r in range(1, 50) if len(s.sample(r, _Grid8())) >= 4)
        msgs = list(s.configure_train(rnd, arrays, ConfigRecord(), _Grid8()))
        sampled[label] = len(msgs)
        kept = msgs if keep is None else msgs[: len(msgs) // 2]
        new, _ = s.aggregate_train(rnd, _replies(kept, [{k: np.zeros(arrays[k].shape, np.float32) for k in arrays}]
                                                 * len(kept), [5] * len(kept)))
        noise = np.concatenate([(new[k].numpy() - arrays[k].numpy()).ravel() for k in arrays])
        stds[label] = float(noise.std())
        assert s.release.report()["user_effective_noise_multiplier"] == pytest.approx(nm)
    expected = nm * bound / 4  # σ·C / (q·N) with q·N = 4 expected clients
    assert stds["all"] == pytest.approx(expected, rel=0.05) and stds["half"] == pytest.approx(expected, rel=0.05)


class _Grid8:
    def get_node_ids(self) -> list[int]:
        return list(range(201, 209))


def _strategy8(cfg) -> AdapterStrategy:
    model = build_model(cfg, num_labels=2)
    return with_user_dp(get_strategy_class(cfg.method.name)(cfg, NodeDirectory({201 + i: i for i in range(8)}), model), cfg)


def test_seeded_noise_repeats_in_simulation_and_os_noise_differs_in_deployment():
    cfg = _cfg(noise_multiplier=1.0)

    def release(simulated: bool):
        model = build_model(cfg, num_labels=2)
        s = with_user_dp(get_strategy_class(cfg.method.name)(cfg, NodeDirectory(NODES), model), cfg, simulated=simulated)
        arrays = s.initial_arrays()
        for rnd in range(1, 100):  # under OS entropy each draw differs: go on until one samples a client
            _, new = _round(s, rnd, arrays)
            if new is not None:
                break
        assert s.release.report()["user_noise_source"] == ("seeded" if simulated else "os")
        return np.concatenate([new[k].numpy().ravel() for k in new])

    np.testing.assert_array_equal(release(True), release(True))
    assert not np.array_equal(release(False), release(False))


def test_deployment_draws_the_client_sample_from_os_entropy():
    cfg = _cfg(noise_multiplier=1.0)
    model = build_model(cfg, num_labels=2)
    a, b = (with_user_dp(get_strategy_class("fedavg")(cfg, NodeDirectory(NODES), model), cfg, simulated=False)
            for _ in range(2))
    assert any(a.sample(r, _Grid()) != b.sample(r, _Grid()) for r in range(1, 30))


# ----- clipping ----------------------------------------------------------------------------------
def test_server_side_clipping_bounds_each_update_and_divides_by_the_expected_count():
    bound = 0.05
    s = _strategy(_cfg(noise_multiplier=1e-6, clipping_norm=bound))  # noise std 2.5e-8: the clipping shows
    arrays = s.initial_arrays()
    rnd = next(r for r in range(1, 50) if len(s.sample(r, _Grid())) == 2)
    msgs = list(s.configure_train(rnd, arrays, ConfigRecord(), _Grid()))
    updates = [_update(arrays, 1.0, 1), _update(arrays, 1e-4, 2)]  # one far above the bound, one below
    assert _norm(updates[0]) > 10 * bound > _norm(updates[1])
    new, _ = s.aggregate_train(rnd, _replies(msgs, updates, [1000, 10]))
    clipped = [{k: v * min(1.0, bound / _norm(u)) for k, v in u.items()} for u in updates]
    for k in arrays:  # the clipped sum over the expected count (2), not example-weighted
        expected = arrays[k].numpy() + (clipped[0][k] + clipped[1][k]) / 2
        np.testing.assert_allclose(new[k].numpy(), expected, atol=1e-6)
    # One reply of the two: its clipped update still enters with weight 1/m (m = 2), not 1.
    s2 = _strategy(_cfg(noise_multiplier=1e-6, clipping_norm=bound))
    msgs = list(s2.configure_train(rnd, arrays, ConfigRecord(), _Grid()))
    new, _ = s2.aggregate_train(rnd, _replies(msgs[:1], updates[:1], [1000]))
    for k in arrays:
        np.testing.assert_allclose(new[k].numpy(), arrays[k].numpy() + clipped[0][k] / 2, atol=1e-6)


def test_adaptive_noise_split_matches_the_hand_computation():
    """z = 0.56 with σ_b = 0.5: the count is a Gaussian mechanism at 2σ_b = 1 (centred bits, sensitivity ½)."""
    from fedpeft.privacy.user_level import adaptive_noise

    sigma_b, z_update = adaptive_noise(0.56, 10, None)
    assert sigma_b == 0.5  # m / 20
    assert z_update == pytest.approx((0.56 ** -2 - 1.0) ** -0.5, rel=1e-12) == pytest.approx(0.67593, rel=1e-4)
    # Composing the two Gaussian mechanisms gives back exactly the accounted multiplier.
    assert (z_update ** -2 + (2 * sigma_b) ** -2) ** -0.5 == pytest.approx(0.56, rel=1e-12)


def test_adaptive_clipping_round_against_a_hand_computation():
    from fedpeft.privacy.noise import numpy_noise_rng

    nm, c0, lr, gamma, sb = 0.5, 0.01, 0.2, 0.5, 0.3
    cfg = _cfg(noise_multiplier=nm, clipping="adaptive", clipping_norm=c0, clipped_count_stddev=sb,
               clip_norm_lr=lr, target_quantile=gamma)
    s = _strategy(cfg)
    arrays = s.initial_arrays()
    rnd = next(r for r in range(1, 50) if len(s.sample(r, _Grid())) == 2)
    msgs = list(s.configure_train(rnd, arrays, ConfigRecord(), _Grid()))
    updates = [_update(arrays, 1.0, 1), _update(arrays, 1e-6, 2)]  # one clipped, one not
    new, _ = s.aggregate_train(rnd, _replies(msgs, updates, [5, 5]))
    # By hand: the same generator draws the update noise (one array per key, in key order), then the count noise.
    gen = numpy_noise_rng("seeded", cfg.sim.seed, rnd, "user-dp-noise")
    z_update = (nm ** -2 - (2 * sb) ** -2) ** -0.5
    clipped = [{k: v * min(1.0, c0 / _norm(u)) for k, v in u.items()} for u in updates]
    for k in arrays:
        noise = gen.normal(0.0, z_update * c0, size=arrays[k].shape)
        expected = arrays[k].numpy().astype(np.float64) + (clipped[0][k] + clipped[1][k] + noise) / 2
        np.testing.assert_allclose(new[k].numpy(), expected, rtol=1e-5, atol=1e-7)
    unclipped_fraction = (1 - 0.5 * 2 + gen.normal(0.0, sb)) / 2 + 0.5
    assert s.release.report()["user_clipping_norm"] == pytest.approx(c0 * math.exp(-lr * (unclipped_fraction - gamma)), rel=1e-12)


@pytest.mark.parametrize("scale,grows", [(1.0, True), (1e-5, False)], ids=["all-clipped", "none-clipped"])
def test_adaptive_clipping_moves_the_bound_towards_the_target_quantile(scale, grows):
    s = _strategy(_cfg(noise_multiplier=0.5, clipping="adaptive", clipping_norm=0.01, clipped_count_stddev=0.3))
    arrays = s.initial_arrays()
    rounds = [r for r in range(1, 60) if len(s.sample(r, _Grid())) == 2][:3]
    for rnd in rounds:  # every update far above (below) the bound: the bound grows (shrinks) each round
        before = s.release.report()["user_clipping_norm"]
        _, new = _round(s, rnd, arrays, scale=scale)
        arrays = new
        assert (s.release.report()["user_clipping_norm"] > before) == grows


def test_server_side_clipping_applies_to_decoded_codec_uploads():
    from fedpeft.codecs.endpoints import CODEC_RECORD, Codecs, numpy_state

    bound = 0.05
    cfg = _cfg(codecs={"up": ["delta", "topk:0.5"], "error_feedback": False}, noise_multiplier=1e-6,
               clipping_norm=bound)
    s, codecs = _strategy(cfg), Codecs(cfg.codecs, cfg.sim.seed)
    arrays = s.initial_arrays()
    rnd = next(r for r in range(1, 50) if len(s.sample(r, _Grid())) == 2)
    msgs = list(s.configure_train(rnd, arrays, ConfigRecord(), _Grid()))
    replies = []
    for i, msg in enumerate(msgs):  # each client sends the top half of a large update, delta-coded
        ref = numpy_state(msg.content["arrays"])
        local = {k: v + u for (k, v), u in zip(ref.items(), _update(arrays, 1.0, i).values())}
        coded = codecs.encode_upload(local, ref, s.directory.client_of(msg.metadata.dst_node_id), rnd, None)
        replies.append(Message(RecordDict({CODEC_RECORD: coded, "metrics": MetricRecord({"num-examples": 5})}),
                               reply_to=msg))
    new, _ = s.aggregate_train(rnd, replies)
    assert s.pop_rejections() == []
    step = {k: new[k].numpy() - arrays[k].numpy() for k in arrays}
    assert 0.5 * bound < _norm(step) <= bound * (1 + 1e-3)


# ----- invalid combinations ---------------------------------------------------------------------
BAD = {
    "zeroth-order method": (['method.name="fedkseed"'], r"dp\.user\.enabled = true needs a method .*fedkseed.*seeds"),
    "rank-heterogeneous method": (['method.name="hetlora"'], r"'hetlora' does not \(its clients hold adapters of different ranks"),
    "exact LoRA aggregation": (['method.lora_aggregation="exact"'], r"lora_aggregation = 'exact'"),
    "peft merge": (['codecs.merge="ties"'], r"codecs\.merge = 'mean' \(got 'ties'\)"),
    "client side with codecs": (['dp.user.side="client"', 'codecs.up=["delta","int8"]'], r"side = 'client'.*codecs"),
    "delta >= 1/num_clients": (["dp.user.delta=0.1"], r"dp\.user\.delta = 0\.1 is >= 1/sim\.num_clients"),
    "both noise sources": (["dp.user.target_epsilon=2.0"], r"exactly one of dp\.user\.noise_multiplier"),
    "adaptive noise too large for count noise": (['dp.user.clipping="adaptive"', "dp.user.noise_multiplier=5.0"],
                                                 r"adaptive clipping cannot reach noise multiplier 5"),
    "unknown clipping": (['dp.user.clipping="median"'], r"dp\.user\.clipping"),
    "unknown key": (["dp.user.clip=1.0"], r"unknown key 'dp\.user\.clip' \(allowed here: .*clipping_norm"),
    "negative clipping norm": (["dp.user.clipping_norm=-1"], r"dp\.user\.clipping_norm"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_invalid_user_dp_settings_are_rejected(name):
    extra, pattern = BAD[name]
    with pytest.raises(ConfigError, match=pattern):
        load(SMOKE, ["dp.user.enabled=true", "dp.user.noise_multiplier=1.0", *extra])


def test_user_dp_with_update_codecs_on_the_server_side_is_accepted():
    cfg = load(SMOKE, ["dp.user.enabled=true", "dp.user.noise_multiplier=1.0", 'codecs.up=["delta","topk:0.1"]'])
    assert cfg.dp.user.side == "server"


# ----- end to end -------------------------------------------------------------------------------
def _adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


def test_client_side_user_dp_run_clips_every_round_and_exports_a_loadable_adapter(tmp_path):
    from fedpeft.data import open_prepared
    from fedpeft.evaluation import evaluate
    from fedpeft.models import load_base_model
    from fedpeft.app.simulate import simulate

    bound = 0.01
    cfg = load(SMOKE, ["dp.user.enabled=true", 'dp.user.side="client"', "dp.user.noise_multiplier=1e-6",
                       f"dp.user.clipping_norm={bound}", f'output.dir="{tmp_path}"'])
    summary = simulate(cfg)
    rd = Path(summary["run_dir"])
    rows = [json.loads(line) for line in (rd / "metrics.jsonl").read_text().splitlines()]
    assert [r["user_releases"] for r in rows[1:]] == [1, 2, 3] and sum(r["rejected"] for r in rows) == 0
    acc = RDPAccountant()
    acc.history = [(1e-6, 0.5, 3)]
    assert summary["user_epsilon"] == pytest.approx(acc.get_epsilon(delta=1 / 100), rel=1e-9)
    with (rd / "privacy.csv").open() as f:
        ledger = list(csv.DictReader(f))
    assert [(r["round"], r["client_id"], r["level"]) for r in ledger] == [(str(i), "-1", "user") for i in (1, 2, 3)]
    # Each round's global step is the mean of updates the clients' Flower mod clipped to the bound.
    states = [_adapter_tensors(rd / "checkpoints" / f"round-{i:04d}") for i in (1, 2)] + [_adapter_tensors(rd / "adapter")]
    m = cfg.sim.clients_per_round  # the fixed denominator: each clipped update enters with weight 1/m
    for row, a, b in zip(rows[2:], states, states[1:]):
        step = float(torch.sqrt(sum(((b[k] - a[k]).double() ** 2).sum() for k in a)))
        assert 0 < step <= bound * row["user_replies"] / m * (1 + 1e-3)
    t = open_prepared(str(rd / "data"))
    reloaded = PeftModel.from_pretrained(load_base_model(cfg, t.num_labels), str(rd / "adapter"))
    assert evaluate(reloaded, t.test, cfg.sim.eval_batch_size, t.pad_token_id)["accuracy"] == summary["final_accuracy"]
