"""The token-level calibrator contract and `register`, which fills its registry (calq.calib.registry.TOKEN: the
pipeline, the lm-eval model, the report and the recipe use it).

A token-level calibrator multiplies each position's logits by one positive scale predicted from the model's
last hidden states (after the final norm), so the argmax and token-level accuracy never change:

    @register
    class MyCalibrator(Calibrator):
        name = "mine"
        Config = MySettings                      # pydantic; the recipe's `calibrators.mine:` section

        @classmethod
        def fit(cls, data: FitData, config) -> "MyCalibrator": ...   # from cached hidden states (data.train)
        def scale(self, hidden, attention_mask=None): ...             # [B, T, H] -> positive [B, T]
        def save(self, folder): ...                                   # files in `folder`
        @classmethod
        def load(cls, folder, model_config) -> "MyCalibrator": ...

Registered calibrators are fitted per variant when the recipe lists them (`calibrators.use`), evaluated with one
forward pass of the model for all of them, selected by `calq.calib.select`, shown in the report and loadable in the
lm-eval model as `calibrator=<name>:<folder>`. Adding one is one file: calq's own live in this package and are
discovered by `calq.calib.calibrators` (and declare their name and settings in `calq.calib.registry.OWN` too, so that
a recipe is checked without importing torch); a plugin package's are found through the entry point group
`calq.calibrators`; others register on import.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel
from torch import nn

from calq.calib.hidden import Cached, Logits
from calq.calib.registry import TOKEN, NoSettings


@dataclass
class FitData:
    """What a calibrator is fitted from: one model's cached hidden states on the fit records, split once into
    `train` and `val` record indices shared by every calibrator (selection compares them on `val`)."""

    cached: Cached
    train: torch.Tensor
    val: torch.Tensor
    logits: Logits  # the model's output layer: hidden states -> logits, a chunk at a time
    model_config: Any
    chunk: int = 1024  # positions per chunk when logits are recomputed (at most hidden.LOGITS_BUDGET values)
    progress: Callable[[str, int, int], None] | None = None  # (description, done, total)
    memo: dict = field(default_factory=dict)  # results shared between calibrators (the global temperature)


def split(records: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) record indices: a seeded permutation, the first `val_fraction` of it validates."""
    order = torch.randperm(records, generator=torch.Generator().manual_seed(seed))
    n_val = min(max(1, round(records * val_fraction)), records - 1)
    return order[n_val:], order[:n_val]


class Calibrator:
    name: ClassVar[str]
    Config: ClassVar[type[BaseModel]] = NoSettings
    version: ClassVar[int] = 1  # raise it when a fix changes what it fits: finished runs refit the calibrators
    fuse: ClassVar[str | None] = None  # how an exporter fuses it (none, temperature, ats); None: it cannot
    needs_hidden: ClassVar[bool] = True  # False: the scale does not depend on the hidden states
    identity: ClassVar[bool] = False  # True: it leaves the model's probabilities as they are
    argument: ClassVar[str | None] = "<folder of a fitted one>"  # what `<name>:<arg>` takes (from_arg); None: nothing
    fit_info: dict = {}  # what fitting measured (sizes, history), kept in calibrators.json

    @classmethod
    def fit(cls, data: FitData, config: BaseModel) -> Calibrator:
        raise NotImplementedError

    def scale(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [B, T, H] -> positive scale [B, T] (float32). attention_mask [B, T]: 1 on real tokens."""
        raise NotImplementedError

    def __call__(self, logits: torch.Tensor, hidden: torch.Tensor | None,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Calibrated logits. `logits` may cover only the last positions of `hidden` (logits_to_keep)."""
        if hidden is None:
            hidden = logits.new_zeros(*logits.shape[:2], 1)  # a calibrator that needs no hidden states
        s = self.scale(hidden, attention_mask)[:, -logits.shape[1]:]
        return logits * s.to(logits.dtype)[..., None]

    def save(self, folder: Path) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)

    @classmethod
    def load(cls, folder: Path, model_config) -> Calibrator:
        raise NotImplementedError

    @classmethod
    def from_arg(cls, arg: str, model_config) -> Calibrator:
        """What `calibrator=<name>:<arg>` builds in the lm-eval model: by default, the one saved in folder `arg`."""
        return cls.load(Path(arg), model_config)

    def to(self, device) -> Calibrator:
        return self

    def eval(self) -> Calibrator:
        return self


register = TOKEN.register


@register
class NoCalibration(Calibrator):
    """`none`: the model's own probabilities."""

    name = "none"
    needs_hidden = False
    fuse = "none"
    identity = True
    argument = None

    @classmethod
    def fit(cls, data: FitData, config: BaseModel) -> NoCalibration:
        return identity

    def scale(self, hidden, attention_mask=None):
        return hidden.new_ones(hidden.shape[:2], dtype=torch.float32)

    def __call__(self, logits, hidden=None, attention_mask=None):
        return logits

    @classmethod
    def load(cls, folder, model_config) -> NoCalibration:
        return identity

    @classmethod
    def from_arg(cls, arg, model_config) -> NoCalibration:
        return identity


identity = NoCalibration()


# ---- a model that returns calibrated logits --------------------------------------------------------

class CalibratedLM(nn.Module):
    """A causal LM whose forward returns `calibrator(logits, last hidden state)` in place of its logits.

    Works for full-sequence forward passes (scoring, evaluation, lm-eval loglikelihood), padded on either side.
    `generate()` is not supported: with a KV cache the model returns hidden states for the new tokens only, and a
    calibrator that attends over positions (the ATS head) needs its own keys and values for every earlier position,
    which this wrapper does not cache.
    """

    def __init__(self, model: nn.Module, calibrator: Calibrator):
        super().__init__()
        self.model, self.calibrator = model, calibrator

    @property
    def config(self):
        return self.model.config

    @property
    def device(self):
        return self.model.device

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, **kwargs):
        if past_key_values is not None:
            raise NotImplementedError("CalibratedLM scores whole sequences; it does not take past_key_values "
                                      "(see its docstring)")
        keep_hidden = kwargs.pop("output_hidden_states", False)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False,
                         **kwargs)
        hidden = out.hidden_states[-1]
        out.logits = self.calibrator(out.logits, hidden, attention_mask)
        if not keep_hidden:
            out.hidden_states = None
        return out

    def generate(self, *args, **kwargs):
        raise NotImplementedError("generation with calibrated logits is not supported: the ATS head attends over all "
                                  "earlier positions and keeps no KV cache of its own; score full sequences instead")
