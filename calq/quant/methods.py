"""Every quantization method: the modules of this package and the plugins' (entry point group `calq.methods`) that
register a MethodConfig (calq.quant.base) are discovered here, so adding a method is one file. `config(spec)` turns a
recipe entry into its method's config."""

from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import Field, ValidationError

from calq.errors import CalqError
from calq.quant.base import REGISTRY, MethodConfig

METHODS = REGISTRY.discover()


def variant_config() -> Any:
    """The recipe's `variants[]` entry: one config class per method registered now, chosen by its `method` key."""
    return Annotated[Union[tuple(METHODS.values())], Field(discriminator="method")]  # noqa: UP007


def config(spec: dict | MethodConfig) -> MethodConfig:
    """A method config from a dict like `{"method": "awq", "scheme": "w4a16", "group_size": 64}`."""
    if isinstance(spec, MethodConfig):
        return spec
    if not isinstance(spec, dict) or "method" not in spec:
        raise CalqError("a variant needs a `method`", "method", f"use one of: {', '.join(METHODS)}")
    cls = METHODS.get(spec["method"])
    try:
        return cls.model_validate(spec)
    except ValidationError as err:
        e = err.errors()[0]
        key = ".".join(map(str, e["loc"])) or "method"
        raise CalqError(e["msg"].removeprefix("Value error, "), key, "see `calq keys` for the allowed values") from None
