"""Adaptive answer calibrator in the spirit of Thermometer (Shen et al., ICML 2024) and ATS.

A small MLP reads a question's features (the model's last hidden state at the end of the prompt, from the
forward pass that scored the choices, plus cheap ones: number of choices, score margin, choice-length spread,
entropy; see answer_features) and predicts a per-question inverse temperature beta > 0; probabilities are
softmax(beta * choice log-likelihoods), so the top choice and accuracy never change.

Training follows Thermometer: every gradient step uses questions of one fit task (tasks visited in a seeded
random order), loss = NLL of the gold choices. One fit task is held out from training to early-stop the head. The
head starts as `answer_temperature` fitted on the same training tasks (zero last layer), so training only has to
learn departures from it.

Regularised towards the single temperature: log beta = log(1/T) + s * (log beta_head - log(1/T)), T fitted on every
fit task, the shrinkage s in SHRINKAGE chosen by leave-one-task-out over the fit tasks (nested: each fold fits its
own T and head without the held-out tasks and scores every s by the held-out tasks' mean ECE; ties go to the
smaller s). With s = 0 (or fewer than three fit tasks, too few to choose s) the calibrator is that single
temperature, no head is kept, and `info` says so. Measured on SmolLM2-135M over 56 tasks (each fitted without its
group of ten held-out groups: benchmarks/results_answer_calibration_loto.txt) the head alone had mean ECE 0.089,
one temperature 0.081, the shrunk head 0.081 (s = 0 for 38 of them): on tasks where the model is at chance a head
learns per-question noise.

For a new task, Thermometer's own recipe uses one temperature per task: the mean of the predicted inverse
temperatures over that task's unlabelled prompts (`apply(..., per_task_mean=True)`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from calq.calib import answer_temperature
from calq.calib.answer_base import AnswerCalibrator, AnswerFitData, register, task_folds
from calq.calib.answer_features import AnswerSet, nll, top_choice
from calq.calib.registry import AdaptiveSettings
from calq.errors import CalqError
from calq.metrics import ece

CONFIG, WEIGHTS = "answer_adaptive.json", "answer_adaptive.safetensors"


LOG_BETA = (-7.0, 5.0)  # predicted log inverse temperature is clamped here: T between e^-5 and about 1100
SHRINKAGE = (0.0, 0.25, 0.5, 0.75, 1.0)  # share of the head's departure from the single temperature that is kept


class Head(torch.nn.Module):
    """standardized features -> Linear -> GELU -> Dropout -> Linear -> exp: one inverse temperature each.

    exp, not softplus: a fit set on which the model is at chance drives beta towards 0, where softplus has no
    gradient left and the head could not move back up on tasks that need a finite temperature."""

    def __init__(self, n_features: int, width: int = 32, dropout: float = 0.1, beta0: float = 1.0):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))
        self.net = torch.nn.Sequential(torch.nn.Linear(n_features, width), torch.nn.GELU(), torch.nn.Dropout(dropout),
                                       torch.nn.Linear(width, 1))
        torch.nn.init.zeros_(self.net[-1].weight)
        with torch.no_grad():  # exp(bias) = beta0
            self.net[-1].bias.fill_(min(max(math.log(beta0), LOG_BETA[0]), LOG_BETA[1]))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = (features.float() - self.mean) / self.std
        return self.net(x).squeeze(-1).clamp(*LOG_BETA).exp()


@register
class AnswerAdaptive(AnswerCalibrator):
    name = "answer_adaptive"
    Config = AdaptiveSettings
    min_fit_tasks = 2  # one is held out for early stopping
    version = 2  # 2: shrunk towards the single temperature by nested leave-one-task-out

    def __init__(self, head: Head | None, temperature: float, use_hidden: bool, info: dict,
                 per_task_mean: bool = False, shrinkage: float = 1.0):
        self.head, self.temperature, self.use_hidden, self.info = head, float(temperature), use_hidden, info
        self.per_task_mean, self.shrinkage = per_task_mean, float(shrinkage)
        self.fit_info = info
        if head is not None:
            head.eval()

    @classmethod
    def fit(cls, data: AnswerFitData, config: AdaptiveSettings | None = None) -> AnswerAdaptive:
        config = config or AdaptiveSettings()
        fitted = fit(data.tasks, data.validation_task, seed=data.seed,
                     **config.model_dump(exclude={"per_task_mean"}))
        fitted.per_task_mean = config.per_task_mean
        return fitted

    def inverse_temperatures(self, answers: AnswerSet, shrinkage: float | None = None) -> torch.Tensor:
        """One beta per question: the head's, shrunk towards the single temperature's (default: by the fitted
        shrinkage); the single temperature's alone when no head was kept."""
        single = torch.full((len(answers),), -math.log(self.temperature), dtype=torch.float64)
        shrinkage = self.shrinkage if shrinkage is None else shrinkage
        if self.head is None or shrinkage == 0:
            return single.exp()
        with torch.no_grad():
            head = self.head(answers.features(self.use_hidden)).double().log()
        return (single + shrinkage * (head - single)).exp()

    def apply(self, answers: AnswerSet, per_task_mean: bool | None = None, shrinkage: float | None = None
              ) -> torch.Tensor:
        """Calibrated probabilities [questions, most choices]; per_task_mean (default: as configured): one beta for
        the whole set, the mean of the predicted ones over its prompts."""
        beta = self.inverse_temperatures(answers, shrinkage)
        mean = self.per_task_mean if per_task_mean is None else per_task_mean
        return answers.probabilities(beta.mean() if mean else beta)

    def save(self, folder) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"kind": "answer_adaptive", "temperature": self.temperature, "use_hidden": self.use_hidden,
                  "per_task_mean": self.per_task_mean, "shrinkage": self.shrinkage, "info": self.info, "head": None}
        if self.head is not None:
            first = self.head.net[0]
            config["head"] = {"n_features": first.in_features, "width": first.out_features,
                              "dropout": self.head.net[2].p}
            save_file({k: v.contiguous() for k, v in self.head.state_dict().items()}, folder / WEIGHTS)
        (folder / CONFIG).write_text(json.dumps(config, indent=1))

    @classmethod
    def load(cls, folder, model_config=None) -> AnswerAdaptive:
        folder = Path(folder)
        if not (folder / CONFIG).exists():
            raise CalqError(f"no fitted adaptive answer calibrator in {folder}", "calibrator",
                            f"expected {CONFIG} there")
        config = json.loads((folder / CONFIG).read_text())
        head = None
        if config["head"] is not None:
            head = Head(**config["head"])
            head.load_state_dict(load_file(folder / WEIGHTS))
        return cls(head, config["temperature"], config["use_hidden"], config["info"], config["per_task_mean"],
                   config["shrinkage"])


