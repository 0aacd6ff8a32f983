"""A central (no federation) sweep of FedKSeed's zeroth-order hyperparameters on SmolLM2-135M-Instruct.

    python benchmarks/fedkseed_sweep.py --threads 2 --seconds 40
    python benchmarks/fedkseed_sweep.py --threads 2 --seconds 40 --lr 3e-7 1e-5 --eps 5e-4 1e-3 --batch 1 4

Builds the embedded causal model and the built-in instruction task exactly as
`simulations/llm-fedkseed.toml` does (one client, iid), snapshots every weight, then for each
setting (lr, eps, batch) restores the snapshot and runs local FedKSeed steps as
clients/zeroth_order.py does: `ZOStepper` over `tuned_parameters(model, "full")`, Gaussian
directions, step seeds drawn uniformly from a pool of K = 1024 (`seed_pool`, picked with the
client's own `rng(seed, round, cid, "zo-seeds")`), batches from `train_batches`. Afterwards it
measures the mean response-token loss on the first `--eval-examples` held-out examples
(`held_out_loss` over `eval_batches`); the starting loss is measured once on the snapshot.

Steps per setting: every setting gets the same wall time (`--seconds`) -- the per-step time of
each batch size is measured first (`--probe` steps, not counted) and turned into a fixed step
count, N_b = round(seconds / t_b), so settings of one batch size take identical steps over
identical batches and seeds (common random numbers); only lr and eps differ between them.
`--equal-examples` instead gives every batch size the same number of examples seen
(N_b = round(N_1 / b), N_1 from `--seconds`).

The markdown table gives, per setting: steps, examples seen, wall seconds of the steps, and the
held-out loss start -> end. The paper's setting (lr 3e-7, eps 5e-4, batch 1) and the current
recipe's (lr 1e-5, eps 1e-3, batch 4) run first, so a run cut short still has them.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from fedpeft.env import quiet_libraries, set_offline_env

set_offline_env()
quiet_libraries()

ROOT = Path(__file__).resolve().parents[1]
PAPER = (3e-7, 5e-4, 1)
RECIPE = (1e-5, 1e-3, 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lr", type=float, nargs="+", default=[3e-7, 3e-6, 1e-5, 3e-5])
    ap.add_argument("--eps", type=float, nargs="+", default=[5e-4, 1e-3])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--seconds", type=float, default=40.0, help="wall seconds of ZO steps per setting")
    ap.add_argument("--equal-examples", action="store_true",
                    help="same examples seen per setting (batch 1's step count from --seconds) instead of same wall time")
    ap.add_argument("--steps", type=int, default=0, help="fixed steps per setting (overrides --seconds)")
    ap.add_argument("--probe", type=int, default=3, help="steps timed per batch size to size the runs")
    ap.add_argument("--round", type=int, default=1,
                    help="round index of the client's seed-pick and batch generators (another value: another draw)")
    ap.add_argument("--num-seeds", type=int, default=1024, help="K, the candidate seed pool")
    ap.add_argument("--eval-examples", type=int, default=64)
    ap.add_argument("--eval-batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="*", default=None, help="settings as lr,eps,batch (e.g. 3e-7,5e-4,1)")
    ap.add_argument("--json", type=Path, default=None, help="also append each finished row to this JSON-lines file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from fedpeft.causal_lm import batch_loss, held_out_loss
    from fedpeft.data.prepared import eval_batches, prepare, train_batches
    from fedpeft.models import build_model
    from fedpeft.precision import compute
    from fedpeft.app.recipe import load
    from fedpeft.seeding import rng
    from fedpeft.methods.zo import ZOStepper, seed_pool, tuned_parameters

    t0 = time.perf_counter()
    cfg = load(ROOT / "simulations" / "llm-fedkseed.toml",
               ["sim.num_clients=1", "sim.clients_per_round=1", "partition.type=iid"])
    task = prepare(cfg, Path(tempfile.mkdtemp(prefix="fedpeft-fedkseed-sweep-")))
    model = build_model(cfg, 0)
    model.eval()  # no dropout: both passes of a step must see the same function
    device = next(model.parameters()).device
    direction = cfg.method.options()["direction"]
    params = tuned_parameters(model, "full")
    snapshot = [p.clone() for p in params]
    buffer = ZOStepper.new_buffer(params)
    pool = seed_pool(cfg.sim.seed, args.num_seeds)
    test = task.test.select(range(min(args.eval_examples, len(task.test))))
    print(f"# setup {time.perf_counter() - t0:.1f} s: {sum(p.numel() for p in params) / 1e6:.1f} M tuned weights, "
          f"{len(task.train)} train / {len(test)} held-out examples, direction {direction}, K={args.num_seeds}, "
          f"threads {torch.get_num_threads()}", flush=True)

    def restore() -> None:
        for p, s in zip(params, snapshot):
            p.copy_(s)

    def evaluate() -> float:
        with torch.inference_mode(), compute(cfg.train.precision, device):
            return held_out_loss(model, eval_batches(test, args.eval_batch, task.pad_token_id))["loss"]

    def run_steps(lr: float, eps: float, batch: int, steps: int) -> tuple[float, list[float]]:
        """`steps` ZO steps from the snapshot, as the client takes them; (wall s, mean of L+ and L- per step)."""
        restore()
        picks = rng(cfg.sim.seed, args.round, 0, "zo-seeds")  # the client's seed picks (client 0)
        batches = train_batches(task.train, batch, rng(cfg.sim.seed, args.round, 0, "batches"), task.pad_token_id,
                                steps=steps)
        stepper = ZOStepper(params, direction, buffer=buffer)
        losses = []
        t = time.perf_counter()
        with torch.inference_mode(), compute(cfg.train.precision, device):
            for b in batches:
                b = {k: v.to(device) for k, v in b.items()}
                i = int(picks.choice(args.num_seeds))
                plus, minus, _ = stepper.step(int(pool[i]), eps, lr, partial(batch_loss, model, b))
                losses.append((plus + minus) / 2)
            stepper.flush()  # keep the last step's update: the model is evaluated after it
        return time.perf_counter() - t, losses

    t = time.perf_counter()
    start = evaluate()
    eval_s = time.perf_counter() - t
    print(f"# held-out loss at start {start:.4f} ({eval_s:.1f} s per evaluation)", flush=True)

    if args.only:
        settings = [tuple(float(x) for x in s.split(",")) for s in args.only]
        settings = [(lr, eps, int(b)) for lr, eps, b in settings]
    else:
        settings = [(lr, eps, b) for b in args.batch for lr in args.lr for eps in args.eps]
        settings = sorted(set(settings), key=lambda s: (s != PAPER, s != RECIPE, s[2], s[0], s[1]))

    steps_for: dict[int, int] = {}
    step_s: dict[int, float] = {}
    for b in sorted({s[2] for s in settings}) if not args.steps else []:  # fixed steps: no sizing probe
        wall, _ = run_steps(1e-9, 1e-3, b, args.probe + 1)
        step_s[b] = wall / (args.probe + 1)
    for b in sorted({s[2] for s in settings}):
        if args.steps:
            steps_for[b] = args.steps
        elif args.equal_examples:
            n1 = args.seconds / step_s.get(1, step_s[b] / b)
            steps_for[b] = max(1, round(n1 / b))
        else:
            steps_for[b] = max(1, round(args.seconds / step_s[b]))
    fwd = []
    with torch.inference_mode(), compute(cfg.train.precision, device):
        for b in train_batches(task.train, 1, np.random.default_rng(0), task.pad_token_id, steps=4):
            t = time.perf_counter()
            batch_loss(model, b)
            fwd.append(time.perf_counter() - t)
    print(f"# batch-1 forward {float(np.median(fwd[1:])):.2f} s (median of {len(fwd) - 1})", flush=True)
    mode = ("fixed steps" if args.steps else "equal examples seen" if args.equal_examples else "equal wall time")
    print("# step time " + (", ".join(f"batch {b}: {s:.2f} s" for b, s in sorted(step_s.items())) or "not probed")
          + f"; round {args.round} draw; {mode}: " + ", ".join(f"batch {b}: {n} steps" for b, n in sorted(steps_for.items())), flush=True)

    rows = []
    for lr, eps, b in settings:
        n = steps_for[b]
        wall, losses = run_steps(lr, eps, b, n)
        end = evaluate()
        tag = " (paper)" if (lr, eps, b) == PAPER else " (recipe)" if (lr, eps, b) == RECIPE else ""
        row = {"lr": lr, "eps": eps, "batch": b, "steps": n, "examples": n * b, "wall_s": wall, "start": start,
               "end": end, "train_first": float(np.mean(losses[: max(1, n // 5)])),
               "train_last": float(np.mean(losses[-max(1, n // 5):])), "tag": tag.strip(" ()")}
        rows.append(row)
        print(f"# lr {lr:g} eps {eps:g} batch {b}{tag}: {n} steps {wall:.1f} s, held-out {start:.4f} -> {end:.4f}",
              flush=True)
        if args.json:
            with args.json.open("a") as f:
                f.write(json.dumps(row) + "\n")
    restore()

    print()
    print("| setting | steps | examples seen | wall s | held-out loss start → end | Δ | train loss first → last fifth |")
    print("|---|---:|---:|---:|---|---:|---|")
    for r in rows:
        tag = f" ({r['tag']})" if r["tag"] else ""
        delta = r["end"] - r["start"]
        end = f"{r['end']:.4f}" if math.isfinite(r["end"]) else "nan"
        print(f"| lr {r['lr']:g}, eps {r['eps']:g}, batch {r['batch']}{tag} | {r['steps']} | {r['examples']} | "
              f"{r['wall_s']:.1f} | {r['start']:.4f} → {end} | {delta:+.4f} | "
              f"{r['train_first']:.3f} → {r['train_last']:.3f} |")
    finite = [r for r in rows if math.isfinite(r["end"])]
    if finite:
        best = min(finite, key=lambda r: r["end"])
        print(f"\nbest: lr {best['lr']:g}, eps {best['eps']:g}, batch {best['batch']} "
              f"({best['start']:.4f} → {best['end']:.4f}); total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
