"""The recipe: one YAML file that drives one run. It composes the configs its parts declare: data sources
(calq.data.DataSpec), one config per quantization method (calq.quant), one per calibrator (calq.calib), gates
(calq.report.gates). Nothing below this module imports it.

`calq keys` prints this schema; errors name the key, the bad value and the fix.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from calq.calib import registry
from calq.data import DataSpec
from calq.errors import CalqError
from calq.evaluation.baseline import BaselineCheck
from calq.names import check_name
from calq.quant.base import MethodConfig
from calq.quant.methods import METHODS, variant_config
from calq.report.gates import Gates


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(Strict):
    id: str = Field("smollm2-135m", description="'smollm2-135m' (bundled), a Hugging Face id, a local model folder, "
                                                "or a .gguf file")
    gguf_file: str | None = Field(None, description="GGUF file name inside a folder/repo given as `id`")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="weights dtype for calibration and evaluation (float32 on CPU)")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit) for Hugging Face ids: config, "
                                                   "tokenizer and weights all come from it")
    check: BaselineCheck = Field(default_factory=BaselineCheck,
                                 description="the baseline check before any long work (calq.evaluation.baseline)")
    device_map: str | None = Field(None, description="placement for the calibrate and evaluate stages' model, passed "
                                                     "to from_pretrained (auto: spread over the visible GPUs through "
                                                     "accelerate); omit: one device")


class CalibrationSpec(Strict):
    data: DataSpec = Field(description="text for activation ranges and quantization calibration")
    num_samples: int = Field(128, ge=1, description="number of calibration samples (128-512 unless allow_any_size)")
    seq_len: int = Field(256, ge=8, description="tokens per calibration sample")
    seed: int = Field(0, description="seed for choosing the samples")
    allow_any_size: bool = Field(False, description="allow num_samples outside 128-512 (tests, quick looks)")

    @model_validator(mode="after")
    def _range(self):
        if not self.allow_any_size and not 128 <= self.num_samples <= 512:
            raise ValueError(f"num_samples={self.num_samples} is outside 128-512; use 128-512 or set "
                             "calibration.allow_any_size: true")
        return self


class TokenEvalSpec(Strict):
    data: DataSpec = Field(description="held-out text for token-level calibration (never the calibration text)")
    max_tokens: int = Field(40960, gt=0, description="evaluate at most this many tokens")
    seq_len: int = Field(512, ge=8, description="window length; windows do not overlap")
    batch_size: int = Field(4, ge=1, description="windows per forward pass")
    bins: int = Field(15, ge=2, description="equal-width ECE bins")

    @model_validator(mode="after")
    def _one_window(self):
        if self.max_tokens < self.seq_len:
            raise ValueError(f"max_tokens={self.max_tokens} is less than one window of seq_len={self.seq_len}; "
                             "raise max_tokens or lower seq_len")
        return self


class CalibratorSection(BaseModel):
    """A section listing calibrators in `use`, each with an optional settings section under its own name, validated by
    that calibrator's Config (so an error names the key)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    level: ClassVar[str] = "token"
    use: tuple[str, ...]

    @model_validator(mode="after")
    def _calibrator_settings(self):
        known = [n for n in registry.names(self.level) if n != "none"]
        for name in self.use:
            if name not in known:
                raise ValueError(f"unknown calibrator '{name}' in use; known: {', '.join(known)}")
        for key, value in (self.model_extra or {}).items():
            if key not in known:
                close = difflib.get_close_matches(key, [*type(self).model_fields, *known], n=1)
                hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(type(self).model_fields)}"
                raise ValueError(f"unknown key '{key}' ({hint})")
            if key not in self.use:
                raise ValueError(f"settings for '{key}', which `use` does not list; add it to use or remove them")
            settings = registry.settings(key, self.level)
            try:
                self.model_extra[key] = settings.model_validate(value or {})
            except ValidationError as err:
                e = err.errors()[0]
                where = f"{key}.{'.'.join(map(str, e['loc']))}"
                if e["type"] == "extra_forbidden":
                    close = difflib.get_close_matches(str(e["loc"][-1]), list(settings.model_fields), n=1)
                    hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(settings.model_fields)}"
                    raise ValueError(f"unknown key '{where}' ({hint})") from None
                raise ValueError(f"{where}: {e['msg']}") from None
        return self

    def settings(self) -> dict[str, BaseModel]:
        """{calibrator name: its settings} for every calibrator in `use`."""
        return {name: (self.model_extra or {}).get(name) or registry.settings(name, self.level)() for name in self.use}


