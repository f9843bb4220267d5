"""`parent`: a label-free answer temperature for a quantized variant (DACA, arXiv 2505.16690).

The variant's answer temperature is fitted so that its answer distribution matches its parent's (the
calibrated baseline's) on the prompts where the two pick the same answer: minimize, over those prompts, the
cross-entropy of softmax(variant scores / T) against the parent's calibrated probabilities (= KL up to a
constant). No gold answers are read, so a team can calibrate a compressed model on its own unlabelled prompts.
Prompts where the two disagree are left out: there the parent's confidence says little about the variant's.
"""

from __future__ import annotations

import torch

from calq.calib.answer_base import AnswerFitData, register
from calq.calib.answer_features import AnswerSet
from calq.calib.answer_temperature import AnswerTemperature, fit_inverse_temperature
from calq.errors import CalqError

MIN_AGREEING = 20  # fewer agreeing prompts than this make the fitted T mostly noise


@register
class ParentTemperature(AnswerTemperature):
    """An answer temperature fitted label-free against the calibrated baseline (saved like answer_temperature)."""

    name = "parent"
    needs_parent = True

    def __init__(self, temperature: float, kind: str = "parent", info: dict | None = None):
        super().__init__(temperature, kind, info)

    @classmethod
    def fit(cls, data: AnswerFitData, config=None) -> ParentTemperature:
        if not data.parent_probabilities:
            raise CalqError("parent needs the calibrated baseline's answer probabilities on the same prompts",
                            "parent", "fit the baseline's answer calibrator first and pass its probabilities")
        names = list(data.tasks)
        return fit([data.tasks[n] for n in names], [data.parent_probabilities[n] for n in names])


def fit(variant: AnswerSet | list[AnswerSet], parent_probabilities: torch.Tensor | list[torch.Tensor],
        min_agreeing: int = MIN_AGREEING) -> ParentTemperature:
    """The variant's answer temperature from unlabelled prompts; `parent_probabilities` [questions, most choices] are
    the calibrated baseline's probabilities on the same prompts, in the same order (e.g. its calibrator's apply).
    Lists: several tasks' prompts together (one temperature for all)."""
    variants = variant if isinstance(variant, list) else [variant]
    parents = parent_probabilities if isinstance(parent_probabilities, list) else [parent_probabilities]
    pairs = []
    for answers, probs in zip(variants, parents, strict=True):
        scores = answers.scores()
        if probs.shape != scores.shape:
            raise CalqError(f"parent probabilities have shape {tuple(probs.shape)}, the variant's scores "
                            f"{tuple(scores.shape)}", "parent",
                            "score the same prompts, in the same order, with both models")
        agree = scores.argmax(1) == probs.argmax(1)
        pairs.append((scores[agree], probs[agree].double(), len(agree)))
    agreeing, prompts = sum(len(s) for s, _, _ in pairs), sum(n for _, _, n in pairs)
    if agreeing < min_agreeing:
        raise CalqError(f"the variant and its parent agree on only {agreeing} of {prompts} prompts", "parent",
                        f"give at least {min_agreeing} prompts on which both pick the same answer")
    beta = fit_inverse_temperature(
        lambda b: -sum((t * torch.log_softmax(s * b, 1)).sum() for s, t, _ in pairs) / agreeing)
    return ParentTemperature(1.0 / beta, info={"agreeing": agreeing, "prompts": prompts})
