"""report.json (every number, with data names, token counts, seed, versions), and report.md and report.html from it."""

from __future__ import annotations

import json
import time
from pathlib import Path

from calq.errors import CalqError
from calq.evaluation.answers import tasks_section
from calq.models import BASELINE
from calq.report import answers as answer_report
from calq.report import render, sections
from calq.report.gates import Gates, gates_section
from calq.report.sections import EVAL_SETS
from calq.runs import RunDir, write_json, write_text
from calq.stages import output

METRICS = ("ppl", "accuracy", "confidence", "ece", "adaptive_ece", "brier")


def goals(rows: list[dict]) -> list[dict]:
    """The calibration goals, checked on every held-out set: each variant's selected calibrator is at least as
    well calibrated as `none`; each quantized variant's selected calibrator is at or below the baseline's
    uncalibrated ECE."""
    out = []
    base = rows[0]
    for part in EVAL_SETS:
        for row in rows:
            cal = row["calibrated"].get(part)
            if not cal or not row["selected"]:
                continue
            chosen = cal[row["selected"]]["ece"]
            out.append({"set": part, "variant": row["variant"], "goal": f"{row['selected']} ECE <= none ECE",
                        "value": chosen, "bound": cal["none"]["ece"], "met": chosen <= cal["none"]["ece"]})
            if row is not base and base["calibrated"].get(part):
                bound = base["calibrated"][part]["none"]["ece"]
                out.append({"set": part, "variant": row["variant"],
                            "goal": f"{row['selected']} ECE <= baseline's uncalibrated ECE",
                            "value": chosen, "bound": bound, "met": chosen <= bound})
    return out


def read_manifest(run: RunDir) -> dict:
    path = run.meta / "manifest.json"
    if not path.is_file():
        raise CalqError("the run folder has no manifest (.calq/manifest.json)", str(run.root),
                        "run the recipe with this version of calq (`calq run`) to write one")
    return json.loads(path.read_text())


def read_output(run: RunDir, kind: str, name: str, **parts: str):
    """A stage's JSON output, by stage kind and output name (calq.stages)."""
    return json.loads(run.path(output(kind, name, **parts)).read_text())


def deployed_rows(run: RunDir, manifest: dict) -> list[dict]:
    """One row per exported (variant, format): the artifact on its runtime against the PyTorch variant."""
    rows = []
    for stage in manifest["stages"]:
        if not stage["name"].startswith("export/"):
            continue
        _, variant, fmt = stage["name"].split("/")
        path = run.path(output("export", "result", variant=variant, format=fmt))
        if not path.is_file():
            continue
        r = json.loads(path.read_text())
        v = r["verify"]
        rows.append({"variant": variant, "format": fmt, "calibrator": r["calibrator"], "note": r.get("note"),
                     "bytes": r["export"].get("bytes"), "seconds": r["export"].get("seconds"),
                     "load_seconds": v.get("load_seconds"),
                     "top1": v["top1_agreement"], "max_rel_logit_diff": v["max_rel_logit_diff"],
                     "ppl_reference": v["reference"]["ppl"], "ppl": v["artifact"]["ppl"],
                     "ece_reference": v["reference"]["ece"], "ece": v["artifact"]["ece"],
                     "ece_drift": v["drift"]["ece"], "brier": v["artifact"]["brier"], "tokens": v["positions"],
                     "changes": r["export"].get("changes", []), "decode": v.get("decode"),
                     "divergence": v.get("divergence")})
    return rows


