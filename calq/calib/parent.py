"""`parent`: a label-free answer temperature for a quantized variant (DACA, arXiv 2505.16690).

The variant's answer temperature is fitted so that its answer distribution matches its parent's (the
calibrated baseline's) on the prompts where the two pick the same answer: minimize, over those prompts, the
cross-entropy of softmax(variant scores / T) against the parent's calibrated probabilities (= KL up to a
constant). No gold answers are read, so a team can calibrate a compressed model on its own unlabelled prompts.
Prompts where the two disagree are left out: there the parent's confidence says little about the variant's.
"""

from __future__ import annotations

import torch

from calq.calib.answer_features import AnswerSet
from calq.calib.answer_temperature import AnswerTemperature, fit_inverse_temperature
from calq.errors import CalqError

MIN_AGREEING = 20  # fewer agreeing prompts than this make the fitted T mostly noise


def fit(variant: AnswerSet, parent_probabilities: torch.Tensor, min_agreeing: int = MIN_AGREEING) -> AnswerTemperature:
    """The variant's answer temperature from unlabelled prompts; `parent_probabilities` [questions, most choices] are
    the calibrated baseline's probabilities on the same prompts, in the same order (e.g. its calibrator's apply)."""
    scores = variant.scores()
    if parent_probabilities.shape != scores.shape:
        raise CalqError(f"parent probabilities have shape {tuple(parent_probabilities.shape)}, the variant's scores "
                        f"{tuple(scores.shape)}", "parent", "score the same prompts, in the same order, with both models")
    agree = scores.argmax(1) == parent_probabilities.argmax(1)
    if int(agree.sum()) < min_agreeing:
        raise CalqError(f"the variant and its parent agree on only {int(agree.sum())} of {len(agree)} prompts",
                        "parent", f"give at least {min_agreeing} prompts on which both pick the same answer")
    target, own = parent_probabilities[agree].double(), scores[agree]
    beta = fit_inverse_temperature(lambda b: -(target * torch.log_softmax(own * b, 1)).sum(1).mean())
    return AnswerTemperature(1.0 / beta, kind="parent", info={"agreeing": int(agree.sum()), "prompts": len(agree)})