class AnswerCalibrationSpec(CalibratorSection):
    """Answer-level calibrators fitted per variant on multiple-choice fit tasks and evaluated on the evaluation tasks,
    which they never see. Besides the keys below, each calibrator in `use` may have a section of its own settings
    under its name (`answer_adaptive: {width: 64}`; `calq keys` lists them)."""

    level: ClassVar[str] = "answer"
    fit_tasks: tuple[str, ...] = Field(("openbookqa", "commonsense_qa", "siqa", "copa"),
                                       description="multiple-choice tasks the answer calibrators are fitted on (never "
                                                   "one of the evaluation tasks)")
    fit_limit: int | None = Field(200, ge=1, description="questions per fit task (None: all)")
    use: tuple[str, ...] = Field(("answer_temperature", "answer_adaptive", "parent"),
                                 description="answer calibrators to fit (none is always included; parent, label-free, "
                                             "is fitted on quantized variants only)")
    select_by: Literal["ece", "nll"] = Field("ece", description="leave-one-fit-task-out metric that selects each "
                                                                "variant's answer calibrator")
    skip_at_chance: bool = Field(True, description="leave out of fitting, per variant, a fit task whose accuracy "
                                                   "interval reaches chance (there the best temperature is infinite)")
    targets: tuple[float, ...] = Field((0.8,), description="target accuracies for selective prediction: the "
                                                           "confidence threshold is fitted on the fit tasks")

    @field_validator("targets")
    @classmethod
    def _targets(cls, targets):
        if any(not 0 < t < 1 for t in targets):
            raise ValueError(f"target accuracies must lie between 0 and 1, got {list(targets)}")
        return targets


class TasksSpec(Strict):
    """Benchmarks through the lm-eval harness, for every variant × calibrator."""

    names: tuple[str, ...] = Field(description="calq's task names: mmlu, mmlu_5shot, truthfulqa_mc1, truthfulqa_mc2, "
                                               "arc_easy, arc_challenge, piqa, boolq, lambada, triviaqa, openbookqa, "
                                               "commonsense_qa, siqa, copa (read from --data-dir); tasks of the "
                                               "include_path folders; any name in lm-eval's registry (its data comes "
                                               "from the hub: needs network)")
    include_path: tuple[str, ...] = Field((), description="folders of your own lm-eval task YAMLs, as lm-eval's "
                                                          "--include_path (relative to the working directory)")
    answer_calibration: AnswerCalibrationSpec | None = Field(
        None, description="answer-level calibrators fitted on separate fit tasks (omit: none)")
    limit: int | None = Field(200, ge=1, description="examples per task (None: all)")
    batch_size: int = Field(8, ge=1, description="requests per forward pass")
    bootstrap: int = Field(1000, ge=10, description="bootstrap resamples for the answer-level confidence intervals "
                                                      "(at least 10)")
    seed: int = Field(0, description="bootstrap seed")
    split: bool = Field(False, description="one stage per task (tasks/<variant>/<task>), merged into the variant's "
                                           "results: the Ray executor runs them side by side")


class SensitivitySpec(Strict):
    """Per-layer sensitivity on the calibration samples (calq.quant.sensitivity); a variant with a `budget` needs it
    and gets these defaults when the section is absent."""

    samples: int = Field(4, gt=0, description="calibration samples measured on (the first ones); the cost is one "
                                              "forward pass over them per Linear")
    seq_len: int = Field(128, gt=1, description="tokens of each sample (at most calibration.seq_len)")


