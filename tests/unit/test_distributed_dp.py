"""Distributed DP's parts: its refusals, each client's clipped and noised share, the server's fixed denominator."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fedpeft.app.recipe import load
from fedpeft.config import ConfigError
from fedpeft.privacy import distributed, user_level

SMOKE = Path(__file__).resolve().parents[2] / "simulations" / "smoke.toml"
DDP = ["dp.user.enabled=true", 'dp.user.side="distributed"', "dp.user.noise_multiplier=0.5",
       "dp.user.clipping_norm=0.1"]


@pytest.mark.parametrize("extra,needle", [
    (["secagg.enabled=false"], "needs secure aggregation to hide each noised update: set secagg.enabled = true"),
    (["secagg.enabled=true", 'dp.user.clipping="adaptive"'], "needs dp.user.clipping = 'fixed'"),
    # threshold 3 of 5: each share has std 0.5·0.1/√3 = 0.0289, so the clamp must reach 0.1 + 4·0.0289
    (["secagg.enabled=true", "secagg.clip_range=0.2"], "set secagg.clip_range >= C + 4 std = 0.2155"),
])
def test_distributed_dp_refuses_what_cannot_give_its_guarantee(extra, needle):
    with pytest.raises(ConfigError) as err:
        load(SMOKE, [*DDP, *extra])
    assert needle in str(err.value)


def test_a_valid_distributed_recipe_loads():
    cfg = load(SMOKE, [*DDP, "secagg.enabled=true", "secagg.clip_range=0.25"])
    assert distributed.is_distributed(cfg)


def test_a_share_is_the_clipped_update_plus_noise_of_the_stated_std():
    sent = {"a": np.zeros((40, 50), np.float32), "b": np.ones(1000, np.float32)}
    trained = {"a": np.full((40, 50), 0.3, np.float32), "b": np.ones(1000, np.float32)}  # ‖Δ‖ = 0.3·√2000
    quiet = distributed.noised_update(trained, sent, 1.0, 0.0, np.random.default_rng(0))
    assert np.sqrt(sum(np.square(v).sum() for v in quiet.values())) == pytest.approx(1.0)
    assert np.allclose(quiet["a"], 1.0 / np.sqrt(2000)) and not quiet["b"].any()
    small = {"a": np.full((40, 50), 1e-4, np.float32), "b": np.ones(1000, np.float32)}
    assert np.allclose(distributed.noised_update(small, sent, 1.0, 0.0, np.random.default_rng(0))["a"],
                       np.float64(np.float32(1e-4)))  # within the bound: unchanged
    std = distributed.share_std(0.5, 1.0, 4)
    assert std == pytest.approx(0.25)
    noisy = distributed.noised_update(trained, sent, 1.0, std, np.random.default_rng(1))
    noise = np.concatenate([(noisy[k] - quiet[k]).ravel() for k in quiet])
    assert noise.std() == pytest.approx(0.25, rel=0.05) and abs(noise.mean()) < 0.02


def test_the_secure_release_divides_by_the_expected_count_and_is_accounted():
    cfg = load(SMOKE, [*DDP, "secagg.enabled=true", "secagg.clip_range=0.25"])
    mech = user_level.UserLevelDP(cfg)
    strategy = SimpleNamespace(sent={1: None, 2: None, 3: None, 4: None}, failure=None)
    mean = {"w": np.array([1.0, -2.0])}
    out = mech.secure_mean(strategy, 1, mean, 4)  # Σ = 4·mean; m = q·N = 5
    assert np.allclose(out["w"], [4 / 5, -8 / 5])
    assert mech.releases == 1 and mech.report()["user_epsilon"] == user_level.epsilon(mech.plan, 1)
    assert mech.secure_mean(strategy, 2, None, 0) is None and mech.releases == 2  # a failed round still counts
    nobody = SimpleNamespace(sent={}, failure=None)
    assert mech.secure_mean(nobody, 3, None, 0) is None and "drew no client" in nobody.failure
