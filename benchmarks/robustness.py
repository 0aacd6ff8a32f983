"""Byzantine robustness on the method benchmark: FedAvg and each robust aggregator under five attacks, at convergence.

20 % of the 50 clients (a fixed, seeded set) are Byzantine. Every run is simulations/bench.toml (the
benchmark on which clean FedAvg-LoRA leaves its plateau) over its full round count, with 7 clients
per round instead of 5, so that each rule tolerates f = 1 attacker per round (Bulyan needs
n >= 4f + 3 = 7): the same model, data, partition, sampling, rounds and seed for every run.

Attacks: `signflip` sends -10 x its honest update; `scale` 10 x its honest update; `noise` replaces
its update by N(0, 1) values; `labelflip` trains on flipped labels; `alie` ("A little is enough",
Baruch et al. 2019) sends mean - z std of the round's honest updates (z from the paper's formula).

    python benchmarks/robustness.py                           # every run
    python benchmarks/robustness.py --only clean,fedavg-signflip,fedmedian-signflip
    python benchmarks/robustness.py --table                   # the table of what has finished

Each finished run is stored as <out>/<key>.json; the table is assembled from whatever has finished.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from runlist import ROOT, bench_config, stored_main  # benchmarks/ is the script's own folder

CLIENTS_PER_ROUND = 7
AGGREGATORS = {  # key: (label, method overlay)
    "fedavg": ("FedAvg", {}),
    "fedmedian": ("coordinate-wise median", {}),
    "trimmed-mean": ("trimmed mean (β = 0.2)", {"method": {"beta": 0.2}}),
    "krum": ("Krum (f = 1)", {"method": {"f": 1}}),
    "multi-krum": ("Multi-Krum (f = 1, m = 6)", {"method": {"f": 1, "m": 6}}),
    "bulyan": ("Bulyan (f = 1)", {"method": {"f": 1}}),
}
BYZANTINE = {"byzantine_fraction": 0.2}
ATTACKS = {  # key: (label, [faults] table)
    "signflip": ("sign flip ×10", {**BYZANTINE, "attack": "sign_flip", "attack_scale": 10.0}),
    "scale": ("scaling ×10", {**BYZANTINE, "attack": "scale", "attack_scale": 10.0}),
    "noise": ("Gaussian noise (σ = 1)", {**BYZANTINE, "attack": "noise", "noise_std": 1.0}),
    "labelflip": ("label flip", {**BYZANTINE, "attack": "label_flip"}),
    "alie": ("ALIE", {**BYZANTINE, "attack": "alie"}),
}
RUNS = {"clean": ("FedAvg", "no attack", "fedavg", {})}
RUNS.update({f"{a}-{k}": (label, attack, a, faults)
             for k, (attack, faults) in ATTACKS.items() for a, (label, _) in AGGREGATORS.items()})


def run(key: str, out: Path, extra: list[str]) -> dict:
    """Run one aggregator under one attack (or clean); store and return its figures."""
    from fedpeft.app.simulate import simulate
    from fedpeft.rundir import RunDir

    label, attack, method, faults = RUNS[key]
    overlay = {**AGGREGATORS[method][1], "sim": {"clients_per_round": CLIENTS_PER_ROUND}, "faults": faults}
    overrides = [f'output.dir="{out / "runs"}"', f'name="{key}"', *extra]
    summary = simulate(bench_config(method, overlay, overrides))
    rows = RunDir(Path(summary["run_dir"])).metrics()
    byzantine = [r.get("faults", {}).get("byzantine", 0) for r in rows[1:]]
    result = {"key": key, "label": label, "attack": attack, "method": method, "overlay": overlay,
              "overrides": overrides, "accuracy": [r["accuracy"] for r in rows], "byzantine_per_round": byzantine,
              "wall_s": summary["wall_s"], "run_dir": summary["run_dir"]}
    (out / f"{key}.json").write_text(json.dumps(result, indent=1))
    return result


def table(out: Path) -> str:
    """Markdown table, an attack a row and an aggregator a column: final (best) accuracy of every finished run,
    and the best robust aggregator's gap to clean FedAvg."""
    done = {k: json.loads((out / f"{k}.json").read_text()) for k in RUNS if (out / f"{k}.json").is_file()}
    if not done:
        return f"no finished runs in {out}"
    clean = done.get("clean")
    clean_final = clean["accuracy"][-1] if clean else None
    head = " | ".join(label for label, _ in AGGREGATORS.values())
    lines = [f"| attack | {head} | best robust aggregator vs clean FedAvg (points, final) |",
             "|---" * (len(AGGREGATORS) + 2) + "|"]
    if clean:
        cells = [f"**{clean_final:.3f}** ({max(clean['accuracy']):.3f})"] + ["–"] * (len(AGGREGATORS) - 1)
        lines.append(f"| none | {' | '.join(cells)} | – |")
    for attack_key, (attack, _) in ATTACKS.items():
        cells, robust = [], []
        for agg in AGGREGATORS:
            r = done.get(f"{agg}-{attack_key}")
            cells.append(f"{r['accuracy'][-1]:.3f} ({max(r['accuracy']):.3f})" if r else "not run")
            if r and agg != "fedavg":
                robust.append((r["accuracy"][-1], AGGREGATORS[agg][0]))
        best = max(robust) if robust else None
        gap = (f"{best[1]}: {100 * (best[0] - clean_final):+.1f}" if best and clean_final is not None else "–")
        lines.append(f"| {attack} | {' | '.join(cells)} | {gap} |")
    per_round = next((r["byzantine_per_round"] for r in done.values() if any(r["byzantine_per_round"])), None)
    if per_round:
        lines.append("")
        lines.append(f"Byzantine clients among the {CLIENTS_PER_ROUND} sampled, rounds 1–{len(per_round)} (the same in every attacked run): "
                     f"{', '.join(map(str, per_round))}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the selected runs one after another (finished ones are kept), then print the table."""
    return stored_main(__doc__, RUNS, ROOT / "runs" / "robustness", run,
                       lambda key, r: f"{key}: final accuracy {r['accuracy'][-1]:.3f} ({r['wall_s']:.0f} s)",
                       table, argv)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