class EvaluationSpec(Strict):
    tokens: TokenEvalSpec = Field(description="token-level calibration on held-out text")
    sensitivity: SensitivitySpec | None = Field(None, description="mean KLD from the baseline with each Linear alone "
                                                                  "quantized, per scheme (omit: only when a variant "
                                                                  "has a budget)")
    tasks: TasksSpec | None = Field(None, description="task accuracy and answer-level calibration through lm-eval "
                                                      "(omit: none)")


class ValidationTextSpec(Strict):
    """Plain text the calibrators are validated and selected on besides the instruction responses, so that the selected
    one is checked on the kind of text the token-level evaluation reports. Never the evaluation text."""

    data: DataSpec | None = Field(None, description="plain text for validation (never evaluation.tokens.data); "
                                                    "default: calibration.data, windows the calibration samples "
                                                    "did not take")
    tokens: int = Field(8192, gt=0, description="validation tokens, in windows of calibration.seq_len")


class CalibratorsSpec(CalibratorSection):
    """Calibrators fitted on each variant's own hidden states. Besides the keys below, each calibrator in `use`
    may have a section of its own settings under its name (`ats: {lr: 1e-4}`; `calq keys` lists them)."""

    data: DataSpec = Field(description="instruction data: Alpaca-style records (instruction, input, output), rendered "
                                       "with the chat template; the loss covers response tokens only")
    fit_records: int = Field(300, ge=2, description="records the calibrators are fitted on (val_fraction of them "
                                                    "validate)")
    heldout_records: int = Field(200, ge=1, description="further records whose responses are the held-out evaluation "
                                                        "set (never fitted)")
    seed: int = Field(0, description="seed for splitting the records into fit, validation and held-out")
    use: tuple[str, ...] = Field(("temperature", "ats"), description="calibrators to fit (none is always included)")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="share of the fit records held out for validation "
                                                             "(early stopping and selection)")
    select_by: Literal["ece", "nll"] = Field("ece", description="validation metric that selects each variant's "
                                                                "calibrator (the one whose worst validation domain "
                                                                "changes it least relative to none)")
    validation_text: ValidationTextSpec | None = Field(
        default_factory=ValidationTextSpec, description="plain-text validation domain beside the instruction "
                                                        "responses (null: instruction responses only)")
    max_len: int = Field(512, ge=8, description="tokens per record when hidden states are cached (longer records are "
                                                "cut)")
    logits_chunk: int = Field(1024, ge=1, description="positions per chunk when logits are recomputed from hidden "
                                                      "states (memory: chunk x vocab floats)")


class ExportSpec(Strict):
    """Each variant exported to what runs on a device, its calibrator fused, and re-verified on that runtime."""

    formats: tuple[str, ...] = Field(("onnx",), description="onnx (ONNX Runtime), gguf (llama.cpp) and/or "
                                                          "executorch (XNNPACK)")
    variants: tuple[str, ...] | None = Field(None, description="variant names to export (default: every variant, "
                                                               "baseline included)")
    calibrator: str = Field(
        "selected", description="calibrator fused into the artifact (none, temperature, ats); 'selected': the "
                                "variant's selected one (a format that cannot hold it, GGUF for ATS, gets the "
                                "temperature, and the report says so)")
    max_tokens: int = Field(4096, gt=0, description="held-out evaluation tokens the artifact is re-verified on")
    threads: int = Field(2, ge=1, description="runtime threads for the re-verification")
    onnx_accuracy_level: Literal[0, 1, 2, 3, 4] = Field(
        0, description="ONNX Runtime MatMulNBits compute for int4 layers: 0 float32 activations (calq's numbers); 4 "
                       "int8 activations per block (faster on CPUs, as llama.cpp's 8-bit activations; re-verified); "
                       "1-3 float32, float16, bfloat16")
    onnx_scale_dtype: Literal["float32", "float16"] = Field(
        "float32", description="ONNX Runtime MatMulNBits scales as stored: float32 (calq's scales, exact) or float16 "
                               "(GGUF's precision and calq's budget's byte count: 4.5 bits per weight at groups of "
                               "32 instead of 5; re-verified)")

    @field_validator("calibrator")
    @classmethod
    def _known_calibrator(cls, name):
        known = ["selected", *registry.names("token")]
        if name not in known:
            raise ValueError(f"unknown calibrator '{name}'; use one of: {', '.join(known)}")
        return name


