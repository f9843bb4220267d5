"""The method contract. A quantization method is one pydantic config class that owns its settings, its checks and
how it quantizes (as llm-compressor's modifiers do); registering it (`@register`) puts it in the recipe schema
(`variants:` is a union discriminated on `method`), `calq keys`, the pipeline and `calq.quantize`.

    @register
    class MyMethod(MethodConfig):
        method: Literal["mine"] = "mine"
        schemes: ClassVar = ("w4a16",)
        my_setting: float = Field(0.5, description="...")

        def quantize(self, model, samples):   # samples: [n, seq] token ids, or None when needs_data() is False
            ...                               # modify `model` in place (llm-compressor modifiers + oneshot)
            return model

A method module is discovered by `calq.quant.methods` (this package's modules, then the entry point group
`calq.methods`: calq.registry), so adding a method is one file in this package or in a plugin package. It imports
torch and llm-compressor inside its functions only: the recipe schema is built from these classes, and `calq run`
checks a recipe before torch is imported (tests/test_recipe_errors.py).
Errors name keys relative to the variant ('group_size'); the caller adds where the variant is ('variants[1]').
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from calq.errors import CalqError
from calq.quant.budget import Budget
from calq.registry import Registry

if TYPE_CHECKING:
    import torch

SCHEMES = ("w8a8", "w4a16")
REGISTRY = Registry("method", "calq.quant", "methods", key=lambda cls: cls.model_fields["method"].default)
register = REGISTRY.register


class MethodUnavailable(CalqError):
    """The method's optional package is not installed; the pipeline may skip the variant with a notice."""


class MethodConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schemes: ClassVar[tuple[str, ...]] = SCHEMES  # the schemes this method can do
    version: ClassVar[int] = 1  # raise it when a fix changes what the method produces: finished runs redo its variants
    # why the method cannot hold some layers at int8 beside its int4 ones (int8_layers, a budget's promotions); empty
    # when it can
    no_int8_layers: ClassVar[str] = ""

    method: str = Field(description="quantization method (the list is at the end of `calq keys`)")
    scheme: str = Field(description="w8a8 (int8 weights and activations) or w4a16 (int4 group-wise weights)")
    group_size: int | None = Field(None, gt=0, description="w4a16: int4 group size along the input dimension "
                                                           "(default 128); must divide every quantized layer's input "
                                                           "width")
    bits: Literal[4, 5] | None = Field(
        None, description="w4a16: bits per weight in the groups (default 4); 5 exports as GGUF Q5_0 (symmetric: 5.5 "
                          "bits per weight at group_size 32) or Q5_1 (6)")
    symmetric: bool | None = Field(None, description="symmetric weights (default: true for w8a8, false for w4a16)")
    scale_dtype: Literal["bfloat16", "float16"] | None = Field(
        None, description="w4a16: round the group scales to this type before the weights are rounded to them, so a "
                          "runtime that stores its scales so runs calq's weights exactly: bfloat16 for ExecuTorch "
                          "(XNNPACK's int4 kernels keep bfloat16 scales), float16 for GGUF's block scales "
                          "(default: float32 scales)")
    dynamic_activations: bool | None = Field(
        None, description="w8a8: per-token dynamic activation scales instead of static per-tensor scales from "
                          "calibration (default false)")
    max_samples: int | None = Field(None, gt=0, description="calibrate this variant on at most this many of the "
                                                            "calibration samples (default: all)")
    max_seq_len: int | None = Field(None, gt=0, description="calibrate this variant on at most this many tokens of "
                                                            "each sample (default: all)")
    ignore: tuple[str, ...] = Field(("lm_head",), description="layers left unquantized, matched as llm-compressor "
                                                              "does: exact names, 're:<regex>' (from the start of the "
                                                              "name) or class names")
    int8_layers: tuple[str, ...] = Field(
        (), description="w4a16: Linear layers held at int8 instead (W8A16: symmetric int8 weights per output channel, "
                        "16-bit activations), matched as `ignore` is (exact names or 're:<regex>'): one checkpoint "
                        "with two config groups")
    int4_layers: tuple[str, ...] = Field(
        (), description="bits: 5: Linear layers held at 4 bits instead (the same groups and symmetry), matched as "
                        "`ignore` is: a third config group, GGUF Q4_0/Q4_1; what a budget with `demote` sets")
    embedding: Literal["float", "int8", "int4", "auto"] = Field(
        "float", description="int8 / int4: the token embedding (and the output head, tied or not) held as int8 or int4 "
                             "in symmetric groups of 32 along the hidden dimension with float16 scales, GGUF's Q8_0 / "
                             "Q4_0 layout, before the method runs (calq/quant/embedding.py); auto: the budget "
                             "(size_mb) chooses int4, int8 or float by the embedding's measured divergence")
    name: str | None = Field(None, description="variant name in reports (default '<method>-<scheme>[-g<group>]')")
    budget: Budget | None = Field(None, description="hold the Linears whose quantization moves the output most (the "
                                                    "sensitivity stage) at int8 (w4a16; unquantized for w8a8) within "
                                                    "this size budget")

    @field_validator("scheme")
    @classmethod
    def _scheme(cls, scheme: str) -> str:
        if scheme not in SCHEMES:
            raise ValueError(f"unknown scheme '{scheme}'; use one of: {', '.join(SCHEMES)}")
        if scheme not in cls.schemes:
            method = cls.model_fields["method"].default
            others = [name for name, c in REGISTRY.items() if scheme in c.schemes]
            raise ValueError(f"method '{method}' cannot do scheme '{scheme}' (it supports: {', '.join(cls.schemes)}); "
                             f"for {scheme} use a method among: {', '.join(others)}")
        return scheme

    @field_validator("group_size", "bits", "scale_dtype", "dynamic_activations")
    @classmethod
    def _applies_to_scheme(cls, value, info: ValidationInfo):
        only = {"group_size": "w4a16", "bits": "w4a16", "scale_dtype": "w4a16",
                "dynamic_activations": "w8a8"}[info.field_name]
        if value is not None and info.data.get("scheme") not in (None, only):
            raise ValueError(f"{info.field_name} applies to {only} only; remove it from this "
                             f"{info.data['scheme']} variant")
        return value

    @field_validator("int8_layers", "int4_layers", "budget")
    @classmethod
    def _mixed_precision(cls, targets, info: ValidationInfo):
        if targets and cls.no_int8_layers:
            method = cls.model_fields["method"].default
            raise ValueError(f"{method} cannot take {info.field_name}: {cls.no_int8_layers}; use method gptq or "
                             "minmax for mixed precision")
        if info.field_name == "int8_layers" and targets and info.data.get("scheme") != "w4a16":
            raise ValueError(f"int8_layers applies to w4a16 only (a {info.data.get('scheme')} variant is int8 "
                             "already); remove it")
        if info.field_name == "int4_layers" and targets and info.data.get("bits") != 5:
            raise ValueError("int4_layers holds layers of a 5-bit variant at 4 bits; set bits: 5 or remove it")
        if info.field_name == "budget" and targets and targets.demote and info.data.get("bits") != 5:
            raise ValueError("budget.demote holds layers of a 5-bit variant at 4 bits; set bits: 5 or remove demote")
        return targets  # each must match a quantized layer: check_layers, when the plan knows them

    @model_validator(mode="after")
    def _auto_embedding(self):
        if self.embedding == "auto" and (self.budget is None or self.budget.size_mb is None):
            raise ValueError("embedding: auto is chosen by a size budget over the whole model; add budget: {size_mb: "
                             "...} or set embedding to float, int8 or int4")
        return self

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        group = f"-g{self.group_size}" if self.group_size and self.scheme == "w4a16" else ""
        mixed = ("-int8layers" if self.int8_layers else "") + ("-int4layers" if self.int4_layers else "")
        embedding = f"-{self.embedding}emb" if self.embedding != "float" else ""
        scales = {"bfloat16": "-bf16scales", "float16": "-f16scales", None: ""}[self.scale_dtype]
        return f"{self.method}-{self.scheme_name}{group}{scales}{mixed}{embedding}"

    @property
    def weight_bits(self) -> int:
        """Bits per quantized weight in the scheme's first config group."""
        return 8 if self.scheme == "w8a8" else self.bits or 4

    @property
    def scheme_name(self) -> str:
        """The scheme as reports name it: w5a16 for w4a16 with `bits: 5`."""
        return "w5a16" if self.weight_bits == 5 else self.scheme

    # ---- what a method overrides ---------------------------------------------------------------------

    def quantize(self, model, samples: torch.Tensor | None):
        """Quantize `model` in place and return it; `samples` are this variant's calibration samples."""
        raise NotImplementedError

    def needs_data(self) -> bool:
        """Whether `quantize` reads calibration samples (the quantize stage is keyed on them then)."""
        return True

    def check_model(self, config) -> None:
        """Refuse a model architecture this method cannot handle (CalqError; MethodUnavailable for a missing extra)."""

    def extra_outputs(self, quantized, samples: torch.Tensor, load_base: Callable[[], Any]) -> dict[str, Any]:
        """Optional JSON artifacts of the method, {name: data}, written to RUN/<name>/<variant>.json."""
        return {}

    # ---- shared by every method ----------------------------------------------------------------------

    def apply(self, model, samples: torch.Tensor | None):
        """Check the model, then quantize it on the calibration samples this variant asked for (the embedding
        first, with `embedding: int8 | int4`, so a method calibrates on what the quantized embedding gives)."""
        if self.embedding == "auto":
            raise CalqError("embedding: auto is chosen by the budget (calq.quant.budget.select, then apply_choice), "
                            "which this variant has not been through", "embedding",
                            "run it in a recipe (the quantize stage chooses), or set embedding to float, int8 or int4")
        self.check_model(model.config)
        if self.embedding != "float":
            from calq.quant import embedding

            embedding.quantize_embeddings(model, embedding.BITS[self.embedding])
        return self.quantize(model, self.calibration_samples(samples) if self.needs_data() else None)

    def calibration_samples(self, samples: torch.Tensor) -> torch.Tensor:
        """The shared calibration samples cut to `max_samples` and `max_seq_len` (the first ones)."""
        return samples[: self.max_samples, : self.max_seq_len]

    def config_groups(self) -> dict:
        """The scheme as compressed-tensors config groups (the format vLLM and transformers load)."""
        if self.scheme == "w8a8":
            dynamic = bool(self.dynamic_activations)
            activations = {"num_bits": 8, "type": "int", "symmetric": True,
                           "strategy": "token" if dynamic else "tensor", "dynamic": dynamic}
            weights = {"num_bits": 8, "type": "int", "symmetric": True if self.symmetric is None else self.symmetric,
                       "strategy": "channel"}
            return {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": activations}}
        weights = {"num_bits": self.weight_bits, "type": "int",
                   "symmetric": False if self.symmetric is None else self.symmetric, "strategy": "group",
                   "group_size": self.group_size or 128}
        if self.scale_dtype:
            weights["scale_dtype"] = self.scale_dtype
        groups = {"group_0": {"targets": ["Linear"], "weights": weights}}
        if self.int8_layers:  # compressed-tensors gives a name or regex target precedence over the class 'Linear'
            groups["group_1"] = {"targets": list(self.int8_layers),
                                 "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}}
        if self.int4_layers:
            groups["group_2"] = {"targets": list(self.int4_layers), "weights": {**weights, "num_bits": 4}}
        return groups

    def int8_layer_names(self, names) -> list[str]:
        """Those of `names` held at int8 by `int8_layers` (W8A16)."""
        return matching(names, self.int8_layers)

    def int4_layer_names(self, names) -> list[str]:
        """Those of `names` held at 4 bits by `int4_layers`."""
        return matching(names, self.int4_layers)

    def quantized_layers(self, layers: dict) -> dict:
        """Those of `layers` ({name: module}) that `quantization_modifier` quantizes, matched by compressed-tensors'
        own rule, as llm-compressor matches them: an exact name, 're:' a regex matched from the start of the name,
        or a class name."""
        from compressed_tensors.utils import is_match

        targets = [t for group in self.config_groups().values() for t in group["targets"]]
        return {name: m for name, m in layers.items() if is_match(name, m, targets, self.ignore)}

    def quantization_modifier(self):
        from llmcompressor.modifiers.quantization import QuantizationModifier

        return QuantizationModifier(config_groups=self.config_groups(), ignore=list(self.ignore))

    def check_layers(self, widths: dict[str, int], config) -> None:
        """Plan-time checks on the layers that will be quantized ({name: input width}) and the model config: the
        group size, every `int8_layers` entry matching one of them, the embedding's width for `embedding: int8`."""
        from compressed_tensors.utils import match_name

        self.check_group_size(widths)
        for key in ("int8_layers", "int4_layers"):
            for target in getattr(self, key):
                if not any(match_name(name, target) for name in widths):
                    raise CalqError(f"{key} entry '{target}' matches none of the {len(widths)} quantized layers "
                                    f"(e.g. {next(iter(widths), 'none')})", key,
                                    "give full module names or 're:' regexes matched from the start ('re:.*v_proj')")
        both = set(self.int8_layer_names(widths)) & set(self.int4_layer_names(widths))
        if both:
            raise CalqError(f"{len(both)} layers are in both int8_layers and int4_layers (e.g. {min(both)})",
                            "int4_layers", "give each layer one precision")
        hidden = getattr(config.get_text_config(), "hidden_size", 0)
        if self.embedding != "float" and hidden % 32:
            raise CalqError(f"embedding: {self.embedding} holds blocks of 32 along the hidden size, and it is {hidden}",
                            "embedding", "use embedding: float for this model")

    def check_group_size(self, widths: dict[str, int]) -> None:
        """The group size must divide the input width of every quantized layer; name the layers and a size that
        works."""
        if self.scheme != "w4a16":
            return
        int8 = set(self.int8_layer_names(widths))  # int8 per channel: no group to divide
        widths = {name: width for name, width in widths.items() if name not in int8}
        group = self.group_size or 128
        bad = sorted(name for name, w in widths.items() if w % group)
        if not bad:
            return
        sizes = sorted(set(widths.values()))
        working = [g for g in (256, 128, 64, 32, 16) if all(w % g == 0 for w in sizes)]
        shown = ", ".join(f"{n} ({widths[n]})" for n in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        fix = (f"set group_size: {working[0]}" if working
               else "set group_size to a divisor of " + ", ".join(map(str, sizes)))
        raise CalqError(f"group_size {group} does not divide the input width of {len(bad)} layers: {shown}",
                        "group_size", fix)


def matching(names, targets) -> list[str]:
    """Those of `names` that one of `targets` matches as llm-compressor matches them (exact names or 're:' regexes)."""
    from compressed_tensors.utils import match_name

    return [name for name in names if any(match_name(name, target) for target in targets)]
