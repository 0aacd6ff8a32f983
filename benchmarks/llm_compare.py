"""The FedKSeed paper's question on a real LLM: LoRA FedAvg against exact LoRA, FFA-LoRA, top-k uploads, DP-SGD and FedKSeed.

Every run uses the embedded causal default (SmolLM2-135M-Instruct), the built-in instruction task,
the same 100 clients, sampling (10 per round) and rounds as `simulations/llm-default.toml`:

    fedavg            FedAvg over LoRA r=8 (llm-default.toml)
    lora-exact        exact LoRA aggregation (SVD of the mean B·A)
    ffa-lora          FFA-LoRA (A frozen, only B trained and sent)
    codec-topk        top-10 % uploads with error feedback (llm-codec-topk.toml)
    dp-sgd            sample-level DP-SGD through Opacus (llm-dp.toml)
    fedkseed-1024     FedKSeed over every weight, K = 1024 candidate seeds (llm-fedkseed.toml)
    fedkseed-4096     the same with K = 4096
    fedkseed-pro      FedKSeed-Pro (seed probabilities from their scalar gradients), K = 1024
    fedkseed-eq       FedKSeed over every weight at FedAvg's client compute: local steps scaled by the
                      measured ratio of a first-order LoRA step's wall time to a FedKSeed step's
                      (timed alternately; <out>/calibration.json)

    python benchmarks/llm_compare.py                 # all
    python benchmarks/llm_compare.py --only fedavg   # some
    python benchmarks/llm_compare.py --table         # the table of what has finished

Round 0 scores the pretrained model before any training (the zero-shot row of every run). Each
finished run is stored as <out>/<key>.json; the table is assembled from whatever has finished.
"""

from __future__ import annotations

import csv
import json
import sys
from collections import defaultdict
from pathlib import Path

from runlist import comparison_parser, run_selected  # benchmarks/ is the script's own folder

from fedpeft.ledger import KIB, MIB, format_bytes

ROOT = Path(__file__).resolve().parents[1]
RUNS = {  # key: (label, recipe, overrides)
    "fedavg": ("FedAvg, LoRA r=8", "llm-default.toml", []),
    "lora-exact": ("exact LoRA aggregation", "llm-default.toml", ['method.name="fedavg"',
                                                                  'method.lora_aggregation="exact"']),
    "ffa-lora": ("FFA-LoRA", "llm-default.toml", ['method.name="ffa-lora"']),
    "fedsa-lora": ("FedSA-LoRA (A shared, B personal)", "llm-default.toml", ['method.name="fedsa-lora"']),
    "fedex-lora": ("FedEx-LoRA (exact, residual in the frozen weights)", "llm-default.toml",
                   ['method.name="fedex-lora"']),
    "fedsvd": ("FedSVD (B trained, A re-orthonormalized by SVD)", "llm-default.toml", ['method.name="fedsvd"']),
    "codec-topk": ("FedAvg, top-10 % uploads + error feedback", "llm-codec-topk.toml", []),
    "dp-sgd": ("FedAvg + DP-SGD (Opacus)", "llm-dp.toml", []),
    "fedkseed-1024": ("FedKSeed, every weight, K=1024", "llm-fedkseed.toml", ["method.num_seeds=1024"]),
    "fedkseed-4096": ("FedKSeed, every weight, K=4096", "llm-fedkseed.toml", ["method.num_seeds=4096"]),
    "fedkseed-pro": ("FedKSeed-Pro, every weight, K=1024", "llm-fedkseed.toml", ['method.name="fedkseed-pro"',
                                                                                "method.num_seeds=1024"]),
    "fedkseed-eq": ("FedKSeed, every weight, K=1024, FedAvg's client compute", "llm-fedkseed.toml",
                    ["method.num_seeds=1024"]),
}


def client_bytes(run_dir: Path) -> tuple[float, int, int]:
    """Bytes one client sends + receives: mean per round, largest per round, largest over the whole run (comm.csv)."""
    per: dict[tuple[int, int], int] = defaultdict(int)
    whole: dict[int, int] = defaultdict(int)
    with (run_dir / "comm.csv").open() as f:
        for row in csv.DictReader(f):
            if int(row["round"]) > 0 and int(row["client_id"]) >= 0:
                per[(int(row["round"]), int(row["client_id"]))] += int(row["bytes"])
                whole[int(row["client_id"])] += int(row["bytes"])
    values = list(per.values()) or [0]
    return sum(values) / len(values), max(values), max(whole.values(), default=0)


def mean_train_s(rows: list[dict]) -> float:
    """Mean wall seconds of one client's local training over the run's rounds."""
    values = [r["client_train_s"] for r in rows if "client_train_s" in r]
    return sum(values) / len(values) if values else float("nan")


