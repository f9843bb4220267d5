"""The stages of one run, in order. Each stage is a plain function that reads its inputs from the run
folder and returns ({name: output path}, info); `RunDir.run_stage` skips it when its inputs are unchanged.
"""

from __future__ import annotations

import json
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from calq import data as data_mod
from calq import models
from calq.calib import CALIBRATORS
from calq.calib import ranges as ranges_mod
from calq.errors import CalqError
from calq.evaluate import tokens as token_eval
from calq.quant import llmc, methods, schemes
from calq.recipe import Recipe, VariantSpec
from calq.runs import RunDir, atomic_path, stable_hash, write_json

BASELINE = "baseline"
UNTIL = ("ranges", "quantize", "calibrate", "evaluate")
CODE_VERSION = 1  # bump when a stage's computation changes, so old markers stop matching
EVALUATE_VERSION = 3  # the same, for the evaluation stages alone
TASKS_VERSION = 1


@dataclass
class Context:
    recipe: Recipe
    run: RunDir
    data_root: Path | None = None
    progress: object | None = None  # a rich Progress, or None
    log: Callable[[str], None] = lambda msg: None
    debug: bool = False
    until: str | None = None  # stop after this group of stages (one of UNTIL); None: run everything and report


@dataclass
class Plan:
    """Everything checked before long work starts, and the input hash (key) of every stage, in run order."""

    source: models.ModelSource
    keys: dict[str, str] = field(default_factory=dict)
    variants: list[str] = field(default_factory=list)  # variant names, baseline first
    skipped: dict[str, str] = field(default_factory=dict)  # variant name -> why (an optional package is missing)
    notes: list[str] = field(default_factory=list)  # sections left out, and why


def without_unavailable_data(recipe: Recipe, data_root: Path | None) -> tuple[Recipe, list[str]]:
    """Without a data folder, drop the sections that need one (calibrators, tasks, the gates on them), with notes.

    So the quickstart still runs on a laptop with no network and no data folder; a missing file inside a
    given data folder stays an error."""
    if data_root is not None:
        return recipe, []
    notes, update = [], {}
    cal = recipe.calibrators
    if cal is not None:
        try:
            data_mod.check_available(cal.data, "calibrators.data", None)
        except data_mod.SourceUnavailable:
            update["calibrators"] = None
            notes.append(f"calibrators skipped: {cal.data.source} needs a data folder (--data-dir)")
    tasks = recipe.evaluation.tasks
    if tasks is not None:
        update["evaluation"] = recipe.evaluation.model_copy(update={"tasks": None})
        notes.append("tasks skipped: calq's task data is read from a data folder (--data-dir)")
        if recipe.gates is not None and recipe.gates.task_gates():
            keep = recipe.gates.model_copy(update={g: None for g in recipe.gates.task_gates()})
            update["gates"] = keep if keep.max_token_ece is not None else None
            notes.append(f"gates skipped: {', '.join(recipe.gates.task_gates())} (no tasks)")
    if update.get("calibrators", cal) is None and recipe.gates is not None and recipe.gates.calibrator not in (None, "none"):
        update["gates"] = None
        notes.append(f"gates skipped: they check calibrator '{recipe.gates.calibrator}', which was not fitted")
    return recipe.model_copy(update=update), notes


