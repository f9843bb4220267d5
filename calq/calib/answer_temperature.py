"""`answer_temperature`: one temperature T on the softmax over a question's choice log-likelihoods.

Fitted by NLL of the gold choices (the probability mass on them when a question has several) over the
questions of every fit task together, LBFGS on log T. Dividing every score of a question by the same T > 0
keeps the top choice, so accuracy never changes. T is bounded to [e^-7, e^7]; a T at its bound is marked
`at_bound` in `fit_info` (on fit tasks at chance the likelihood-optimal T is infinite: every answer uniform).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from calq.calib.answer_base import AnswerCalibrator, AnswerFitData, register
from calq.calib.answer_features import PAD, AnswerSet, nll
from calq.errors import CalqError

CONFIG = "answer_temperature.json"
LOG_BOUND = 7.0


@register
class AnswerTemperature(AnswerCalibrator):
    name = "answer_temperature"

    def __init__(self, temperature: float, kind: str = "answer_temperature", info: dict | None = None):
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature, self.kind, self.info = float(temperature), kind, info or {}
        self.fit_info = {"temperature": self.temperature, "at_bound": at_bound(self.temperature), **self.info}

    @classmethod
    def fit(cls, data: AnswerFitData, config=None) -> AnswerTemperature:
        return fit(list(data.tasks.values()))

    def apply(self, answers: AnswerSet) -> torch.Tensor:
        """Calibrated probabilities [questions, most choices] (0 at padding)."""
        return answers.probabilities(1.0 / self.temperature)

    def save(self, folder) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"kind": self.kind, "temperature": self.temperature, "info": self.info}
        (folder / CONFIG).write_text(json.dumps(config))

    @classmethod
    def load(cls, folder, model_config=None) -> AnswerTemperature:
        path = Path(folder) / CONFIG
        if not path.exists():
            raise CalqError(f"no fitted answer temperature in {folder}", "calibrator", f"expected {CONFIG} there")
        config = json.loads(path.read_text())
        return cls(config["temperature"], config.get("kind", "answer_temperature"), config.get("info"))


def at_bound(temperature: float) -> bool:
    """Whether a fitted temperature (or inverse temperature) stopped at the fit's bound, e^±LOG_BOUND."""
    return abs(math.log(temperature)) >= LOG_BOUND - 1e-6


def fit_inverse_temperature(loss) -> float:
    """argmin over beta > 0 of loss(beta) (a scalar tensor), by LBFGS on log beta from beta = 1."""
    log_beta = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_beta], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        # bounded (T between e^-7 and e^7): on a set where the model is at chance the NLL keeps falling as T grows,
        # and the flat gradient past the bound lets LBFGS stop there instead of running out its iterations
        value = loss(log_beta.clamp(-LOG_BOUND, LOG_BOUND).exp())
        value.backward()
        return value

    optimizer.step(closure)
    return float(log_beta.detach().clamp(-LOG_BOUND, LOG_BOUND).exp())


def fit(answer_sets: list[AnswerSet]) -> AnswerTemperature:
    """One T for the questions of all sets together (every set needs gold answers)."""
    n = sum(len(s) for s in answer_sets)
    if not n:
        raise ValueError("no questions to fit an answer temperature on")
    scores, mask = stacked(answer_sets)
    beta = fit_inverse_temperature(lambda b: nll(torch.softmax(scores * b, 1), mask))
    return AnswerTemperature(1.0 / beta)


def stacked(answer_sets: list[AnswerSet]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every set's scores and gold mask in one [questions, most choices] pair (PAD scores and False beyond a
    question's choices), so one softmax covers sets with different numbers of choices."""
    width = max(s.scores().shape[1] for s in answer_sets)
    scores = torch.cat([torch.nn.functional.pad(s.scores(), (0, width - s.scores().shape[1]), value=PAD)
                        for s in answer_sets])
    mask = torch.cat([torch.nn.functional.pad(s.gold_mask(), (0, width - s.scores().shape[1]), value=False)
                      for s in answer_sets])
    return scores, mask
