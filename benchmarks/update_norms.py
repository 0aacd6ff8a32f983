"""L2 norm of one round's client updates (returned adapter minus the global one) without DP: a guide for
`dp.user.clipping_norm`.

    python benchmarks/update_norms.py --recipe simulations/default.toml --clients 4
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from clients.first_order import FirstOrderTrainer
from clients.app.runtime import ClientRuntime
from fedpeft.adapters import adapter_state
from fedpeft.app.recipe import load
from fedpeft.data import prepare
from fedpeft.env import quiet_libraries, set_offline_env
from fedpeft.models import build_model

ROOT = Path(__file__).resolve().parents[1]


def update_norms(recipe: Path, clients: int, overrides: list[str]) -> list[tuple[int, int, float]]:
    """(client id, examples, update norm) of the first `clients` clients trained from the initial adapter."""
    cfg = load(recipe, [*overrides, "dp.enabled=false", "dp.user.enabled=false"])
    task = prepare(cfg, Path(tempfile.mkdtemp(prefix="update-norms-")))
    model = build_model(cfg, task.num_labels)
    trainer = FirstOrderTrainer(ClientRuntime(cfg, task, model, tempfile.mkdtemp()))
    start = {k: v.clone() for k, v in adapter_state(model).items() if k in trainer.keys}
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1  # a message needs an identity
    out = []
    for cid in range(clients):
        msg = Message(RecordDict({"arrays": ArrayRecord(start), "config": ConfigRecord({"server-round": 1})}),
                      dst_node_id=1, message_type=MessageType.TRAIN)
        new = trainer.train(msg, cid)["arrays"]
        norm = np.sqrt(sum(float(((new[k].numpy() - start[k].numpy()).astype(np.float64) ** 2).sum()) for k in start))
        out.append((cid, len(task.client_dataset(cid)), float(norm)))
    return out


def main() -> None:
    """Print each client's update norm."""
    set_offline_env()
    quiet_libraries()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", type=Path, default=ROOT / "simulations" / "default.toml")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], help="override, key=value")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for cid, n, norm in update_norms(args.recipe, args.clients, args.set):
        print(f"client {cid}: {n} examples, update L2 norm {norm:.4f}")


if __name__ == "__main__":
    main()
