"""AWQ (W4A16) through llm-compressor: AWQModifier searches per-channel scales that protect the weights
the activations lean on most, then the same W4A16 QuantizationModifier as minmax quantizes them
(asymmetric int4 groups by default)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import ClassVar, Literal
from unittest import mock

from pydantic import Field

from calq.errors import CalqError
from calq.quant import llmc
from calq.quant.base import MethodConfig, register


@register
class Awq(MethodConfig):
    method: Literal["awq"] = "awq"
    schemes: ClassVar = ("w4a16",)
    # measured with llm-compressor's AWQModifier: the grid search for a mapping whose balanced layers mix int4 groups
    # and int8 channels fails on a shape mismatch, and with promoted layers left unquantized it divides by zero
    no_int8_layers: ClassVar = "llm-compressor's AWQ search balances each mapping's layers with one int4 scheme"
    n_grid: int = Field(20, ge=2, description="scale ratios AWQ's search tries per mapping (llm-compressor's n_grid; "
                                              "each is a forward pass of the mapping's block over the samples, "
                                              "so the search time is proportional to it)")

    def modifiers(self) -> list:
        from llmcompressor.modifiers.transform import AWQModifier

        return [AWQModifier(n_grid=self.n_grid), self.quantization_modifier()]

    def quantize(self, model, samples):
        with no_pinning_without_accelerator():
            return llmc.run_oneshot(model, self.modifiers(), samples)

    def check_model(self, config) -> None:
        check_awq_mappings(config)


@contextmanager
def no_pinning_without_accelerator():
    """llm-compressor 0.14's AWQ pins the cached layer inputs before its grid search
    (`IntermediatesCache.pin_memory`) so that their repeated copies to the GPU can run asynchronously.
    Pinning needs an accelerator: without one torch raises "Cannot access accelerator device when none
    is available" (older torch: "Found no NVIDIA driver"). Without an accelerator the inputs never leave
    the CPU, so skipping the pinning changes nothing else. tests/test_quant_methods.py fails once the
    unpatched call stops raising, i.e. when this patch can go."""
    import torch

    if torch.accelerator.is_available():
        yield
        return
    from llmcompressor.pipelines.cache import IntermediatesCache

    with mock.patch.object(IntermediatesCache, "pin_memory", lambda self, *args, **kwargs: None):
        yield


def check_awq_mappings(config) -> None:
    """llm-compressor maps architectures to AWQ (norm -> projections) mappings and silently falls back to
    Llama-style mappings for the others; refuse an architecture where those would not fit."""
    import torch
    from compressed_tensors.utils import match_name
    from llmcompressor.modifiers.transform.awq import (
        AWQ_DYNAMIC_MAPPING_REGISTRY,
        AWQ_MAPPING_REGISTRY,
        default_mappings,
    )
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    arch = type(model).__name__
    if arch in AWQ_MAPPING_REGISTRY or arch in AWQ_DYNAMIC_MAPPING_REGISTRY:
        return
    names = [name for name, _ in model.named_modules()]
    patterns = [p for m in default_mappings for p in (m.smooth_layer, *m.balance_layers)]
    unmatched = [p for p in patterns if not any(match_name(n, p) for n in names)]
    if unmatched:
        raise CalqError(f"llm-compressor has no AWQ mappings for {arch}, and its Llama-style default mappings do not "
                        f"fit it (no layer matches '{unmatched[0]}')", "method",
                        "use method minmax for w4a16, or a model whose architecture llm-compressor maps for AWQ "
                        "(Llama, Mistral, Qwen2/3, Gemma2/3, Phi3, ...)")
