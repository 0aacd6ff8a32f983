"""10,000 clients against 1,000 at the same per-round load: memory, client-state disk use, round time.

    python benchmarks/scale.py                              # simulations/scale-10k.toml, 5 rounds
    python benchmarks/scale.py --rounds 3 --set train.local_steps=2

Runs `fedpeft simulate simulations/scale-10k.toml` (10,000 clients, 100 per round, error-feedback
top-k uploads and sample-level DP accountants: both keep per-client state on disk), then the same
recipe with 1,000 clients and a tenth of the training rows (the same examples per client, clients
per round, local steps and payloads). For each it prints the peak PSS of the whole process tree
(driver, Ray daemons and workers; sampled from /proc every 0.25 s), the disk used by the client
state store, and the mean round time over rounds 2..R (round 1 includes worker start).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            out.setdefault(ppid, []).append(int(d.name))
    return out


def tree_pss(root: int) -> int:
    """Sum of PSS (bytes) over `root` and all its descendants."""
    kids, todo, total, seen = _children(), [root], 0, set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        todo.extend(kids.get(pid, []))
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            pass
    return total


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def run(recipe: str, overrides: list[str], out: Path) -> dict:
    cmd = [str(Path(sys.executable).parent / "fedpeft"), "simulate", recipe,
           *sum((["--set", o] for o in overrides), []), "--set", f"output.dir={out}"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    peak = {"pss": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak["pss"] = max(peak["pss"], tree_pss(proc.pid))
            time.sleep(0.25)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    rc = proc.wait()
    done.set()
    th.join()
    if rc:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {rc}")
    (run_dir,) = sorted(out.iterdir())[-1:]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = [r["round_s"] for r in rows if r["round"] > 0]
    steady = rounds[1:] or rounds
    state = run_dir / "client_state"
    return {"run_dir": str(run_dir), "whole_s": time.perf_counter() - t0, "peak_pss_bytes": peak["pss"],
            "client_state_bytes": du(state), "client_state_files": sum(1 for _ in state.glob("*")) if state.is_dir() else 0,
            "round_s": rounds, "steady_round_s": sum(steady) / len(steady)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(ROOT / "simulations/scale-10k.toml"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from fedpeft.app.recipe import load

    cfg = load(args.recipe, args.overrides)
    small = max(cfg.sim.num_clients // 10, cfg.sim.clients_per_round)
    rows_small = cfg.data.builtin.num_train * small // cfg.sim.num_clients
    base = [*args.overrides, f"sim.rounds={args.rounds}"]
    out = Path(tempfile.mkdtemp(prefix="fedpeft-scale-"))
    big = run(args.recipe, base, out / "big")
    little = run(args.recipe, [*base, f"sim.num_clients={small}", f"data.builtin.num_train={rows_small}"], out / "small")
    GiB = 1024 ** 3
    print(f"{'':34}{cfg.sim.num_clients:>12,}{small:>12,}  clients")
    print(f"{'peak PSS, process tree (GiB)':34}{big['peak_pss_bytes'] / GiB:12.2f}{little['peak_pss_bytes'] / GiB:12.2f}")
    print(f"{'client state store (MiB, files)':34}{big['client_state_bytes'] / 2**20:12.1f}{little['client_state_bytes'] / 2**20:12.1f}"
          f"  ({big['client_state_files']} / {little['client_state_files']} files)")
    print(f"{'mean round 2..R (s)':34}{big['steady_round_s']:12.2f}{little['steady_round_s']:12.2f}"
          f"  ({100 * (big['steady_round_s'] / little['steady_round_s'] - 1):+.1f} %)")
    print(f"{'whole command (s)':34}{big['whole_s']:12.1f}{little['whole_s']:12.1f}")
    print("rounds (s): " + " ".join(f"{x:.2f}" for x in big["round_s"]) + " | " + " ".join(f"{x:.2f}" for x in little["round_s"]))
    if args.json:
        Path(args.json).write_text(json.dumps({"big": big, "small": little}, indent=2))


if __name__ == "__main__":
    main()
