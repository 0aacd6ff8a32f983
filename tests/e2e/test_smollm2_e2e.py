"""One real round of the embedded LLM (SmolLM2-135M-Instruct) through real Flower + Ray + peft, kept small."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from safetensors.numpy import load_file

from fedpeft.rundir import RunDir
from fedpeft.app.recipe import load
from fedpeft.app.simulate import simulate

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["sim.num_clients=4", "sim.clients_per_round=2", "sim.rounds=1", "sim.num_cpus=2", "train.local_steps=2",
         "train.batch_size=2", "model.max_length=48", "data.builtin.num_train=64", "data.builtin.num_test=8",
         "eval.generate_examples=4", "eval.max_new_tokens=6", "eval.multiple_choice_examples=8", "partition.type=iid", "output.checkpoint_every=1"]


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory) -> Path:
    """llm-default.toml, shrunk to one round of two clients."""
    out = tmp_path_factory.mktemp("smollm2")
    cfg = load(ROOT / "simulations" / "llm-default.toml", [*SMALL, f'output.dir="{out}"'])
    assert cfg.model.source == "embedded" and cfg.model.kind == "causal-lm"
    return Path(simulate(cfg)["run_dir"])


def test_one_round_of_smollm2_through_flower_and_ray(smollm2_run):
    rows = [json.loads(line) for line in (smollm2_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[1]["accepted"] == 2
    # A real pretrained LLM: its response loss on the task starts far below a random model's ln(49152) = 10.8.
    assert rows[0]["loss"] < 6.0
    assert rows[1]["loss"] < rows[0]["loss"]
    assert 0.0 <= rows[1]["rouge_l"] <= 1.0 and 0.0 <= rows[1]["mc_accuracy"] <= 1.0
    # LoRA r=8 on q_proj and v_proj of 30 layers: 30 x (8 x 576 + 576 x 8 + 8 x 576 + 192 x 8) fp32 values.
    assert rows[1]["bytes_up"] > 2 * 4 * 30 * (3 * 8 * 576 + 8 * 192)


def test_its_adapter_is_saved_and_moved(smollm2_run):
    state = load_file(RunDir(smollm2_run).adapter_dir / "adapter_model.safetensors")
    lora_b = [v for k, v in state.items() if "lora_B" in k]
    assert len(lora_b) == 60 and any(float(np.abs(v).sum()) > 0 for v in lora_b)  # B starts at zero