def step_seconds(repeats: int = 6) -> tuple[float, float]:
    """Median wall seconds of one first-order LoRA step (llm-default) and one FedKSeed step over every weight (llm-fedkseed).

    The two are timed alternately on the same batches, so a machine whose load drifts slows
    both alike; their ratio is what equal client compute needs.
    """
    import statistics
    import tempfile
    import time

    import numpy as np
    import torch

    from fedpeft.causal_lm import batch_loss
    from fedpeft.data.prepared import prepare, train_batches
    from fedpeft.models import build_model
    from fedpeft.app.recipe import load
    from fedpeft.methods.zo import ZOStepper, tuned_parameters

    cfg = load(ROOT / "simulations" / "llm-default.toml", ["sim.num_clients=1", "sim.clients_per_round=1",
                                                           "partition.type=iid"])
    task = prepare(cfg, Path(tempfile.mkdtemp(prefix="fedpeft-calibrate-")))
    model = build_model(cfg, 0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr)
    zo_cfg = load(ROOT / "simulations" / "llm-fedkseed.toml", [])
    every = tuned_parameters(model, "full")
    stepper = ZOStepper(every, zo_cfg.method.options()["direction"])
    zo_batches = list(train_batches(task.train, zo_cfg.train.batch_size, np.random.default_rng(1),
                                    task.pad_token_id, steps=repeats + 1))
    batches = list(train_batches(task.train, cfg.train.batch_size, np.random.default_rng(0), task.pad_token_id,
                                 steps=repeats + 1))
    fo, zo = [], []
    for i, b in enumerate(batches):
        t = time.perf_counter()
        model.train()
        batch_loss(model, b).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        fo.append(time.perf_counter() - t)
        t = time.perf_counter()
        model.eval()
        with torch.inference_mode():  # the clients' own step, at FedKSeed's batch size
            stepper.step(i, 1e-3, 1e-9, lambda zb=zo_batches[i]: batch_loss(model, zb))
        zo.append(time.perf_counter() - t)
    stepper.discard()
    return statistics.median(fo[1:]), statistics.median(zo[1:])  # the first of each warms caches up


def equal_compute_steps(out: Path, local_steps: int) -> int:
    """FedKSeed's local steps at FedAvg's client compute (from `step_seconds`, stored in <out>/calibration.json)."""
    path = out / "calibration.json"
    if not path.is_file():
        fo, zo = step_seconds()
        path.write_text(json.dumps({"first_order_step_s": fo, "zo_full_step_s": zo}))
    cal = json.loads(path.read_text())
    return max(1, round(local_steps * cal["first_order_step_s"] / cal["zo_full_step_s"]))


def run(key: str, out: Path, extra: list[str]) -> dict:
    """Run one configuration; store and return its figures."""
    from fedpeft.app.recipe import load
    from fedpeft.rundir import RunDir
    from fedpeft.app.simulate import simulate

    label, recipe, own = RUNS[key]
    overrides = [*own, f'output.dir="{out / "runs"}"', f'name="{key}"', *extra]
    cfg = load(ROOT / "simulations" / recipe, overrides)
    if key == "fedkseed-eq":
        overrides.append(f"train.local_steps={equal_compute_steps(out, cfg.train.local_steps)}")
        cfg = load(ROOT / "simulations" / recipe, overrides)
    summary = simulate(cfg)
    run_dir = Path(summary["run_dir"])
    rows = RunDir(run_dir).metrics()
    mean_b, max_b, run_b = client_bytes(run_dir)
    scored = [r for r in rows if "rouge_l" in r]
    mc = [(r["round"], r["mc_accuracy"]) for r in rows if "mc_accuracy" in r]
    result = {"key": key, "label": label, "recipe": f"simulations/{recipe}", "overrides": overrides,
              "local_steps": cfg.train.local_steps, "rouge_l": [(r["round"], r["rouge_l"]) for r in scored],
              "exact_match": [(r["round"], r["exact_match"]) for r in scored], "mc_accuracy": mc,
              "loss": [r["loss"] for r in rows],
              "bytes_total": summary["bytes_total"], "client_round_bytes_mean": mean_b,
              "client_round_bytes_max": max_b, "client_run_bytes_max": run_b, "client_train_s": mean_train_s(rows), "wall_s": summary["wall_s"],
              "generation_share": summary.get("generation_share"), "run_dir": str(run_dir)}
    (out / f"{key}.json").write_text(json.dumps(result, indent=1))
    return result


def _size(b: float) -> str:
    return format_bytes(b, 2) if b >= MIB else f"{b / KIB:,.1f} KiB"


def _pair(series: list) -> str:
    """'first → last' of a [(round, value)] series, or '-' when the run did not score it."""
    return f"{series[0][1]:.3f} → {series[-1][1]:.3f}" if series else "-"


def table(out: Path) -> str:
    """Markdown table of every finished run: zero-shot (round 0) → final scores, bytes, client compute."""
    done = [json.loads((out / f"{k}.json").read_text()) for k in RUNS if (out / f"{k}.json").is_file()]
    if not done:
        return f"no finished runs in {out}"
    lines = ["| method | local steps | Rouge-L | exact match | MC accuracy | response loss | per client per round "
             "| per client, whole run (max) | total | client training per round | wall |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in done:
        em = r["exact_match"] if isinstance(r["exact_match"], list) else [(0, r["exact_match"])]
        lines.append(f"| {r['label']} | {r['local_steps']} | {_pair(r['rouge_l'])} | {_pair(em)} | "
                     f"{_pair(r.get('mc_accuracy', []))} | {r['loss'][0]:.3f} → {r['loss'][-1]:.3f} | "
                     f"{_size(r['client_round_bytes_mean'])} | {_size(r.get('client_run_bytes_max', 0))} | "
                     f"{_size(r['bytes_total'])} | {r['client_train_s']:.2f} s | {r['wall_s']:.0f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the selected configurations one after another, then print the table of everything finished."""
    ap = comparison_parser(__doc__, RUNS, ROOT / "runs" / "llm-compare")
    args = ap.parse_args(argv)

    def one(key: str) -> str:
        r = run(key, args.out, args.extra)
        return f"{key}: final Rouge-L {r['rouge_l'][-1][1]:.3f}, {_size(r['bytes_total'])}, {r['wall_s']:.0f} s"

    run_selected(ap, args, RUNS, one)
    print(table(args.out))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
