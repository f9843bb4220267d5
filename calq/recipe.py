"""The recipe: one YAML file that drives one run. Every key is declared here, with its help text.

`calq keys` prints this schema; errors name the key, the bad value and the fix.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from calq.calib.ats import AtsConfig
from calq.errors import CalqError
from calq.report.gates import Gates


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSpec(Strict):
    """Where text comes from. `source` takes one of:
    a local file (`.txt`, `.jsonl`, `.json`; `@data/…` is relative to --data-dir),
    `hf:DATASET_ID` (Hugging Face datasets; needs network), or `builtin:pydoc` (offline prose shipped with Python).
    """

    source: str = Field(description="local file, '@data/<path under --data-dir>', 'hf:<dataset id>' or 'builtin:pydoc'")
    split: str | None = Field(None, description="dataset split for hf: sources (default 'train'); 'train'/'test' halves for builtin:pydoc")
    subset: str | None = Field(None, description="dataset config name for hf: sources (e.g. 'wikitext-2-raw-v1')")
    text_field: str | None = Field(None, description="record field holding the text (default: 'text'; Alpaca records with 'instruction'/'output' are detected)")
    fallback: str | None = Field(None, description="source used instead when `source` is unavailable offline (e.g. 'builtin:pydoc'); the report names the one used")
    max_records: int | None = Field(None, gt=0, description="read at most this many records")


class ModelSpec(Strict):
    id: str = Field("smollm2-135m", description="'smollm2-135m' (bundled), a Hugging Face id, a local model folder, or a .gguf file")
    gguf_file: str | None = Field(None, description="GGUF file name inside a folder/repo given as `id`")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="weights dtype for calibration and evaluation (float32 on CPU)")
    revision: str | None = Field(None, description="hub revision for Hugging Face ids")


class CalibrationSpec(Strict):
    data: DataSpec = Field(description="text for activation ranges and quantization calibration")
    num_samples: int = Field(128, ge=1, description="number of calibration samples (128-512 unless allow_any_size)")
    seq_len: int = Field(256, ge=8, description="tokens per calibration sample")
    seed: int = Field(0, description="seed for choosing the samples")
    allow_any_size: bool = Field(False, description="allow num_samples outside 128-512 (tests, quick looks)")

    @model_validator(mode="after")
    def _range(self):
        if not self.allow_any_size and not 128 <= self.num_samples <= 512:
            raise ValueError(
                f"num_samples={self.num_samples} is outside 128-512; use 128-512 or set calibration.allow_any_size: true"
            )
        return self


class VariantSpec(Strict):
    method: str = Field(description="quantization method (the list is at the end of `calq keys`)")
    scheme: str = Field(description="quantization scheme: w8a8 (int8 weights and activations) or w4a16 (int4 group-wise weights)")
    group_size: int | None = Field(None, gt=0, description="int4 group size along the input dimension (w4a16); must divide every quantized layer's input width")
    symmetric: bool | None = Field(None, description="symmetric weights (default: true for w8a8, false for w4a16)")
    dynamic_activations: bool = Field(False, description="w8a8: per-token dynamic activation scales instead of static per-tensor scales from calibration")
    smoothing_strength: float = Field(0.8, description="smoothquant: how much of the activation outliers moves into the weights (alpha, 0 < x < 1)")
    max_samples: int | None = Field(None, gt=0, description="calibrate this variant on at most this many of the calibration samples (default: all)")
    max_seq_len: int | None = Field(None, gt=0, description="calibrate this variant on at most this many tokens of each sample (default: all)")
    ignore: tuple[str, ...] = Field(("lm_head",), description="layers left unquantized (names or 're:<regex>')")
    name: str | None = Field(None, description="variant name in reports (default '<method>-<scheme>[-g<group>]')")

    @field_validator("smoothing_strength")
    @classmethod
    def _strength(cls, v):
        if not 0 < v < 1:
            raise ValueError("smoothing_strength must lie strictly between 0 and 1 (SmoothQuant's alpha; 0.5-0.8 is usual)")
        return v

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        g = f"-g{self.group_size}" if self.group_size and self.scheme != "w8a8" else ""
        return f"{self.method}-{self.scheme}{g}"


class TokenEvalSpec(Strict):
    data: DataSpec = Field(description="held-out text for token-level calibration (never the calibration text)")
    max_tokens: int = Field(40960, gt=0, description="evaluate at most this many tokens")
    seq_len: int = Field(512, ge=8, description="window length; windows do not overlap")
    batch_size: int = Field(4, ge=1, description="windows per forward pass")
    bins: int = Field(15, ge=2, description="equal-width ECE bins")


class TasksSpec(Strict):
    """Benchmarks through the lm-eval harness, for every variant × calibrator."""

    names: tuple[str, ...] = Field(description="calq's task names: mmlu, mmlu_5shot, truthfulqa_mc1, truthfulqa_mc2, arc_easy, arc_challenge, piqa, boolq, lambada, triviaqa (read from --data-dir)")
    limit: int | None = Field(200, ge=1, description="examples per task (None: all)")
    batch_size: int = Field(8, ge=1, description="requests per forward pass")
    bootstrap: int = Field(1000, ge=0, description="bootstrap resamples for the answer-level confidence intervals")
    seed: int = Field(0, description="bootstrap seed")


class EvaluationSpec(Strict):
    tokens: TokenEvalSpec = Field(description="token-level calibration on held-out text")
    tasks: TasksSpec | None = Field(None, description="task accuracy and answer-level calibration through lm-eval (omit: none)")


class CalibratorsSpec(Strict):
    """Calibrators fitted on each variant's own hidden states: a global temperature and an ATS head."""

    data: DataSpec = Field(description="instruction data: Alpaca-style records (instruction, input, output), rendered with the chat template; the loss covers response tokens only")
    fit_records: int = Field(300, ge=2, description="records the calibrators are fitted on (ats.val_fraction of them validate)")
    heldout_records: int = Field(200, ge=1, description="further records whose responses are the held-out evaluation set (never fitted)")
    seed: int = Field(0, description="seed for splitting the records into fit and held-out")
    ats: AtsConfig = Field(default_factory=AtsConfig, description="how the ATS head is fitted")


