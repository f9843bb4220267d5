"""Per-question arrays of a multiple-choice task, as the answer-level calibrators read them.

A question has several choices with summed log-likelihoods (a ragged list: tasks differ in their number of
choices), one or more gold indices (TruthfulQA MC2 has several; an unlabelled set has none) and features from
the same forward pass that scored the choices: the model's last hidden state at the last prompt token, plus
cheap ones computed here (number of choices, score margin, choice-length spread).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CHEAP_FEATURES = ("log_choices", "margin", "length_spread", "entropy")
PAD = -1e30  # score of a missing choice: finite, so gradients through a temperature stay finite (0, not NaN)


@dataclass
class AnswerSet:
    loglikelihoods: list[list[float]]
    gold: list[list[int]] | None = None
    hidden: torch.Tensor | None = None  # [questions, hidden], any float dtype
    choice_tokens: list[list[int]] | None = None

    def __post_init__(self):
        self._scores = None
        if not self.loglikelihoods or any(len(row) < 2 for row in self.loglikelihoods):
            raise ValueError("every question needs at least two choices")
        for name in ("gold", "choice_tokens"):
            value = getattr(self, name)
            if value is not None and len(value) != len(self.loglikelihoods):
                raise ValueError(f"{name} has {len(value)} rows for {len(self.loglikelihoods)} questions")
        if self.hidden is not None and self.hidden.shape[0] != len(self.loglikelihoods):
            raise ValueError(f"hidden has {self.hidden.shape[0]} rows for {len(self.loglikelihoods)} questions")

    @classmethod
    def from_task(cls, entry: dict, calibrator: str = "none") -> AnswerSet:
        """From one task of `harness.run_tasks` output (multiple choice, ideally with features=True)."""
        return cls(entry["calibrators"][calibrator]["loglikelihoods"], entry["gold"], entry.get("prompt_hidden"),
                   entry.get("choice_tokens"))

    def __len__(self) -> int:
        return len(self.loglikelihoods)

    def scores(self) -> torch.Tensor:
        """Log-likelihoods padded to [questions, most choices] with PAD where a question has fewer choices."""
        if self._scores is None:
            width = max(len(row) for row in self.loglikelihoods)
            self._scores = torch.tensor([list(row) + [PAD] * (width - len(row)) for row in self.loglikelihoods],
                                        dtype=torch.float64)
        return self._scores.clone()

    def gold_mask(self) -> torch.Tensor:
        """[questions, most choices] bool: True at every gold choice."""
        if self.gold is None:
            raise ValueError("this answer set has no gold answers (unlabelled)")
        scores = self.scores()
        mask = torch.zeros(scores.shape, dtype=torch.bool)
        for i, answers in enumerate(self.gold):
            mask[i, answers] = True
        return mask

    def probabilities(self, inverse_temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
        """softmax(beta * log-likelihoods) per question; beta a number or one per question; padding gets 0."""
        beta = torch.as_tensor(inverse_temperature, dtype=torch.float64)
        return torch.softmax(self.scores() * (beta[:, None] if beta.ndim else beta), dim=1)

    def cheap_features(self) -> torch.Tensor:
        """[questions, 4]: log(number of choices), top-1 minus top-2 log-likelihood, spread (std) of the choices'
        token lengths in log-tokens (0 without lengths), entropy of the uncalibrated answer distribution."""
        scores = self.scores()
        top2 = scores.topk(2, dim=1).values
        n = torch.tensor([len(row) for row in self.loglikelihoods], dtype=torch.float64)
        if self.choice_tokens is not None:
            spread = torch.tensor([torch.tensor(row, dtype=torch.float64).clamp(min=1).log().std().item()
                                   for row in self.choice_tokens])
        else:
            spread = torch.zeros(len(self), dtype=torch.float64)
        p = torch.softmax(scores, dim=1)
        entropy = -(p * p.clamp(min=1e-300).log()).sum(1)
        return torch.stack([n.log(), top2[:, 0] - top2[:, 1], spread, entropy], dim=1)

    def features(self, use_hidden: bool = True) -> torch.Tensor:
        """float32 [questions, features]: the prompt-end hidden state (when present and asked for), then the cheap
        ones."""
        parts = [self.hidden.float()] if use_hidden and self.hidden is not None else []
        return torch.cat([*parts, self.cheap_features().float()], dim=1)


def top_choice(probabilities: torch.Tensor, gold: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(confidence, correct) per question, float64: the top choice's probability, and whether it is a gold one."""
    conf, top = probabilities.max(dim=1)
    correct = torch.tensor([float(int(t) in answers) for t, answers in zip(top, gold, strict=True)],
                           dtype=torch.float64)
    return conf.double(), correct


def nll(probabilities: torch.Tensor, gold_mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log of the probability mass on the gold choices (one or several per question)."""
    return -(probabilities * gold_mask).sum(1).clamp(min=1e-12).log().mean()
