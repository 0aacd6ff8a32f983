"""End to end: real Flower simulation engine on Ray, real peft adapters, the embedded MiniLM-L6."""

from __future__ import annotations

import csv
import json

import torch
from peft import PeftModel

from fedpeft.data import open_prepared
from fedpeft.evaluation import evaluate, predict
from fedpeft.models import load_base_model
from fedpeft.rundir import RunDir


def test_accuracy_rises_over_rounds(quick_run):
    rows = quick_run["rounds"]
    assert [r["round"] for r in rows] == list(range(0, quick_run["cfg"].sim.rounds + 1))
    assert rows[-1]["accuracy"] > rows[0]["accuracy"] + 0.15
    assert all(r["clients"] == quick_run["cfg"].sim.clients_per_round for r in rows[1:])


def test_run_directory_has_every_artifact(quick_run):
    rd = quick_run["run_dir"]
    for name in ("config.toml", "metrics.jsonl", "comm.csv", "summary.json", "adapter/adapter_config.json"):
        assert (rd / name).is_file(), name
    assert len(RunDir(rd).metrics()) == quick_run["cfg"].sim.rounds + 1


def test_comm_csv_sums_equal_summary_and_metrics(quick_run):
    rd = quick_run["run_dir"]
    with (rd / "comm.csv").open() as f:
        rows = list(csv.DictReader(f))
    down = sum(int(r["bytes"]) for r in rows if r["direction"] == "down")
    up = sum(int(r["bytes"]) for r in rows if r["direction"] == "up")
    summary = json.loads((rd / "summary.json").read_text())
    assert (down, up) == (summary["bytes_down"], summary["bytes_up"])
    for m in RunDir(rd).metrics():
        assert m["bytes_down"] == sum(int(r["bytes"]) for r in rows if r["direction"] == "down" and int(r["round"]) == m["round"])
        assert m["bytes_up"] == sum(int(r["bytes"]) for r in rows if r["direction"] == "up" and int(r["round"]) == m["round"])
    # Every sampled client got one message down and sent one up each round.
    cfg = quick_run["cfg"]
    ups = {(r["round"], r["client_id"]) for r in rows if r["direction"] == "up"}
    assert len(ups) == cfg.sim.rounds * cfg.sim.clients_per_round
    assert all(int(r["client_id"]) >= 0 for r in rows)
    # The whole adapter travels both ways each round, so its record has one size, except the
    # first download: LoRA B starts at zero and Flower sends identical arrays only once.
    arrays = {int(r["bytes"]) for r in rows if r["record"] == "arrays" and (r["round"], r["direction"]) != ("1", "down")}
    first = {int(r["bytes"]) for r in rows if r["record"] == "arrays" and (r["round"], r["direction"]) == ("1", "down")}
    assert len(arrays) == 1 and len(first) == 1
    assert first.pop() < arrays.pop()


def test_exported_adapter_reloads_with_identical_predictions(quick_run):
    cfg, rd, summary = quick_run["cfg"], quick_run["run_dir"], quick_run["summary"]
    task = open_prepared(str(rd / "data"))
    reloaded = PeftModel.from_pretrained(load_base_model(cfg, task.num_labels), str(rd / "adapter"))
    # The server evaluated its in-memory global adapter after the last round; the reloaded
    # adapter must reproduce that evaluation exactly (same accuracy, same summed loss).
    result = evaluate(reloaded, task.test, cfg.sim.eval_batch_size, task.pad_token_id)
    assert result["accuracy"] == summary["final_accuracy"]
    assert abs(result["loss"] - summary["final_loss"]) < 1e-6
    # And the last checkpointed round reloads too, giving different (earlier) predictions.
    ckpts = sorted((rd / "checkpoints").iterdir())
    assert ckpts, "checkpoints were written"
    earlier = PeftModel.from_pretrained(load_base_model(cfg, task.num_labels), str(ckpts[0]))
    assert not torch.equal(
        predict(earlier, task.test, 64, task.pad_token_id), predict(reloaded, task.test, 64, task.pad_token_id)
    )
