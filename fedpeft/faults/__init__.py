"""Injected faults and Byzantine attacks, drawn from the run seed so every run meets the same ones."""

from fedpeft.faults.plan import Fault, FaultPlan

__all__ = ["Fault", "FaultPlan"]