def _train(head: Head, train: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
           valid: tuple[torch.Tensor, torch.Tensor, torch.Tensor], seed: int, epochs: int, patience: int,
           batch: int, lr: float, weight_decay: float) -> tuple[float, int]:
    """Thermometer-style: each step one task's minibatch. Returns (best validation NLL, its epoch); head ends there."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)

    def valid_nll() -> float:
        head.eval()
        with torch.no_grad():
            x, scores, mask = valid
            value = float(nll(torch.softmax(scores * head(x).double()[:, None], 1), mask))
        head.train()
        return value

    best, best_epoch, best_state = valid_nll(), 0, {k: v.clone() for k, v in head.state_dict().items()}
    names = list(train)
    for epoch in range(1, epochs + 1):
        steps = [(name, idx) for name in names
                 for idx in torch.randperm(len(train[name][0]), generator=generator).split(batch)]
        for k in torch.randperm(len(steps), generator=generator).tolist():
            name, idx = steps[k]
            x, scores, mask = train[name]
            loss = nll(torch.softmax(scores[idx] * head(x[idx]).double()[:, None], 1), mask[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        value = valid_nll()
        if value < best:
            best, best_epoch, best_state = value, epoch, {k: v.clone() for k, v in head.state_dict().items()}
        elif epoch - best_epoch >= patience:
            break
    head.load_state_dict(best_state)
    return best, best_epoch


def fit(tasks: dict[str, AnswerSet], validation_task: str | None = None, use_hidden: bool = True, seed: int = 0,
        **training) -> AnswerAdaptive:
    """Train the head on every fit task but `validation_task` (default: the last), early-stopped on it; shrink it
    towards one temperature fitted on every fit task by the shrinkage that leave-one-task-out chooses.
    `training`: train_head's settings (epochs, patience, batch, width, dropout, lr, weight_decay)."""
    if len(tasks) < 2:
        raise CalqError(f"the adaptive answer calibrator needs at least two fit tasks, got {len(tasks)}", "fit tasks",
                        "list two or more multiple-choice fit tasks (one is held out for early stopping)")
    validation_task = validation_task or list(tasks)[-1]
    if validation_task not in tasks:
        raise CalqError(f"validation task '{validation_task}' is not a fit task", "fit tasks",
                        f"use one of {list(tasks)}")
    fallback = answer_temperature.fit(list(tasks.values()))
    shrinkage, chosen = choose_shrinkage(tasks, use_hidden, seed, **training)
    info = {"temperature": fallback.temperature, "seed": seed, "shrinkage": shrinkage, **chosen}
    if shrinkage == 0:
        info.update(kept=False, at_bound=answer_temperature.at_bound(fallback.temperature))
        return AnswerAdaptive(None, fallback.temperature, use_hidden, info, shrinkage=0.0)
    head, trained = train_head(tasks, validation_task, use_hidden, seed, **training)
    info.update(kept=True, at_bound=False, **trained)
    return AnswerAdaptive(head, fallback.temperature, use_hidden, info, shrinkage=shrinkage)


