"""SCAFFOLD's messages and client state, shared by its server half (`strategies.scaffold`) and client half."""

from __future__ import annotations

from fedpeft.methods.contract import TrainerKind

SCAFFOLD = TrainerKind("scaffold", "first-order steps corrected by the control variates c − c_i")
CONTROL = "control"  # the record holding c (down) or Δc_i (up)
VARIATE_SET = "scaffold-control"  # the client's c_i in the client state store
