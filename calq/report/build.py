"""report.json (every number, with data names, token counts, seed, versions) and report.md (the tables)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from calq.errors import CalqError
from calq.evaluation.answers import tasks_section
from calq.models import BASELINE
from calq.report import answers as answer_report
from calq.report.common import EVAL_SETS, baseline_check_lines, calibrators_text, deployed_decode, mb, validation_table
from calq.report.gates import Gates, gates_section
from calq.report.html import write_html
from calq.runs import RunDir, write_json, write_text

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


def deployed_rows(run: RunDir, manifest: dict) -> list[dict]:
    """One row per exported (variant, format): the artifact on its runtime against the PyTorch variant."""
    rows = []
    for stage in manifest["stages"]:
        path = run.path(f"{stage['name']}.json")
        if not stage["name"].startswith("export/") or not path.is_file():
            continue
        _, variant, fmt = stage["name"].split("/")
        r = json.loads(path.read_text())
        v = r["verify"]
        rows.append({"variant": variant, "format": fmt, "calibrator": r["calibrator"], "note": r.get("note"),
                     "bytes": r["export"].get("bytes"), "seconds": r["export"].get("seconds"),
                     "top1": v["top1_agreement"], "max_rel_logit_diff": v["max_rel_logit_diff"],
                     "ppl_reference": v["reference"]["ppl"], "ppl": v["artifact"]["ppl"],
                     "ece_reference": v["reference"]["ece"], "ece": v["artifact"]["ece"],
                     "ece_drift": v["drift"]["ece"], "brier": v["artifact"]["brier"], "tokens": v["positions"],
                     "changes": r["export"].get("changes", []), "decode": v.get("decode")})
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
        evaluated = json.loads(run.path("eval", f"{name}.json").read_text())
        result = evaluated["tokens"]["calibrators"]["none"]
        if name == BASELINE:
            size = stages[f"evaluate/{name}"]["info"].get("size_bytes")
            quant = {"method": "none", "scheme": recipe["model"]["dtype"], "calibration_seconds": None}
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
                     "calibrated": {part: evaluated[part]["calibrators"] for part in EVAL_SETS if part in evaluated}})
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
        "outliers": json.loads(run.path("outliers.json").read_text()),
        "smoothing": {name: json.loads(p.read_text())[: recipe["outliers_top_k"]] for name in manifest["variants"]
                      if (p := run.path("smoothing", f"{name}.json")).is_file()},
        "skipped": manifest["skipped"],
        "notes": manifest["notes"] + [m["redone"] for m in stages.values() if m.get("redone")],
        "deployed": deployed_rows(run, manifest),
        "stages": {name: {"seconds": m["seconds"], "peak_rss_mb": m["peak_rss_mb"]} for name, m in stages.items()},
        "versions": manifest["versions"],
        "machine": manifest["machine"],
        "recipe_content": recipe,
    }


def markdown(report: dict) -> str:
    cal, ev = report["calibration"], report["evaluation"]["tokens"]
    lines = [f"# calq report: {report['recipe']}", ""]
    lines += [f"Model `{report['model']['source']}` ({report['model']['dtype']}).",
              *([f"Note: {report['model']['note']}."] if report["model"].get("note") else []), "",
              f"Calibration: {cal['num_samples']} samples × {cal['seq_len']} tokens from `{cal['source']}` "
              f"(seed {cal['seed']}).",
              f"Token-level evaluation: {ev['tokens']:,} tokens of `{ev['source']}` in windows of {ev['seq_len']}; "
              f"ECE with {ev['bins']} equal-width bins (adaptive ECE: equal-mass bins).", ""]
    for note in (cal.get("note"), ev.get("note"), *report.get("notes", [])):
        if note:
            lines += [f"Data note: {note}.", ""]
    if report.get("baseline_check"):
        lines += ["## Baseline check", "",
                  *baseline_check_lines(report["baseline_check"], code=lambda t: f"`{t}`", bold=lambda t: f"**{t}**"),
                  ""]
    lines += ["## Variants", "",
              "| variant | size (MB) | calib. (s) | ppl | acc | conf | ECE | adaptive ECE | Brier |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["variants"]:
        secs = f"{r['calibration_seconds']:.1f}" if r["calibration_seconds"] is not None else "–"
        lines.append(f"| {r['variant']} | {mb(r['size_bytes'])} | {secs} | {r['ppl']:.2f} | {r['accuracy']:.4f} | "
                     f"{r['confidence']:.4f} | {r['ece']:.4f} | {r['adaptive_ece']:.4f} | {r['brier']:.4f} |")
    if report.get("calibrators"):
        c = report["calibrators"]
        lines += ["", "## Calibrators", "", calibrators_text(c, code=lambda text: f"`{text}`")]
        header, rows = validation_table(report)
        if rows:
            lines += ["", "### Validation (selection)", "", "| " + " | ".join(header) + " |",
                      "|---|---|" + "---:|" * (len(header) - 2), *("| " + " | ".join(r) + " |" for r in rows)]
        for part, title in EVAL_SETS.items():
            rows = [v for v in report["variants"] if part in v["calibrated"]]
            if not rows:
                continue
            lines += ["", f"### {title.capitalize()}", "",
                      "| variant | calibrator | NLL | acc | conf | ECE | adaptive ECE | Brier | tokens |",
                      "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
            for v in rows:
                for cal, m in v["calibrated"][part].items():
                    mark = " *" if cal == v["selected"] else ""
                    lines.append(f"| {v['variant']} | {cal}{mark} | {m['nll']:.4f} | {m['accuracy']:.4f} | "
                                 f"{m['confidence']:.4f} | {m['ece']:.4f} | {m['adaptive_ece']:.4f} | "
                                 f"{m['brier']:.4f} | {m['tokens']:,} |")
        if report.get("goals"):
            lines += ["", "### Goals", "", "| set | variant | goal | value | bound | met |",
                      "|---|---|---|---:|---:|---|"]
            for g in report["goals"]:
                lines.append(f"| {g['set']} | {g['variant']} | {g['goal']} | {g['value']:.4f} | {g['bound']:.4f} | "
                             f"{'yes' if g['met'] else '**no**'} |")
    if report.get("tasks"):
        t = report["tasks"]["settings"]
        lines += ["", "## Tasks (lm-eval)", "",
                  f"At most {t['limit']} examples per task from `{t['data_dir']}`; answer-level calibration from a "
                  f"softmax over the choices' log-likelihoods ({t['bins']} bins; {t['level']:.0%} bootstrap intervals, "
                  f"{t['bootstrap']} resamples, seed {t['seed']}).", "",
                  "| variant | calibrator | task | n | accuracy | answer ECE | Brier |",
                  "|---|---|---|---:|---:|---:|---:|"]
        for r in report["tasks"]["results"]:
            ece = f"{r['ece']:.4f}" if r.get("ece") is not None else "–"
            brier = f"{r['brier']:.4f}" if r.get("brier") is not None else "–"
            lines.append(f"| {r['variant']} | {r['calibrator']} | {r['task']} | {r['n']} | {r['accuracy']:.4f} | "
                         f"{ece} | {brier} |")
    if report.get("answers"):
        lines += ["", "## Answer-level calibration (tasks the calibrators never saw)"]
        for table in answer_report.tables(report["answers"]):
            numeric = table["numeric"]
            lines += ["", f"### {table['title']}", "", table["note"], "", "| " + " | ".join(table["header"]) + " |",
                      "|" + "|".join("---:" if i in numeric else "---" for i in range(len(table["header"]))) + "|",
                      *("| " + " | ".join(row) + " |" for row in table["rows"])]
    if report.get("deployed"):
        lines += ["", "## Deployed: each artifact on its own runtime", "",
                  "Token-level numbers of the exported artifact (calibrator fused) against the PyTorch variant "
                  "with the same calibrator, on the same held-out windows.", "",
                  "| variant | format | calibrator | MB | export (s) | top-1 agreement | max rel. logit diff | "
                  "ppl PyTorch → runtime | ECE PyTorch → runtime | ECE drift |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in report["deployed"]:
            lines.append(f"| {r['variant']} | {r['format']} | {r['calibrator']} | {mb(r['bytes'])} | "
                         f"{r['seconds']:.1f} | {r['top1']:.4f} | {r['max_rel_logit_diff']:.2g} | "
                         f"{r['ppl_reference']:.2f} → {r['ppl']:.2f} | {r['ece_reference']:.4f} → {r['ece']:.4f} | "
                         f"{r['ece_drift']:+.4f} |")
        for r in report["deployed"]:
            if r.get("decode"):
                lines.append(f"- {r['variant']} as {r['format']}: {deployed_decode(r['decode'])}")
            for change in ([r["note"]] if r["note"] else []) + r["changes"]:
                lines.append(f"- {r['variant']} as {r['format']}: {change}")
    if report.get("gates"):
        g = report["gates"]
        lines += ["", f"## Gates: {'PASSED' if g['passed'] else 'FAILED'}", "", "| gate | value | threshold | passed |",
                  "|---|---:|---:|---|"]
        for r in g["results"]:
            value = f"{r['value']:.4f}" if r["value"] is not None else "nothing to check"
            lines.append(f"| {r['name']} | {value} | {r['threshold']} | {'yes' if r['passed'] else '**no**'} |")
    for name, why in report.get("skipped", {}).items():
        lines.append(f"\nSkipped variant {name}: {why}")
    lines += ["", "## Activation outliers", "",
              "Layers whose input has the strongest outlier channel (channel absmax / median channel absmax), "
              "measured over the calibration samples.", "",
              "| layer | ratio | absmax | median absmax | channel | tokens |", "|---|---:|---:|---:|---:|---:|"]
    for o in report["outliers"]:
        lines.append(f"| {o['layer']} | {o['ratio']:.1f} | {o['absmax']:.3f} | {o['median_absmax']:.4f} | "
                     f"{o['channel']} | {o['tokens']:,} |")
    for name, rows in report.get("smoothing", {}).items():
        lines += ["", f"## SmoothQuant's effect on the activation spread ({name})", "",
                  "Channel absmax / median channel absmax of each Linear input, unquantized vs smoothed-and-quantized, "
                  "on the same calibration samples; layers not preceded by a norm (o_proj, down_proj) are not "
                  "smoothed.", "",
                  "| layer | spread before | spread after | reduction |", "|---|---:|---:|---:|"]
        for o in rows:
            red = f"{o['reduction']:.1f}×" if o["reduction"] is not None else "–"
            lines.append(f"| {o['layer']} | {o['spread_before']:.1f} | {o['spread_after']:.1f} | {red} |")
    lines += ["", "## Stages", "", "| stage | wall (s) | peak RSS (MB) |", "|---|---:|---:|"]
    for name, s in report["stages"].items():
        lines.append(f"| {name} | {s['seconds']:.1f} | {s['peak_rss_mb']:,.0f} |")
    lines += ["", "## Versions", "", ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
              f"on {report['machine']['platform']} ({report['machine']['cpus']} CPUs).", "",
              "## Recipe", "", "```yaml", yaml.safe_dump(report["recipe_content"], sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def write_reports(run_root: str | Path) -> dict:
    """report.json, report.md and a self-contained report.html, from the run folder alone (its manifest and stored
    results: no model, data folder or network); gates are evaluated last, on the finished report."""
    run = RunDir(run_root)
    manifest = read_manifest(run)
    recipe = manifest["recipe"]
    report = collect(run, manifest)
    spec = recipe["evaluation"]["tasks"]
    if spec is not None:
        per_variant = {name: json.loads(run.path("tasks", f"{name}.json").read_text()) for name in manifest["variants"]}
        report["tasks"] = tasks_section(per_variant, recipe["evaluation"]["tokens"]["bins"], spec["bootstrap"],
                                        spec["seed"], manifest["versions"]["lm_eval"])
        if spec.get("answer_calibration"):
            answers = spec["answer_calibration"]
            report["answers"] = answer_report.answers_section(
                {name: json.loads(run.path("answers", f"{name}.json").read_text()) for name in manifest["variants"]},
                {"fit_limit": answers["fit_limit"], "select_by": answers["select_by"],
                 "targets": [str(t) for t in answers["targets"]], "bins": recipe["evaluation"]["tokens"]["bins"],
                 "bootstrap": spec["bootstrap"], "seed": spec["seed"]})
    gates = Gates.model_validate(recipe["gates"]) if recipe.get("gates") else None
    report["gates"] = gates_section(gates, report, baseline=BASELINE)
    write_json(run.path("report.json"), report)
    write_text(run.path("report.md"), markdown(report))
    write_html(run.path("report.html"), report)
    return report
