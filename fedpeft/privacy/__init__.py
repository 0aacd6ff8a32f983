"""Differential privacy in one place: accounting (Opacus accountants, the noise solver), sample-level
DP-SGD (per-client plans, Opacus wrapping), user-level DP (Flower's DP wrappers) and the privacy ledger."""

from fedpeft.privacy.ledger import PrivacyLedger, epsilon_stats, read_ledger

__all__ = ["PrivacyLedger", "epsilon_stats", "read_ledger"]