class StageResources(Strict):
    """What one stage asks of the Ray executor (the local executor ignores it)."""

    num_cpus: float = Field(1, ge=0, description="CPUs reserved for the stage")
    num_gpus: float = Field(0, ge=0, description="GPUs reserved for the stage (Ray sets CUDA_VISIBLE_DEVICES)")
    memory_gb: float | None = Field(None, gt=0, description="CPU memory reserved for the stage (Ray schedules on it)")
    max_retries: int = Field(2, ge=0, le=10, description="times Ray reruns the stage when its worker dies")


class Recipe(Strict):
    name: str = Field(description="run name; an output folder belongs to one recipe name")
    model: ModelSpec = Field(default_factory=ModelSpec, description="the model to compress")
    calibration: CalibrationSpec = Field(description="calibration samples for ranges and quantization")
    _methods: ClassVar[tuple[type, ...]] = tuple(METHODS.values())  # the methods `variants` takes
    variants: tuple[variant_config(), ...] = Field(description="the quantized variants to build (the unquantized "
                                                            "baseline is always included); keys per method below")
    evaluation: EvaluationSpec = Field(description="held-out evaluation")
    calibrators: CalibratorsSpec | None = Field(None, description="calibrators fitted per variant (omit: evaluate "
                                                                  "uncalibrated only)")
    export: ExportSpec | None = Field(None, description="edge export and re-verification on the runtime (omit: none)")
    gates: Gates | None = Field(None, description="release gates: `calq run` exits 1 when one fails")
    output: str | None = Field(None, description="run folder (default runs/<name>; --out overrides)")
    outliers_top_k: int = Field(10, ge=1, description="layers listed in the report's outlier summary")
    resources: dict[str, StageResources] = Field(
        default_factory=dict, description="--executor ray only: resources per stage, keyed by a stage group "
                                          "(quantize), kind (tasks) or name (tasks/baseline); the most specific key "
                                          "wins; unlisted stages get 1 CPU, 0 GPUs, 2 retries")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name):
        return _as_value_error(check_name, name, "name")

    @field_validator("variants")
    @classmethod
    def _unique(cls, v):
        labels = [x.label for x in v]
        for i, label in enumerate(labels):
            _as_value_error(check_name, label, f"variants[{i}].name")
        dup = {x for x in labels if labels.count(x) > 1}
        if dup:
            raise ValueError(f"variant names repeat: {sorted(dup)}; give each a distinct `name`")
        if not v:
            raise ValueError("list at least one variant")
        if "baseline" in labels:
            raise ValueError("the name 'baseline' is reserved for the unquantized model; give the variant another name")
        return v

    def calibrator_names(self) -> list[str]:
        return ["none", *(self.calibrators.use if self.calibrators else ())]

    @classmethod
    def model_validate(cls, obj: Any, **kwargs) -> Recipe:
        """Validate, with `variants` taking every method registered by now (a plugin's, imported after calq)."""
        methods = tuple(METHODS.values())
        if methods != cls._methods:
            cls.model_fields["variants"].annotation = tuple[variant_config(), ...]
            cls.model_rebuild(force=True)
            cls._methods = methods
        return super().model_validate(obj, **kwargs)


# ---- reading a recipe, and errors that name the key ------------------------------------------------

def _as_value_error(check, value, what: str):
    """Run a check that raises CalqError inside a pydantic validator, as the ValueError pydantic reports with the
    key."""
    try:
        return check(value, what)
    except CalqError as err:
        raise ValueError(f"{err.what} ({what}); {err.fix}") from None


def _key_path(loc: tuple) -> tuple:
    """A pydantic location without the discriminator tag it adds inside `variants` (('variants', 0, 'awq', 'x'))."""
    if len(loc) > 2 and loc[0] == "variants" and loc[2] in METHODS:
        return loc[:2] + loc[3:]
    return loc


