"""Is the built-in instruction task worth scoring with a real pretrained instruct LLM?

    python benchmarks/instruction_task.py [--task skills] [--steps 240] [--batch 8] [--threads 2]

Central training (no federation) of a LoRA adapter on the embedded causal default (SmolLM2-135M-Instruct,
its chat template), on `data.builtin.task`'s training set. Greedy generations on held-out prompts are
scored before training (zero-shot) and after it, per category: Rouge-L (F1) and exact match. Also prints
the token-length distribution of prompt + answer (and of answers alone) under the model's template,
and the number of examples longer than `--max-length`. Prints a few zero-shot and tuned generations.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np
import torch

from fedpeft.env import quiet_libraries, set_offline_env

set_offline_env()
quiet_libraries()

from fedpeft.causal_lm import batch_loss, generation_scores, score_texts  # noqa: E402
from fedpeft.data import load_instructions  # noqa: E402
from fedpeft.data.instruction_task import tokenize_instructions  # noqa: E402
from fedpeft.data.prepared import train_batches  # noqa: E402
from fedpeft.data.prompts import IGNORE_INDEX, encode_example, render_prompt, special_ids  # noqa: E402
from fedpeft.models import build_model, load_tokenizer, model_label  # noqa: E402
from fedpeft.app.recipe import validate  # noqa: E402


def lengths(raw, tok, template: str) -> tuple[list[int], list[int]]:
    """Untruncated token counts of every example (prompt + answer + eos) and of its answer alone."""
    total, answer = [], []
    for row in raw:
        prompt = render_prompt(tok, row["instruction"], row["input"], template)
        ids, labels = encode_example(tok, prompt, row["output"], 10**6)
        total.append(len(ids))
        answer.append(sum(lab != IGNORE_INDEX for lab in labels) - 1)
    return total, answer


def per_category(samples: list[dict], categories: list[str]) -> dict[str, dict[str, float]]:
    """Rouge-L / exact match per category, and over all samples (key 'all')."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for s, c in zip(samples, categories):
        groups[c].append(s)
        groups["all"].append(s)
    return {c: {**score_texts([s["generated"] for s in g], [s["reference"] for s in g]), "n": len(g)}
            for c, g in groups.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", choices=["skills", "words"], default="skills")
    ap.add_argument("--steps", type=int, default=240, help="training steps (batches)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--r", type=int, default=8, help="LoRA rank (alpha = 2r, dropout 0)")
    ap.add_argument("--targets", default="q_proj,v_proj", help="LoRA target modules, comma-separated")
    ap.add_argument("--num-train", type=int, default=4000)
    ap.add_argument("--num-test", type=int, default=70, help="held-out prompts scored by generation")
    ap.add_argument("--max-length", type=int, default=96)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=0, help="also score the held-out prompts every N steps")
    ap.add_argument("--show", type=int, default=1, help="generations shown per category")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    cfg = validate({
        "model": {"kind": "causal-lm", "source": "embedded", "max_length": args.max_length},
        "adapter": {"type": "lora", "r": args.r, "lora_alpha": 2 * args.r, "lora_dropout": 0.0,
                    "target_modules": args.targets.split(",")},
        "data": {"source": "builtin", "builtin": {"task": args.task, "num_train": args.num_train,
                                                  "num_test": args.num_test}},
        "eval": {"max_new_tokens": args.max_new_tokens},
        "sim": {"seed": args.seed},
    })
    tok = load_tokenizer(cfg.model)
    raw = load_instructions(cfg.data, args.seed)
    train = tokenize_instructions(raw.train, tok, cfg)
    test = tokenize_instructions(raw.test, tok, cfg)
    categories = list(raw.test["category"])
    pad, eos = tok.pad_token_id if tok.pad_token_id is not None else 0, special_ids(tok)[1]

    total, answer = lengths(raw.train, tok, cfg.data.template)
    q = np.percentile(total, [0, 50, 90, 100])
    print(f"task {args.task}: {len(raw.train)} train / {len(raw.test)} test, model {model_label(cfg.model)}, "
          f"template {cfg.data.template}")
    print(f"tokens per example (prompt + answer + eos): min {q[0]:.0f}, median {q[1]:.0f}, p90 {q[2]:.0f}, "
          f"max {q[3]:.0f}; over {args.max_length}: {sum(t > args.max_length for t in total)}")
    a = np.percentile(answer, [0, 50, 100])
    words = [len(o.split()) for o in raw.train["output"]]
    print(f"answer tokens: min {a[0]:.0f}, median {a[1]:.0f}, max {a[2]:.0f}; over --max-new-tokens "
          f"{args.max_new_tokens}: {sum(x > args.max_new_tokens for x in answer)}; answer words {min(words)}-"
          f"{max(words)}", flush=True)

    model = build_model(cfg, 0)
    t0 = time.perf_counter()
    before, samples0 = generation_scores(model, test, tok, len(test), 16, args.max_new_tokens, pad, eos)
    zero = per_category(samples0, categories)
    print(f"zero-shot generation: {time.perf_counter() - t0:.0f} s", flush=True)

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    model.train()
    t0, losses = time.perf_counter(), []
    rng = np.random.default_rng(args.seed)
    for step, b in enumerate(train_batches(train, args.batch, rng, pad, steps=args.steps), 1):
        loss = batch_loss(model, b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 20 == 0 or step == args.steps:
            print(f"  step {step:>4}  loss {np.mean(losses[-20:]):.3f}  {time.perf_counter() - t0:.0f} s", flush=True)
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:
            _, mid = generation_scores(model, test, tok, len(test), 16, args.max_new_tokens, pad, eos)
            model.train()
            scores = per_category(mid, categories)
            print(f"  step {step:>4}  Rouge-L / exact: " + "  ".join(
                f"{c} {v['rouge_l']:.2f}/{v['exact_match']:.2f}" for c, v in sorted(scores.items())), flush=True)
    train_s = time.perf_counter() - t0  # includes any --eval-every scoring
    after, samples1 = generation_scores(model, test, tok, len(test), 16, args.max_new_tokens, pad, eos)
    tuned = per_category(samples1, categories)

    print(f"\nLoRA r={args.r} on {args.targets}: {sum(p.numel() for p in params):,} trained parameters, "
          f"{args.steps} steps x batch {args.batch}, lr {args.lr:g}, {train_s:.0f} s on {args.threads} threads")
    print(f"{'category':<12}{'n':>4}{'zero-shot Rouge-L':>19}{'exact':>7}{'tuned Rouge-L':>15}{'exact':>7}")
    for c in [*sorted(k for k in zero if k != "all"), "all"]:
        z, t = zero[c], tuned[c]
        print(f"{c:<12}{z['n']:>4}{z['rouge_l']:>19.3f}{z['exact_match']:>7.3f}{t['rouge_l']:>15.3f}"
              f"{t['exact_match']:>7.3f}")
    shown: dict[str, int] = defaultdict(int)
    print("\nsamples (reference | zero-shot | tuned):")
    for s0, s1, c in zip(samples0, samples1, categories):
        if shown[c] < args.show:
            shown[c] += 1
            print(f"  [{c}] {s0['reference']!r} | {s0['generated']!r} | {s1['generated']!r}")


if __name__ == "__main__":
    main()
