"""Every calibrator: calq's own are the modules of this package that register one (calq.calib.base for token-level,
calq.calib.answer_base for answer-level), a plugin's are named by an entry point, both discovered here (TOKEN,
ANSWER); others register themselves on import. Fitting a set of token-level ones, validating and selecting, and
parsing `<name>:<arg>` are the same for all."""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import BaseModel

from calq.calib import registry
from calq.calib.base import Calibrator, FitData
from calq.calib.hidden import Cached, evaluate_cached
from calq.calib.select import select
from calq.errors import CalqError

TOKEN = registry.TOKEN.discover()
ANSWER = registry.ANSWER.discover()


def fit_all(data: FitData, settings: dict[str, BaseModel], select_by: str = "ece", batch_size: int = 8,
            text: Cached | None = None) -> tuple[dict[str, Calibrator], dict[str, dict], str]:
    """Fit `none` and each calibrator named in `settings` ({name: its config}) on `data.train`; validate them all
    on `data.val` (domain `instructions`) and on every window of `text` (domain `text`: plain text held apart from
    any evaluation text), one pass each; select the one whose worst domain changes least against `none`
    (calq.calib.select). Returns (fitted, {domain: {calibrator: metrics}}, selected name)."""
    fitted = {"none": TOKEN.get("none").fit(data, None)}
    for name, config in settings.items():
        fitted[name] = TOKEN.get(name).fit(data, config)
    domains = {"instructions": (data.cached, data.val)}
    if text is not None:
        domains["text"] = (text, torch.arange(len(text)))
    validation = {}
    for domain, (cached, records) in domains.items():
        metrics = evaluate_cached(cached, records, data.logits, fitted, batch_size, data.chunk)
        validation[domain] = {name: {k: v for k, v in m.items() if k != "reliability"} for name, m in metrics.items()}
    return fitted, validation, select(validation, select_by)


def save_all(fitted: dict[str, Calibrator], folder: Path) -> None:
    for name, calibrator in fitted.items():
        calibrator.save(Path(folder) / name)


def load_all(folder: Path, model_config, names: list[str]) -> dict[str, Calibrator]:
    return {name: TOKEN.get(name).load(Path(folder) / name, model_config) for name in names}


def parse(spec: str | None, model_config) -> tuple[str, Calibrator]:
    """'temperature:1.2' or 'ats:<folder>' -> (name, calibrator); None or 'none' -> ('none', identity)."""
    name, _, arg = (spec or "none").partition(":")
    cls = TOKEN.get(name)
    if cls.argument is not None and not arg:
        raise CalqError(f"calibrator '{name}' needs an argument", "calibrator", f"write {name}:{cls.argument}")
    return name, cls.from_arg(arg, model_config)
