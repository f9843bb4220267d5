"""Registry of quantization methods: name -> quantize(model, samples, variant, where) -> model.

Adding a method is one module with a `quantize` function and one line here.
"""

from __future__ import annotations

from calq.errors import CalqError
from calq.quant import minmax

METHODS = {
    "minmax": minmax.quantize,
}


def get(name: str, where: str):
    if name not in METHODS:
        raise CalqError(f"unknown method '{name}'", where, f"use one of: {', '.join(METHODS)}")
    return METHODS[name]
