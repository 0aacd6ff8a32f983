"""Methods that keep part of the adapter on each client: their trainer kind and reply keys, shared by both halves.

A personal-split method (pFedPara, FedSA-LoRA) exchanges some adapter tensors and keeps the others,
its personal tensors, in each client's state store: exactly the adapter keys its `exchanged(key)`
is False for. Each client holds out a seeded local test split of its own data and reports, on it,
the score of the global model and of its personalized one.
"""

from __future__ import annotations

from typing import Literal

from fedpeft.methods.contract import TrainerKind

PERSONAL_SPLIT = TrainerKind(
    "personal-split",
    "trains the shared and the personal adapter tensors on a local train split; uploads only the shared ones",
)
# Reply keys: the task's primary metric (accuracy, or Rouge-L for causal-lm) on the client's local test split.
PERSONAL, GLOBAL_LOCAL, LOCAL_TEST = "personal-score", "global-score-local", "local-test-examples"
# peft's default init of the factors that do not start Kaiming-uniform (nn.Linear's init): the zero
# ones make a fresh adapter add nothing (LoRA's B, LoHa's w2_b; on embeddings LoRA's A, with B normal).
ZERO_INIT_MARKS = ("lora_B", "hada_w2_b", "lora_embedding_A")
NORMAL_INIT_MARKS = ("lora_embedding_B",)


def local_set(method_name: str) -> str:
    """The client-state-store set (file `client-<id>.<set>.npz`) holding a method's personal tensors."""
    return f"{method_name}-local"


def peft_init(key: str) -> Literal["zero", "normal", "kaiming"]:
    """How peft's default init draws the adapter tensor `key`."""
    if any(mark in key for mark in ZERO_INIT_MARKS):
        return "zero"
    return "normal" if any(mark in key for mark in NORMAL_INIT_MARKS) else "kaiming"
