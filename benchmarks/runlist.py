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