def _location(loc: tuple) -> str:
    return ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in loc).replace(".[", "[")


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the last key of `loc` (for 'did you mean' suggestions)."""
    if len(loc) > 2 and loc[0] == "variants" and loc[2] in METHODS:
        return METHODS.get(loc[2]) if len(loc) == 4 else None
    model: type[BaseModel] = Recipe
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        ann = field.annotation
        sub = next((a for a in (ann, *getattr(ann, "__args__", ()))
                    if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if sub is None:
            return None
        model = sub
    return model


def explain(err: ValidationError, where: str) -> CalqError:
    e = err.errors()[0]
    loc = tuple(e["loc"])
    key = _location(_key_path(loc)) or "(top level)"
    if e["type"] == "extra_forbidden":
        owner = _model_at(loc)
        known = list(owner.model_fields) if owner else []
        name = str(loc[-1])
        if owner is not None and owner in METHODS.values():
            elsewhere = [m for m, cls in METHODS.items() if name in cls.model_fields]
            if elsewhere:
                return CalqError(f"'{key}' does not apply to method {owner.model_fields['method'].default} (it is a "
                                 f"setting of: {', '.join(elsewhere)})", where, f"remove {name}")
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"known keys here: {', '.join(known)}"
        return CalqError(f"unknown key '{key}'", where, f"{hint} (`calq keys` lists every key)")
    if e["type"] == "missing":
        return CalqError(f"missing key '{key}'", where, "add it (`calq keys` lists every key and its meaning)")
    if e["type"] == "union_tag_invalid":
        return CalqError(f"'{key}.method': unknown method '{e['ctx']['tag']}'", where,
                         f"use one of: {', '.join(METHODS)}")
    if e["type"] == "union_tag_not_found":
        return CalqError(f"missing key '{key}.method'", where, f"use one of: {', '.join(METHODS)}")
    msg = e["msg"].removeprefix("Value error, ")
    value = e.get("input")
    shown = f" (got {value!r})" if value is not None and not isinstance(value, dict) else ""
    return CalqError(f"'{key}': {msg}{shown}", where, "see `calq keys` for the allowed values")


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise CalqError(f"recipe file not found: {path}", None,
                        "pass the path of a YAML recipe, e.g. recipes/quickstart.yaml")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise CalqError(f"not a UTF-8 text file (byte {exc.start} cannot be decoded)", str(path),
                        "pass a YAML recipe saved as UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise CalqError(f"malformed YAML ({problem})", where, "check indentation and quoting at that line") from None
    if not isinstance(raw, dict):
        raise CalqError("a recipe must be a YAML mapping of keys", str(path), "start from recipes/quickstart.yaml")
    return parse_recipe(raw, str(path))


def parse_recipe(raw: dict[str, Any] | Recipe, where: str = "recipe") -> Recipe:
    if isinstance(raw, Recipe):
        return raw
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        raise explain(err, where) from None


def describe_keys(model: type[BaseModel] = Recipe, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) rows for every recipe key, nested keys dotted; per method and per calibrator."""
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        sub = next((a for a in (ann, *getattr(ann, "__args__", ()))
                    if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if field.is_required():
            default = "required"
        elif field.default_factory is not None:
            default = "(see below)"
        else:
            default = repr(field.default)
        many = "tuple" in str(ann)
        if name == "variants" and model is Recipe:
            rows.append((key + "[]", default, field.description or ""))
            rows.extend(describe_keys(MethodConfig, f"{key}[]."))
            for method, cls in METHODS.items():
                rows.extend((f"{key}[].{k} (method {method})", d, h) for k, d, h in describe_keys(cls)
                            if k not in MethodConfig.model_fields)
            continue
        rows.append((key + ("[]" if many and sub else ""), default, field.description or ""))
        if sub is not None:
            rows.extend(describe_keys(sub, key + ("[]." if many else ".<stage>." if "dict" in str(ann) else ".")))
        for spec, level in ((CalibratorsSpec, "token"), (AnswerCalibrationSpec, "answer")):
            if sub is spec:
                for cal in registry.names(level):
                    rows.extend(describe_keys(registry.settings(cal, level), f"{key}.{cal}."))
    return rows
