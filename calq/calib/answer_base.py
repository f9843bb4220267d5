"""The answer-level calibrator contract and `register`, which fills its registry (calq.calib.registry.ANSWER).

A token-level calibrator (calq.calib.base) rescales logits at every position; an answer-level one turns a question's
choice log-likelihoods (and features from the same forward pass: calq.calib.answer_features) into calibrated answer
probabilities. The two have separate contracts and registries; `registry.names("answer")` lists these. A plugin
package's are found through the entry point group `calq.answer_calibrators`.

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
from pathlib import Path
from typing import ClassVar

import torch
from pydantic import BaseModel

from calq.calib.answer_features import AnswerSet
from calq.calib.registry import ANSWER, NoSettings


@dataclass
class AnswerFitData:
    """What an answer calibrator is fitted from: the fit tasks' questions by task name (labelled, except for one that
    `needs_parent`), the task held out for early stopping / selection (default: the last), and for one that
    `needs_parent` the calibrated baseline's probabilities on the same prompts, by task."""

    tasks: dict[str, AnswerSet]
    validation_task: str | None = None
    seed: int = 0
    parent_probabilities: dict[str, torch.Tensor] | None = None


class AnswerCalibrator:
    name: ClassVar[str]
    Config: ClassVar[type[BaseModel]] = NoSettings
    version: ClassVar[int] = 1  # raise it when a fix changes what it fits: finished runs refit the answer calibrators
    needs_parent: ClassVar[bool] = False  # fitted without labels against the calibrated baseline's probabilities
    min_fit_tasks: ClassVar[int] = 1  # fit tasks it needs (more when one is held out)
    fit_info: dict = {}  # what fitting measured, kept in answers/<variant>.json

    @classmethod
    def fit(cls, data: AnswerFitData, config=None) -> AnswerCalibrator:
        raise NotImplementedError

    def apply(self, answers: AnswerSet) -> torch.Tensor:
        """Calibrated answer probabilities [questions, most choices] (0 where a question has fewer choices)."""
        raise NotImplementedError

    def save(self, folder: Path) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)

    @classmethod
    def load(cls, folder: Path, model_config=None) -> AnswerCalibrator:
        raise NotImplementedError


register = ANSWER.register


MOST_FOLDS = 5


def task_folds(names: list[str], most: int = MOST_FOLDS) -> list[list[str]]:
    """Leave-one-task-out folds over fit tasks: one task each; with more than `most` tasks, `most` groups of them
    (every most-th in the listed order), which bounds the refits when the fit set spans many tasks."""
    if len(names) <= most:
        return [[name] for name in names]
    return [list(names[k::most]) for k in range(most)]
