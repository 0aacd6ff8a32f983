"""A real Flower + Ray simulation with coded uploads and downloads: exact packed bytes in the ledger, error feedback on disk."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message, MessageType, RecordDict

from fedpeft.adapters import adapter_state
from fedpeft.codecs.endpoints import CODEC_RECORD, payload_record
from fedpeft.ledger import record_bytes
from fedpeft.models import build_model
from fedpeft.app.recipe import load
from fedpeft.app.simulate import simulate
from fedpeft.state import STATE_DIR, ClientStateStore
from strategies import get_strategy_class

ROOT = Path(__file__).resolve().parents[2]
UP = ["delta", "randk:0.25", "int8"]


def _codec_record_bytes(payload_len: int, message_type: str) -> int:
    """What the ledger charges for a `codec` record carrying `payload_len` bytes."""
    msg = Message(RecordDict({CODEC_RECORD: payload_record(bytes(payload_len))}), dst_node_id=1,
                  message_type=message_type)
    return record_bytes(msg)[CODEC_RECORD]


def test_coded_run_charges_exactly_the_packed_bytes_and_keeps_residuals(tmp_path):
    cfg = load(ROOT / "simulations" / "smoke.toml", [
        f'output.dir="{tmp_path}"', "sim.rounds=2",
        "codecs.up=[" + ",".join(f'"{s}"' for s in UP) + "]", 'codecs.down=["fp16"]', "codecs.error_feedback=true",
    ])
    summary = simulate(cfg)
    run_dir = Path(summary["run_dir"])
    assert summary["rejected"] == 0

    # The payload size follows from the chain and the adapter's shapes alone (rand-k sends no indices).
    num_labels = len(json.loads((run_dir / "data" / "task.json").read_text())["label_names"])
    model = build_model(cfg, num_labels)
    strategy_cls = get_strategy_class(cfg.method.name)
    shapes = [tuple(v.shape) for k, v in sorted(adapter_state(model).items()) if strategy_cls.exchanged(k)]
    header = 2 + 1 + 1 + len(",".join(UP)) + 2
    up_payload = header + sum(4 + max(1, round(0.25 * math.prod(s))) for s in shapes)
    down_payload = 2 + 1 + 1 + len("fp16") + 2 + sum(2 * math.prod(s) for s in shapes)

    rows = list(csv.DictReader((run_dir / "comm.csv").open()))
    up = [int(r["bytes"]) for r in rows if r["direction"] == "up" and r["record"] == CODEC_RECORD]
    down = [int(r["bytes"]) for r in rows if r["direction"] == "down" and r["record"] == CODEC_RECORD]
    assert len(up) == len(down) == 2 * cfg.sim.clients_per_round
    assert set(up) == {_codec_record_bytes(up_payload, MessageType.TRAIN)}
    assert set(down) == {_codec_record_bytes(down_payload, MessageType.TRAIN)}
    assert not any(r["record"] == "arrays" for r in rows if r["round"] != "0")  # nothing travelled dense

    # Error feedback: each client that trained holds a residual shaped like its upload, and only those.
    trained = {int(r["client_id"]) for r in rows if r["direction"] == "up" and r["record"] == CODEC_RECORD}
    store = ClientStateStore(run_dir / STATE_DIR)
    holders = {c for c in range(cfg.sim.num_clients) if store.load_arrays(c, "residual")}
    assert holders == trained
    residual = store.load_arrays(min(trained), "residual")
    assert sorted(v.shape for v in residual.values()) == sorted(shapes)
    assert any(np.abs(v).max() > 0 for v in residual.values())


@pytest.mark.slow
def test_coded_uploads_work_with_heterogeneous_ranks(tmp_path):
    """HetLoRA clients send rank-r slices through the codec chain; the server decodes each against its tier."""
    cfg = load(ROOT / "simulations" / "smoke.toml", [
        f'output.dir="{tmp_path}"', "sim.rounds=2", "method.name=hetlora",
        'codecs.up=["delta", "topk:0.2", "ternary"]',
    ])
    summary = simulate(cfg)
    assert summary["rejected"] == 0
    rows = list(csv.DictReader((Path(summary["run_dir"]) / "comm.csv").open()))
    ups = [r for r in rows if r["direction"] == "up" and r["round"] != "0"]
    assert {r["record"] for r in ups} == {CODEC_RECORD, "metrics", "_envelope"}
    ranks = {int(k): v for k, v in summary["client_ranks"].items()}
    by_rank: dict[int, set[int]] = {}
    for r in ups:
        if r["record"] == CODEC_RECORD:
            by_rank.setdefault(ranks[int(r["client_id"])], set()).add(int(r["bytes"]))
    sizes = [max(by_rank[r]) for r in sorted(by_rank)]
    assert len(sizes) >= 2 and sizes == sorted(sizes) and sizes[0] < sizes[-1]  # higher rank, bigger payload