def choose_shrinkage(tasks: dict[str, AnswerSet], use_hidden: bool = True, seed: int = 0, **training
                     ) -> tuple[float, dict]:
    """The SHRINKAGE value with the lowest mean ECE over held-out fit tasks (the smallest on a tie), each fold's head
    and temperature fitted without them (task_folds), and what was measured."""
    names = list(tasks)
    if len(names) < 3:
        return 0.0, {"shrinkage_reason": "fewer than three fit tasks: too few to choose how much of a head to keep "
                                         "by leave-one-task-out, so one temperature"}
    per_task: dict[float, list[float]] = {s: [] for s in SHRINKAGE}
    for held in task_folds(names):
        rest = {n: tasks[n] for n in names if n not in held}
        head, _ = train_head(rest, list(rest)[-1], use_hidden, seed, **training)
        fold = AnswerAdaptive(head, answer_temperature.fit(list(rest.values())).temperature, use_hidden, {})
        for name in held:
            for s in SHRINKAGE:
                per_task[s].append(ece(*top_choice(fold.apply(tasks[name], shrinkage=s), tasks[name].gold)))
    mean_ece = {s: sum(v) / len(v) for s, v in per_task.items()}
    return min(SHRINKAGE, key=mean_ece.get), {"shrinkage_mean_ece": {str(s): v for s, v in mean_ece.items()},
                                              "shrinkage_folds": len(task_folds(names))}


def train_head(tasks: dict[str, AnswerSet], validation_task: str, use_hidden: bool = True, seed: int = 0,
          epochs: int = 100, patience: int = 15, batch: int = 64, width: int = 32, dropout: float = 0.1,
          lr: float = 3e-3, weight_decay: float = 1e-2) -> tuple[Head, dict]:
    """The head trained on every task but `validation_task` and early-stopped on it, and what training measured."""
    torch.manual_seed(seed)
    train_sets = {name: s for name, s in tasks.items() if name != validation_task}
    baseline = answer_temperature.fit(list(train_sets.values()))
    arrays = {name: (s.features(use_hidden), s.scores(), s.gold_mask()) for name, s in tasks.items()}
    train = {name: arrays[name] for name in train_sets}
    valid = arrays[validation_task]
    all_x = torch.cat([x for x, _, _ in train.values()])
    head = Head(all_x.shape[1], width, dropout, beta0=1.0 / baseline.temperature)
    head.mean.copy_(all_x.mean(0))
    head.std.copy_(all_x.std(0).clamp(min=1e-4))
    head_nll, epoch = _train(head, train, valid, seed, epochs, patience, batch, lr, weight_decay)
    head.eval()
    temperature_nll = float(nll(baseline.apply(tasks[validation_task]), valid[2]))
    return head, {"validation_task": validation_task, "train_tasks": list(train_sets), "best_epoch": epoch,
                  "validation_nll_head": head_nll, "validation_nll_temperature": temperature_nll,
                  "temperature_train_tasks": baseline.temperature, "features": all_x.shape[1]}
