"""Accuracy against true upload bytes: dense FedAvg-LoRA vs update-codec chains on one recipe.

    python benchmarks/codec_compare.py [--recipe simulations/default.toml] [--rounds N]
                                       [--chain "delta,topk:0.05,ternary" ...] [--out codec_compare.md]

A chain may carry more `[codecs]` keys after semicolons: "delta,randk:0.1,int8;merge=sparse-mean".

Each chain runs the same recipe (same seed, clients, rounds) with `codecs.up` set to it. Upload
bytes come from each run's communication ledger (serialized Flower messages), so indices, scales,
headers and Flower's framing are all counted. The ratio is dense upload bytes / chain upload bytes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedpeft.env import quiet_libraries, set_offline_env

set_offline_env()
quiet_libraries()

from fedpeft.app.recipe import load
from fedpeft.report.load import load_run
from fedpeft.report.tables import run_stats
from fedpeft.app.simulate import simulate

DEFAULT_CHAINS = [
    "delta,ternary",
    "delta,randk:0.1,int8;merge=sparse-mean",
    "delta,topk:0.1,ternary",
    "delta,topk:0.05",
    "delta,dare:0.9,int8",
    "delta,int8",
    "delta,topk:0.01:global,ternary",
]


def run_chain(recipe: str, chain: str | None, rounds: int | None, out_dir: str) -> dict:
    """One run of the recipe with `chain` as the upload codec (None: dense); its headline figures."""
    stages, *options = (chain or "").split(";")
    label = "dense" if chain is None else chain.replace(",", "+").replace(":", "").replace(";", "-").replace("=", "")
    overrides = [f"output.dir={out_dir}", f"name={label}"]
    if rounds:
        overrides.append(f"sim.rounds={rounds}")
    if stages:
        overrides.append("codecs.up=[" + ",".join(f'"{c}"' for c in stages.split(",")) + "]")
    overrides += [f"codecs.{o.strip()}" for o in options if o.strip()]
    return row(simulate(load(recipe, overrides))["run_dir"])


def row(run_dir: str | Path) -> dict:
    """Headline figures of one finished run directory (its codecs, accuracy, ledger bytes)."""
    run = load_run(run_dir)
    stats = run_stats(run)
    codecs = run.config.get("codecs") or {}
    chain = ",".join(codecs.get("up", [])) or "dense fp32"
    extra = {k: v for k, v in codecs.items() if k != "up" and v not in (None, [], "mean", 0.5)}
    if extra:
        chain += ";" + ";".join(f"{k}={','.join(v) if isinstance(v, list) else v}" for k, v in extra.items())
    reach = next((m["round"] for m in run.metrics if m["round"] > 0 and m["accuracy"] >= 0.99), None)
    return {"chain": chain, "reach": reach, "final": stats.final_score, "best": stats.best_score, "up": stats.bytes_up,
            "down": stats.bytes_down, "rejected": sum(int(m.get("rejected", 0)) for m in run.metrics)}


def table(rows: list[dict]) -> str:
    """A Markdown table of the runs, with compression ratios against the dense run (the first row)."""
    dense = rows[0]["up"]
    lines = ["| upload chain | final acc | best acc | first round ≥ 0.99 | upload bytes | ratio vs dense | rejected |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| `{r['chain']}` | {r['final']:.3f} | {r['best']:.3f} | {r['reach'] or '—'} | {r['up']:,} | "
                     f"{dense / r['up']:.1f}× | {r['rejected']} |")
    return "\n".join(lines)


def main() -> None:
    """Run dense and every chain, print (and optionally write) the comparison table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="simulations/default.toml")
    ap.add_argument("--rounds", type=int, default=None, help="override sim.rounds")
    ap.add_argument("--chain", action="append", help="comma-separated chain; repeatable (default: a standard set)")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense reference run (ratios then use the first chain)")
    ap.add_argument("--runs-dir", default="runs/codec_compare")
    ap.add_argument("--out", default=None, help="also write the table to this Markdown file")
    ap.add_argument("--from-runs", nargs="+", metavar="RUN_DIR",
                    help="tabulate finished run directories instead of running (the first is the reference)")
    args = ap.parse_args()
    if args.from_runs:
        text = table([row(d) for d in args.from_runs])
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")
        return
    chains = ([] if args.no_dense else [None]) + (args.chain or DEFAULT_CHAINS)
    rows = []
    for chain in chains:
        print(f"running {chain or 'dense'} ...", flush=True)
        rows.append(run_chain(args.recipe, chain, args.rounds, args.runs_dir))
        r = rows[-1]
        print(f"  final {r['final']:.3f} best {r['best']:.3f} upload {r['up']:,} B", flush=True)
    text = table(rows)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
