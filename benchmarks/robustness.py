"""Byzantine robustness on the default task: FedAvg and each robust aggregator under attack, against the clean run.

20 % of the clients (a fixed, seeded set) are Byzantine. `signflip` sends −10 × its honest update;
`alie` ("A little is enough", Baruch et al. 2019) sends mean − z·std of the round's honest updates
(z from the paper's formula). Every run uses the same model, data, partition, sampling and rounds
(simulations/default.toml plus the aggregator's own recipe).

    python benchmarks/robustness.py                         # every run, the recipe's rounds
    python benchmarks/robustness.py --rounds 6              # shorter runs
    python benchmarks/robustness.py --only clean,fedavg-signflip,fedmedian-signflip
    python benchmarks/robustness.py --table                 # the table of what has finished

Each finished run is stored as <out>/<key>.json; the table is assembled from whatever has finished.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from runlist import comparison_parser, run_selected  # benchmarks/ is the script's own folder

ROOT = Path(__file__).resolve().parents[1]
AGGREGATORS = {  # key: (label, recipe)
    "fedavg": ("FedAvg", "default.toml"),
    "fedmedian": ("coordinate-wise median", "fedmedian.toml"),
    "trimmed-mean": ("trimmed mean (β = 0.2)", "trimmed-mean.toml"),
    "krum": ("Krum (f = 2)", "krum.toml"),
    "multi-krum": ("Multi-Krum (f = 2, m = 6)", "multi-krum.toml"),
}
ATTACKS = {
    "signflip": ("sign flip ×10", ["faults.byzantine_fraction=0.2", 'faults.attack="sign_flip"', "faults.attack_scale=10"]),
    "alie": ("ALIE", ["faults.byzantine_fraction=0.2", 'faults.attack="alie"']),
}
RUNS = {"clean": ("FedAvg", "no attack", "default.toml", [])}
RUNS.update({f"{a}-{k}": (label, attack, recipe, extra)
             for k, (attack, extra) in ATTACKS.items() for a, (label, recipe) in AGGREGATORS.items()})


def run(key: str, rounds: int | None, out: Path, extra: list[str]) -> dict:
    """Run one aggregator under one attack (or clean); store and return its figures."""
    from fedpeft.app.recipe import load
    from fedpeft.rundir import RunDir
    from fedpeft.app.simulate import simulate

    label, attack, recipe, attack_keys = RUNS[key]
    overrides = [*attack_keys, f'output.dir="{out / "runs"}"', f'name="{key}"', "output.checkpoint_every=0", *extra]
    if rounds:
        overrides.append(f"sim.rounds={rounds}")
    summary = simulate(load(ROOT / "simulations" / recipe, overrides))
    rows = RunDir(Path(summary["run_dir"])).metrics()
    byzantine = [r.get("faults", {}).get("byzantine", 0) for r in rows[1:]]
    result = {"key": key, "label": label, "attack": attack, "recipe": f"simulations/{recipe}", "overrides": overrides,
              "accuracy": [r["accuracy"] for r in rows], "byzantine_per_round": byzantine,
              "wall_s": summary["wall_s"], "run_dir": summary["run_dir"]}
    (out / f"{key}.json").write_text(json.dumps(result, indent=1))
    return result


def table(out: Path) -> str:
    """Markdown table: final and best accuracy of every finished run, and the gap to the clean run."""
    done = {k: json.loads((out / f"{k}.json").read_text()) for k in RUNS if (out / f"{k}.json").is_file()}
    if not done:
        return f"no finished runs in {out}"
    clean = done.get("clean")
    lines = ["| aggregator | attack | final accuracy | best | vs clean (points, final) | Byzantine clients per round | wall |",
             "|---|---|---|---|---|---|---|"]
    for r in done.values():
        gap = f"{100 * (r['accuracy'][-1] - clean['accuracy'][-1]):+.1f}" if clean else "–"
        byz = ", ".join(map(str, r["byzantine_per_round"])) if any(r["byzantine_per_round"]) else "–"
        lines.append(f"| {r['label']} | {r['attack']} | {r['accuracy'][-1]:.3f} | {max(r['accuracy']):.3f} | {gap} | "
                     f"{byz} | {r['wall_s']:.0f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the selected runs one after another, then print the table of everything finished."""
    ap = comparison_parser(__doc__, RUNS, ROOT / "runs" / "robustness")
    ap.add_argument("--rounds", type=int, default=0, help="override the recipes' rounds (0 = keep them)")
    args = ap.parse_args(argv)

    def one(key: str) -> str:
        r = run(key, args.rounds or None, args.out, args.extra)
        return f"{key}: final accuracy {r['accuracy'][-1]:.3f} ({r['wall_s']:.0f} s)"

    run_selected(ap, args, RUNS, one)
    print(table(args.out))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
