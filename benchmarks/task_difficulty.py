"""How hard is the built-in task? Central training: classifier head on frozen MiniLM-L6 vs LoRA.

    python benchmarks/task_difficulty.py [--steps 250]

Prints test accuracy every 50 steps for each variant (same data, batch and seed).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from fedpeft.env import quiet_libraries, set_offline_env

set_offline_env()
quiet_libraries()

from fedpeft.app.recipe import validate  # noqa: E402
from fedpeft.data.builtin import generate  # noqa: E402
from fedpeft.data.prepared import tokenize, train_batches  # noqa: E402
from fedpeft.evaluation import evaluate  # noqa: E402
from fedpeft.models import build_model, load_base_model, load_tokenizer  # noqa: E402


def run(variant: str, steps: int, lr: float, train, test, pad: int) -> list[tuple[int, float]]:
    """Train one variant centrally and return (step, test accuracy) every 50 steps."""
    cfg = validate({"model": {"source": "embedded"}})
    if variant == "head":
        model = load_base_model(cfg, 6)
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith("classifier")
    else:
        model = build_model(cfg, 6)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    out = []
    model.train()
    for i, batch in enumerate(train_batches(train, 16, np.random.default_rng(0), pad, steps=steps), 1):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        if i % 50 == 0:
            out.append((i, evaluate(model, test, 128, pad)["accuracy"]))
            model.train()
    return out


def main() -> None:
    """Run both variants and print the accuracy curves."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=250)
    args = ap.parse_args()
    tok = load_tokenizer(validate({}).model)
    train = tokenize(generate(4000, 1), tok, 48)
    test = tokenize(generate(600, 2), tok, 48)
    for variant, lr in (("head", 1e-2), ("lora", 2e-3)):
        t = time.perf_counter()
        curve = run(variant, args.steps, lr, train, test, tok.pad_token_id)
        print(f"{variant:5s} lr={lr:g}: " + "  ".join(f"{s}:{a:.3f}" for s, a in curve) + f"  ({time.perf_counter() - t:.0f} s)")


if __name__ == "__main__":
    main()
