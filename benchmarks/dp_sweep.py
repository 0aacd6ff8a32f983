"""Accuracy vs ε on a recipe (default: the default task): a no-DP reference, sample-level DP-SGD at several
target ε, and user-level DP at several target ε. Prints a markdown table; heavy (one full run per point).

    python benchmarks/dp_sweep.py --targets 1,4,8 --user-targets 8 --out dp_sweep.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from fedpeft.app.recipe import load
from fedpeft.env import quiet_libraries, set_offline_env
from fedpeft.app.simulate import simulate

ROOT = Path(__file__).resolve().parents[1]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def points(args: argparse.Namespace) -> list[tuple[str, str, list[str]]]:
    """(level, setting, overrides) of every run of the sweep."""
    out = [("none", "no DP", [])]
    out += [("sample", f"target ε = {t:g}", ["dp.enabled=true", f"dp.target_epsilon={t}"]) for t in args.targets]
    out += [("user", f"target ε = {t:g}, C = {args.user_clip:g}",
             ["dp.user.enabled=true", f"dp.user.target_epsilon={t}", f"dp.user.clipping_norm={args.user_clip}"])
            for t in args.user_targets]
    return out


def run_point(recipe: Path, overrides: list[str], out_dir: str) -> dict:
    """One simulation; its summary."""
    cfg = load(recipe, [*overrides, f'output.dir="{out_dir}"'])
    return simulate(cfg)


def row(level: str, setting: str, s: dict) -> dict:
    """The figures of one run that go in the table."""
    eps = s.get("epsilon_max") if level == "sample" else s.get("user_epsilon") if level == "user" else None
    nm = s.get("user_noise_multiplier") if level == "user" else None
    return {"level": level, "setting": setting, "epsilon": eps, "user_noise_multiplier": nm, "epsilon_median": s.get("epsilon_median"),
            "final_accuracy": s["final_accuracy"], "best_accuracy": s["best_accuracy"], "wall_s": s["wall_s"],
            "run_dir": s["run_dir"]}


def table(rows: list[dict]) -> str:
    """A markdown table of the sweep."""
    lines = ["| DP | setting | ε (sample: max over clients; user: run) | final accuracy | best accuracy | wall |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        eps = "∞ (no DP)" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
        lines.append(f"| {r['level']} | {r['setting']} | {eps} | {r['final_accuracy']:.4f} | "
                     f"{r['best_accuracy']:.4f} | {r['wall_s']:.0f} s |")
    return "\n".join(lines)


def main() -> None:
    """Run the sweep and print the table."""
    set_offline_env()
    quiet_libraries()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", type=Path, default=ROOT / "simulations" / "default.toml")
    ap.add_argument("--rounds", type=int, default=0, help="override sim.rounds (0 = the recipe's)")
    ap.add_argument("--targets", type=_floats, default=[1.0, 4.0, 8.0], help="sample-level target ε values")
    ap.add_argument("--user-targets", type=_floats, default=[8.0], help="user-level target ε values")
    ap.add_argument("--user-clip", type=float, default=1.0, help="user-level clipping norm")
    ap.add_argument("--set", action="append", default=[], help="extra override for every run, key=value")
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    ap.add_argument("--runs-dir", default="", help="where run directories go (default: a temp dir)")
    args = ap.parse_args()
    common = [*args.set, *([f"sim.rounds={args.rounds}"] if args.rounds else [])]
    out_dir = args.runs_dir or tempfile.mkdtemp(prefix="dp-sweep-")
    rows = []
    for level, setting, overrides in points(args):
        s = run_point(args.recipe, [*common, *overrides], out_dir)
        rows.append(row(level, setting, s))
        print(f"{level:6s} {setting:24s} ε={rows[-1]['epsilon']} acc={s['final_accuracy']:.4f} "
              f"({s['wall_s']:.0f} s)", file=sys.stderr, flush=True)
        if args.out:
            args.out.write_text(json.dumps(rows, indent=1))
    print(f"recipe {args.recipe.name}, overrides {common or 'none'}")
    print(table(rows))


if __name__ == "__main__":
    main()
