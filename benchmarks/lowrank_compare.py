"""Low-rank methods at one byte budget on the default task, non-IID Dirichlet(0.3): accuracy and total MiB.

Every method is sized to send about what LoRA r=8 sends per client per round (the budget):
LoRA and exact LoRA at r=8, LoHa r=4 (same parameter count), pFedPara LoHa r=8 (one pair of
rank 8 travels), FFA-LoRA r=16 (only B travels: 16 x out = 8 x (in + out) for square layers) and
FlexLoRA with ranks 4/8/16 for 30/50/20 % of clients (mean rank 8.4). Same model, data,
partition, client sampling and rounds for all.

    python benchmarks/lowrank_compare.py                       # all six, 12 rounds each
    python benchmarks/lowrank_compare.py --only lora,loha      # some of them
    python benchmarks/lowrank_compare.py --table               # print the table of what has finished

Each finished run is stored as <out>/<key>.json, so methods can run one at a time (e.g. each under
a lock) and the table is assembled from whatever has finished.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from runlist import comparison_parser, run_selected  # benchmarks/ is the script's own folder

from fedpeft.ledger import MIB, format_bytes

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "simulations"

# key: (label, recipe, overrides that size the method to the budget)
METHODS: dict[str, tuple[str, str, list[str]]] = {
    "lora": ("LoRA r=8, A and B averaged", "default.toml", []),
    "loha": ("FedPara: LoHa r=4", "fedpara.toml", []),
    "pfedpara": ("pFedPara: LoHa r=8, one pair sent", "pfedpara.toml", []),
    "ffa-lora": ("FFA-LoRA r=16, B sent", "ffa-lora.toml", ["adapter.r=16", "adapter.lora_alpha=32"]),
    "flexlora": ("FlexLoRA r=4/8/16 (30/50/20 %)", "flexlora.toml", ["method.rank_tiers={4 = 0.3, 8 = 0.5, 16 = 0.2}"]),
    "lora-exact": ("LoRA r=8, exact (SVD of mean B·A)", "lora-exact.toml", []),
}


def run_method(key: str, rounds: int, alpha: float, out: Path, extra: list[str]) -> dict:
    """Run one method's recipe with the shared overrides; return and store its figures."""
    from fedpeft.app.recipe import load
    from fedpeft.rundir import RunDir
    from fedpeft.app.simulate import simulate

    label, recipe, sized = METHODS[key]
    overrides = [f"partition.alpha={alpha}", f"sim.rounds={rounds}", f'output.dir="{out / "runs"}"',
                 f'name="{key}"', *sized, *extra]
    cfg = load(RECIPES / recipe, overrides)
    summary = simulate(cfg)
    rows = RunDir(Path(summary["run_dir"])).metrics()  # round rows only (a budget stop adds an event line)
    result = {
        "key": key, "label": label, "recipe": f"simulations/{recipe}", "overrides": overrides,
        "rounds": rounds, "final_accuracy": summary["final_accuracy"], "best_accuracy": summary["best_accuracy"],
        "accuracy_by_round": [r["accuracy"] for r in rows],
        "bytes_total": summary["bytes_total"], "bytes_up": summary["bytes_up"], "bytes_down": summary["bytes_down"],
        "trainable_params": summary["trainable_params"], "wall_s": summary["wall_s"], "run_dir": summary["run_dir"],
    }
    if "final_personal_accuracy" in summary:
        result["final_personal_accuracy"] = summary["final_personal_accuracy"]
    (out / f"{key}.json").write_text(json.dumps(result, indent=1))
    return result


def table(out: Path) -> str:
    """The comparison table (Markdown) of every finished method in `out`."""
    results = [json.loads((out / f"{k}.json").read_text()) for k in METHODS if (out / f"{k}.json").is_file()]
    if not results:
        return f"no finished runs in {out}"
    lines = ["| method | final accuracy (best) | personalized | total MiB | MiB per round | rounds |",
             "|---|---|---|---|---|---|"]
    for r in results:
        personal = f"{r['final_personal_accuracy']:.3f}" if "final_personal_accuracy" in r else "—"
        lines.append(f"| {r['label']} | {r['final_accuracy']:.3f} ({r['best_accuracy']:.3f}) | {personal} | "
                     f"{r['bytes_total'] / MIB:.1f} | {r['bytes_total'] / MIB / r['rounds']:.2f} | {r['rounds']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the selected methods, then print the table of everything finished."""
    ap = comparison_parser(__doc__, METHODS, ROOT / "runs" / "lowrank-compare")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--alpha", type=float, default=0.3, help="Dirichlet concentration of the partition")
    args = ap.parse_args(argv)

    def one(key: str) -> str:
        r = run_method(key, args.rounds, args.alpha, args.out, args.extra)
        return f"{key}: accuracy {r['final_accuracy']:.3f}, {format_bytes(r['bytes_total'], 1)}, {r['wall_s']:.0f} s"

    run_selected(ap, args, METHODS, one)
    print(table(args.out))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
