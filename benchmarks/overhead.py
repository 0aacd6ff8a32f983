"""fedpeft against a plain loop doing the same work: what the platform costs on top of its clients' compute.

    python benchmarks/overhead.py simulations/smoke.toml --set sim.num_clients=1000 \\
        --set sim.clients_per_round=50 --set sim.rounds=5 --set data.builtin.num_train=20000
    python benchmarks/overhead.py simulations/default.toml            # the default workload (~10 min)
    python benchmarks/overhead.py ... --run-dir runs/smoke-…          # reuse a finished fedpeft run

First `fedpeft simulate` runs the recipe (whole command timed; per-round times from its
`metrics.jsonl`). Then the plain loop repeats the same work with no Flower, no Ray and no
message serialization: the same clients per round (read from the run's `comm.csv`), the same
batches from the same seeds (the project's own data preparation, `train_batches` and
optimizer), the same local steps, the same example-weighted mean and the same server evaluation,
on `sim.num_cpus` worker processes (2 by default) with one torch thread each, at the niceness Ray gives
its workers (15). Only first-order
methods without codecs or DP are reproduced (FedAvg over the whole adapter).

Prints both wall times, per-round times, the ratio and the per-client overhead in ms
(fedpeft's extra wall time over rounds 1..R divided by the round trips it ran).
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from fedpeft.env import quiet_libraries, set_offline_env

set_offline_env()
quiet_libraries()

ROOT = Path(__file__).resolve().parents[1]

_W: dict = {}  # one worker's config, task and model


def _init_worker(cfg_json: str, task_dir: str) -> None:
    import torch

    torch.set_num_threads(1)
    # Ray runs fedpeft's client workers at niceness 15 (its `worker_niceness` default): the plain loop's
    # workers take the same, so both compete alike with the driver and anything else on the machine.
    os.nice(max(int(os.environ.get("RAY_worker_niceness", "15")) - os.nice(0), 0))
    quiet_libraries()
    from fedpeft.config import Config
    from fedpeft.data import open_prepared
    from fedpeft.models import build_model

    cfg = Config.from_json(cfg_json)
    task = open_prepared(task_dir)
    _W.update(cfg=cfg, task=task, model=build_model(cfg, task.num_labels))


def _train_client(job: tuple) -> tuple:
    """One client round: exactly what fedpeft's first-order trainer does, minus the messages."""
    import torch

    from clients.local_steps import make_optimizer
    from fedpeft.adapters import adapter_state, load_adapter_state
    from fedpeft.data.prepared import train_batches
    from fedpeft.seeding import derive_seed, rng

    rnd, cid, state = job
    cfg, task, model = _W["cfg"], _W["task"], _W["model"]
    load_adapter_state(model, {k: torch.from_numpy(v) for k, v in state.items()})
    params = [p for p in model.parameters() if p.requires_grad]
    ds = task.client_dataset(cid)
    torch.manual_seed(derive_seed(cfg.sim.seed, rnd, cid, "dropout"))
    opt = make_optimizer(params, cfg.train)
    batches = train_batches(ds, cfg.train.batch_size, rng(cfg.sim.seed, rnd, cid, "batches"), task.pad_token_id,
                            steps=cfg.train.local_steps if cfg.train.local_epochs == 0 else 0,
                            epochs=cfg.train.local_epochs)
    model.train()
    loss_sum, steps = 0.0, 0
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        if cfg.train.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_sum += float(loss.detach())
        steps += 1
    model.eval()
    return {k: v.numpy() for k, v in adapter_state(model).items()}, len(ds), loss_sum / max(steps, 1)


def plain_loop(cfg, sampled: dict[int, list[int]], workers: int) -> dict:
    """The same rounds without Flower or Ray: returns whole-run and per-round wall times."""
    t_start = time.perf_counter()
    import numpy as np
    import torch

    from fedpeft.adapters import adapter_state, load_adapter_state
    from fedpeft.data import prepare
    from fedpeft.evaluation import evaluate
    from fedpeft.models import build_model

    tmp = Path(tempfile.mkdtemp(prefix="fedpeft-plain-"))
    task = prepare(cfg, tmp / "task")
    model = build_model(cfg, task.num_labels)
    ctx = mp.get_context("spawn")
    pool = ctx.Pool(workers, initializer=_init_worker, initargs=(cfg.to_json(), str(tmp / "task")))
    state = {k: v.numpy() for k, v in adapter_state(model).items()}
    evaluate(model, task.test, cfg.sim.eval_batch_size, task.pad_token_id)  # round 0
    rounds, accs = [], []
    t_rounds = time.perf_counter()
    for rnd in sorted(sampled):
        t0 = time.perf_counter()
        results = pool.map(_train_client, [(rnd, cid, state) for cid in sampled[rnd]], chunksize=1)
        total = sum(n for _, n, _ in results)
        state = {k: sum(s[k].astype(np.float64) * n for s, n, _ in results) / total for k in state}
        state = {k: v.astype(np.float32) for k, v in state.items()}
        load_adapter_state(model, {k: torch.from_numpy(v) for k, v in state.items()})
        accs.append(evaluate(model, task.test, cfg.sim.eval_batch_size, task.pad_token_id)["accuracy"])
        rounds.append(time.perf_counter() - t0)
    rounds_s = time.perf_counter() - t_rounds
    pool.close()
    pool.join()
    return {"whole_s": time.perf_counter() - t_start, "rounds_s": rounds_s, "round_s": rounds, "accuracy": accs}