class Recipe(Strict):
    name: str = Field(description="run name; an output folder belongs to one recipe name")
    model: ModelSpec = Field(default_factory=ModelSpec, description="the model to compress")
    calibration: CalibrationSpec = Field(description="calibration samples for ranges and quantization")
    variants: tuple[VariantSpec, ...] = Field(description="the quantized variants to build (the unquantized baseline is always included)")
    evaluation: EvaluationSpec = Field(description="held-out evaluation")
    calibrators: CalibratorsSpec | None = Field(None, description="fit temperature and ATS calibrators per variant (omit: evaluate uncalibrated only)")
    gates: Gates | None = Field(None, description="release gates: `calq run` exits 1 when one fails")
    output: str | None = Field(None, description="run folder (default runs/<name>; --out overrides)")
    outliers_top_k: int = Field(10, ge=1, description="layers listed in the report's outlier summary")

    @field_validator("variants")
    @classmethod
    def _unique(cls, v):
        labels = [x.label for x in v]
        dup = {x for x in labels if labels.count(x) > 1}
        if dup:
            raise ValueError(f"variant names repeat: {sorted(dup)}; give each a distinct `name`")
        if not v:
            raise ValueError("list at least one variant")
        return v


def _location(loc: tuple) -> str:
    return ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in loc).replace(".[", "[")


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the last key of `loc` (for 'did you mean' suggestions)."""
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        sub = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if sub is None:
            return None
        model = sub
    return model


def explain(err: ValidationError, where: str) -> CalqError:
    e = err.errors()[0]
    loc = tuple(e["loc"])
    key = _location(loc) or "(top level)"
    if e["type"] == "extra_forbidden":
        owner = _model_at(Recipe, loc)
        known = list(owner.model_fields) if owner else []
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"known keys here: {', '.join(known)}"
        return CalqError(f"unknown key '{key}'", where, f"{hint} (`calq keys` lists every key)")
    if e["type"] == "missing":
        return CalqError(f"missing key '{key}'", where, "add it (`calq keys` lists every key and its meaning)")
    msg = e["msg"].removeprefix("Value error, ")
    value = e.get("input")
    shown = f" (got {value!r})" if value is not None and not isinstance(value, dict) else ""
    return CalqError(f"'{key}': {msg}{shown}", where, "see `calq keys` for the allowed values")


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise CalqError(f"recipe file not found: {path}", None, "pass the path of a YAML recipe, e.g. recipes/quickstart.yaml")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise CalqError(f"malformed YAML ({problem})", where, "check indentation and quoting at that line") from None
    if not isinstance(raw, dict):
        raise CalqError("a recipe must be a YAML mapping of keys", str(path), "start from recipes/quickstart.yaml")
    return parse_recipe(raw, str(path))


def parse_recipe(raw: dict[str, Any], where: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        raise explain(err, where) from None


def describe_keys(model: type[BaseModel] = Recipe, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) rows for every recipe key, nested keys dotted."""
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        sub = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if field.is_required():
            default = "required"
        elif field.default_factory is not None:
            default = "(see below)"
        else:
            default = repr(field.default)
        rows.append((key + ("[]" if ann is not None and "tuple" in str(ann) and sub else ""), default, field.description or ""))
        if sub is not None:
            rows.extend(describe_keys(sub, key + ("[]." if "tuple" in str(ann) else ".")))
    return rows
