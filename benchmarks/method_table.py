"""Every registered method on the method benchmark (simulations/bench.toml): accuracy, rounds and bytes.

Each method runs once with the same model, data, partition, client sampling, rounds and seed
(simulations/bench.toml), with what its shipped recipe changes in the method, adapter and train
tables (simulations/<method>.toml; `fedavg-exact` is fedavg with `lora_aggregation = "exact"`).
Every row runs first with its shipped options; then methods with a tuned option run a small sweep
of other values (SWEEPS below, the same benchmark). A row shows the value with the best final
accuracy, and lists every value tried with its final accuracy.

    python benchmarks/method_table.py                              # every row, then the sweeps
    python benchmarks/method_table.py --only fedavg,fedadam        # some rows (and their sweeps)
    python benchmarks/method_table.py --no-sweeps                  # the rows with shipped options only
    python benchmarks/method_table.py --table                      # the table of what has finished

Each finished run is stored as <out>/<key>.json; the table is assembled from whatever has finished.
Personalized methods (pfedpara, fedsa-lora) keep part of the adapter on the clients: their row gives
the global model's accuracy and, in brackets, the mean personalized accuracy on the clients' local
test splits.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from runlist import ROOT, bench_config, comparison_parser, merged  # benchmarks/ is the script's own folder

from fedpeft.ledger import KIB

# Other option values tried on the benchmark (each a [method] or [train] overlay), besides the shipped recipe's.
SWEEPS: dict[str, list[dict]] = {
    "fedadam": [{"method": {"eta": e}} for e in (0.001, 0.003)],  # shipped: 0.01
    "fedyogi": [{"method": {"eta": e}} for e in (0.001, 0.003)],  # shipped: 0.01
    "fedadagrad": [{"method": {"eta": e}} for e in (0.001, 0.003)],  # shipped: 0.01
    "fedavgm": [{"method": {"momentum": 0.9}}],  # shipped: 0.5
    "fedprox": [{"method": {"mu": 0.1}}],  # shipped: 0.01
    "hetlora": [{"method": {"rank_tiers": {"4": 0.3, "8": 0.5, "16": 0.2}}}],  # shipped: 8/16 at 50/50 %
    "flexlora": [{"method": {"rank_tiers": {"4": 0.3, "8": 0.5, "16": 0.2}}}],  # shipped: 8/16 at 50/50 %
    "fedkseed": [{"train": {"lr": 0.03}}],  # shipped: 0.01
    "scaffold": [{"train": {"lr": lr}} for lr in (0.1, 0.5)],  # plain local SGD; shipped: 0.2
}
VARIANTS = {"fedavg-exact": ("fedavg", {"method": {"lora_aggregation": "exact"}})}
# The benchmark samples 5 clients per round: Krum's rules tolerate f = 1 there (their recipes' f = 2 needs 7).
FITTED = {"krum": {"method": {"f": 1}}, "multi-krum": {"method": {"f": 1, "m": 4}}}
UNFIT = {"bulyan": "needs n ≥ 4f + 3 = 7 clients per round for f = 1; the benchmark samples 5 (see the Byzantine table)"}
PERSONAL = "final_personal_accuracy"


def row_keys() -> dict[str, tuple[str, dict]]:
    """Every row: key -> (method, overlay); registered methods in name order, then variants."""
    from strategies import available_methods

    newest = ["fedsa-lora", "fedex-lora", "fedsvd"]  # last, after the established methods
    names = ["fedavg", *(m for m in available_methods() if m != "fedavg" and m not in newest)]  # FedAvg first
    names += [m for m in newest if m in available_methods()]
    rows = {m: (m, FITTED.get(m, {})) for m in names}
    rows.update(VARIANTS)
    return rows


def sweep_keys(method: str) -> list[str]:
    """The run keys of `method`'s sweep points."""
    return [f"{method}@{i}" for i in range(len(SWEEPS.get(method, [])))]


def describe(overlay: dict) -> str:
    """A short `key=value` text of an overlay."""
    parts = []
    for table in overlay.values():
        for k, v in table.items():
            v = "/".join(f"{r}:{s:g}" for r, s in v.items()) if isinstance(v, dict) else f"{v:g}" if isinstance(v, float) else v
            parts.append(f"{k}={v}")
    return ", ".join(parts)


