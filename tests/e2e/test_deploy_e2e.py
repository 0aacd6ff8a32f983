"""Real deployment on loopback: a SuperLink and 3 SuperNodes (TLS, SuperNode authentication), 2 rounds of
FedAvg-LoRA on a tiny model; an unregistered node is refused; every process is stopped; the wire agrees
with the ledger."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from fedpeft.app.recipe import load
from fedpeft.app.deploy.processes import pid_alive
from fedpeft.app.deploy.run import deploy_recipe
from fedpeft.app.deploy.wirecheck import DOWN, UP, ledger_totals
from fedpeft.ledger import COLUMNS

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "simulations" / "smoke.toml"
TINY = ["sim.num_clients=3", "sim.clients_per_round=3", "sim.rounds=2", "train.local_steps=3",
        "data.builtin.num_train=300", "data.builtin.num_test=60", "output.checkpoint_every=0"]


def _ledger(run_dir: Path) -> list[dict]:
    with (run_dir / "comm.csv").open() as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        return list(reader)


@pytest.fixture(scope="module")
def secure_run(tmp_path_factory):
    """3 registered SuperNodes + 1 unregistered one, TLS and SuperNode authentication on."""
    base = tmp_path_factory.mktemp("deploy")
    return deploy_recipe(SMOKE, TINY, base, unregistered=1, timeout=600, node_wait_s=60)


def test_tls_auth_run_completes_two_rounds_with_ledger(secure_run):
    res = secure_run
    assert res.returncode == 0, res.output[-3000:]
    assert res.run_dir is not None
    metrics = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [0, 1, 2]
    assert all(m["clients"] == 3 and m["rejected"] == 0 for m in metrics[1:])
    rows = _ledger(res.run_dir)
    for rnd in (1, 2):
        for d in ("down", "up"):
            got = {int(r["client_id"]) for r in rows if int(r["round"]) == rnd and r["direction"] == d
                   and r["message_type"] == "train" and r["record"] == ("arrays")}
            assert got == {0, 1, 2}
        assert metrics[rnd]["bytes_down"] == sum(int(r["bytes"]) for r in rows
                                                 if int(r["round"]) == rnd and r["direction"] == "down")
    assert (res.run_dir / "adapter" / "adapter_config.json").is_file()


def test_tls_and_node_auth_were_on(secure_run):
    cfg_toml = (Path(secure_run.log_dir).parent / "flwr-home" / "config.toml").read_text()
    assert "root-certificates" in cfg_toml and "insecure" not in cfg_toml
    log = (Path(secure_run.log_dir) / "superlink.log").read_text()
    assert "insecure" not in log.lower()
    for name in ("node-0", "node-1", "node-2"):
        assert "SuperNode ID" in (Path(secure_run.log_dir) / f"{name}.log").read_text()


def test_unregistered_node_is_refused_and_the_run_goes_on(secure_run):
    res = secure_run
    assert res.refused == ["unregistered-0"]
    log = (Path(res.log_dir) / "unregistered-0.log").read_text()
    assert "Exit Code: 305" in log and "Failed to activate SuperNode" in log
    assert res.node_exit["unregistered-0"] not in (None, 0)
    assert res.online == 3
    clients = {int(r["client_id"]) for r in _ledger(res.run_dir)}
    assert clients == {0, 1, 2}  # the refused node (client 3) never took part


def test_every_started_process_is_stopped(secure_run):
    res = secure_run
    # SuperLink + 4 SuperNodes, plus the SuperExec processes Flower started under them.
    assert len(res.pids) >= 5
    assert res.alive_after == []
    assert not any(pid_alive(p, started) for p, started in res.pids.items())


def test_deployed_run_matches_the_simulation(secure_run, tmp_path):
    """The same ClientApp on real SuperNodes, with node-config data, learns exactly what the simulation learns."""
    from fedpeft.app.simulate import simulate

    cfg = load(SMOKE, [*TINY, f'output.dir="{tmp_path}"'])
    sim = simulate(cfg)
    sim_metrics = [json.loads(x) for x in (Path(sim["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    dep_metrics = [json.loads(x) for x in (secure_run.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["accuracy"] for m in dep_metrics] == [m["accuracy"] for m in sim_metrics]
    assert [round(m.get("train_loss", 0), 5) for m in dep_metrics] == [round(m.get("train_loss", 0), 5) for m in sim_metrics]

    def arrays_bytes(run_dir: Path) -> list[tuple]:
        return sorted((r["round"], r["client_id"], r["direction"], r["bytes"]) for r in _ledger(run_dir)
                      if r["record"] == "arrays")

    assert arrays_bytes(secure_run.run_dir) == arrays_bytes(Path(sim["run_dir"]))


@pytest.mark.slow
def test_wire_bytes_match_the_ledger_within_2_percent(tmp_path):
    """TLS off, SuperNodes dial a counting relay: message objects on the wire vs the ledger."""
    res = deploy_recipe(SMOKE, TINY, tmp_path, tls=False, auth=False, relay=True, timeout=600)
    assert res.returncode == 0, res.output[-3000:]
    assert res.alive_after == []
    ledger, wire = ledger_totals(res.run_dir), res.wire
    for d in (DOWN, UP):
        assert ledger[d] > 0
        assert abs(wire["objects"][d] - ledger[d]) <= 0.02 * ledger[d], (d, wire["objects"][d], ledger[d])
    # Everything else that crossed the wire is protocol overhead, counted separately.
    assert wire["tcp"][UP] + wire["tcp"][DOWN] > wire["objects"][UP] + wire["objects"][DOWN]
