"""bf16 against fp32 for a LoRA training step of the embedded causal LM (SmolLM2-135M-Instruct).

    python benchmarks/precision_step.py [--threads 1] [--batch 8] [--tokens 64] [--reps 3] [--train-steps 0]

Prints, on `--threads` threads:
  - the machine's own matmul peak in fp32 and bf16 (a square matmul, best of a few),
  - one LoRA step (forward under `fedpeft.precision.compute`, backward, AdamW) in fp32 and bf16,
    timed alternately, best of `--reps`; the step's FLOPs counted by torch's FlopCounterMode and the
    achieved FLOP/s as a share of the same-precision matmul peak,
  - where the fp32 step's time goes (torch.profiler, top operators by self CPU time),
  - with `--train-steps N`: N central LoRA steps from the same start in each precision, then the
    held-out response loss of both (evaluated in fp32), to compare the scores they reach.
On CPUs without AMX or AVX-512 bf16, bf16 matmuls are emulated and far slower than fp32, which is
why `train.precision = "auto"` picks fp32 there.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from fedpeft.env import quiet_libraries, set_offline_env

set_offline_env()
quiet_libraries()

from fedpeft.causal_lm import held_out_loss, response_loss  # noqa: E402
from fedpeft.data.prepared import eval_batches, prepare, train_batches  # noqa: E402
from fedpeft.models import build_model  # noqa: E402
from fedpeft.precision import compute, cpu_bf16_units  # noqa: E402
from fedpeft.app.recipe import validate  # noqa: E402

CPU = torch.device("cpu")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def matmul_peak(dtype: torch.dtype, m: int, k: int, n: int) -> float:
    """Best GFLOP/s of an (m x k) @ (k x n) matmul in `dtype`."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * m * k * n / best / 1e9


def peak_size(dtype: torch.dtype) -> int:
    """The largest of 2048/1024/512 whose matmul takes under ~2 s (emulated bf16 is very slow)."""
    t = time.perf_counter()
    torch.randn(256, 256, dtype=dtype) @ torch.randn(256, 256, dtype=dtype)
    per_256 = max(time.perf_counter() - t, 1e-6)
    for size in (2048, 1024, 512):
        if per_256 * (size / 256) ** 3 < 2.0:
            return size
    return 256


def make_step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: dict, precision: str):
    """One LoRA step as fedpeft's local loop takes it: autocast forward, fp32 backward and AdamW."""
    def step() -> float:
        with compute(precision, CPU):
            loss = response_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())
    return step


def step_flops(step) -> int:
    """FLOPs of one call of `step` (matmuls and convolutions, as FlopCounterMode counts them)."""
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def time_steps(steps: dict, reps: int) -> dict[str, float]:
    """Best wall seconds per step for each precision, alternating between them."""
    best = {k: float("inf") for k in steps}
    for _ in range(reps):
        for name, step in steps.items():
            t = time.perf_counter()
            step()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def where_time_goes(step, top: int = 8) -> list[tuple[str, float]]:
    """(operator, share of self CPU time) of one step, the largest first."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = [(e.key, e.self_cpu_time_total) for e in prof.key_averages()]
    total = sum(t for _, t in events) or 1.0
    return [(k, t / total) for k, t in sorted(events, key=lambda kv: -kv[1])[:top]]


def batch_of(task, batch: int, tokens: int) -> dict:
    """A real training batch of the built-in task, padded or cut to exactly `tokens` positions."""
    b = next(iter(train_batches(task.train, batch, np.random.default_rng(0), task.pad_token_id, steps=1)))
    out = {}
    for k, v in b.items():
        fill = -100 if k == "labels" else (0 if k == "attention_mask" else task.pad_token_id)
        v = v[:, :tokens]
        if v.shape[1] < tokens:
            v = torch.cat([v, torch.full((v.shape[0], tokens - v.shape[1]), fill, dtype=v.dtype)], 1)
        out[k] = v
    return out


def quality(cfg, task, steps: int, batch: int) -> dict[str, float]:
    """Held-out response loss (fp32 evaluation) after `steps` central LoRA steps in each precision."""
    out = {}
    for precision in DTYPES:
        torch.manual_seed(0)
        model = build_model(cfg, 0).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr)
        for b in train_batches(task.train, batch, np.random.default_rng(0), task.pad_token_id, steps=steps):
            with compute(precision, CPU):
                loss = response_loss(model, b)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        out[precision] = held_out_loss(model.eval(), eval_batches(task.test, 16, task.pad_token_id))["loss"]
    return out


def main() -> None:
    """Run every measurement and print it."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--train-steps", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    units = cpu_bf16_units() or "none (bf16 is emulated)"
    print(f"threads {args.threads}; CPU bf16 units: {units}")
    cfg = validate({"model": {"kind": "causal-lm", "max_length": max(args.tokens, 64)}, "train": {"lr": 3e-3},
                    "data": {"builtin": {"num_train": 2000, "num_test": 128}}, "partition": {"type": "iid"},
                    "sim": {"num_clients": 1, "clients_per_round": 1}})
    task = prepare(cfg, Path(tempfile.mkdtemp(prefix="fedpeft-bench-")))
    model = build_model(cfg, 0).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    batch = batch_of(task, args.batch, args.tokens)
    # The peak: the better of a square matmul and the step's own MLP shape (tokens x hidden x intermediate).
    mc = model.config
    peaks = {}
    for name, dtype in DTYPES.items():
        size = peak_size(dtype)
        square = matmul_peak(dtype, size, size, size)
        shaped = matmul_peak(dtype, args.batch * args.tokens, mc.hidden_size, mc.intermediate_size)
        peaks[name] = max(square, shaped)
        print(f"matmul peak {name}: {square:8.1f} GFLOP/s ({size}^2), {shaped:8.1f} GFLOP/s "
              f"({args.batch * args.tokens} x {mc.hidden_size} x {mc.intermediate_size})")
    steps = {p: make_step(model, opt, batch, p) for p in DTYPES}
    flops = step_flops(steps["fp32"])
    best = time_steps(steps, args.reps)
    print(f"\nLoRA step, batch {args.batch} x {args.tokens} tokens: {flops / 1e9:.1f} GFLOP counted")
    for p, s in best.items():
        achieved = flops / s / 1e9
        print(f"  {p}: {s:8.3f} s/step  {achieved:7.1f} GFLOP/s = {achieved / peaks[p]:6.1%} of the {p} matmul peak")
    print(f"  bf16 speed-up over fp32: {best['fp32'] / best['bf16']:.2f}x")
    print("\nfp32 step, self CPU time by operator:")
    for op, share in where_time_goes(steps["fp32"]):
        print(f"  {share:6.1%}  {op}")
    if args.train_steps:
        q = quality(cfg, task, args.train_steps, args.batch)
        print(f"\nheld-out response loss after {args.train_steps} steps: fp32 {q['fp32']:.4f}  bf16 {q['bf16']:.4f}")


if __name__ == "__main__":
    main()
