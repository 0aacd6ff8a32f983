"""What secure aggregation costs in bytes: FedAvg-LoRA with and without SecAgg+ at 5, 10, 20 and 50 clients a round.

Every run is the default recipe (MiniLM-L6, LoRA r = 8 on query and value, 100 clients) for one
round of one local step (bytes do not depend on the training), with `sim.clients_per_round` set to
5, 10, 20 or 50. Three exchanges each: plain FedAvg; classic SecAgg (`secagg.num_shares = "all"`:
every client shares its secrets with every other, so its share_keys traffic grows with n); and
SecAgg+ (`secagg.num_shares = 0.3`: a neighbourhood of about 30 % of the round, rounded up to an odd
count, with the threshold a majority of it). The figures are the ledger's, measured per message and record as Flower serializes them,
averaged over the round's clients, per stage.

    python benchmarks/secagg_cost.py                         # every run, then the table
    python benchmarks/secagg_cost.py --only plain-5,secagg-5
    python benchmarks/secagg_cost.py --table

Each finished run is stored as <out>/<key>.json; the table is assembled from whatever has finished.
"""

from __future__ import annotations

import csv
import json
import sys
from collections import defaultdict
from pathlib import Path

from runlist import ROOT, stored_main  # benchmarks/ is the script's own folder

from fedpeft.ledger import KIB

SIZES = (5, 10, 20, 50)
VARIANTS = {  # key: (label, overrides)
    "plain": ("FedAvg", []),
    "secagg": ("SecAgg (all shares)", ["secagg.enabled=true"]),
    "secaggplus": ("SecAgg+ (num_shares 0.3)", ["secagg.enabled=true", "secagg.num_shares=0.3"]),
}
SHARES = 0.3
RUNS = {f"{v}-{n}": (v, n) for n in SIZES for v in VARIANTS}
STAGES = {  # message type -> the stage's name in the table
    "train.secagg_setup": "setup", "train.secagg_share_keys": "share keys", "train": "train / masked upload",
    "train.secagg_unmask": "unmask",
}


def run(key: str, out: Path, extra: list[str]) -> dict:
    """Run one exchange at one round size; store and return its per-stage bytes per client."""
    from fedpeft.app.recipe import load
    from fedpeft.app.simulate import simulate
    from fedpeft.config import SecAggConfig
    from fedpeft.secagg.updates import resolve_shares

    variant, n = RUNS[key]
    overrides = [f"sim.clients_per_round={n}", "sim.rounds=1", "train.local_steps=1", "output.checkpoint_every=0",
                 f'output.dir="{out / "runs"}"', f'name="{key}"', *VARIANTS[variant][1], *extra]
    if variant == "secaggplus":  # the threshold: a majority of the neighbourhood (it must exceed k / 2, and be <= k)
        k = resolve_shares(SecAggConfig(num_shares=SHARES), n) or n
        overrides.append(f"secagg.threshold={k // 2 + 1}")
    summary = simulate(load(ROOT / "simulations" / "default.toml", overrides))
    run_dir = Path(summary["run_dir"])
    per_stage: dict[str, dict[str, int]] = defaultdict(lambda: {"down": 0, "up": 0})
    clients = set()
    with (run_dir / "comm.csv").open() as f:
        for row in csv.DictReader(f):
            if int(row["round"]) != 1 or row["message_type"] not in STAGES:
                continue
            clients.add(int(row["client_id"]))
            per_stage[row["message_type"]][row["direction"]] += int(row["bytes"])
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    result = {"key": key, "variant": variant, "clients_per_round": n, "clients": len(clients),
              "num_shares": metrics[1].get("secagg_num_shares"), "threshold": metrics[1].get("secagg_threshold"),
              "bytes": dict(per_stage), "run_dir": str(run_dir)}
    (out / f"{key}.json").write_text(json.dumps(result, indent=1))
    return result


def _kib(total: int, clients: int) -> str:
    return f"{total / clients / KIB:,.1f}"


def table(out: Path) -> str:
    """Markdown table: KiB per client per stage (down + up), the total, and the overhead against plain FedAvg."""
    done = {k: json.loads((out / f"{k}.json").read_text()) for k in RUNS if (out / f"{k}.json").is_file()}
    if not done:
        return f"no finished runs in {out}"
    head = " | ".join(f"{s} (KiB)" for s in STAGES.values())
    lines = [f"| clients / round | exchange | shares k / threshold t | {head} | total KiB per client | vs FedAvg |",
             "|---|---|---|" + "---|" * len(STAGES) + "---|---|"]
    for n in SIZES:
        plain = done.get(f"plain-{n}")
        plain_total = sum(d + u for d, u in ((b["down"], b["up"]) for b in plain["bytes"].values())) if plain else 0
        for v, (label, _) in VARIANTS.items():
            r = done.get(f"{v}-{n}")
            if r is None:
                continue
            c = r["clients"]
            cells = [(_kib(b["down"] + b["up"], c) if (b := r["bytes"].get(t)) else "–") for t in STAGES]
            total = sum(b["down"] + b["up"] for b in r["bytes"].values())
            ratio = f"×{total / plain_total:.2f}" if plain_total else "–"
            shares = f"{r['num_shares']} / {r['threshold']}" if r["num_shares"] else "–"
            lines.append(f"| {n} | {label} | {shares} | {' | '.join(cells)} | {_kib(total, c)} | {ratio} |")
    return "\n".join(lines)


def _line(key: str, r: dict) -> str:
    return f"{key}: {sum(b['down'] + b['up'] for b in r['bytes'].values()) / r['clients']:,.0f} B per client"


def main(argv: list[str] | None = None) -> int:
    """Run the selected runs one after another (finished ones are kept), then print the table."""
    return stored_main(__doc__, RUNS, ROOT / "runs" / "secagg-cost", run, _line, table, argv)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