def make_plan(recipe: Recipe, data_root: Path | None) -> Plan:
    m = recipe.model
    source = models.resolve(m.id, m.gguf_file, m.revision)
    cal, ev = recipe.calibration, recipe.evaluation.tokens
    data_mod.check_available(cal.data, "calibration.data", data_root)
    data_mod.check_available(ev.data, "evaluation.tokens.data", data_root)
    used_for_calibration = {(cal.data.source, cal.data.split), (cal.data.fallback, cal.data.split)}
    if {(ev.data.source, ev.data.split), (ev.data.fallback, ev.data.split)} & used_for_calibration - {(None, cal.data.split)}:
        raise CalqError("evaluation text is the calibration text", "evaluation.tokens.data",
                        "evaluate on held-out text: another file, or another split")
    config = models.load_config(source)
    widths = models.linear_input_widths(config)
    plan = Plan(source)
    for i, v in enumerate(recipe.variants):
        where = f"variants[{i}]"
        if v.label == BASELINE:
            raise CalqError("the name 'baseline' is reserved for the unquantized model", where, "give the variant another name")
        try:
            methods.check(v, where, config)
        except methods.MethodUnavailable as exc:
            plan.skipped[v.label] = exc.line()
            continue
        schemes.config_groups(v, where)
        schemes.check_group_size(v, {k: w for k, w in widths.items() if not models.is_ignored(k, v.ignore)}, where)
    variants = [v for v in recipe.variants if v.label not in plan.skipped]
    model_key = stable_hash(CODE_VERSION, m.model_dump(), source.describe())
    samples_key = stable_hash(model_key, cal.model_dump(), data_mod.fingerprint(cal.data, data_root))
    eval_data_key = stable_hash(model_key, ev.data.model_dump(), ev.max_tokens, data_mod.fingerprint(ev.data, data_root))
    eval_settings = (ev.seq_len, ev.bins, EVALUATE_VERSION)  # batch_size changes speed, not results
    plan.variants = [BASELINE, *(v.label for v in variants)]
    if source.gguf_file:
        plan.keys["base_model"] = model_key
    plan.keys["samples"] = samples_key
    plan.keys["ranges"] = stable_hash(samples_key, recipe.outliers_top_k)
    model_keys = {BASELINE: model_key}
    for v in variants:
        needs = samples_key if schemes.needs_calibration_data(v) else model_key
        version = methods.get(v.method, "method").version
        # a method at its first version adds nothing, so the keys of runs made before versions existed stay valid
        model_keys[v.label] = plan.keys[f"quantize/{v.label}"] = stable_hash(
            needs, v.model_dump(exclude_defaults=True), *([version] if version > 1 else []))
    plan.keys["eval_tokens"] = eval_data_key
    cal_spec = recipe.calibrators
    if cal_spec is not None:
        data_mod.check_available(cal_spec.data, "calibrators.data", data_root)
        plan.keys["instructions"] = stable_hash(model_key, cal_spec.model_dump(exclude={"ats"}),
                                                data_mod.fingerprint(cal_spec.data, data_root))
        for name, key in model_keys.items():
            model_keys[name] = plan.keys[f"calibrate/{name}"] = stable_hash(key, plan.keys["instructions"], cal_spec.ats.model_dump())
    for name, key in model_keys.items():
        plan.keys[f"evaluate/{name}"] = stable_hash(key, eval_data_key, eval_settings)
    tasks = recipe.evaluation.tasks
    if tasks is not None:
        from calq.evaluate import harness

        counts = harness.check_tasks(list(tasks.names), data_root, tasks.limit, "evaluation.tasks.names")
        for name, key in model_keys.items():
            plan.keys[f"tasks/{name}"] = stable_hash(key, tasks.names, tasks.limit, counts, str(data_root), TASKS_VERSION)
    if recipe.gates is not None:
        from calq.report.gates import check_gates

        check_gates(recipe.gates, plan.variants, list(CALIBRATORS if cal_spec else ("none",)),
                    list(tasks.names) if tasks else [])
    return plan


def _track(ctx: Context, description: str, total: int):
    if ctx.progress is None:
        return None
    task = ctx.progress.add_task(description, total=total)
    return lambda done: ctx.progress.update(task, completed=done)


def _base_source(ctx: Context, plan: Plan) -> models.ModelSource:
    if plan.source.gguf_file:
        return models.ModelSource(str(ctx.run.path("base_model")), kind="folder")
    return plan.source


def _dir_size(folder: Path) -> int | None:
    files = list(folder.glob("*.safetensors")) + list(folder.glob("*.bin"))
    return sum(f.stat().st_size for f in files) or None


# ---- stages ----------------------------------------------------------------------------------------

def stage_base_model(ctx: Context, plan: Plan):
    """GGUF weights dequantized once into an ordinary transformers folder that every later stage loads."""
    model, tokenizer = models.load(plan.source, ctx.recipe.model.dtype)
    final = ctx.run.path("base_model")
    with atomic_path(final) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return {"model": final}, {"from": plan.source.describe(),
                              "note": "dequantized from GGUF: the baseline carries the GGUF quantization error"}


def stage_samples(ctx: Context, plan: Plan):
    cal = ctx.recipe.calibration
    _, tokenizer = _load_tokenizer(ctx, plan)
    texts = data_mod.load_texts(cal.data, "calibration.data", ctx.data_root, tokenizer)
    if texts.note:
        ctx.log(f"[yellow]note:[/] {texts.note}")
    need = cal.num_samples * cal.seq_len
    stream = data_mod.token_stream(texts.docs, tokenizer, max_tokens=need * 8)
    samples = data_mod.sample_windows(stream, cal.num_samples, cal.seq_len, cal.seed, "calibration")
    out = ctx.run.path("samples.safetensors")
    with atomic_path(out) as tmp:
        save_file({"input_ids": samples}, str(tmp), metadata={"source": texts.name})
    return {"samples": out}, {"source": texts.name, "note": texts.note, "tokens_read": int(stream.numel()),
                              "num_samples": cal.num_samples, "seq_len": cal.seq_len, "seed": cal.seed}


