"""Answer-level calibration on the bundled model: fit tasks -> answer calibrators -> evaluation tasks never seen.

Two phases, so the slow part (the model's forward passes) runs once:

    python benchmarks/bench_answer_calibration.py collect --data-dir ../shared/data --out bench_answers
    python benchmarks/bench_answer_calibration.py analyze --out bench_answers [--json results.json]

    python benchmarks/bench_answer_calibration.py collect --all --data-dir ../shared/data --out bench_loto
    python benchmarks/bench_answer_calibration.py loto --out bench_loto [--json results.json]

`collect` runs every task once through `harness.run_tasks` (calibrator `none`, features on) and stores per task
the choices' log-likelihoods, gold indices, choice lengths (JSON) and the prompt-end hidden states (safetensors),
with the wall time and the number of questions. `analyze` fits the answer calibrators on the fit tasks and
reports, per evaluation task: accuracy, confidence, ECE (15 equal-width bins), ECE (10 equal-mass bins), smooth
ECE, Brier, AUROC, AURC, each with a 95% bootstrap interval, and "answer only when confidence >= c" for target
accuracies. `collect --all` stores every offline multiple-choice task (each MMLU subject a task) at `--limit`
questions each (default 500, all a task has when fewer); `loto` holds out each collected task in turn and reports
on it: uncalibrated ECE, one temperature fitted on all the others, answer_adaptive fitted on all the others (its head
alone, and shrunk towards one temperature), the calibrator the pipeline's selection picks from those others, and
the per-task oracle temperature (fitted on the held-out task's own labels: the floor a temperature can reach).
`collect` skips tasks already in --out, so it resumes; `loto` reads only the stored files.
Sizes, seeds and times are printed and written to --json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

# Sizes fit a shared 2-core machine (about 130 tokens/s on one thread there): the probe used 150 per task.
FIT = {"openbookqa": 150, "commonsense_qa": 150, "siqa": 150, "copa": 100}
EVAL = {"arc_easy": 150, "arc_challenge": 150, "piqa": 150, "boolq": 150, "mmlu": 150, "truthfulqa_mc1": 100}
# Leave-one-task-out: every offline multiple-choice task whose questions are in no other one (not `mmlu`, whose
# questions are the subjects', nor truthfulqa_mc2, mc1's questions), plus mmlu_<subject> for each of the 57.
LOTO = ["arc_easy", "arc_challenge", "piqa", "boolq", "openbookqa", "commonsense_qa", "siqa", "copa",
        "truthfulqa_mc1"]


def loto_tasks() -> list[str]:
    from calq.evaluation.tasks import available

    return LOTO + [t for t in available() if t.startswith("mmlu_") and t not in ("mmlu_5shot", "mmlu_subjects")]


def model_folder(out: Path) -> Path:
    """The bundled GGUF, dequantized once into a transformers folder (every task reloads it in a second)."""
    from calq import models

    folder = out / "model"
    if not (folder / "config.json").exists():
        model, tokenizer = models.load(models.resolve("smollm2-135m"), "float32")
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def variant_folder(out: Path, baseline_out: Path) -> Path:
    """min-max W4A16 (group 64, round to nearest: no calibration data) of the dequantized model, compressed-tensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from calq.quant import minmax
    from calq.recipe import VariantSpec

    folder = out / "minmax-w4a16-g64"
    if not (folder / "config.json").exists():
        base = model_folder(baseline_out)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        model = minmax.quantize(model, None, VariantSpec(method="minmax", scheme="w4a16", group_size=64), "bench")
        model.save_pretrained(folder, save_compressed=True)
        AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    return folder


