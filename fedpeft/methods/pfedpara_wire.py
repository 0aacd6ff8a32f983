"""pFedPara's split of the adapter, shared by its server half and client half (reply keys: `personal_wire`)."""

from __future__ import annotations

from fedpeft.methods.personal_wire import GLOBAL_LOCAL, LOCAL_TEST, PERSONAL, local_set

__all__ = ["GLOBAL_LOCAL", "LOCAL_MARK", "LOCAL_SET", "LOCAL_TEST", "PERSONAL", "is_local"]

LOCAL_MARK = "hada_w2_"
LOCAL_SET = local_set("pfedpara")


def is_local(key: str) -> bool:
    """Whether an adapter tensor belongs to the personal factor pair (never leaves the client)."""
    return LOCAL_MARK in key