def _load_tokenizer(ctx: Context, plan: Plan):
    from transformers import AutoTokenizer

    src = _base_source(ctx, plan)
    kwargs = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    tok = AutoTokenizer.from_pretrained(src.location, **kwargs)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return src, tok


def _samples(ctx: Context) -> torch.Tensor:
    return load_file(str(ctx.run.path("samples.safetensors")))["input_ids"]


def stage_ranges(ctx: Context, plan: Plan):
    model, _ = models.load(_base_source(ctx, plan), ctx.recipe.model.dtype)
    samples = _samples(ctx)
    collected = ranges_mod.collect(model, samples, progress=_track(ctx, "activation ranges", samples.shape[0]))
    out = ctx.run.path("ranges.safetensors")
    with atomic_path(out) as tmp:
        ranges_mod.save(collected, tmp, {"samples": str(samples.shape[0]), "seq_len": str(samples.shape[1])})
    summary = ranges_mod.outlier_summary(ranges_mod.load(out), ctx.recipe.outliers_top_k)
    return {"ranges": out, "outliers": write_json(ctx.run.path("outliers.json"), summary)}, {"layers": len(collected) // 5}


def stage_quantize(ctx: Context, plan: Plan, variant: VariantSpec, index: int):
    model, tokenizer = models.load(_base_source(ctx, plan), ctx.recipe.model.dtype)
    llmc.quiet_logs(str(ctx.run.path("logs", "llmcompressor.log")), console=ctx.debug)
    samples = _samples(ctx)
    start = time.perf_counter()
    methods.get(variant.method, f"variants[{index}].method")(model, samples, variant, f"variants[{index}]")
    seconds = time.perf_counter() - start
    outputs = {}
    if variant.method == "smoothquant":
        outputs["smoothing"] = write_json(ctx.run.path("smoothing", f"{variant.label}.json"),
                                          _smoothing_effect(ctx, plan, model, samples[:SPREAD_SAMPLES]))
    final = ctx.run.path("variants", variant.label)
    with atomic_path(final) as tmp, warnings.catch_warnings():
        # llm-compressor leaves its offloading hooks on the model (all on the CPU here); the shard-size warning is moot
        warnings.filterwarnings("ignore", message="Attempting to save a model with offloaded modules")
        model.save_pretrained(tmp, save_compressed=True)
        tokenizer.save_pretrained(tmp)
    used = schemes.calibration_samples(samples, variant).shape if schemes.needs_calibration_data(variant) else (0, 0)
    return {"checkpoint": final, **outputs}, {
        "calibration_seconds": round(seconds, 2), "size_bytes": _dir_size(final), "method": variant.method,
        "scheme": variant.scheme, "group_size": variant.group_size, "calibration_samples": list(used)}


SPREAD_SAMPLES = 32  # calibration samples on which SmoothQuant's effect on the activation spread is measured


def _smoothing_effect(ctx: Context, plan: Plan, quantized, samples: torch.Tensor) -> list[dict]:
    """Activation absmax spread per layer, unquantized model vs the smoothed and quantized one, same samples.

    The hooks see each Linear's input before its activation quantizer, so the spread 'after' is what
    SmoothQuant left for the int8 activation scale to cover.
    """
    from calq.quant.smoothquant import outlier_reduction

    base, _ = models.load(_base_source(ctx, plan), ctx.recipe.model.dtype)
    before = ranges_mod.by_layer(ranges_mod.collect(base, samples))
    after = ranges_mod.by_layer(ranges_mod.collect(quantized, samples))
    return outlier_reduction(before, after)


def stage_eval_tokens(ctx: Context, plan: Plan):
    ev = ctx.recipe.evaluation.tokens
    _, tokenizer = _load_tokenizer(ctx, plan)
    texts = data_mod.load_texts(ev.data, "evaluation.tokens.data", ctx.data_root, tokenizer)
    if texts.note:
        ctx.log(f"[yellow]note:[/] {texts.note}")
    stream = data_mod.token_stream(texts.docs, tokenizer, max_tokens=ev.max_tokens)
    if stream.numel() < ev.seq_len:
        raise CalqError(f"the evaluation text has {stream.numel()} tokens, fewer than one window of {ev.seq_len}",
                        "evaluation.tokens", "use more text or a smaller seq_len")
    out = ctx.run.path("eval_tokens.safetensors")
    with atomic_path(out) as tmp:
        save_file({"input_ids": stream}, str(tmp), metadata={"source": texts.name})
    return {"tokens": out}, {"source": texts.name, "note": texts.note, "tokens": int(stream.numel())}


def stage_instructions(ctx: Context, plan: Plan):
    """Instruction records split once, with the recipe's seed, into fit and held-out sets shared by every variant."""
    spec = ctx.recipe.calibrators
    name, records, note = data_mod.load_records(spec.data, "calibrators.data", ctx.data_root)
    if note:
        ctx.log(f"[yellow]note:[/] {note}")
    records = [r for r in records if isinstance(r, dict) and r.get("instruction") and r.get("output")]
    need = spec.fit_records + spec.heldout_records
    if len(records) < need:
        raise CalqError(f"{name} has {len(records)} instruction records (with 'instruction' and 'output'), fewer than "
                        f"fit_records + heldout_records = {need}", "calibrators.data",
                        "give more Alpaca-style records, or lower fit_records / heldout_records")
    chosen = random.Random(spec.seed).sample(range(len(records)), need)
    split = {"source": name, "note": note, "fit": [records[i] for i in chosen[:spec.fit_records]],
             "heldout": [records[i] for i in chosen[spec.fit_records:]]}
    out = write_json(ctx.run.path("instructions.json"), split)
    return {"records": out}, {"source": name, "note": note, "fit_records": spec.fit_records,
                              "heldout_records": spec.heldout_records, "seed": spec.seed}


def stage_calibrate(ctx: Context, plan: Plan, name: str, source: models.ModelSource):
    """Cache this model's hidden states on the fit and held-out responses; fit the global temperature and the ATS head."""
    from calq.calib import ats, hidden

    spec = ctx.recipe.calibrators
    model, tokenizer = models.load(source, ctx.recipe.model.dtype)
    records = json.loads(ctx.run.path("instructions.json").read_text())
    final = ctx.run.path("calibrators", name)
    with atomic_path(final) as tmp:
        tmp.mkdir(parents=True)
        caches = {}
        for part in ("fit", "heldout"):
            caches[part] = hidden.cache_hidden(model, tokenizer, records[part], tmp / f"{part}_hidden.safetensors",
                                               max_len=spec.ats.max_len, where="calibrators.data",
                                               progress=_track(ctx, f"hidden states {name} ({part})", len(records[part])))
        epochs = _track(ctx, f"fit ATS head {name}", spec.ats.epochs)
        result = ats.fit(hidden.load_cached(tmp / "fit_hidden.safetensors"), hidden.Logits(model), model.config, spec.ats,
                         progress=(lambda epoch, summary: epochs(epoch)) if epochs else None, where="calibrators.ats")
        ats.save_head(result.head, tmp / "ats_head", spec.ats, result.stats)
        write_json(tmp / "calibrators.json", {"temperature": result.temperature, "choice": result.choice,
                                              "fit": result.stats, "caches": caches})
    return {"calibrators": final}, {"temperature": result.temperature, "choice": result.choice,
                                    "validation": result.stats["validation"]}


def stage_tasks(ctx: Context, plan: Plan, name: str, source: models.ModelSource):
    """lm-eval tasks under every calibrator: one forward pass per batch serves them all (calq.evaluate.harness)."""
    from calq.evaluate import harness

    spec = ctx.recipe.evaluation.tasks
    config = models.load_config(source)
    calibrators, _ = _calibrators(ctx, name, config)
    bar = ctx.progress.add_task(f"tasks {name}", total=None) if ctx.progress else None

    def progress(description, done, total):
        if bar is not None:
            ctx.progress.update(bar, description=f"tasks {name}: {description}", completed=done, total=total)

    result = harness.run_tasks(source.location, calibrators, list(spec.names), spec.limit, ctx.data_root, spec.batch_size,
                               dtype=ctx.recipe.model.dtype, progress=progress)
    out = write_json(ctx.run.path("tasks", f"{name}.json"), result)
    return {"result": out}, {t: {c: r["metrics"] for c, r in v["calibrators"].items()} for t, v in result["tasks"].items()}


def _calibrators(ctx: Context, name: str, model) -> tuple[dict, dict]:
    """{calibrator name: callable} for this variant, and its fit summary ({} without calibrators).

    `model` is the loaded model (the head goes to its device) or just its config (the head stays on the CPU)."""
    from calq.calib import identity

    if ctx.recipe.calibrators is None:
        return {"none": identity}, {}
    from calq.calib import ats
    from calq.calib.temperature import Temperature

    folder = ctx.run.path("calibrators", name)
    fitted = json.loads((folder / "calibrators.json").read_text())
    config = getattr(model, "config", model)
    head = ats.load_head(folder / "ats_head", config, where=f"calibrators/{name}")
    if hasattr(model, "parameters"):
        head = head.to(next(model.parameters()).device)
    return {"none": identity, "temperature": Temperature(fitted["temperature"]), "ats": head}, fitted


def stage_evaluate(ctx: Context, plan: Plan, name: str, source: models.ModelSource):
    ev = ctx.recipe.evaluation.tokens
    model, _ = models.load(source, ctx.recipe.model.dtype)
    calibrators, fitted = _calibrators(ctx, name, model)
    stream = load_file(str(ctx.run.path("eval_tokens.safetensors")))["input_ids"]
    windows = stream.numel() // ev.seq_len
    result = {"tokens": token_eval.evaluate(model, stream, ev.seq_len, ev.batch_size, ev.bins, calibrators,
                                            progress=_track(ctx, f"evaluate {name}", windows))}
    if fitted:
        from calq.calib import ats, hidden

        with torch.no_grad():
            cached = hidden.load_cached(ctx.run.path("calibrators", name, "heldout_hidden.safetensors"))
            result["responses"] = {"calibrators": ats.evaluate_cached(cached, torch.arange(len(cached)), hidden.Logits(model),
                                                                      calibrators, chunk=ctx.recipe.calibrators.ats.logits_chunk)}
        result["selected"] = fitted["choice"]
        result["temperature"] = fitted["temperature"]
        result["validation"] = fitted["fit"]["validation"]
    out = write_json(ctx.run.path("eval", f"{name}.json"), result)
    none = result["tokens"]["calibrators"]["none"]
    return {"result": out}, {"ece": none["ece"], "ppl": none["ppl"]}


# ---- the run ---------------------------------------------------------------------------------------

def run(ctx: Context, plan: Plan) -> dict | None:
    """Run every stage (reusing finished ones) and write the report; returns the report dict
    (None when `ctx.until` stops the run before the report)."""
    from calq.report.build import write_reports

    r, run_dir = ctx.recipe, ctx.run

    def stage(name: str, fn, *args):
        task = ctx.progress.add_task(name, total=None) if ctx.progress else None  # elapsed time while it works
        try:
            rec = run_dir.run_stage(name, plan.keys[name], fn, ctx, plan, *args)
        finally:
            if task is not None:
                ctx.progress.remove_task(task)
        state = "reused" if rec.reused else f"{rec.seconds:.1f} s, peak {rec.peak_rss_mb:,.0f} MB"
        ctx.log(f"[green]✓[/] {name} [dim]({state})[/]")
        return rec

    if plan.source.gguf_file:
        stage("base_model", stage_base_model)
    stage("samples", stage_samples)
    stage("ranges", stage_ranges)
    if ctx.until == "ranges":
        return None
    for label, why in plan.skipped.items():
        ctx.log(f"[yellow]skipped[/] variant {label}: {why}")
    variants = [(i, v) for i, v in enumerate(r.variants) if v.label not in plan.skipped]
    for i, v in variants:
        stage(f"quantize/{v.label}", stage_quantize, v, i)
    if ctx.until == "quantize":
        return None
    stage("eval_tokens", stage_eval_tokens)
    sources = {BASELINE: _base_source(ctx, plan)}
    sources.update({v.label: models.ModelSource(str(run_dir.path("variants", v.label)), kind="folder") for _, v in variants})
    if r.calibrators is not None:
        stage("instructions", stage_instructions)
        for name, source in sources.items():
            stage(f"calibrate/{name}", stage_calibrate, name, source)
    if ctx.until == "calibrate":
        return None
    for name, source in sources.items():
        stage(f"evaluate/{name}", stage_evaluate, name, source)
    if r.evaluation.tasks is not None:
        for name, source in sources.items():
            stage(f"tasks/{name}", stage_tasks, name, source)
    if ctx.until == "evaluate":
        return None
    return write_reports(ctx, plan)
