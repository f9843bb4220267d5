"""The one place that calls llm-compressor's `oneshot`."""

from __future__ import annotations

import contextlib
import functools
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def samples_dataset(samples: torch.Tensor):
    import torch
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": samples.tolist(), "attention_mask": torch.ones_like(samples).tolist()})


def quiet_logs(log_file: str | None, console: bool = False) -> None:
    """llm-compressor logs to a file in the run folder; to the console only with --debug."""
    import logging

    from llmcompressor.logger import LoggerConfig, configure_logger

    configure_logger(LoggerConfig(console_log_level="INFO" if console else None, log_file=log_file,
                                  log_file_level="INFO" if log_file else None))  # no file: no ./llmcompressor.log
    if not console:
        _hide_compressed_tensors_bars()
        # "is_fx_tracing will return true for both ...", once per run from llm-compressor's tracing
        logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
        # "Could not match `<layer>`", once per named target of a mixed checkpoint (int8_layers, int4_layers, a
        # budget's choice): compressed-tensors stops at the first target a module matches, and the class target
        # `Linear` comes first, so it reports name targets it did apply. calq checks them itself at plan time.
        logging.getLogger("compressed_tensors.utils.match").setLevel(logging.ERROR)


def _hide_compressed_tensors_bars() -> None:
    """compressed-tensors passes `disable=` to two tqdm bars itself, so TQDM_DISABLE cannot hide them."""
    from compressed_tensors.offload import dispatch
    from compressed_tensors.quantization.lifecycle import apply

    for module in (apply, dispatch):
        bar = getattr(module.tqdm, "__wrapped__", module.tqdm)
        module.tqdm = functools.wraps(bar)(lambda *args, _bar=bar, **kwargs: _bar(*args, **{**kwargs, "disable": True}))


def run_oneshot(model, recipe: list, samples: torch.Tensor | None, pipeline: str | None = None):
    """Apply `recipe` (llm-compressor modifiers) to `model` in place, calibrating on `samples` if given."""
    from llmcompressor import oneshot

    kwargs = {}
    if samples is not None:
        kwargs = dict(dataset=samples_dataset(samples), num_calibration_samples=samples.shape[0],
                      max_seq_length=samples.shape[1], shuffle_calibration_samples=False)
    if pipeline:
        kwargs["pipeline"] = pipeline
    with _config_on_disk(model):
        oneshot(model=model, recipe=recipe, **kwargs)
    return model


@contextlib.contextmanager
def _config_on_disk(model):
    """oneshot re-reads the model's config from `config.name_or_path` (to refuse checkpoints quantized by other
    tools). A model loaded from a GGUF file or built from a config has no config.json there: lend it the in-memory
    one for the call."""
    name = model.config.name_or_path
    if name and (Path(name) / "config.json").is_file():
        yield
        return
    with tempfile.TemporaryDirectory() as folder:
        model.config.save_pretrained(folder)
        model.config.name_or_path = folder
        try:
            yield
        finally:
            model.config.name_or_path = name
