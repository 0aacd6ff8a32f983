"""Wire check: bytes in the ledger vs bytes counted on the wire, for one real deployment on loopback.

    python benchmarks/wire_check.py [RECIPE] [--set key=value ...] [--out DIR] [--tls]

Starts a SuperLink and one SuperNode per client of the recipe; the SuperNodes dial a counting TCP relay
in front of the SuperLink. Without `--tls` (the measurement the ledger is checked against) the relay
follows the Fleet API's HTTP exchanges and splits the bytes into message objects (what the ledger
charges), their protobuf wrapping, HTTP headers and the other Fleet calls. With `--tls` (SuperNode
authentication on too) it counts TLS records, to report handshake and record framing. Prints a
Markdown table and writes `wire-check.json` under `--out`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fedpeft.env import quiet_libraries, set_offline_env

set_offline_env()
quiet_libraries()

from fedpeft.app.deploy.run import deploy_recipe  # noqa: E402
from fedpeft.app.deploy.wirecheck import compare_with_ledger  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SET = ["sim.num_clients=3", "sim.clients_per_round=3", "sim.rounds=2", "train.local_steps=3",
               "data.builtin.num_train=300", "data.builtin.num_test=60", "output.checkpoint_every=0"]


def main() -> int:
    """Run the deployment through the relay and print the comparison."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe", nargs="?", default=str(ROOT / "simulations" / "smoke.toml"))
    ap.add_argument("--set", dest="set_", action="append", default=None,
                    help="recipe override (default: 3 clients, 2 rounds, 3 local steps, small data)")
    ap.add_argument("--out", default=None, help="deployment folder (default: runs/wire-check-<timestamp>)")
    ap.add_argument("--tls", action="store_true", help="TLS + SuperNode auth on (reports TLS framing)")
    args = ap.parse_args()
    out = Path(args.out or f"runs/wire-check-{time.strftime('%Y%m%d-%H%M%S')}")
    overrides = DEFAULT_SET if args.set_ is None else args.set_
    t0 = time.perf_counter()
    res = deploy_recipe(Path(args.recipe), overrides, out, tls=args.tls, auth=args.tls, relay=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0 or res.run_dir is None:
        print(res.output[-3000:], file=sys.stderr)
        print(f"the run failed; logs in {res.log_dir}", file=sys.stderr)
        return 1
    figures = compare_with_ledger(res.wire, res.run_dir)
    figures["wall time s"] = round(wall, 1)
    figures["processes left running"] = len(res.alive_after)
    print(f"recipe {args.recipe} {' '.join(overrides)}; TLS {'on' if args.tls else 'off'}; run {res.run_dir}\n")
    print("| figure | value |\n|---|---|")
    for k, v in figures.items():
        print(f"| {k} | {v:,} |" if isinstance(v, int) else f"| {k} | {v} |")
    (out / "wire-check.json").write_text(json.dumps({"figures": figures, "wire": res.wire, "overrides": overrides,
                                                     "tls": args.tls, "run_dir": str(res.run_dir)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