def run(key: str, method: str, overlay: dict, out: Path, extra: list[str]) -> dict:
    """Run `method` with `overlay` on the benchmark; store and return its figures."""
    from fedpeft.app.simulate import simulate
    from fedpeft.rundir import RunDir

    overrides = [f'output.dir="{out / "runs"}"', f'name="{key.replace("@", "-")}"', "output.checkpoint_every=0", *extra]
    cfg = bench_config(method, overlay, overrides)
    summary = simulate(cfg)
    rows = RunDir(Path(summary["run_dir"])).metrics()
    result = {"key": key, "method": method, "overlay": overlay, "overrides": overrides,
              "accuracy": [r["accuracy"] for r in rows if "accuracy" in r],
              "personal": [r.get("personal_accuracy") for r in rows],
              "bytes_down": sum(r.get("bytes_down", 0) for r in rows),
              "bytes_up": sum(r.get("bytes_up", 0) for r in rows),
              "client_rounds": sum(r.get("clients", 0) for r in rows),
              PERSONAL: summary.get(PERSONAL), "wall_s": summary["wall_s"], "run_dir": summary["run_dir"]}
    (out / f"{key}.json").write_text(json.dumps(result, indent=1))
    return result


def load(out: Path, key: str) -> dict | None:
    """A finished run's figures, or None."""
    p = out / f"{key}.json"
    return json.loads(p.read_text()) if p.is_file() else None


def candidates(out: Path, key: str) -> list[dict]:
    """The finished runs of row `key`: its shipped options first, then its finished sweep points."""
    return [r for k in (key, *sweep_keys(key)) if (r := load(out, k))]


def rounds_to(acc: list[float], target: float) -> str:
    """The first round whose accuracy reaches `target`, or '–'."""
    return next((str(i) for i, a in enumerate(acc) if a >= target), "–")


def shipped_options(method: str) -> dict:
    """The method-table overlay of `method`'s shipped recipe (what its row runs before any sweep)."""
    from runlist import method_overlay

    overlay = method_overlay(method)
    return {t: {k: v for k, v in d.items() if k != "name"} for t, d in overlay.items() if t in ("method", "train")}


def table(out: Path) -> str:
    """Markdown table of every finished row (its best run), against FedAvg-LoRA's final accuracy."""
    rows = row_keys()
    done = {k: c for k in rows if (c := candidates(out, k))}
    unfit = [f"| `{k}` | not run: {why} | – | – | – | – | – |" for k, why in UNFIT.items() if k in rows]
    if not done:
        return f"no finished runs in {out}"
    base = done["fedavg"][0] if "fedavg" in done else None
    target = 0.9 * base["accuracy"][-1] if base else None
    lines = [("| method | options: chosen (final accuracy of each value tried) | final accuracy | best | "
              "vs FedAvg (points, final) | rounds to 90 % of FedAvg's final | KiB per client per round (down + up) |"),
             "|---|---|---|---|---|---|---|"]
    for key, runs in done.items():
        r = max(runs, key=lambda x: x["accuracy"][-1])
        acc = r["accuracy"]
        final = f"{acc[-1]:.3f}" + (f" ({r[PERSONAL]:.3f} personal)" if r.get(PERSONAL) is not None else "")
        labels = [describe(merged(shipped_options(rows[key][0]), runs[0]["overlay"]))]
        labels += [describe(x["overlay"]) for x in runs[1:]]
        chosen = labels[runs.index(r)]
        tried = "; ".join(f"{t}: {x['accuracy'][-1]:.3f}" for t, x in zip(labels, runs)) if len(runs) > 1 else ""
        opts = (chosen or "–") + (f" ({tried})" if tried else "")
        gap = f"{100 * (acc[-1] - base['accuracy'][-1]):+.1f}" if base else "–"
        per = max(r["client_rounds"], 1)
        lines.append(f"| `{key}` | {opts} | {final} | {max(acc):.3f} | {gap} | "
                     f"{rounds_to(acc, target) if target else '–'} | "
                     f"{r['bytes_down'] / per / KIB:.1f} + {r['bytes_up'] / per / KIB:.1f} |")
    return "\n".join(lines + unfit)


def main(argv: list[str] | None = None) -> int:
    """Run the selected rows with their shipped options, then their sweeps, then print the table."""
    rows = row_keys()
    ap = comparison_parser(__doc__, rows, ROOT / "runs" / "method-table")
    ap.add_argument("--no-sweeps", action="store_true", help="run only the rows with their shipped options")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.table:
        keys = [k.strip() for k in args.only.split(",") if k.strip()]
        unknown = [k for k in keys if k not in rows]
        if unknown:
            ap.error(f"unknown row(s) {unknown} (known: {', '.join(rows)})")
        jobs = [(k, *rows[k]) for k in keys if k not in UNFIT]
        if not args.no_sweeps:
            jobs += [(sk, rows[k][0], merged(rows[k][1], point)) for k in keys
                     for sk, point in zip(sweep_keys(k), SWEEPS.get(k, []))]
        for key, method, overlay in jobs:
            if load(args.out, key):  # finished in an earlier invocation into the same folder
                continue
            r = run(key, method, overlay, args.out, args.extra)
            print(f"{key} ({describe(overlay) or 'shipped options'}): final {r['accuracy'][-1]:.3f}, "
                  f"best {max(r['accuracy']):.3f} ({r['wall_s']:.0f} s)", flush=True)
    print(table(args.out))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
