"""Cost of one DP-SGD step vs one plain step: MiniLM-L6 + LoRA r=8, same batch.

    python benchmarks/dp_overhead.py [--batch 32] [--seq 32] [--repeats 10] [--threads 0]

Times forward + backward + optimizer step (best of `repeats` after warm-up) for a plain AdamW
step, an Opacus DP step with per-sample gradients from hooks, and one with ghost clipping.
"""

from __future__ import annotations

import argparse
import time

import torch

from fedpeft.env import quiet_libraries, set_offline_env

set_offline_env()
quiet_libraries()

from fedpeft.privacy.dpsgd import dp_step, make_private, poisson_loader, release  # noqa: E402
from fedpeft.app.recipe import validate  # noqa: E402
from fedpeft.models import build_model  # noqa: E402


def batch(n: int, seq: int, vocab: int = 30522) -> dict[str, torch.Tensor]:
    """A fixed random batch of `n` full-length rows."""
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(1000, vocab, (n, seq), generator=g), "attention_mask": torch.ones(n, seq, dtype=torch.long),
            "labels": torch.randint(0, 6, (n,), generator=g)}


def best_of(step, repeats: int, warmup: int = 2) -> float:
    """Best wall time of `step()` over `repeats` runs (after `warmup` runs)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return min(times)


def time_mode(mode: str, b: dict[str, torch.Tensor], repeats: int) -> float:
    """Seconds per step for `mode` in plain | hooks | ghost."""
    dp = {"enabled": True, "noise_multiplier": 1.0, "grad_sample_mode": "ghost" if mode == "ghost" else "hooks"}
    cfg = validate({"model": {"source": "embedded", "max_length": b["input_ids"].shape[1]},
                    "adapter": {"type": "lora", "r": 8, "lora_alpha": 16, "target_modules": ["query", "value"]}, "dp": dp})
    torch.manual_seed(0)
    model = build_model(cfg, 6).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    if mode == "plain":
        def step() -> None:
            model(**b).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return best_of(step, repeats)
    # The loader only sets Opacus's expected batch size; the step itself uses the fixed batch.
    ds = {"input_ids": b["input_ids"].tolist(), "label": b["labels"].tolist()}
    loader = poisson_loader(ds, 1.0, 0, torch.Generator().manual_seed(0))
    dp_model, dp_opt, criterion = make_private(model, opt, loader, cfg, 1.0)
    try:
        return best_of(lambda: dp_step(dp_model, dp_opt, criterion, b), repeats)
    finally:
        release(dp_model, params)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch default")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    b = batch(args.batch, args.seq)
    print(f"MiniLM-L6 + LoRA r=8, batch {args.batch}, seq {args.seq}, {torch.get_num_threads()} threads, best of {args.repeats}")
    plain = time_mode("plain", b, args.repeats)
    print(f"  plain step      {plain * 1e3:8.1f} ms")
    for mode in ("hooks", "ghost"):
        t = time_mode(mode, b, args.repeats)
        print(f"  DP step ({mode:5s}) {t * 1e3:8.1f} ms   {t / plain:.2f}x plain")


if __name__ == "__main__":
    main()
