"""SCAFFOLD's messages and client state, shared by its server half (`strategies.scaffold`) and client half."""

from __future__ import annotations

from fedpeft.methods.contract import TrainerKind

SCAFFOLD = TrainerKind("scaffold", "first-order steps corrected by the control variates c − c_i")
CONTROL = "control"  # the record holding c (down) or Δc_i (up)
VARIATE_SET = "scaffold-control"  # the client's c_i in the client state store
# How a client computes its new variate c_i⁺ (the strategy class's `variate`).
OPTION_II = "option-ii"  # c_i − c + (x − y_i)/(K·η_l), the paper's, under plain SGD
MEAN_GRADIENT = "mean-gradient"  # the mean of the round's minibatch gradients before correction
