"""The calibrators' registries and what a recipe may say about them (each one's name and settings), without torch:
`calq run` checks a recipe before torch and transformers are imported.

TOKEN holds the token-level calibrator classes (`calq.calib.base.register` fills it), ANSWER the answer-level ones
(`calq.calib.answer_base.register`): two contracts, two registries (calq.registry), both discovered by
`calq.calib.calibrators`. calq's own are also declared in OWN, which stands in for them until their modules are
imported; their classes take their `Config` from here. tests/test_recipe_errors.py checks that OWN matches calq's
registered classes. A plugin's calibrators (entry point groups `calq.calibrators`, `calq.answer_calibrators`) are
loaded when a recipe names its calibrators.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from calq.errors import CalqError
from calq.registry import Registry

TOKEN = Registry("calibrator", "calq.calib", "calibrators")  # calq.calib.base.Calibrator classes
ANSWER = Registry("answer calibrator", "calq.calib", "answer_calibrators")  # calq.calib.answer_base.AnswerCalibrator
LEVELS = {"token": TOKEN, "answer": ANSWER}


class NoSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AtsConfig(BaseModel):
    """How the ATS head is fitted."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    alpha: float = Field(
        0.5, ge=0, le=1, description="weight of the loss on positions the frozen model gets wrong; 1 - alpha weighs "
                                     "cross-entropy on the positions it gets right (paper: 0.5)")
    smoothing: Literal["uniform", "top_k", "none"] = Field(
        "none", description="target on wrong positions: 'uniform' over the whole vocabulary (the paper), 'top_k' "
                            "(uniform over the frozen model's top_k tokens) or 'none' (the next token, so the loss is "
                            "plain cross-entropy)")
    top_k: int = Field(5, ge=1, description="tokens in the smoothed target when smoothing is top_k")
    reweight: bool = Field(
        True, description="weigh the right and the wrong positions as two groups (each group's mean, times 1 - alpha "
                          "and alpha) rather than by how many positions each has")
    init_from_temperature: bool = Field(
        True, description="start the head at the fitted global temperature (its output bias = -log T) instead of at "
                          "the identity")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay")
    epochs: int = Field(3, ge=1, description="at most this many passes over the training records")
    patience: int = Field(1, ge=1, description="stop after this many epochs without a better validation metric")
    batch_size: int = Field(8, ge=1, description="records per optimizer step")
    min_response_tokens: int = Field(2000, ge=1,
                                     description="fewer response tokens than this in the fit data is an error")
    early_stop_by: Literal["ece", "nll"] = Field("ece", description="validation metric for early stopping")
    seed: int = Field(0, description="seed for the head's initialization and the record order")


class AdaptiveSettings(BaseModel):
    """The recipe's `calibrators.answer_adaptive:` section."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    use_hidden: bool = Field(True, description="read the prompt-end hidden state (else only the cheap features)")
    per_task_mean: bool = Field(False, description="one temperature per task: the mean predicted inverse temperature "
                                "over its prompts (Thermometer's recipe for a new task)")
    epochs: int = Field(100, gt=0, description="most passes over the training fit tasks")
    patience: int = Field(15, gt=0, description="epochs without a better held-out NLL before stopping")
    width: int = Field(32, gt=0, description="hidden units of the head")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout in the head")
    lr: float = Field(3e-3, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(1e-2, ge=0, description="AdamW weight decay")


OWN: dict[str, dict[str, type[BaseModel]]] = {  # level: {name: settings} of calq's own calibrators
    "token": {"none": NoSettings, "temperature": NoSettings, "ats": AtsConfig},
    "answer": {"answer_temperature": NoSettings, "answer_adaptive": AdaptiveSettings, "parent": NoSettings},
}


def _declared(level: str) -> dict[str, type[BaseModel]]:
    registry = LEVELS[level].plugins()
    return {**OWN[level], **{name: cls.Config for name, cls in registry.items()}}


def names(level: str = "token") -> list[str]:
    return list(_declared(level))


def settings(name: str, level: str = "token") -> type[BaseModel]:
    """The settings class of calibrator `name` (its section in the recipe)."""
    declared = _declared(level)
    if name not in declared:
        raise CalqError(f"unknown {LEVELS[level].kind} '{name}'", "calibrator", f"use one of: {', '.join(declared)}")
    return declared[name]
