"""FedKSeed step cost: one zeroth-order step over every weight against the two forward passes it needs.

    python benchmarks/zo_speed.py [--model smollm2|minilm] [--reps 7] [--batch 1] [--threads N] [--scope full]

Default model: the embedded causal LM (SmolLM2-135M-Instruct, 134.5 M weights + the LoRA adapter's),
on one realistic instruction example (chat template, 93 tokens, loss on the 17 response tokens).
`--model minilm` measures the MiniLM-L6 classifier on the built-in task instead.

Every figure is the best of `--reps` timings; the measurements take turns within each repetition
(forward, step, legacy step, ...) so a machine whose load drifts slows them alike. Timed:

- forward: one loss evaluation under inference mode, as a ZO step makes it (twice);
- ZO step: `fedpeft.methods.zo.ZOStepper.step`, the call clients/zeroth_order.py makes per step, in steady
  state (the previous step's restore-and-update is deferred into this step's first pass);
- legacy ZO step: the three `perturb` calls a step made before (z generated three times);
- direction overhead: the same two steps with a free loss (generate and apply z only);
- where the overhead goes: generating one z into the buffer, and one in-place add pass over
  every weight (params += c z from the buffer: the memory floor of one pass);
- a first-order LoRA step (forward, backward, AdamW) on the same batch, for comparison.

The ratio printed is step / (2 x forward): 1.0 would be a step that costs only its forwards. Each
figure is given in wall time and in CPU time of the process; on a machine other work shares, the
CPU time of a one-thread run (`--threads 1`) is the steadiest measure of the work itself.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import torch

from fedpeft.env import quiet_libraries, set_offline_env

set_offline_env()
quiet_libraries()

from fedpeft.causal_lm import batch_loss  # noqa: E402
from fedpeft.data.builtin import generate  # noqa: E402
from fedpeft.data.prepared import collate, tokenize, train_batches  # noqa: E402
from fedpeft.data.prompts import encode_example, render_prompt  # noqa: E402
from fedpeft.ledger import MIB  # noqa: E402
from fedpeft.models import build_model, load_tokenizer  # noqa: E402
from fedpeft.precision import compute  # noqa: E402
from fedpeft.app.recipe import validate  # noqa: E402
from fedpeft.methods.zo import CHUNK, ZOStepper, perturb, tuned_parameters  # noqa: E402

INSTRUCTION = "Summarize the paragraph below in one sentence."
INPUT = ("The city council met on Tuesday to discuss the new bike lanes planned for the downtown area. "
         "Residents raised concerns about parking, while shop owners hoped more cyclists would bring customers.")
RESPONSE = "The council debated downtown bike lanes, weighing parking worries against hoped-for business."
EPS, LR = 1e-3, 1e-7  # tiny steps: the weights stay sensible over every repetition


def smollm2(max_length: int):
    """SmolLM2-135M-Instruct, its config and one instruction example (batch of 1)."""
    cfg = validate({"model": {"kind": "causal-lm", "source": "embedded", "max_length": max_length},
                    "method": {"name": "fedkseed", "scope": "full"}})
    model = build_model(cfg, 0)
    tok = load_tokenizer(cfg.model)
    ids, labels = encode_example(tok, render_prompt(tok, INSTRUCTION, INPUT, "auto"), RESPONSE, max_length)
    return cfg, model, collate([ids], [labels], tok.pad_token_id)


def minilm(batch_size: int):
    """MiniLM-L6 classifier (the default recipe's model), its config and a batch of the built-in task."""
    cfg = validate({"method": {"name": "fedkseed", "scope": "full"}})
    model = build_model(cfg, 6)
    tok = load_tokenizer(cfg.model)
    data = tokenize(generate(512, 0), tok, cfg.model.max_length)
    return cfg, model, next(train_batches(data, batch_size, np.random.default_rng(0), tok.pad_token_id, steps=1))


def main() -> None:
    """Take the measurements in turns and print one line each, then the ratios."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("smollm2", "minilm"), default="smollm2")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--batch", type=int, default=1, help="batch size (minilm only; smollm2 uses one example)")
    ap.add_argument("--max-length", type=int, default=96, help="token budget of the smollm2 example")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own count)")
    ap.add_argument("--scope", choices=("full", "adapter"), default="full")
    ap.add_argument("--direction", choices=("gaussian", "rademacher"), default="gaussian")
    ap.add_argument("--no-legacy", action="store_true", help="skip the legacy three-perturb step")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg, model, batch = smollm2(args.max_length) if args.model == "smollm2" else minilm(args.batch)
    model.eval()  # as the client: no dropout, both passes of a step see the same function
    params = tuned_parameters(model, args.scope)
    n = sum(p.numel() for p in params)
    tokens = int(batch["attention_mask"].sum())
    print(f"model {args.model}: {n:,} weights in scope '{args.scope}' ({4 * n / MIB:.0f} MiB fp32), "
          f"batch {batch['input_ids'].shape[0]} x {batch['input_ids'].shape[1]} ({tokens} tokens), "
          f"direction {args.direction}, precision {cfg.train.precision}")
    print(f"torch threads {torch.get_num_threads()} (directions generated on as many threads, "
          f"chunks of {CHUNK:,}); best of {args.reps}, measurements in turns", flush=True)

    device = next(model.parameters()).device
    loss = partial(batch_loss, model, batch)
    stepper = ZOStepper(params, args.direction)
    free = ZOStepper(params, args.direction, buffer=stepper.buffer)  # free loss: direction work only
    seeds = iter(range(1, 1 << 30))

    def forward() -> None:
        with torch.inference_mode(), compute(cfg.train.precision, device):
            float(loss())

    def zo_step() -> None:
        with torch.inference_mode(), compute(cfg.train.precision, device):
            stepper.step(next(seeds), EPS, LR, loss)

    def legacy_step() -> None:
        seed = next(seeds)
        with torch.inference_mode(), compute(cfg.train.precision, device):
            perturb(params, seed, EPS, args.direction)
            plus = float(loss())
            perturb(params, seed, -2 * EPS, args.direction)
            minus = float(loss())
            perturb(params, seed, EPS - LR * (plus - minus) / (2 * EPS), args.direction)

    def overhead() -> None:
        with torch.inference_mode():
            free.step(next(seeds), EPS, LR, lambda: 0.0)

    def legacy_overhead() -> None:
        seed = next(seeds)
        with torch.inference_mode():
            for coef in (EPS, -2 * EPS, EPS):
                perturb(params, seed, coef, args.direction)

    def generate_only() -> None:
        gen, seed = free.gen, next(seeds)
        with torch.inference_mode():
            for index, size, _ in free.work:
                gen(seed, index, free._z(index, size))

    def add_pass() -> None:
        with torch.inference_mode():
            free._add(0.0)

    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-9)

    def first_order() -> None:
        model.train()
        with compute(cfg.train.precision, device):
            loss().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.eval()

    tests: dict[str, Callable[[], None]] = {
        "forward": forward, "ZO step": zo_step, "legacy ZO step": legacy_step,
        "direction overhead": overhead, "legacy direction overhead": legacy_overhead,
        "generate z once": generate_only, "one add pass": add_pass, "first-order LoRA step": first_order,
    }
    if args.no_legacy:
        for key in ("legacy ZO step", "legacy direction overhead"):
            del tests[key]
    for fn in tests.values():  # warm up: allocations, first-call paths, one pending update in each stepper
        fn()
    wall: dict[str, list[float]] = {k: [] for k in tests}
    cpu: dict[str, list[float]] = {k: [] for k in tests}
    for _ in range(args.reps):
        for key, fn in tests.items():
            t, c = time.perf_counter(), time.process_time()
            fn()
            wall[key].append(time.perf_counter() - t)
            cpu[key].append(time.process_time() - c)
    stepper.discard()
    free.discard()

    # Wall time is what a client waits; CPU time (all of this process's threads) is what the work
    # costs when other processes share the cores: with one thread it barely moves under load.
    best = {k: min(v) * 1e3 for k, v in wall.items()}
    best_cpu = {k: min(v) * 1e3 for k, v in cpu.items()}
    fwd, fwd_cpu = best["forward"], best_cpu["forward"]
    print(f"{'':28s}  {'wall ms':>8s} {'x 2 fwd':>8s}  {'CPU ms':>8s} {'x 2 fwd':>8s}")
    for key in tests:
        if key == "forward":
            print(f"{key:28s}: {best[key]:8.1f} {'':8s}  {best_cpu[key]:8.1f}")
            continue
        print(f"{key:28s}: {best[key]:8.1f} {best[key] / (2 * fwd):7.2f}x  {best_cpu[key]:8.1f} "
              f"{best_cpu[key] / (2 * fwd_cpu):7.2f}x")
    gen_ms, add_ms = best_cpu["generate z once"], best_cpu["one add pass"]
    print(f"per weight (CPU): generate z {gen_ms * 1e6 / n:.2f} ns, one add pass {add_ms * 1e6 / n:.2f} ns "
          f"({12 * n / add_ms * 1e3 / (1024 * MIB):.1f} GiB/s read+read+write)")

    def ratio(key: str) -> str:
        # Also the median of each repetition's own ratio: robust to load that drifts between repetitions.
        per_rep = statistics.median(s / (2 * f) for s, f in zip(wall[key], wall["forward"]))
        return (f"{best[key] / (2 * fwd):.2f} wall (best of each), {per_rep:.2f} wall (median of per-repetition "
                f"ratios), {best_cpu[key] / (2 * fwd_cpu):.2f} CPU (best of each)")

    print(f"RATIO ZO step / (2 x forward)        : {ratio('ZO step')}")
    if "legacy ZO step" in best:
        print(f"RATIO legacy ZO step / (2 x forward) : {ratio('legacy ZO step')}")


if __name__ == "__main__":
    main()
