"""SecAgg+ on real SuperNodes: a SuperLink and 3 SuperNodes (TLS, node authentication), one round of FedAvg-LoRA.

The deployed secure round must give the plain simulation's global adapter within SecAgg's
quantization bound, every stage's messages must be in the ledger for every node, and every process
must be stopped. Slow (four message exchanges, each starting a ClientApp process on each node):
`pytest -m slow tests/e2e/test_deploy_secagg_e2e.py`.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedpeft.app.deploy.run import deploy_recipe
from fedpeft.app.recipe import load
from fedpeft.app.simulate import simulate

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "simulations" / "smoke.toml"
ONE_ROUND = ["sim.num_clients=3", "sim.clients_per_round=3", "sim.rounds=1", "train.local_steps=3",
             "data.builtin.num_train=300", "data.builtin.num_test=60", "output.checkpoint_every=0"]
# the server does not know the nodes' example counts: the public bound on a client's weight is set
SECURE = ["secagg.enabled=true", "secagg.max_weight=200"]
STAGES = {"train.secagg_setup", "train.secagg_share_keys", "train", "train.secagg_unmask"}


def _adapter(run_dir: Path) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float64) for k, v in load_file(run_dir / "adapter" / "adapter_model.safetensors").items()}


@pytest.mark.slow
def test_a_secure_round_on_supernodes_gives_the_plain_global_within_the_quantization_bound(tmp_path):
    res = deploy_recipe(SMOKE, [*ONE_ROUND, *SECURE], tmp_path / "deploy", timeout=900, node_wait_s=60)
    assert res.returncode == 0, res.output[-3000:]
    assert res.alive_after == []
    row = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()][1]
    assert row["secagg_survivors"] == 3 and row["rejected"] == 0

    with (res.run_dir / "comm.csv").open() as f:
        seen = {(r["message_type"], r["direction"], int(r["client_id"])) for r in csv.DictReader(f)
                if int(r["round"]) == 1}
    assert {(t, d, c) for t in STAGES for d in ("down", "up") for c in range(3)} <= seen

    plain = simulate(load(SMOKE, [*ONE_ROUND, f'output.dir="{tmp_path / "sim"}"']))
    secure, clear = _adapter(res.run_dir), _adapter(Path(plain["run_dir"]))
    assert set(secure) == set(clear)
    diff = max(float(np.abs(secure[k] - clear[k]).max()) for k in clear)
    moved = max(float(np.abs(clear[k]).max()) for k in clear if "lora_B" in k)  # B starts at zero
    assert diff <= row["secagg_error_bound"] + 1e-6 < moved, (diff, row["secagg_error_bound"])
