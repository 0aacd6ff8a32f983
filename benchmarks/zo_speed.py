"""FedKSeed speed on MiniLM-L6: one seeded direction over every weight, and a ZO step vs a first-order step.

    python benchmarks/zo_speed.py [--reps 7] [--batch 16]

Prints the best of `--reps` timings for: applying one Gaussian / Rademacher direction to all
22.7 M parameters (naive per-tensor torch.randn for reference, and the memory floor of the
in-place add), and a ZO step (scope adapter and full) against a first-order LoRA step.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch

from fedpeft.env import quiet_libraries, set_offline_env

set_offline_env()
quiet_libraries()

from fedpeft.recipe import validate  # noqa: E402
from fedpeft.data.builtin import generate  # noqa: E402
from fedpeft.data.prepared import tokenize, train_batches  # noqa: E402
from fedpeft.models import build_model, load_tokenizer  # noqa: E402
from fedpeft.zo import perturb, tuned_parameters  # noqa: E402


def best_ms(fn: Callable[[], object], reps: int) -> float:
    """Best wall time of `reps` calls, in milliseconds."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main() -> None:
    """Run every measurement and print one line each."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    cfg = validate({})
    model = build_model(cfg, 6).eval()
    full = tuned_parameters(model, "full")
    adapter = tuned_parameters(model, "adapter")
    n = sum(p.numel() for p in full)
    print(f"torch threads {torch.get_num_threads()}, {n:,} parameters in scope 'full', "
          f"{sum(p.numel() for p in adapter):,} in scope 'adapter'")

    gen = torch.Generator()

    def naive() -> None:
        for i, p in enumerate(full):
            gen.manual_seed(i)
            p.add_(torch.randn(p.shape, generator=gen), alpha=1e-9)

    print(f"naive per-tensor torch.randn + add : {best_ms(naive, args.reps):7.1f} ms")
    print(f"in-place add only (memory floor)   : {best_ms(lambda: [p.add_(p, alpha=0.0) for p in full], args.reps):7.1f} ms")
    for direction in ("gaussian", "rademacher"):
        ms = best_ms(lambda: perturb(full, 12345, 1e-9, direction), args.reps)
        print(f"fedpeft {direction:10s} direction      : {ms:7.1f} ms")

    tok = load_tokenizer(cfg.model)
    data = tokenize(generate(512, 0), tok, cfg.model.max_length)
    batch = next(train_batches(data, args.batch, np.random.default_rng(0), tok.pad_token_id, steps=1))

    def zo_step(params: list[torch.Tensor]) -> None:
        with torch.inference_mode():
            perturb(params, 7, 1e-3)
            model(**batch)
            perturb(params, 7, -2e-3)
            model(**batch)
            perturb(params, 7, 1e-3)

    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-9)

    def fo_step() -> None:
        model.train()
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        model.eval()

    fo = best_ms(fo_step, args.reps)
    zo_a = best_ms(lambda: zo_step(adapter), args.reps)
    zo_f = best_ms(lambda: zo_step(full), args.reps)
    print(f"first-order LoRA step (batch {args.batch})    : {fo:7.1f} ms")
    print(f"ZO step, scope adapter (batch {args.batch})   : {zo_a:7.1f} ms  ({zo_a / fo:.2f}x)")
    print(f"ZO step, scope full (batch {args.batch})      : {zo_f:7.1f} ms  ({zo_f / fo:.2f}x)")


if __name__ == "__main__":
    main()
