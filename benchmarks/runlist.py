"""The command line every comparison benchmark shares: pick runs by key, run them in order, print the table."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from pathlib import Path


def comparison_parser(doc: str, known: Mapping[str, object], out: Path, only: str = "") -> argparse.ArgumentParser:
    """`--out`, `--only`, `--set` and `--table`, described by the benchmark's own docstring."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=out)
    ap.add_argument("--only", default=only or ",".join(known), help=f"comma-separated subset of {', '.join(known)}")
    ap.add_argument("--set", action="append", default=[], dest="extra", help="extra key=value override for all")
    ap.add_argument("--table", action="store_true", help="only print the table of finished runs")
    return ap


def run_selected(ap: argparse.ArgumentParser, args: argparse.Namespace, known: Mapping[str, object],
                 run_one: Callable[[str], str]) -> None:
    """Run each selected key (unless `--table`), printing the line `run_one` returns as each finishes."""
    args.out.mkdir(parents=True, exist_ok=True)
    if args.table:
        return
    keys = [k.strip() for k in args.only.split(",") if k.strip()]
    unknown = [k for k in keys if k not in known]
    if unknown:
        ap.error(f"unknown run(s) {unknown} (known: {', '.join(known)})")
    for key in keys:
        print(run_one(key), flush=True)


def stored_main(doc: str, known: Mapping[str, object], out: Path, run: Callable[[str, Path, list[str]], dict],
                line: Callable[[str, dict], str], table: Callable[[Path], str], argv: list[str] | None = None) -> int:
    """A benchmark that stores each run as <out>/<key>.json: run the selected ones not finished yet, print the table."""
    ap = comparison_parser(doc, known, out)
    args = ap.parse_args(argv)

    def one(key: str) -> str:
        if (args.out / f"{key}.json").is_file():
            return f"{key}: finished earlier"
        return line(key, run(key, args.out, args.extra))

    run_selected(ap, args, known, one)
    print(table(args.out))
    return 0


# ----- runs on the method benchmark (simulations/bench.toml) ------------------------------------
ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "simulations" / "bench.toml"
METHOD_SECTIONS = ("method", "adapter", "train")  # what a method's recipe may change; data, clients and rounds are the bench's


def _diff(recipe: dict, reference: dict) -> dict:
    """The entries of `recipe` that differ from `reference` (nested tables compared key by key)."""
    out = {}
    for key, value in recipe.items():
        if isinstance(value, dict) and isinstance(reference.get(key), dict):
            sub = _diff(value, reference[key])
            if sub:
                out[key] = sub
        elif reference.get(key, object()) != value:
            out[key] = value
    return out


def merged(base: dict, extra: dict) -> dict:
    """`base` with `extra` laid over it: recipe tables merged key by key, each key's value replaced whole."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = {**out[key], **value} if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def method_overlay(method: str) -> dict:
    """What method `method`'s shipped recipe changes against the default run, in the method, adapter and train tables.

    The method itself is always set; a method without a recipe of its own runs with its default options.
    """
    from fedpeft.recipe_file import read_recipe

    default = read_recipe(ROOT / "simulations" / "default.toml")
    path = ROOT / "simulations" / f"{method}.toml"
    overlay = {}
    if method != "fedavg" and path.is_file():
        recipe = read_recipe(path)
        overlay = {s: d for s in METHOD_SECTIONS if s in recipe and (d := _diff(recipe[s], default.get(s, {})))}
    if "method" in overlay and overlay["method"].get("name", method) != method:
        raise ValueError(f"simulations/{method}.toml runs method '{overlay['method']['name']}', not '{method}'")
    return merged(overlay, {"method": {"name": method}})


def bench_config(method: str, extra: dict | None = None, overrides: list[str] | None = None):
    """The validated config of `method` on the method benchmark: bench.toml + the method's recipe + `extra`."""
    from fedpeft.app.recipe import validate
    from fedpeft.recipe_file import apply_overrides, read_recipe

    bench, overlay = read_recipe(BENCH), method_overlay(method)
    if overlay.get("adapter", {}).get("type", bench["adapter"]["type"]) != bench["adapter"]["type"]:
        # another adapter type has its own keys: the method's recipe gives the whole adapter table
        bench = {**bench, "adapter": read_recipe(ROOT / "simulations" / f"{method}.toml")["adapter"]}
    raw = merged(merged(bench, overlay), extra or {})
    if overrides:
        raw = apply_overrides(raw, overrides)
    return validate(raw)
