"""Federated optimizers on the default task with a hard non-IID split: accuracy per round and bytes.

FedAvg, FedProx, SCAFFOLD, FedAdam, FedYogi and FedAvgM (and any other recipe in METHODS) over the
same model, data, Dirichlet(α = 0.1) partition, client sampling and rounds; each with its shipped
recipe's options.

    python benchmarks/optimizer_compare.py                        # all, 12 rounds each
    python benchmarks/optimizer_compare.py --only fedavg,fedadam  # some of them
    python benchmarks/optimizer_compare.py --table                # the table of what has finished

Each finished run is stored as <out>/<key>.json; the table is assembled from whatever has finished.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from runlist import comparison_parser, run_selected  # benchmarks/ is the script's own folder

from fedpeft.ledger import MIB, format_bytes

ROOT = Path(__file__).resolve().parents[1]
METHODS = {  # key: (label, recipe)
    "fedavg": ("FedAvg", "default.toml"),
    "fedprox": ("FedProx (μ = 0.01)", "fedprox.toml"),
    "scaffold": ("SCAFFOLD", "scaffold.toml"),
    "fedadam": ("FedAdam (η = 0.01)", "fedadam.toml"),
    "fedyogi": ("FedYogi (η = 0.01)", "fedyogi.toml"),
    "fedavgm": ("FedAvgM (lr 1, β = 0.5)", "fedavgm.toml"),
    "fedadagrad": ("FedAdagrad (η = 0.01)", "fedadagrad.toml"),
}
SHOWN_ROUNDS = (2, 4, 6, 8, 10, 12)


def run(key: str, rounds: int, alpha: float, out: Path, extra: list[str]) -> dict:
    """Run one method's recipe with the shared overrides; store and return its per-round figures."""
    from fedpeft.app.recipe import load
    from fedpeft.rundir import RunDir
    from fedpeft.app.simulate import simulate

    label, recipe = METHODS[key]
    overrides = [f"partition.alpha={alpha}", f"sim.rounds={rounds}", f'output.dir="{out / "runs"}"',
                 f'name="{key}"', *extra]
    summary = simulate(load(ROOT / "simulations" / recipe, overrides))
    rows = RunDir(Path(summary["run_dir"])).metrics()  # round rows only (a budget stop adds an event line)
    result = {"key": key, "label": label, "recipe": f"simulations/{recipe}", "overrides": overrides,
              "accuracy": [r["accuracy"] for r in rows], "bytes_down": summary["bytes_down"],
              "bytes_up": summary["bytes_up"], "bytes_total": summary["bytes_total"],
              "participations": summary["participations"], "wall_s": summary["wall_s"],
              "run_dir": summary["run_dir"]}
    (out / f"{key}.json").write_text(json.dumps(result, indent=1))
    return result


def table(out: Path) -> str:
    """Markdown table of every finished method: accuracy at selected rounds, best, bytes, wall time."""
    done = [json.loads((out / f"{k}.json").read_text()) for k in METHODS if (out / f"{k}.json").is_file()]
    if not done:
        return f"no finished runs in {out}"
    shown = [r for r in SHOWN_ROUNDS if r < len(done[0]["accuracy"])]
    head = " / ".join(str(r) for r in shown)
    lines = [f"| method | accuracy at round {head} | best | MiB down + up | bytes per client per round | wall |",
             "|---|---|---|---|---|---|"]
    for r in done:
        acc = " / ".join(f"{r['accuracy'][i]:.3f}" for i in shown)
        per = r["bytes_total"] / max(r["participations"], 1)
        lines.append(f"| {r['label']} | {acc} | {max(r['accuracy']):.3f} | {r['bytes_down'] / MIB:.1f} + "
                     f"{r['bytes_up'] / MIB:.1f} | {per:,.0f} B | {r['wall_s']:.0f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the selected methods one after another, then print the table of everything finished."""
    ap = comparison_parser(__doc__, METHODS, ROOT / "runs" / "optimizer-compare",
                           only="fedavg,fedprox,scaffold,fedadam,fedyogi,fedavgm")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--alpha", type=float, default=0.1, help="Dirichlet concentration of the partition")
    args = ap.parse_args(argv)

    def one(key: str) -> str:
        r = run(key, args.rounds, args.alpha, args.out, args.extra)
        return f"{key}: final accuracy {r['accuracy'][-1]:.3f}, {format_bytes(r['bytes_total'], 1)}, {r['wall_s']:.0f} s"

    run_selected(ap, args, METHODS, one)
    print(table(args.out))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
