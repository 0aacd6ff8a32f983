"""Same seed, same bytes: fingerprints of runs, to show a change left behaviour identical.

    python benchmarks/identity_check.py --out before.json          # before the change
    python benchmarks/identity_check.py --out after.json --compare before.json

Runs the default recipe as shipped and small variants of other method families, each through
`fedpeft simulate`, and records the sha256 of `comm.csv` (every message's bytes), of the final adapter
(`adapter/adapter_model.safetensors`) and of `metrics.jsonl` without its timing fields. `--compare`
exits 1 when any fingerprint differs and names which.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

SMALL = [
    "sim.num_clients=10",
    "sim.clients_per_round=3",
    "sim.rounds=2",
    "train.local_steps=2",
    "data.builtin.num_train=600",
    "data.builtin.num_test=100",
]

RUNS: dict[str, tuple[str, list[str]]] = {
    "default": ("simulations/default.toml", []),
    "scaffold": ("simulations/scaffold-mean-grad.toml", SMALL),  # the AdamW variant (scaffold.toml: plain SGD)
    "fedkseed": ("simulations/fedkseed.toml", SMALL),
    "dp-user": ("simulations/dp-user.toml", SMALL),
    "dp": ("simulations/dp.toml", SMALL),
    "pfedpara": ("simulations/pfedpara.toml", SMALL),
    "hetlora": ("simulations/hetlora.toml", SMALL),
    "codec-topk-ef": ("simulations/codec-topk-ef.toml", SMALL),
    "fedadam": ("simulations/fedadam.toml", SMALL),
    "krum": ("simulations/krum.toml", [*SMALL, "sim.clients_per_round=7"]),
}

TIMING = ("_s", "elapsed", "seconds")


def sha(data: bytes) -> str:
    """Hex sha256 of bytes."""
    return hashlib.sha256(data).hexdigest()


def metrics_digest(path: Path) -> str:
    """sha256 of metrics.jsonl with every timing field dropped (they differ run to run)."""
    rows = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        rows.append({k: v for k, v in row.items() if not k.endswith(TIMING)})
    return sha(json.dumps(rows, sort_keys=True).encode())


def fingerprint(recipe: str, overrides: list[str], out_dir: Path, name: str) -> dict[str, str]:
    """Run one recipe and return its fingerprints."""
    sets = [*overrides, f'output.dir="{out_dir}"', f'name="{name}"']
    cmd = [str(Path(sys.executable).with_name("fedpeft")), "simulate", recipe]
    for s in sets:
        cmd += ["--set", s]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name}: fedpeft simulate failed ({done.returncode}):\n{done.stderr[-3000:]}")
    (run_dir,) = sorted(out_dir.glob(f"{name}-2*"))  # name-<timestamp>, not name-suffix-<timestamp>
    adapter = run_dir / "adapter" / "adapter_model.safetensors"
    return {
        "comm.csv": sha((run_dir / "comm.csv").read_bytes()),
        "adapter": sha(adapter.read_bytes()) if adapter.exists() else "none",
        "metrics": metrics_digest(run_dir / "metrics.jsonl"),
    }


def main() -> None:
    """Fingerprint every run, optionally compare with an earlier file."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--compare", type=Path)
    ap.add_argument("--only", nargs="*", choices=sorted(RUNS))
    args = ap.parse_args()
    result: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory(prefix="fedpeft-identity-") as tmp:
        for name in args.only or RUNS:
            recipe, overrides = RUNS[name]
            result[name] = fingerprint(recipe, overrides, Path(tmp), name)
            print(name, " ".join(f"{k}={v[:12]}" for k, v in result[name].items()), flush=True)
    args.out.write_text(json.dumps(result, indent=1))
    if args.compare:
        before = json.loads(args.compare.read_text())
        # A fingerprint in --compare may be the 12-digit prefix this script prints.
        differ = [f"{n}.{k}" for n, fp in result.items() for k, v in fp.items()
                  if not v.startswith(before.get(n, {}).get(k) or "missing")]
        print("identical" if not differ else "DIFFERENT: " + ", ".join(differ))
        sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
