"""Task metric names: which one is a run's primary score, and how each is labelled in tables, plots and the CLI."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

ACCURACY = "accuracy"
ROUGE_L = "rouge_l"
EXACT_MATCH = "exact_match"


class MetricLabel(NamedTuple):
    """How a metric is named: `label` in tables and plots, `short` on the per-round progress line."""

    label: str
    short: str


METRIC_LABELS: dict[str, MetricLabel] = {
    ACCURACY: MetricLabel("accuracy", "acc"),
    ROUGE_L: MetricLabel("Rouge-L", "rouge-L"),
    EXACT_MATCH: MetricLabel("exact match", "EM"),
}
# The primary metric of each `model.kind`: what "final", "best" and "bytes to target" are measured in.
PRIMARY_BY_KIND: dict[str, str] = {"classifier": ACCURACY, "causal-lm": ROUGE_L}


def metric_label(metric: str) -> str:
    """The display name of a metric ("rouge_l" → "Rouge-L"); an unknown name with spaces for underscores."""
    known = METRIC_LABELS.get(metric)
    return known.label if known else metric.replace("_", " ")


def metric_short(metric: str) -> str:
    """The progress-line name of a metric ("accuracy" → "acc")."""
    known = METRIC_LABELS.get(metric)
    return known.short if known else metric.replace("_", " ")


def primary_for_kind(kind: str) -> str:
    """The primary metric of a `model.kind`; accuracy for a kind without one of its own."""
    return PRIMARY_BY_KIND.get(kind, ACCURACY)


def primary_metric(summary: Mapping[str, Any], config: Mapping[str, Any] | None = None) -> str:
    """A run's primary metric: its summary's `primary_metric`, else its config's `model.kind`, else accuracy."""
    # Summaries written before `primary_metric` existed all come from classification runs, so a
    # missing key means accuracy; the config covers an interrupted run that has no summary yet.
    named = summary.get("primary_metric")
    if isinstance(named, str) and named:
        return named
    model = (config or {}).get("model")
    kind = model.get("kind") if isinstance(model, Mapping) else None
    return primary_for_kind(kind) if isinstance(kind, str) else ACCURACY
