"""pFedPara's split of the adapter and its reply keys, shared by its server half and client half."""

from __future__ import annotations

from fedpeft.methods.contract import TrainerKind

PFEDPARA = TrainerKind("pfedpara", "trains the global and the personal LoHa factor pairs; uploads the global pair")
LOCAL_MARK = "hada_w2_"
LOCAL_SET = "pfedpara-local"
# Reply keys: the task's primary metric (accuracy, or Rouge-L for causal-lm) on the client's local test split.
PERSONAL, GLOBAL_LOCAL, LOCAL_TEST = "personal-score", "global-score-local", "local-test-examples"


def is_local(key: str) -> bool:
    """Whether an adapter tensor belongs to the personal factor pair (never leaves the client)."""
    return LOCAL_MARK in key
