"""Writes small GGUF model files (a tiny Llama with a byte-level BPE vocabulary) for loader tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _byte_tokens() -> list[str]:
    # GPT-2's byte-to-unicode table: every byte gets a printable stand-in, so any text tokenizes.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [256 + i for i, _ in enumerate(b for b in range(256) if b not in printable)]
    return [chr(c) for c in printable + extra]


def write_tiny_gguf(path: Path, arch: str = "llama", hidden: int = 32, layers: int = 1, heads: int = 2,
                    kv_heads: int = 1, ff: int = 64, seed: int = 0) -> np.ndarray:
    """Write a tiny `arch` model with a Q8_0-quantized embedding to `path`; returns the unquantized embedding."""
    rng = np.random.default_rng(seed)
    tokens = SPECIAL + _byte_tokens() + ["Ġt", "he"]
    w = GGUFWriter(str(path), arch)
    w.add_name("tiny test model")
    for key, value in (("block_count", layers), ("context_length", 128), ("embedding_length", hidden),
                       ("feed_forward_length", ff), ("attention.head_count", heads),
                       ("attention.head_count_kv", kv_heads), ("vocab_size", len(tokens))):
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.rope.freq_base", 10000.0)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIAL) + [1] * (len(tokens) - len(SPECIAL)))
    w.add_token_merges(["Ġ t", "h e"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    embedding = rng.normal(0, 1, size=(len(tokens), hidden)).astype(np.float32)
    w.add_tensor("token_embd.weight", quantize(embedding, GGMLQuantizationType.Q8_0),
                 raw_dtype=GGMLQuantizationType.Q8_0)
    head = hidden // heads
    shapes = {"attn_q": (hidden, hidden), "attn_k": (kv_heads * head, hidden), "attn_v": (kv_heads * head, hidden),
              "attn_output": (hidden, hidden), "ffn_gate": (ff, hidden), "ffn_up": (ff, hidden),
              "ffn_down": (hidden, ff)}
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        for name, shape in shapes.items():
            w.add_tensor(f"blk.{i}.{name}.weight", rng.normal(0, 0.1, size=shape).astype(np.float32))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return embedding
