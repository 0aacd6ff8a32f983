"""The run summary (`summary.json`): bytes, participation, scores, and the full-model reference."""

from __future__ import annotations

from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from fedpeft.config import Config
from fedpeft.ledger import CommLedger, message_bytes
from fedpeft.rundir import RunDir


def full_model_message_bytes(model) -> int:
    """Bytes of a FedAvg message carrying every base-model weight (the full-model reference)."""
    # The frozen parameters are exactly the original model's weights (adapters and the
    # trainable head copy are the only trainable ones).
    arrays = {n: p.detach().cpu() for n, p in model.named_parameters() if not p.requires_grad}
    msg = Message(
        RecordDict({"arrays": ArrayRecord(arrays), "config": ConfigRecord({"server-round": 1})}),
        dst_node_id=1,
        message_type=MessageType.TRAIN,
    )
    return message_bytes(msg)


def run_summary(cfg: Config, rows: list[dict], ledger: CommLedger, model, wall_s: float, rundir: RunDir) -> dict[str, Any]:
    """The run's totals: bytes both ways, per client, participations, parameters, the full-model reference."""
    totals = ledger.totals()
    per_client = [c["down"] + c["up"] for cid, c in ledger.per_client().items() if cid >= 0]
    participations = sum(r["clients"] for r in rows)
    full = full_model_message_bytes(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total_params = sum(p.numel() for p in model.parameters())
    return {
        "name": cfg.name,
        "run_dir": str(rundir.path),
        "method": cfg.method.name,
        "adapter": cfg.adapter.type,
        "rounds": cfg.sim.rounds,
        "rounds_completed": rows[-1]["round"],
        "num_clients": cfg.sim.num_clients,
        "clients_per_round": cfg.sim.clients_per_round,
        "final_loss": rows[-1]["loss"],
        "bytes_down": totals["down"],
        "bytes_up": totals["up"],
        "bytes_total": totals["down"] + totals["up"],
        "participations": participations,
        "rejected": sum(r["rejected"] for r in rows),
        "failed_rounds": sum(1 for r in rows if "round_failed" in r),
        "bytes_per_client_max": max(per_client, default=0),
        "bytes_per_client_mean": sum(per_client) / len(per_client) if per_client else 0.0,
        "trainable_params": trainable,
        "total_params": total_params,
        "full_model_message_bytes": full,
        "full_model_fedavg_bytes": 2 * full * participations,
        "wall_s": wall_s,
    }


def score_summary(primary: str, rows: list[dict]) -> dict[str, Any]:
    """Round 0, final and best of the primary metric (over the rounds that measured it), and causal-LM extras."""
    scored = [r for r in rows if primary in r]
    out: dict[str, Any] = {"primary_metric": primary}
    if scored:
        out.update({f"initial_{primary}": scored[0][primary], f"final_{primary}": scored[-1][primary],
                    f"best_{primary}": max(r[primary] for r in scored)})
    if "perplexity" in rows[-1]:
        out["final_perplexity"] = rows[-1]["perplexity"]
    if scored and "exact_match" in scored[-1]:
        out["final_exact_match"] = scored[-1]["exact_match"]
        out["best_exact_match"] = max(r["exact_match"] for r in scored)
        trained = rows[1:]
        round_s = sum(r["round_s"] for r in trained)
        out["generation_share"] = sum(r.get("generate_s", 0.0) for r in trained) / round_s if round_s else 0.0
    return out
