"""The ε fedpeft reports against the ε of what actually ran, from an independent accountant (Google's dp_accounting).

For `simulations/dp-user.toml` (user-level DP) and `simulations/dp.toml` (sample-level DP-SGD), with full
participation and with half of the sampled clients' replies lost (`faults.drop = 0.5`: the clients trained,
their replies never arrived). Each run is a real simulation; the independent ε is recomputed from the run's
files (which clients were sent a train message in which round, their example counts, the noise used):

- user level, Poisson sampling (this version): the Poisson-subsampled Gaussian at (σ, q) under add/remove
  adjacency, composed over the rounds the mechanism ran.
- user level, fixed-size sampling with the mean over the replies that arrived (earlier versions, through
  Flower's wrappers): each round's noise on the sum is σ·C·n/m for n replies of m sampled, replace-one
  sensitivity 2C; the smaller of the bounds with and without amplification by sampling m of N without
  replacement (dp_accounting's RDP accountant, replace-one adjacency).
- sample level: each client's Poisson-subsampled Gaussian at (σ_i, q_i = B/n_i) composed over every DP step
  of every round it was sent a train message (lost replies included); the maximum over clients.

ε depends on the mechanism's parameters, not on the model's weights: `--model tiny` (the default, minutes)
gives the same ε as the recipes' MiniLM-L6 (`--model embedded`, about an hour on 2 cores).

    python benchmarks/privacy_table.py --out privacy_table.json
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from pathlib import Path

import dp_accounting
from dp_accounting.rdp import RdpAccountant

from fedpeft.env import quiet_libraries, set_offline_env
from fedpeft.app.recipe import load
from fedpeft.app.simulate import simulate

ROOT = Path(__file__).resolve().parents[1]
REPLACE_ONE = dp_accounting.NeighboringRelation.REPLACE_ONE


def sent_rounds(run_dir: Path) -> dict[int, list[int]]:
    """Client id → rounds in which it was sent a train message (from the communication ledger)."""
    out: dict[int, set[int]] = {}
    with (run_dir / "comm.csv").open() as f:
        for r in csv.DictReader(f):
            if r["direction"] == "down" and r["message_type"] == "train" and int(r["client_id"]) >= 0:
                out.setdefault(int(r["client_id"]), set()).add(int(r["round"]))
    return {c: sorted(v) for c, v in out.items()}


def user_epsilon(run_dir: Path, cfg, summary: dict) -> float:
    """ε of the user-level mechanism that ran, from dp_accounting."""
    sigma, delta = float(summary["user_noise_multiplier"]), float(summary["user_delta"])
    n_total, m = cfg.sim.num_clients, cfg.sim.clients_per_round
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("round", 0) >= 1 and "event" not in r]
    if summary.get("user_sampling") == "poisson":
        acc = RdpAccountant()
        rounds = int(summary["user_releases"])
        acc.compose(dp_accounting.PoissonSampledDpEvent(m / n_total, dp_accounting.GaussianDpEvent(sigma)), rounds)
        return acc.get_epsilon(delta)
    # Both bounds hold (with and without the amplification by sampling m of N): the smaller one is reported.
    sampled, plain = RdpAccountant(neighboring_relation=REPLACE_ONE), RdpAccountant(neighboring_relation=REPLACE_ONE)
    for r in rows:
        replies = r.get("accepted", r["clients"])
        if replies and "round_failed" not in r:
            # noise std on the sum σ·C·n/m, replace-one sensitivity 2C
            event = dp_accounting.GaussianDpEvent(sigma * replies / m / 2)
            sampled.compose(dp_accounting.SampledWithoutReplacementDpEvent(n_total, m, event))
            plain.compose(event)
    return min(sampled.get_epsilon(delta), plain.get_epsilon(delta))


def sample_epsilon(run_dir: Path, cfg) -> float:
    """The largest client ε of the DP-SGD that ran (every round a client was sent work), from dp_accounting."""
    from fedpeft.data import open_prepared
    from fedpeft.privacy import sample_level

    task = open_prepared(str(run_dir / "data"))
    sizes = [len(p) for p in task.partitions]
    delta = sample_level.resolve_delta(cfg, sizes)
    worst = 0.0
    for cid, rounds in sent_rounds(run_dir).items():
        plan = sample_level.plan(cfg, sizes[cid], delta)
        acc = RdpAccountant()
        event = dp_accounting.PoissonSampledDpEvent(plan.sample_rate, dp_accounting.GaussianDpEvent(plan.noise_multiplier))
        acc.compose(event, plan.steps * len(rounds))
        worst = max(worst, acc.get_epsilon(delta))
    return worst


def run(recipe: str, drop: float, model: str, out_dir: str) -> dict:
    """One simulation of `recipe` with `drop` of the replies lost; reported and independent ε."""
    sets = [f'output.dir="{out_dir}"', "output.checkpoint_every=0", "sim.min_replies=1"]
    if drop:
        sets.append(f"faults.drop={drop}")
    if model == "tiny":
        sets.append('model.source="tiny"')
    cfg = load(ROOT / "simulations" / f"{recipe}.toml", sets)
    summary = simulate(cfg)
    run_dir = Path(summary["run_dir"])
    if cfg.dp.user.enabled:
        reported, independent = float(summary["user_epsilon"]), user_epsilon(run_dir, cfg, summary)
    else:
        reported, independent = float(summary.get("epsilon_max", 0.0)), sample_epsilon(run_dir, cfg)
    return {"recipe": recipe, "drop": drop, "reported": reported, "independent": independent,
            "final_accuracy": summary.get("final_accuracy"), "run_dir": str(run_dir)}


def main() -> None:
    """Run every point and print a markdown table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", default="dp-user,dp")
    p.add_argument("--drops", default="0,0.5")
    p.add_argument("--model", choices=["tiny", "embedded"], default="tiny")
    p.add_argument("--out", default="", help="write the rows as JSON here")
    p.add_argument("--runs", default="", help="keep the run directories here (default: a temporary folder)")
    args = p.parse_args()
    set_offline_env()
    quiet_libraries()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = args.runs or tmp
        for recipe in args.recipes.split(","):
            for drop in (float(d) for d in args.drops.split(",")):
                rows.append(run(recipe, drop, args.model, tmp))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print("| recipe | replies lost | ε reported | ε of what ran (dp_accounting) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['recipe']} | {r['drop']:.0%} | {r['reported']:.2f} | {r['independent']:.2f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