def collect(args) -> None:
    from calq.calib.base import identity
    from calq.evaluation.harness import run_tasks, split_features

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    folder = variant_folder(args.out, args.baseline) if args.variant else model_folder(args.out)
    if args.all:
        limits = dict.fromkeys(loto_tasks(), args.limit)
    else:
        limits = {**EVAL, **FIT} if args.variant else {**FIT, **EVAL}
    todo = [t for t in args.tasks or limits if not (args.out / f"{t}.json").exists()]
    # tasks of one limit share a run (one model load, one task index): `chunk` at a time, so a stop keeps the rest
    runs = [todo[i:i + args.chunk] for i in range(0, len(todo), args.chunk)] if args.all else [[t] for t in todo]
    for tasks in runs:
        limit = limits.get(tasks[0], args.limit)
        start = time.perf_counter()
        res = run_tasks(folder, {"none": identity}, tasks, limit, args.data_dir, args.batch_size, features=True)
        seconds = time.perf_counter() - start
        part, tensors = split_features(res)
        questions = sum(part["tasks"][t]["n"] for t in tasks)
        for task in tasks:
            entry = part["tasks"][task]
            save_file({k: v for k, v in tensors.items() if k.startswith(f"{task}.")}, args.out / f"{task}.safetensors")
            record = {"task": task, "n": entry["n"], "gold": entry["gold"], "choice_tokens": entry["choice_tokens"],
                      "loglikelihoods": entry["calibrators"]["none"]["loglikelihoods"],
                      "seconds": seconds * entry["n"] / questions, "threads": args.threads,
                      "batch_size": args.batch_size, "limit": limit}
            (args.out / f"{task}.json").write_text(json.dumps(record))
        print(f"{', '.join(tasks)}: {questions} questions in {seconds:.0f} s ({questions / seconds:.2f} questions/s)",
              flush=True)


def load_task(out: Path, task: str):
    from calq.calib.answer_features import AnswerSet

    record = json.loads((out / f"{task}.json").read_text())
    hidden = load_file(out / f"{task}.safetensors")[f"{task}.prompt_hidden"]
    return record, AnswerSet(record["loglikelihoods"], record["gold"], hidden, record["choice_tokens"])


