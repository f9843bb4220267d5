"""Registry of quantization methods: name -> Method (its quantize function, the schemes it can do, whether it needs data).

Adding a method is one module with a `quantize(model, samples, variant, where) -> model` function and one line here.
Call a method through its registry entry: `get(name, where)(model, samples, variant, where)` checks the variant and
the model first and hands the method only the calibration samples this variant asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from calq.errors import CalqError
from calq.quant import autoawq, awq, minmax, smoothquant
from calq.quant.schemes import SCHEMES, calibration_samples
from calq.recipe import VariantSpec


class MethodUnavailable(CalqError):
    """The method's optional package is not installed; the pipeline may skip the variant with a notice."""


@dataclass(frozen=True)
class Method:
    name: str
    quantize: Callable  # (model, samples or None, variant, where) -> model
    schemes: tuple[str, ...]
    needs_data: Callable[[VariantSpec], bool]
    check_model: Callable | None = None  # (model config, variant, where) -> None; raises CalqError
    version: int = 1  # raise it when a fix changes what the method produces: finished runs then redo its variants

    def __call__(self, model, samples: torch.Tensor, variant: VariantSpec, where: str):
        check(variant, where, model.config)
        return self.quantize(model, calibration_samples(samples, variant) if self.needs_data(variant) else None, variant, where)


def _always(v: VariantSpec) -> bool:
    return True


METHODS = {
    "minmax": Method("minmax", minmax.quantize, ("w8a8", "w4a16"), minmax.needs_data),
    "smoothquant": Method("smoothquant", smoothquant.quantize, ("w8a8",), _always),
    "awq": Method("awq", awq.quantize, ("w4a16",), _always, awq.check_model),
    "autoawq": Method("autoawq", autoawq.quantize, ("w4a16",), _always, autoawq.check_model, version=2),  # CPU fix
}


def get(name: str, where: str) -> Method:
    if name not in METHODS:
        raise CalqError(f"unknown method '{name}'", where, f"use one of: {', '.join(METHODS)}")
    return METHODS[name]


def check(v: VariantSpec, where: str, config=None) -> None:
    """Everything about variant `where` that can fail, checked before long work: method, scheme, their
    combination and, given the model config, whether the method handles this architecture."""
    method = get(v.method, f"{where}.method")
    if v.scheme not in SCHEMES:
        raise CalqError(f"unknown scheme '{v.scheme}'", f"{where}.scheme", f"use one of: {', '.join(SCHEMES)}")
    if v.scheme not in method.schemes:
        others = [m for m in METHODS.values() if v.scheme in m.schemes]
        raise CalqError(f"method '{v.method}' cannot do scheme '{v.scheme}' (it supports: {', '.join(method.schemes)})",
                        f"{where}.scheme", f"use scheme {' or '.join(method.schemes)}, or for {v.scheme} a method among: "
                        + ", ".join(m.name for m in others))
    if config is not None and method.check_model is not None:
        method.check_model(config, v, where)


def needs_data(v: VariantSpec) -> bool:
    return get(v.method, "method").needs_data(v)
