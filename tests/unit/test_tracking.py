"""output.trackers without a simulation: names, missing libraries, what a round sends, a tracker that breaks."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, SMOKE

from fedpeft.app.recipe import load
from fedpeft.config import ConfigError
from fedpeft.rundir import RunDir
from fedpeft.tracking.metrics import RoundMetrics
from fedpeft.tracking.session import Tracking
from fedpeft.tracking.wandb import resolve_mode

MIB = 2**20


def test_an_unknown_tracker_is_refused_with_the_known_names() -> None:
    with pytest.raises(ConfigError, match=r"unknown tracker 'tensorbord' \(known: mlflow, tensorboard, wandb\)"):
        load(SMOKE, ['output.trackers=["tensorbord"]'])


def test_a_tracker_listed_twice_is_refused() -> None:
    with pytest.raises(ConfigError, match="tracker 'mlflow' is listed twice"):
        load(SMOKE, ['output.trackers=["mlflow", "mlflow"]'])


def test_missing_tracker_libraries_stop_the_cli_before_the_run_starts(tmp_path: Path) -> None:
    """The libraries are made unimportable in a fresh interpreter: `fedpeft simulate` names each extra, makes no run dir."""
    names = ["tensorboard", "mlflow", "wandb"]
    code = ("import sys\n"
            f"for name in {names!r}:\n    sys.modules[name] = None\n"
            "from fedpeft.app.cli import main\n"
            f"sys.argv = ['fedpeft', 'simulate', {str(SMOKE)!r}, '--set', 'output.trackers={json.dumps(names)}', "
            f"'--set', 'output.dir=\"{tmp_path / 'runs'}\"']\n"
            "main()\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 2, done.stderr[-2000:]
    message = " ".join(done.stderr.split())  # the console wraps long lines
    for name in names:
        assert f"output.trackers has '{name}' but {name} is not installed: pip install -c constraints.txt -e '.[{name}]'" in message
    assert not (tmp_path / "runs").exists()


def _write_privacy_csv(path: Path, delta: float) -> None:
    path.write_text("round,client_id,epsilon,delta,noise_multiplier,steps,sample_rate,level,status,noise\n"
                    f"1,0,0.5,{delta},1.0,1,0.1,sample,accepted,seeded\n")


def test_a_round_sends_every_number_grouped_with_bytes_in_mib(tmp_path: Path) -> None:
    _write_privacy_csv(tmp_path / "privacy.csv", 1e-4)
    metrics = RoundMetrics(tmp_path / "privacy.csv")
    row0 = {"round": 0, "accuracy": 0.25, "loss": 1.5, "bytes_down": 0, "bytes_up": 0, "clients": 0, "round_s": 0.0}
    row1 = {"round": 1, "accuracy": 0.5, "loss": 1.0, "bytes_down": 3 * MIB, "bytes_up": MIB // 2, "clients": 2,
            "train_loss": 0.9, "epsilon_max": 0.7, "epsilon_median": 0.6, "user_epsilon": 2.0,
            "user_noise_source": "seeded", "bytes_up_by_rank": {"4": MIB}, "faults": {"drop": 1},
            "krum_selected": [1, 2], "server_lr": 0.1, "secagg_threshold": 3, "round_failed": "too few replies",
            "rejections": [{"client_id": 1, "reason": "x"}], "round_s": 2.5}
    assert metrics(row0)["eval/accuracy"] == 0.25
    out = metrics(row1)
    assert out == {
        "eval/accuracy": 0.5, "eval/loss": 1.0, "train/loss": 0.9, "clients/clients": 2.0, "time/round_s": 2.5,
        "comm/round_bytes_down_mib": 3.0, "comm/round_bytes_up_mib": 0.5, "comm/round_bytes_total_mib": 3.5,
        "comm/bytes_down_mib": 3.0, "comm/bytes_up_mib": 0.5, "comm/bytes_total_mib": 3.5,
        "comm/bytes_up_by_rank_mib/4": 1.0, "privacy/epsilon_max": 0.7, "privacy/epsilon_median": 0.6,
        "privacy/user_epsilon": 2.0, "privacy/delta": 1e-4, "method/faults/drop": 1.0, "method/server_lr": 0.1,
        "secagg/secagg_threshold": 3.0,
    }
    out2 = metrics({"round": 2, "bytes_down": MIB, "bytes_up": MIB})
    assert (out2["comm/bytes_total_mib"], out2["comm/round_bytes_total_mib"]) == (5.5, 2.0)


def test_wandb_is_offline_unless_asked_or_logged_in(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert resolve_mode("auto") == "offline"
    assert resolve_mode("online") == "online"
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    assert resolve_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("auto") is None  # wandb.init reads $WANDB_MODE itself


def test_a_tracker_that_breaks_is_switched_off_and_the_others_go_on(tmp_path: Path, caplog) -> None:
    """MLflow's run is deleted behind its back after round 0: one warning, no more MLflow calls, TensorBoard keeps on."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load(SMOKE, ['output.trackers=["tensorboard", "mlflow"]', f'output.dir="{tmp_path}"'])
    rundir = RunDir.create(cfg)
    rows = [{"round": r, "accuracy": 0.1 * r, "loss": 1.0, "bytes_down": 100, "bytes_up": 50} for r in range(3)]
    rundir.append_metrics(rows[0])
    before = (rundir.path / "metrics.jsonl").read_text()
    with caplog.at_level(logging.WARNING, logger="fedpeft.tracking"), \
            Tracking.open(cfg, rundir, resumed=False) as tracking:
        run_id = tracking.state["mlflow"]["run_id"]
        client = MlflowClient(tracking_uri=tracking.state["mlflow"]["tracking_uri"])
        client.delete_run(run_id)
        for row in rows[1:]:
            tracking.log(row)
    warnings = [r.getMessage() for r in caplog.records if r.name == "fedpeft.tracking"]
    assert len(warnings) == 1 and "mlflow failed at round 1" in warnings[0]
    state = json.loads((rundir.path / "trackers.json").read_text())
    assert state["mlflow"]["last_round"] == 0 and "error" in state["mlflow"]
    assert state["tensorboard"] == {"last_round": 2}
    assert [m.step for m in client.get_metric_history(run_id, "eval/accuracy")] == [0]
    acc = EventAccumulator(str(rundir.path / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("eval/accuracy")] == [0, 1, 2]
    assert (rundir.path / "metrics.jsonl").read_text() == before
