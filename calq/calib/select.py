"""Selection among fitted calibrators: the one with the best validation metric."""

from __future__ import annotations


def select(metrics: dict[str, dict], by: str = "ece") -> str:
    """The calibrator with the lowest validation `by` ('ece' or 'nll'); ties go to the one listed first (the
    simpler)."""
    return min(metrics, key=lambda name: metrics[name][by])