def analyze(args) -> None:
    from calq.calib import answer_adaptive, answer_temperature
    from calq.calib.answer_features import top_choice
    from calq.evaluation.selective import bands, selective_report, summary

    torch.set_num_threads(args.threads)
    records, sets = {}, {}
    for task in {**FIT, **EVAL}:
        if (args.out / f"{task}.json").exists():
            records[task], sets[task] = load_task(args.out, task)
    fit = [t for t in FIT if t in sets]
    evals = [t for t in EVAL if t in sets]
    result = {"machine": f"{platform.node()} {platform.machine()}", "threads": args.threads, "seed": args.seed,
              "sizes": {t: records[t]["n"] for t in sets}, "collect_seconds": {t: records[t]["seconds"] for t in sets}}

    def fit_all(fit_tasks: list[str]) -> tuple[dict, dict]:
        times, fitted = {}, {}
        start = time.perf_counter()
        fitted["answer_temperature"] = answer_temperature.fit([sets[t] for t in fit_tasks])
        times["answer_temperature"] = time.perf_counter() - start
        start = time.perf_counter()
        fitted["adaptive"] = answer_adaptive.fit({t: sets[t] for t in fit_tasks}, seed=args.seed)
        times["adaptive"] = time.perf_counter() - start
        return fitted, times

    def rows(fitted: dict, tasks: list[str]) -> list[dict]:
        out = []
        for task in tasks:
            s = sets[task]
            probs = {"none": s.probabilities(1.0),
                     "answer_temperature": fitted["answer_temperature"].apply(s),
                     "adaptive": fitted["adaptive"].apply(s),
                     "adaptive_task_mean": fitted["adaptive"].apply(s, per_task_mean=True)}
            for name, p in probs.items():
                out.append({"task": task, "calibrator": name, **summary(p, s, n_boot=args.n_boot, seed=args.seed),
                            "bands": bands(*top_choice(p, s.gold))})
        return out

    if args.only_parent:  # the parent rows alone (the variant is collected after the baseline's analysis)
        result["parent"] = parent_rows(args, sets)
        print_tables(result)
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
        return
    fitted, times = fit_all(fit)
    result["fit_tasks"], result["eval_tasks"], result["fit_seconds"] = fit, evals, times
    result["adaptive"] = fitted["adaptive"].info
    result["temperature"] = fitted["answer_temperature"].temperature
    result["rows"] = rows(fitted, evals)
    fitted["none"] = answer_temperature.AnswerTemperature(1.0)
    fit_probs = {name: [c.apply(sets[t]) for t in fit] for name, c in fitted.items()}
    result["selective"] = {
        name: selective_report(fit_probs[name], [sets[t].gold for t in fit],
                               {t: (c.apply(sets[t]), sets[t].gold) for t in evals}, targets=args.targets,
                               n_boot=args.n_boot, seed=args.seed)
        for name, c in fitted.items()}
    if args.variant_out:
        result["parent"] = parent_rows(args, sets)
    print_tables(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


def loto(args) -> None:
    """Leave-one-task-out over every collected task. On each held-out task, fitted on all the others: none, one T,
    answer_adaptive's head alone (unshrunk), answer_adaptive (shrunk towards one T by nested leave-one-task-out), and
    the calibrator the pipeline selects among none / one T / answer_adaptive by leave-one-fit-task-out over those
    others (answer_calibration.select); the same selection on the others above chance only (the pipeline's default
    screening); and the oracle T fitted on the task itself. Per task: does the selected calibrator's ECE stay at or
    below both one T and none (the issue's goal)? Means over tasks, and the gap to the oracle."""
    from calq.calib import answer_adaptive, answer_temperature
    from calq.calib.answer_base import MOST_FOLDS, task_folds
    from calq.evaluation.answer_calibration import leave_one_task_out, select
    from calq.evaluation.selective import against_chance

    torch.set_num_threads(args.threads)
    tasks = [t for t in loto_tasks() if (args.out / f"{t}.json").exists()]
    records, sets = {}, {}
    for task in tasks:
        records[task], sets[task] = load_task(args.out, task)
    start = time.perf_counter()
    accuracy = {t: against_chance(sets[t], args.n_boot, args.seed) for t in tasks}
    settings = {"answer_temperature": None, "answer_adaptive": None}
    candidates = ["none", *settings]

    def selected_on(fit_sets: dict) -> tuple[str, dict, object]:
        """As the pipeline: none when nothing is fitted, else select() over leave-one-fit-task-out; the selected fit."""
        if not fit_sets:
            return "none", {}, answer_temperature.AnswerTemperature(1.0)
        scores = leave_one_task_out(fit_sets, settings, "ece", 15, args.seed)
        usable = [n for n in candidates if scores[n]["mean"] is not None]
        name = select(scores, usable)
        if name == "none":
            return name, scores, answer_temperature.AnswerTemperature(1.0)
        if name == "answer_temperature":
            return name, scores, answer_temperature.fit(list(fit_sets.values()))
        return name, scores, answer_adaptive.fit(fit_sets, seed=args.seed)

    rows = []
    folds = task_folds(tasks, args.groups) if args.groups else [[t] for t in tasks]
    for fold in folds:
        tick = time.perf_counter()
        others = {t: sets[t] for t in tasks if t not in fold}
        above = {t: a for t, a in others.items() if not accuracy[t]["at_chance"]}
        one_t = answer_temperature.fit(list(others.values()))
        adaptive = answer_adaptive.fit(others, seed=args.seed)
        head, _ = answer_adaptive.train_head(others, list(others)[-1], seed=args.seed)
        head_alone = answer_adaptive.AnswerAdaptive(head, one_t.temperature, True, {})
        selected, scores, chosen = selected_on(others)
        selected_above, _, chosen_above = selected_on(above)
        print(f"held out {len(fold)} task(s), fitted on {len(others)}: {time.perf_counter() - tick:.0f} s", flush=True)
        for held in fold:
            rows.append(held_out_row(held, sets[held], accuracy, len(above), one_t, adaptive, head_alone, selected,
                                     scores, chosen, selected_above, chosen_above))
    rows.sort(key=lambda r: tasks.index(r["task"]))
    columns = ("none", "one_t", "head", "adaptive", "selected", "selected_above", "oracle_t")
    means = {name: sum(r[name] for r in rows) / len(rows) for name in columns}
    result = {"machine": f"{platform.node()} {platform.machine()}", "threads": args.threads, "seed": args.seed,
              "most_folds": MOST_FOLDS, "outer_folds": len(folds), "tasks": len(rows),
              "questions": sum(r["n"] for r in rows),
              "collect_seconds": sum(records[t]["seconds"] for t in tasks), "analyze_seconds":
              time.perf_counter() - start, "mean_ece": means,
              "meets_goal": sum(r["meets_goal"] for r in rows),
              "meets_goal_above": sum(r["meets_goal_above"] for r in rows),
              "selected": {n: sum(r["selected_name"] == n for r in rows) for n in candidates},
              "selected_above": {n: sum(r["selected_above_name"] == n for r in rows) for n in candidates},
              "adaptive_beats_one_t": sum(r["adaptive"] < r["one_t"] - 1e-9 for r in rows),
              "adaptive_loses_to_one_t": sum(r["adaptive"] > r["one_t"] + 1e-9 for r in rows),
              "head_beats_one_t": sum(r["head"] < r["one_t"] - 1e-9 for r in rows), "rows": rows}
    print("\n| held-out task | n | acc | chance | ECE none | one T | head alone | adaptive (shrunk) | selected | "
          "selected, fit tasks above chance | oracle T | T others | T oracle | shrinkage | selected | goal met |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for r in rows:
        print(f"| {r['task']} | {r['n']} | {r['accuracy']['accuracy']:.3f} | {r['accuracy']['chance']:.3f} | "
              + " | ".join(f"{r[k]:.3f}" for k in columns)
              + f" | {r['t_others']:.3g} | {r['t_oracle']:.3g} | {r['shrinkage']} | {r['selected_name']} | "
                f"{'yes' if r['meets_goal'] else 'no'} |")
    print(f"| mean over {len(rows)} tasks | {result['questions']} | | | "
          + " | ".join(f"{means[k]:.3f}" for k in columns) + " | | | | | |")
    print(f"selected ECE at most min(one T, none) on {result['meets_goal']} of {len(rows)} tasks (selection on the "
          f"fit tasks above chance: {result['meets_goal_above']}); selected {result['selected']}, above chance "
          f"{result['selected_above']}; mean ECE selected - oracle T {means['selected'] - means['oracle_t']:+.3f}; "
          f"adaptive below one T on {result['adaptive_beats_one_t']}, above on {result['adaptive_loses_to_one_t']} "
          f"(head alone below on {result['head_beats_one_t']}); analyze {result['analyze_seconds']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


def held_out_row(held: str, s, accuracy: dict, above: int, one_t, adaptive, head_alone, selected: str, scores: dict,
                 chosen, selected_above: str, chosen_above) -> dict:
    """One held-out task's ECE (and share of uniform confidences) under each calibrator fitted without it."""
    from calq.calib import answer_temperature
    from calq.calib.answer_features import top_choice
    from calq.evaluation.selective import uniform_share
    from calq.metrics import ece

    oracle = answer_temperature.fit([s])
    probs = {"none": s.probabilities(), "one_t": one_t.apply(s), "head": head_alone.apply(s, shrinkage=1.0),
             "adaptive": adaptive.apply(s), "selected": chosen.apply(s), "selected_above": chosen_above.apply(s),
             "oracle_t": oracle.apply(s)}
    choices = torch.tensor([len(row) for row in s.loglikelihoods])
    row = {"task": held, "n": len(s), "accuracy": accuracy[held], "fit_tasks_above_chance": above,
           "t_others": one_t.temperature, "t_oracle": oracle.temperature,
           "shrinkage": adaptive.info["shrinkage"], "selected_name": selected,
           "selected_above_name": selected_above,
           "selection_mean_ece": {n: e["mean"] for n, e in scores.items()}}
    for name, p in probs.items():
        conf, correct = top_choice(p, s.gold)
        row[name] = ece(conf, correct, 15)
        row[f"{name}_uniform_share"] = uniform_share(conf, choices)
    # the goal's condition, with a float-rounding allowance: the selected may be one T itself
    row["meets_goal"] = row["selected"] <= min(row["one_t"], row["none"]) + 1e-9
    row["meets_goal_above"] = row["selected_above"] <= min(row["one_t"], row["none"]) + 1e-9
    print(f"{held}: n {row['n']}, acc {row['accuracy']['accuracy']:.3f}, ECE none {row['none']:.3f} one T "
          f"{row['one_t']:.3f} head {row['head']:.3f} adaptive {row['adaptive']:.3f} (s {row['shrinkage']}) "
          f"selected {selected} {row['selected']:.3f} oracle {row['oracle_t']:.3f}", flush=True)
    return row


def parent_rows(args, sets: dict) -> list[dict]:
    """The W4A16 variant on each evaluation task: uncalibrated, with the baseline's temperature, and with `parent`
    fitted label-free on that task's own prompts against the calibrated baseline; beside the calibrated baseline.
    The baseline is calibrated with one answer temperature fitted on every other task (leave-one-task-out)."""
    from calq.calib import answer_temperature, parent
    from calq.evaluation.selective import summary

    out = []
    for task in EVAL:
        if task not in sets or not (args.variant_out / f"{task}.json").exists():
            continue
        _, variant = load_task(args.variant_out, task)
        if variant.gold != sets[task].gold:
            raise SystemExit(f"{task}: the variant's questions differ from the baseline's")
        base_t = answer_temperature.fit([s for t, s in sets.items() if t != task])
        base_probs = base_t.apply(sets[task])
        start = time.perf_counter()
        fitted = parent.fit(without_labels(variant), base_probs)
        seconds = time.perf_counter() - start
        rows = {"baseline (T other tasks)": base_probs, "variant none": variant.probabilities(),
                "variant, baseline T": base_t.apply(variant), "variant parent": fitted.apply(variant)}
        for name, p in rows.items():
            metrics = summary(p, sets[task] if p is base_probs else variant, n_boot=args.n_boot, seed=args.seed)
            out.append({"task": task, "calibrator": name, **metrics,
                        "parent_temperature": fitted.temperature, "baseline_temperature": base_t.temperature,
                        "parent_info": fitted.info, "parent_fit_seconds": seconds})
    return out


def without_labels(answers):
    """The same prompts without their gold answers: `parent` must not see labels."""
    from calq.calib.answer_features import AnswerSet

    return AnswerSet(answers.loglikelihoods, None, answers.hidden, answers.choice_tokens)


def print_tables(result: dict) -> None:
    print(f"sizes: {result['sizes']}; seed {result['seed']}; collect seconds {result['collect_seconds']}")
    if "fit_tasks" in result:
        print(f"fit tasks {result['fit_tasks']}; fit seconds: {result['fit_seconds']}; "
              f"T = {result['temperature']:.3f}; "
              f"adaptive: {result['adaptive']}")
    for key in ("rows", "parent"):
        if key not in result:
            continue
        print(f"\n{key}")
        print("| task | calibrator | n | acc | conf | ECE-15 [95%] | ECE-10 mass | smECE | Brier | AUROC [95%] "
              "| AURC |")
        print("|---|---|---:|---:|---:|---|---:|---:|---:|---|---:|")
        for r in result[key]:
            print(f"| {r['task']} | {r['calibrator']} | {r['n']} | {r['accuracy']:.3f} | {r['confidence']:.3f} | "
                  f"{r['ece']:.3f} [{r['ece_ci'][0]:.3f}, {r['ece_ci'][1]:.3f}] | {r['ece_mass']:.3f} | "
                  f"{r['smece']:.3f} | {r['brier']:.3f} | {r['auroc']:.3f} [{r['auroc_ci'][0]:.2f}, "
                  f"{r['auroc_ci'][1]:.2f}] | {r['aurc']:.3f} |")
        by_cal: dict[str, list[float]] = {}
        for r in result[key]:
            by_cal.setdefault(r["calibrator"], []).append(r["ece"])
        for cal, values in by_cal.items():
            print(f"mean ECE-15 {cal}: {sum(values) / len(values):.3f} (max {max(values):.3f}, {len(values)} tasks)")
    for name, sel in result.get("selective", {}).items():
        for target, entry in sel.items():
            print(f"\nselective {name}, target accuracy {target}: threshold {entry['threshold']}")
            for task, t in entry["tasks"].items():
                print(f"  {task}: coverage {t['coverage']:.3f} {t['coverage_ci']}, accuracy {t['accuracy']} "
                      f"{t['accuracy_ci']}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=["collect", "analyze", "loto"])
    parser.add_argument("--out", type=Path, default=Path("bench_answers"))
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--tasks", nargs="*")
    parser.add_argument("--limit", type=int, default=500, help="questions per task for --all (and unlisted tasks)")
    parser.add_argument("--all", action="store_true", help="collect: every task of the leave-one-task-out")
    parser.add_argument("--groups", type=int, default=0,
                        help="loto: hold out this many groups of tasks in turn instead of one task at a time (faster)")
    parser.add_argument("--chunk", type=int, default=8, help="collect --all: tasks per run")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)  # 2 threads on 2 busy cores ran 4x slower
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--targets", type=float, nargs="*", default=[0.6, 0.7, 0.8])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--variant", action="store_true", help="collect: the min-max W4A16 variant instead")
    parser.add_argument("--baseline", type=Path, help="with --variant: the baseline's collect folder (its model)")
    parser.add_argument("--variant-out", type=Path, help="analyze: the variant's collect folder, for `parent`")
    parser.add_argument("--only-parent", action="store_true", help="analyze: the parent rows only (with --variant-out)")
    args = parser.parse_args()
    {"collect": collect, "analyze": analyze, "loto": loto}[args.phase](args)


if __name__ == "__main__":
    main()
