"""A run killed with SIGKILL at a random moment and resumed ends bit-identical to an uninterrupted run.

The killed run is a real `fedpeft simulate` process (own Ray) killed with SIGKILL between or
inside rounds; what it leaves behind (its Ray processes, found by an environment marker this test
set) is then stopped by PID. The uninterrupted and the resumed runs use the module's Ray session.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from fedpeft.app.recipe import load
from fedpeft.app.server.resume import Checkpoint, ResumeError, read_checkpoint, write_checkpoint
from fedpeft.rundir import RunDir
from fedpeft.app.simulate import resume_config, simulate
from fedpeft.state import ClientStateStore

from conftest import ROOT, SMOKE

BASE = ["sim.rounds=5", "sim.num_clients=6", "sim.clients_per_round=3", "train.local_steps=3", "train.batch_size=8",
        "sim.num_cpus=2", "output.checkpoint_every=2", "data.builtin.num_train=300", "data.builtin.num_test=60"]
TOPK_EF = ['codecs.up=["delta","topk:0.1"]', "codecs.error_feedback=true", 'codecs.merge="sparse-mean"']
SAMPLE_DP = ["dp.enabled=true", "dp.target_epsilon=8.0", "dp.max_grad_norm=1.0"]
FEDKSEED = ['method.name="fedkseed"', "method.num_seeds=64", "train.lr=0.001", "sim.rounds=8"]  # fast rounds: more of them
# In the default run: one run that holds most kinds of state at once (server optimizer moments +
# error-feedback residuals + DP accountants), and FedKSeed's history; each method alone under `-m slow`.
METHODS = {
    "fedadam+topk-error-feedback+sample-dp": ['method.name="fedadam"', *TOPK_EF, *SAMPLE_DP],
    "fedkseed": FEDKSEED,
    "fedavg": pytest.param([], marks=pytest.mark.slow),
    "topk-error-feedback": pytest.param(TOPK_EF, marks=pytest.mark.slow),
    "sample-dp": pytest.param(SAMPLE_DP, marks=pytest.mark.slow),
    "fedadam": pytest.param(['method.name="fedadam"'], marks=pytest.mark.slow),
}
TIMINGS = ("round_s", "elapsed_s", "client_train_s", "generate_s")


def _marked(marker: str) -> list[int]:
    pids = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if marker.encode() in Path(f"/proc/{pid}/environ").read_bytes():
                    pids.append(int(pid))
            except OSError:
                continue
    return pids


def _kill_mid_run(overrides: list[str], out: Path, rng: random.Random) -> Path:
    """Start `fedpeft simulate` in a process, SIGKILL it at a random moment after round 1, stop what it left."""
    marker = f"fedpeft-resume-{uuid.uuid4()}"
    env = dict(os.environ, FLWR_HOME=str(out / "flwr"), FEDPEFT_TEST_MARKER=marker)
    args = [sys.executable, "-m", "fedpeft.app.cli", "simulate", str(SMOKE), "--set", f'output.dir="{out}"']
    for o in overrides:
        args += ["--set", o]
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            runs = list(out.glob("smoke-*/metrics.jsonl"))
            if runs and len(runs[0].read_text().splitlines()) >= 2:  # round 1 is recorded
                break
            time.sleep(0.05)
        # A random moment in the next round or two: between rounds, inside one, or while a checkpoint is
        # written (a fast method's whole run can be over in a couple of seconds).
        time.sleep(rng.uniform(0.0, 0.4))
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        for pid in _marked(marker):  # Ray's processes of the killed run, by PID
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    (run_dir,) = list(out.glob("smoke-*"))
    return run_dir


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rows(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in RunDir(run_dir).metrics()]


@pytest.mark.parametrize("overrides", list(METHODS.values()), ids=list(METHODS))
def test_killed_and_resumed_run_is_bit_identical_to_an_uninterrupted_one(overrides, request, tmp_path, ray_session):
    method = request.node.callspec.id
    overrides = [*BASE, *overrides]
    reference = Path(simulate(load(SMOKE, [*overrides, f'output.dir="{tmp_path / "ref"}"']))["run_dir"])
    killed = _kill_mid_run(overrides, tmp_path / "killed", random.Random(method))
    assert RunDir(killed).status()["status"] != "completed"
    resumed = Path(simulate(resume_config(killed), resume=killed)["run_dir"])
    assert resumed == killed and RunDir(killed).status()["status"] == "completed"
    assert _digest(resumed / "adapter" / "adapter_model.safetensors") == _digest(reference / "adapter" / "adapter_model.safetensors")
    assert (resumed / "comm.csv").read_bytes() == (reference / "comm.csv").read_bytes()
    assert _rows(resumed) == _rows(reference)  # no round missing or twice, every figure identical
    if (reference / "privacy.csv").is_file():  # each client's ε as if never interrupted
        assert (resumed / "privacy.csv").read_bytes() == (reference / "privacy.csv").read_bytes()
    summary, ref = json.loads((resumed / "summary.json").read_text()), json.loads((reference / "summary.json").read_text())
    assert {k: v for k, v in summary.items() if k not in ("wall_s", "run_dir")} == \
        {k: v for k, v in ref.items() if k not in ("wall_s", "run_dir")}


def test_a_checkpoint_interrupted_while_written_leaves_the_previous_one(tmp_path, monkeypatch):
    first = Checkpoint(3, ArrayRecord({"w": Array(np.arange(4, dtype=np.float32))}), {"m": np.ones(2)}, {"metrics.jsonl": 10})
    write_checkpoint(tmp_path, first)

    def torn(file, **arrays):  # the process dies half-way through writing the next checkpoint
        file.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", torn)
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(tmp_path, Checkpoint(4, first.arrays, {}, {}))
    monkeypatch.undo()
    back = read_checkpoint(tmp_path)
    assert back.round == 3 and back.arrays["w"].numpy().tolist() == [0, 1, 2, 3] and back.log_sizes == {"metrics.jsonl": 10}


def test_client_state_written_after_the_checkpoint_is_rolled_back(tmp_path):
    def at(r: int) -> ClientStateStore:
        return ClientStateStore(tmp_path, server_round=r)

    at(2).save(0, {"eps": 1.0})
    at(2).save_arrays(0, "residual", {"x": np.ones(3)})
    at(5).save(0, {"eps": 2.0})  # round 5 committed...
    at(7).save(0, {"eps": 3.0})  # ...round 7 was running when the run was killed
    at(7).save_arrays(0, "residual", {"x": np.zeros(3)})
    at(7).save(1, {"eps": 9.0})  # a client whose first state came in round 7
    assert at(8).load(0) == {"eps": 3.0}
    assert ClientStateStore(tmp_path).rollback(5) == 3
    assert at(6).load(0) == {"eps": 2.0} and at(6).load(1) == {}
    assert at(6).load_arrays(0, "residual")["x"].tolist() == [1.0, 1.0, 1.0]
    assert ClientStateStore(tmp_path).client_ids() == [0]


def test_a_run_that_cannot_be_resumed_says_why(tmp_path):
    with pytest.raises(ResumeError, match="not a fedpeft run directory"):
        resume_config(tmp_path)
    with pytest.raises(ResumeError, match="no resume.npz"):
        read_checkpoint(tmp_path)


def test_a_client_retried_in_the_same_round_starts_from_the_state_before_it(tmp_path):
    ClientStateStore(tmp_path, server_round=3).save(4, {"eps": 1.0})
    first_attempt = ClientStateStore(tmp_path, server_round=6)
    assert first_attempt.load(4) == {"eps": 1.0}
    first_attempt.save(4, {"eps": 2.0})  # then its worker died before the reply left
    retry = ClientStateStore(tmp_path, server_round=6)
    assert retry.load(4) == {"eps": 1.0}  # not the half-finished attempt's
    retry.save(4, {"eps": 2.0})
    assert ClientStateStore(tmp_path, server_round=7).load(4) == {"eps": 2.0}
