"""Causal-LM instruction tuning end to end on real Flower + Ray + peft (+ Opacus): a Dolly file learned through
the CLI and its exported adapter, an Alpaca file under DP-SGD, FedKSeed's bytes, a deployment."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from fedpeft.causal_lm import generate_ids
from fedpeft.data.builtin_instructions import generate
from fedpeft.data.prepared import open_prepared
from fedpeft.models import build_model, load_base_model
from fedpeft.app.recipe import load
from fedpeft.app.simulate import simulate

ROOT = Path(__file__).resolve().parents[2]
LLM_SMOKE = ROOT / "simulations" / "llm-smoke.toml"
# Short answers from a handful of words: learnable by the tiny decoder in a few rounds.
LEARNABLE = ["sim.num_clients=10", "sim.clients_per_round=5", "sim.rounds=3", "train.local_steps=12",
             "train.lr=0.02", "eval.generate_examples=32", "output.checkpoint_every=0"]


def _cli(args: list[str], tmp_path: Path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, FLWR_HOME=str(tmp_path / "flwr"), COLUMNS="140")
    return subprocess.run([sys.executable, "-m", "fedpeft.app.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


@pytest.fixture(scope="module")
def learned(tmp_path_factory) -> dict:
    """A Dolly-format JSONL through the CLI: 10 clients x 3 rounds of FedAvg-LoRA on the tiny decoder."""
    tmp = tmp_path_factory.mktemp("llm-dolly")
    # Dolly-15K's own columns: instruction / context / response / category (context often empty).
    rows = [{"instruction": r["instruction"], "context": r["input"], "response": r["output"], "category": r["category"]}
            for r in generate(700, seed=5, categories=["sentiment", "topic"])]
    data = _write_jsonl(tmp / "dolly.jsonl", rows)
    res = _cli(["simulate", str(LLM_SMOKE), *_sets([*LEARNABLE, "data.source=file", f"data.path={data}",
                                                    "data.test_fraction=0.1", "partition.type=dirichlet",
                                                    "partition.by=category", "partition.alpha=0.5",
                                                    f"output.dir={tmp / 'runs'}"])], tmp)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run_dir = next((tmp / "runs").iterdir())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"cfg": load(run_dir / "config.toml"), "summary": json.loads((run_dir / "summary.json").read_text()),
            "rounds": rows, "run_dir": run_dir, "stdout": res.stdout}


def test_response_loss_falls_and_rouge_l_rises(learned):
    rows, s = learned["rounds"], learned["summary"]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
    assert all("perplexity" in r for r in rows)
    assert s["primary_metric"] == "rouge_l" and s["final_rouge_l"] > s["initial_rouge_l"]
    assert s["final_rouge_l"] >= 0.1 and 0.0 <= s["final_exact_match"] <= 1.0
    assert 0.0 < s["generation_share"] < 0.5
    assert all(r["clients"] == 5 and r["rejected"] == 0 for r in rows[1:])
    assert "Rouge-L (round 0 → final)" in learned["stdout"] and "exact match (final)" in learned["stdout"]


def test_exported_adapter_reloads_and_generates_the_same_tokens(learned):
    from peft import PeftModel

    cfg, run_dir = learned["cfg"], learned["run_dir"]
    final = [json.loads(line) for line in (run_dir / "generations.jsonl").read_text().splitlines()]
    final = [g for g in final if g["round"] == cfg.sim.rounds]
    assert len(final) == cfg.eval.generate_examples
    reloaded = PeftModel.from_pretrained(load_base_model(cfg, 0), str(run_dir / "adapter"))
    task = open_prepared(str(run_dir / "data"))
    prompts = [list(p) for p in task.test.select(range(len(final)))["prompt_ids"]]
    again = generate_ids(reloaded, prompts, batch_size=32, max_new_tokens=cfg.eval.max_new_tokens,
                         pad_id=task.pad_token_id, eos_id=task.eos_token_id)
    assert again == [g["generated_ids"] for g in final]
    # ... and they are not what the untrained adapter generates.
    fresh = generate_ids(build_model(cfg, 0), prompts, 32, cfg.eval.max_new_tokens, task.pad_token_id,
                         task.eos_token_id)
    assert fresh != again


def _busiest_client_per_round(run_dir: Path) -> dict[int, int]:
    per = defaultdict(int)
    with (run_dir / "comm.csv").open() as f:
        for row in csv.DictReader(f):
            if int(row["round"]) > 0 and int(row["client_id"]) >= 0:
                per[(int(row["round"]), int(row["client_id"]))] += int(row["bytes"])
    out: dict[int, int] = {}
    for (rnd, _), b in per.items():
        out[rnd] = max(out.get(rnd, 0), b)
    return out


def test_fedkseed_on_a_causal_lm_keeps_the_busiest_client_under_18_kb_per_round(tmp_path):
    cfg = load(LLM_SMOKE, ["method.name=fedkseed", "method.num_seeds=1024", "method.eps=0.001", "train.lr=0.0005",
                           "sim.num_clients=6", "sim.clients_per_round=3", "sim.rounds=2", "output.checkpoint_every=0",
                           f'output.dir="{tmp_path / "runs"}"'])
    summary = simulate(cfg)
    assert summary["method"] == "fedkseed" and summary["participations"] == 6
    busiest = _busiest_client_per_round(Path(summary["run_dir"]))
    assert sorted(busiest) == [1, 2] and max(busiest.values()) <= 18_000, busiest


@pytest.mark.slow
def test_alpaca_jsonl_through_the_cli_with_dp_sgd_reports_epsilon_and_moves_the_adapter(tmp_path):
    ds = generate(400, seed=6, categories=["sentiment", "antonym", "plural"])
    rows = [{"instruction": r["instruction"], "input": r["input"], "output": r["output"]} for r in ds]
    data = _write_jsonl(tmp_path / "alpaca.jsonl", rows)
    res = _cli(["simulate", str(LLM_SMOKE), *_sets([
        "data.source=file", f"data.path={data}", "dp.enabled=true", "dp.noise_multiplier=0.8", "dp.max_grad_norm=1.0",
        "sim.num_clients=4", "sim.clients_per_round=2", "sim.rounds=1", f"output.dir={tmp_path / 'runs'}"])], tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "sample-level ε" in res.stdout
    run_dir = next((tmp_path / "runs").iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epsilon_max"] > 0
    cfg = load(run_dir / "config.toml")
    from peft import PeftModel

    exported = PeftModel.from_pretrained(load_base_model(cfg, 0), str(run_dir / "adapter"))
    initial = build_model(cfg, 0)
    moved = [n for (n, p), (_, q) in zip(exported.named_parameters(), initial.named_parameters())
             if "lora_B" in n and not torch.equal(p, q)]
    assert moved, "DP-SGD left every LoRA B matrix at its initial value"


@pytest.mark.slow
def test_deploy_runs_a_causal_lm_on_real_supernodes(tmp_path):
    from fedpeft.app.deploy.run import deploy_recipe

    res = deploy_recipe(LLM_SMOKE, ["sim.num_clients=2", "sim.clients_per_round=2", "sim.rounds=1",
                                    "train.local_steps=2", "data.builtin.num_train=120", "data.builtin.num_test=16",
                                    "eval.generate_examples=8", "output.checkpoint_every=0"],
                        tmp_path, tls=False, auth=False, timeout=600, node_wait_s=60)
    assert res.returncode == 0, res.output[-3000:]
    metrics = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [0, 1] and metrics[1]["clients"] == 2
    assert "rouge_l" in metrics[1] and (res.run_dir / "adapter" / "adapter_config.json").is_file()
