"""Selection among fitted calibrators, on every validation domain at once.

A calibrator that helps one kind of text can hurt another (measured: an ATS head chosen on instruction responses
made WikiText-2 worse than no calibrator for an AWQ variant, while one temperature helped both). So each calibrator
is scored by its worst domain: the largest relative change of the validation metric against `none` over the
domains. `none` scores 0, so the selected calibrator is never worse than `none` on any validation domain.
"""

from __future__ import annotations


def worst_change(validation: dict[str, dict[str, dict]], name: str, by: str = "ece") -> float:
    """The largest relative change of `by` from `none` to calibrator `name` over the domains of
    `validation` ({domain: {calibrator: metrics}}); negative when it improves every domain."""
    return max((m[name][by] - m["none"][by]) / max(m["none"][by], 1e-12) for m in validation.values())


def select(validation: dict[str, dict[str, dict]], by: str = "ece") -> str:
    """The calibrator with the smallest worst-domain change of `by` ('ece' or 'nll'); ties go to the one listed
    first (the simpler; `none` comes first)."""
    names = list(next(iter(validation.values())))
    return min(names, key=lambda name: worst_change(validation, name, by))