def collect(run: RunDir, manifest: dict) -> dict:
    """Assemble report.json's content from the manifest and the stored results (stage markers and result files)."""
    recipe = manifest["recipe"]
    stages = {s["name"]: json.loads(p.read_text()) for s in manifest["stages"]
              if (p := run.meta / "stages" / f"{s['name']}.json").is_file()}
    missing = [f"evaluate/{name}" for name in manifest["variants"] if f"evaluate/{name}" not in stages]
    missing += [name for name in ("samples", "eval_tokens") if name not in stages]
    if missing:
        raise CalqError(f"the run has not finished its evaluation ({', '.join(missing)} missing)", str(run.root),
                        "finish it with `calq run`")
    rows = []
    for name in manifest["variants"]:
        evaluated = read_output(run, "evaluate", "result", variant=name)
        result = evaluated["tokens"]["calibrators"]["none"]
        if name == BASELINE:
            size = stages[f"evaluate/{name}"]["info"].get("size_bytes")
            # the byte accounting of the unquantized model (float16), from any variant's quantize stage
            floats = [m["info"]["float_bytes"] for n, m in stages.items() if n.startswith("quantize/")
                      and "float_bytes" in m["info"]]
            quant = {"method": "none", "scheme": recipe["model"]["dtype"], "calibration_seconds": None,
                     "accounted_bytes": floats[0] if floats else None}
        else:
            quant = stages[f"quantize/{name}"]["info"]
            size = quant["size_bytes"]
        rows.append({"variant": name, "method": quant["method"], "scheme": quant["scheme"],
                     "group_size": quant.get("group_size"), "size_bytes": size,
                     "calibration_seconds": quant["calibration_seconds"],
                     "calibration_samples": quant.get("calibration_samples"),
                     **{k: result[k] for k in METRICS}, "tokens": result["tokens"],
                     "reliability": result["reliability"],
                     "selected": evaluated.get("selected"),
                     "temperature": (evaluated.get("fit") or {}).get("temperature", {}).get("temperature"),
                     "validation": evaluated.get("validation"),
                     "calibrated": {part: evaluated[part]["calibrators"] for part in EVAL_SETS if part in evaluated},
                     "divergence": evaluated["tokens"].get("divergence"),
                     "accounted_bytes": quant.get("accounted_bytes"), "budget": quant.get("budget")})
    samples, eval_data = stages["samples"]["info"], stages["eval_tokens"]["info"]
    instructions = stages.get("instructions", {}).get("info")
    ev = recipe["evaluation"]["tokens"]
    return {
        "recipe": recipe["name"],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": {"id": recipe["model"]["id"], "source": manifest["model"]["source"], "dtype": recipe["model"]["dtype"],
                  "revision": manifest["model"]["revision"],
                  "note": stages.get("base_model", {}).get("info", {}).get("note")},
        "baseline_check": stages.get("baseline_check", {}).get("info"),
        "calibration": samples,
        "evaluation": {"tokens": {**eval_data, "seq_len": ev["seq_len"], "bins": ev["bins"]}},
        "calibrators": instructions and {**instructions, "settings": recipe["calibrators"],
                                         "validation_text": stages.get("validation_text", {}).get("info")},
        "variants": rows,
        "goals": goals(rows),
        "outliers": read_output(run, "ranges", "outliers"),
        "smoothing": {name: json.loads(p.read_text())[: recipe["outliers_top_k"]] for name in manifest["variants"]
                      if (p := run.path(output("quantize", "method", output="smoothing", variant=name))).is_file()},
        "sensitivity": {s["name"].split("/", 1)[1]: read_output(run, "sensitivity", "table",
                                                                 scheme=s["name"].split("/", 1)[1])
                        for s in manifest["stages"] if s["name"].startswith("sensitivity/")},
        "skipped": manifest["skipped"],
        "notes": manifest["notes"] + [m["redone"] for m in stages.values() if m.get("redone")],
        "deployed": deployed_rows(run, manifest),
        "stages": {name: {"seconds": m["seconds"], "peak_rss_mb": m["peak_rss_mb"]} for name, m in stages.items()},
        "versions": manifest["versions"],
        "machine": manifest["machine"],
        "recipe_content": recipe,
    }


def write_reports(run_root: str | Path) -> dict:
    """report.json, report.md and a self-contained report.html, from the run folder alone (its manifest and stored
    results: no model, data folder or network); gates are evaluated last, on the finished report."""
    run = RunDir(run_root)
    manifest = read_manifest(run)
    recipe = manifest["recipe"]
    report = collect(run, manifest)
    spec = recipe["evaluation"]["tasks"]
    if spec is not None:
        per_variant = {name: read_output(run, "tasks", "result", variant=name) for name in manifest["variants"]}
        report["tasks"] = tasks_section(per_variant, recipe["evaluation"]["tokens"]["bins"], spec["bootstrap"],
                                        spec["seed"], manifest["versions"]["lm_eval"])
        if spec.get("answer_calibration"):
            answers = spec["answer_calibration"]
            report["answers"] = answer_report.answers_section(
                {name: read_output(run, "answers", "result", variant=name) for name in manifest["variants"]},
                {"fit_limit": answers["fit_limit"], "select_by": answers["select_by"],
                 "targets": [str(t) for t in answers["targets"]], "bins": recipe["evaluation"]["tokens"]["bins"],
                 "bootstrap": spec["bootstrap"], "seed": spec["seed"]})
    gates = Gates.model_validate(recipe["gates"]) if recipe.get("gates") else None
    report["gates"] = gates_section(gates, report, baseline=BASELINE)
    write_json(run.path("report.json"), report)
    built = sections.build(report)
    title = f"calq report: {report['recipe']}"
    write_text(run.path("report.md"), render.markdown(title, built))
    write_text(run.path("report.html"), render.html(title, built))
    return report
