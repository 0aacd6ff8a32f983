"""Distributed DP over SecAgg+ in real Flower + Ray runs: the central mechanism's release, without a clean update.

Three one-round runs of the smoke recipe on the same seed (the same Poisson draw, the same local
training): central user-level DP on the server with almost no noise; distributed DP under `[secagg]`
with almost no noise (the two must agree within SecAgg's quantization error: both are
Σ clip_C(Δ_i) / m); and distributed DP with σ = 0.5, whose difference from the second is the sum of
the clients' noise shares over m, each share N(0, σ²C²/t).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import SMOKE
from safetensors.numpy import load_file

from fedpeft.app.recipe import load
from fedpeft.app.simulate import simulate
from fedpeft.privacy import user_level

C = 0.05  # the clipping bound of every update (both mechanisms clip alike)
ONE_ROUND = ["sim.rounds=1", "output.checkpoint_every=0", "dp.user.enabled=true", f"dp.user.clipping_norm={C}"]
DISTRIBUTED = ["secagg.enabled=true", 'dp.user.side="distributed"']
TINY_NOISE, NOISE = 1e-6, 0.5


def _run(tmp: Path, name: str, extra: list[str]) -> tuple[dict[str, np.ndarray], dict, object]:
    cfg = load(SMOKE, [*ONE_ROUND, *extra, f'output.dir="{tmp}"', f'name="{name}"'])
    summary = simulate(cfg)
    run_dir = Path(summary["run_dir"])
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    adapter = {k: v.astype(np.float64) for k, v in load_file(run_dir / "adapter" / "adapter_model.safetensors").items()}
    return adapter, rows[1], cfg


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    central = _run(tmp, "central", [f"dp.user.noise_multiplier={TINY_NOISE}"])
    quiet = _run(tmp, "quiet", [*DISTRIBUTED, f"dp.user.noise_multiplier={TINY_NOISE}"])
    noisy = _run(tmp, "noisy", [*DISTRIBUTED, f"dp.user.noise_multiplier={NOISE}"])
    return central, quiet, noisy


def test_distributed_release_equals_the_central_one_within_the_quantization_error(runs):
    (central, c_row, _), (quiet, q_row, _), _ = runs
    assert q_row["secagg_survivors"] == c_row["user_replies"] >= 3
    assert set(quiet) == set(central)
    diff = max(float(np.abs(quiet[k] - central[k]).max()) for k in central)
    # SecAgg's bound, the two runs' (tiny) noise, and fp32 rounding of the stored globals
    tolerance = q_row["secagg_error_bound"] + 1e-5
    assert diff <= tolerance, (diff, tolerance)


def test_the_clients_noise_shares_sum_to_the_central_noise(runs):
    (_, _, _), (quiet, _, _), (noisy, row, cfg) = runs
    m, count, t = user_level.plan(cfg).expected_clients, row["secagg_survivors"], row["secagg_threshold"]
    # (noisy − quiet)·m/(σC): the sum of `count` shares of N(0, 1/t) per value
    z = np.concatenate([((noisy[k] - quiet[k]) * m / (NOISE * C)).ravel() for k in quiet])
    assert z.size > 1000
    expected = np.sqrt(count / t)
    assert expected >= 1.0  # never less noise than the central mechanism's σC
    assert abs(z.std() / expected - 1) < 0.1, (z.std(), expected)
    assert abs(z.mean()) < 5 * expected / np.sqrt(z.size)


def test_epsilon_is_the_central_mechanisms(runs):
    *_, (_, row, cfg) = runs
    assert row["user_releases"] == 1
    assert row["user_epsilon"] == pytest.approx(user_level.epsilon(user_level.plan(cfg), 1))
    assert row["user_effective_noise_multiplier"] == NOISE
