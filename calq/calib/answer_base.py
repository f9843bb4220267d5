"""Answer-level calibrators on the calibrator contract (calq.calib.base, `level = "answer"`).

A token-level calibrator rescales logits at every position; an answer-level one turns a question's choice
log-likelihoods (and features from the same forward pass: calq.calib.answer_features) into calibrated answer
probabilities. Both live in the one registry (`base.REGISTRY`); `calibrators.names("answer")` lists these.

    @register
    class Mine(AnswerCalibrator):
        name = "mine"
        Config = MySettings                                            # pydantic
        @classmethod
        def fit(cls, data: AnswerFitData, config) -> "Mine": ...       # labelled fit tasks (or parent probabilities)
        def apply(self, answers: AnswerSet) -> torch.Tensor: ...       # [questions, most choices]
        def save(self, folder): ...
        @classmethod
        def load(cls, folder, model_config=None) -> "Mine": ...
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from calq.calib.answer_features import AnswerSet
from calq.calib.base import Calibrator
from calq.errors import CalqError


@dataclass
class AnswerFitData:
    """What an answer calibrator is fitted from: the fit tasks' questions by task name (labelled, except for
    `parent`), the task held out for early stopping / selection (default: the last), and for `parent` the calibrated
    baseline's probabilities on the same prompts, by task."""

    tasks: dict[str, AnswerSet]
    validation_task: str | None = None
    seed: int = 0
    parent_probabilities: dict[str, torch.Tensor] | None = None


class AnswerCalibrator(Calibrator):
    level = "answer"
    needs_hidden = False  # reads the prompt-end hidden states run_tasks(features=True) stores, not the model's

    @classmethod
    def fit(cls, data: AnswerFitData, config=None) -> AnswerCalibrator:
        raise NotImplementedError

    def apply(self, answers: AnswerSet) -> torch.Tensor:
        """Calibrated answer probabilities [questions, most choices] (0 where a question has fewer choices)."""
        raise NotImplementedError

    def scale(self, hidden, attention_mask=None):
        raise CalqError(f"'{self.name}' is an answer-level calibrator: it calibrates answers, not logits", "calibrator",
                        "apply it to a task's answers (calq.calib.answer_base), or use a token-level calibrator here")

    @classmethod
    def from_arg(cls, arg: str, model_config=None) -> AnswerCalibrator:
        raise CalqError(f"'{cls.name}' is an answer-level calibrator and cannot rescale the model's logits",
                        "calibrator",
                        "use a token-level calibrator (none, temperature, ats) in the lm-eval model; answer-level "
                        "ones apply to run_tasks' answers")