def run_fedpeft(recipe: str, overrides: list[str], out: Path) -> tuple[Path, float]:
    cmd = [str(Path(sys.executable).parent / "fedpeft"), "simulate", recipe, *sum((["--set", o] for o in overrides), []),
           "--set", f"output.dir={out}"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    whole = time.perf_counter() - t0
    (run_dir,) = sorted(out.iterdir())[-1:]
    return run_dir, whole


def fedpeft_figures(run_dir: Path) -> dict:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    sampled: dict[int, list[int]] = defaultdict(list)
    for r in csv.DictReader((run_dir / "comm.csv").open()):
        if r["direction"] == "up" and r["record"] == "_envelope" and int(r["round"]) > 0:
            sampled[int(r["round"])].append(int(r["client_id"]))
    rounds = [r["round_s"] for r in rows if r["round"] > 0]
    return {"sampled": {k: sorted(v) for k, v in sampled.items()}, "round_s": rounds, "rounds_s": sum(rounds),
            "accuracy": [r["accuracy"] for r in rows if r["round"] > 0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--run-dir", help="a finished fedpeft run of this recipe to compare against (skips running it)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()

    from fedpeft.app.recipe import load

    cfg = load(args.recipe, args.overrides)
    if args.run_dir:
        run_dir, whole = Path(args.run_dir), json.loads((Path(args.run_dir) / "summary.json").read_text())["wall_s"]
        whole_note = "(server wall time from summary.json; the command was not timed)"
    else:
        run_dir, whole = run_fedpeft(args.recipe, args.overrides, Path(tempfile.mkdtemp(prefix="fedpeft-bench-")))
        whole_note = ""
    fp = fedpeft_figures(run_dir)
    workers = cfg.sim.num_cpus or os.cpu_count() or 1
    plain = plain_loop(cfg, fp["sampled"], workers)
    trips = sum(len(v) for v in fp["sampled"].values())
    steady = fp["round_s"][1:] or fp["round_s"]
    out = {
        "recipe": args.recipe, "overrides": args.overrides, "run_dir": str(run_dir), "workers": workers,
        "fedpeft_whole_s": whole, "plain_whole_s": plain["whole_s"],
        "fedpeft_rounds_s": fp["rounds_s"], "plain_rounds_s": plain["rounds_s"],
        "fedpeft_round_s": fp["round_s"], "plain_round_s": plain["round_s"],
        "ratio_rounds": fp["rounds_s"] / plain["rounds_s"], "ratio_whole": whole / plain["whole_s"],
        "round1_over_steady": fp["round_s"][0] / (sum(steady) / len(steady)),
        "client_round_trips": trips,
        "overhead_ms_per_client": 1000 * (fp["rounds_s"] - plain["rounds_s"]) / max(trips, 1),
        "fedpeft_accuracy": fp["accuracy"], "plain_accuracy": plain["accuracy"],
    }
    print(f"workload: {args.recipe} {' '.join('--set ' + o for o in args.overrides)}")
    print(f"{'':28}{'fedpeft':>10}{'plain loop':>12}{'ratio':>8}")
    print(f"{'rounds 1..R (s)':28}{out['fedpeft_rounds_s']:10.1f}{out['plain_rounds_s']:12.1f}{out['ratio_rounds']:8.2f}")
    print(f"{'whole command (s)':28}{whole:10.1f}{plain['whole_s']:12.1f}{out['ratio_whole']:8.2f} {whole_note}")
    print("per round (s): fedpeft " + " ".join(f"{x:.2f}" for x in fp["round_s"])
          + " | plain " + " ".join(f"{x:.2f}" for x in plain["round_s"]))
    print(f"round 1 / mean steady round (fedpeft): {out['round1_over_steady']:.2f}")
    print(f"per-client overhead: {out['overhead_ms_per_client']:.1f} ms over {trips} client round trips")
    print("accuracy per round: fedpeft " + " ".join(f"{a:.3f}" for a in fp["accuracy"])
          + " | plain " + " ".join(f"{a:.3f}" for a in plain["accuracy"]))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
