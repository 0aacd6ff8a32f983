"""Which embedded causal default learns the built-in instruction task better in the same time?

    python benchmarks/causal_default.py [--seconds 150]

Central training (no federation), same data, batch size and wall-clock budget per candidate:
  minilm-decoder  MiniLM-L6's pretrained weights as a causal decoder, frozen; LoRA r=8 on
                  query/value + the untrained LM-head transform (what fedpeft federates)
  scratch-full    a small Llama-style decoder with MiniLM-L6's tokenizer, every weight trained
                  from random initialization (what "a decoder trained from scratch" can reach)
  scratch-lora    the same random decoder frozen, LoRA only (what federating its adapter would learn)
Prints held-out response loss, Rouge-L and exact match after the budget, and steps taken.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fedpeft.env import quiet_libraries, set_offline_env

set_offline_env()
quiet_libraries()

from fedpeft.causal_lm import batch_loss, generation_scores, held_out_loss  # noqa: E402
from fedpeft.data.prepared import eval_batches, prepare, train_batches  # noqa: E402
from fedpeft.evaluation import tokenizer_for  # noqa: E402
from fedpeft.models import build_model, load_base_model  # noqa: E402
from fedpeft.app.recipe import validate  # noqa: E402

SCRATCH = {"kind": "causal-lm", "source": "tiny", "max_length": 64,
           "tiny": {"arch": "llama", "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
                    "intermediate_size": 1024}}
CANDIDATES = {
    "minilm-decoder": ({"kind": "causal-lm", "source": "embedded", "max_length": 64}, "lora", 3e-3),
    "scratch-full": (SCRATCH, "full", 1e-3),
    "scratch-lora": (SCRATCH, "lora", 3e-3),
}


def run(name: str, seconds: float, task, batch: int) -> dict:
    """Train one candidate for `seconds` of wall time and score it on the held-out set."""
    model_cfg, mode, lr = CANDIDATES[name]
    cfg = validate({"model": model_cfg, "data": {"source": "builtin"}, "eval": {"max_new_tokens": 8}})
    if mode == "full":
        model = load_base_model(cfg, 0)
        for p in model.parameters():
            p.requires_grad = True
    else:
        model = build_model(cfg, 0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    steps, t0 = 0, time.perf_counter()
    for b in train_batches(task.train, batch, np.random.default_rng(0), task.pad_token_id, steps=10**9):
        batch_loss(model, b).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps += 1
        if time.perf_counter() - t0 > seconds:
            break
    out = held_out_loss(model, eval_batches(task.test, 32, task.pad_token_id))
    scores, _ = generation_scores(model, task.test, tokenizer_for(cfg), 200, 32, 8, task.pad_token_id,
                                  task.eos_token_id)
    return {"candidate": name, "steps": steps, "trained": sum(p.numel() for p in params), **out, **scores}


def main() -> None:
    """Run every candidate under the same budget and print one row each."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=150.0)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    cfg = validate({"model": {"kind": "causal-lm", "max_length": 64}, "data": {"source": "builtin"},
                    "partition": {"type": "iid"}, "sim": {"num_clients": 1, "clients_per_round": 1}})
    task = prepare(cfg, Path(tempfile.mkdtemp(prefix="fedpeft-bench-")))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"budget {args.seconds:.0f} s per candidate, batch {args.batch}, {len(task.train)} train / "
          f"{len(task.test)} test examples (generation scored on 200)")
    print(f"{'candidate':<16}{'steps':>7}{'trained':>11}{'loss':>8}{'ppl':>9}{'Rouge-L':>9}{'exact':>8}")
    for name in CANDIDATES:
        r = run(name, args.seconds, task, args.batch)
        print(f"{r['candidate']:<16}{r['steps']:>7}{r['trained']:>11,}{r['loss']:>8.3f}{r['perplexity']:>9.2f}"
              f"{r['rouge_l']:>9.3f}{r['exact_match']:>8.3f}", flush=True)


if __name__ == "__main__":
    main()
