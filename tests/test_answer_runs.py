"""Answer-level calibration inside a run: the recipe's evaluation.tasks.answer_calibration, its stages
(fit_tasks/<v>, answers/<v>), the report section and the answer gates, on the tiny model with the user's own
task YAMLs (include_path); and bad input failing before any model loads."""

import json
import random

import pytest
from test_task_shapes import yaml_task

import calq
from calq import pipeline
from calq.calib import calibrators
from calq.errors import CalqError
from calq.evaluation.answer_calibration import select
from calq.recipe import parse_recipe

WORDS = ["sky", "grass", "sun", "snow", "sea", "leaf", "coal", "milk", "rose", "lime", "sand", "ink", "moss", "fire",
         "rust", "plum", "bone", "clay", "iron", "corn", "wine", "jade", "pearl", "mint", "ash", "gold", "tar", "salt"]


def write_task(folder, name: str, n: int, seed: int, choices: int) -> None:
    rng = random.Random(seed)
    options = ["red", "green", "blue", "white", "black"][:choices]
    rows = [{"question": f"What colour is {rng.choice(WORDS)} number {i}?", "options": options,
             "label": rng.randrange(choices)} for i in range(n)]
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{name}.yaml").write_text(yaml_task(name, folder / f"{name}.jsonl", """\
        doc_to_text: "Question: {{question}}\\nAnswer:"
        doc_to_choice: options
        doc_to_target: label
        """))


@pytest.fixture(scope="module")
def mc_tasks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mc-tasks")
    for i, (name, choices) in enumerate({"fit_a": 3, "fit_b": 4, "fit_c": 2, "eval_x": 3, "eval_y": 4}.items()):
        write_task(folder, name, 24, i, choices)
    return folder


def answer_recipe(tiny_recipe, mc_tasks, **answers) -> dict:
    return {**tiny_recipe, "variants": [{"method": "minmax", "scheme": "w4a16", "group_size": 32}],
            "evaluation": {**tiny_recipe["evaluation"], "tasks": {
                "names": ["eval_x", "eval_y"], "limit": 24, "batch_size": 16, "bootstrap": 50,
                "include_path": [str(mc_tasks)],
                # the tiny model is at chance on every fit task: fitted anyway, to see what that does
                "answer_calibration": {"fit_tasks": ["fit_a", "fit_b", "fit_c"], "fit_limit": 24,
                                       "skip_at_chance": False,
                                       **({} if "use" in answers else {"answer_adaptive": {"epochs": 5,
                                                                                           "patience": 2}}),
                                       **answers}}}}


def test_answer_calibration_in_a_run_fits_selects_reports_and_gates(tiny_recipe, mc_tasks, tmp_path):
    recipe = answer_recipe(tiny_recipe, mc_tasks)
    recipe["gates"] = {"max_answer_ece": 1.0, "min_coverage": 0.0, "min_auroc": 0.0, "allow_constant_answers": True}
    out = tmp_path / "run"
    result = calq.run(recipe, out=out, data_dir=tmp_path)
    report = json.loads((out / "report.json").read_text())
    answers = report["answers"]
    assert answers["settings"]["fit_tasks"] == ["fit_a", "fit_b", "fit_c"]
    assert answers["settings"]["eval_tasks"] == ["eval_x", "eval_y"]
    variants = ["baseline", "minmax-w4a16-g32"]
    for variant in variants:
        info = answers["variants"][variant]
        fitted = ["answer_temperature", "answer_adaptive"] + (["parent"] if variant != "baseline" else [])
        assert sorted(info["fit_seconds"]) == sorted(fitted)
        assert set(info["selection"]) == {"none", *fitted}
        # leave-one-fit-task-out: every candidate scored on each fit task; the selected one by `select` (the better of
        # none and one T on the mean, unless another is no worse than both on every fit task)
        means = {n: e["mean"] for n, e in info["selection"].items() if e["mean"] is not None}
        assert all(len(e["per_task"]) == 3 for e in info["selection"].values() if e["mean"] is not None)
        assert info["selected"] == select(info["selection"], list(means))
        assert means[info["selected"]] <= min(means[n] for n in ("none", "answer_temperature") if n in means)
        rows = [r for r in answers["results"] if r["variant"] == variant]
        assert {(r["calibrator"], r["task"]) for r in rows} == {(c, t) for c in ["none", *fitted]
                                                                for t in ("eval_x", "eval_y")}
        for r in rows:
            assert r["n"] == 24 and r["auroc_ci"] is not None and "0.8" in r["coverage"]
            # temperature-type calibrators rescale, they do not reorder: accuracy is none's
            none = next(x for x in rows if x["task"] == r["task"] and x["calibrator"] == "none")
            assert r["accuracy"] == none["accuracy"]
        assert sum(r["selected"] for r in rows) == 2
        for name in fitted:  # saved where the report says, and loadable
            calibrators.ANSWER.get(name).load(out / "answers" / variant / name)
    quantized = [r for r in answers["results"] if r["variant"] != "baseline" and r["selected"]]
    assert all(r["ece_vs_baseline"] is not None for r in quantized)
    gates = {(g["gate"], g["task"]) for g in report["gates"]["results"]}
    assert {("max_answer_ece", "eval_x"), ("min_coverage", "eval_y"), ("min_auroc", "eval_x")} <= gates
    assert result.exit_code == 0
    md = (out / "report.md").read_text()
    assert "## Answer-level calibration" in md and "Selection (leave one fit task out)" in md
    from calq.report.answers import summary_rows

    for row in summary_rows(answers):  # the per-task condition, counted as the rows say
        mine = [r for r in answers["results"] if r["variant"] == row["variant"]]
        expected = sum(s["ece"] <= min(r["ece"] for r in mine if r["task"] == s["task"]
                                       and r["calibrator"] in ("none", "answer_temperature")) + 1e-9
                       for s in mine if s["selected"])
        assert row["no_worse"] == expected and f"{expected} of 2" in md
    assert "risk-coverage" in (out / "report.html").read_text()
    # the tiny model is at chance on its fit tasks: one temperature runs to its bound, confidences to 1/choices,
    # and the report says so, as does every max_answer_ece pass that rests on such a constant predictor
    assert answers["variants"]["baseline"]["fit_info"]["answer_temperature"]["at_bound"]
    assert "baseline / answer_temperature: temperature at its bound (T=1097" in md
    assert "collapsed to uniform: confidence carries no information" in md and "Fit tasks against chance" in md
    selected = {(r["variant"], r["task"]): r["collapsed"] for r in answers["results"] if r["selected"]}
    ece_gates = [g for g in report["gates"]["results"] if g["gate"] == "max_answer_ece"]
    assert all(g["note"] == ("constant predictor" if selected[g["variant"], g["task"]] else None) for g in ece_gates)
    assert any(selected.values()) and "pass (constant predictor)" in md
    # the fit tasks are not evaluation rows anywhere: the task table holds the evaluation tasks only
    assert {r["task"] for r in report["tasks"]["results"]} == {"eval_x", "eval_y"}

    # without allow_constant_answers the collapsed calibrators' checks fail the run (exit 1), on the stored results
    del recipe["gates"]["allow_constant_answers"]
    strict = calq.run(recipe, out=out, data_dir=tmp_path)
    collapsed = sum(c for (variant, _), c in selected.items() if variant != "baseline")  # gates: quantized variants
    assert strict.exit_code == 1 and len(strict.failed_gates) == collapsed
    assert all(g.startswith("max_answer_ece") and g.endswith("(constant predictor)") for g in strict.failed_gates)
    # a gate the calibrated answers cannot pass fails the run (exit 1), on the stored results
    recipe["gates"] = {"max_answer_ece": 0.0}
    again = calq.run(recipe, out=out, data_dir=tmp_path)
    assert again.exit_code == 1 and all(g.startswith("max_answer_ece") for g in again.failed_gates)

    # screened (the default): every fit task is at chance, so nothing is fitted, `none` is selected, the report says so
    del recipe["evaluation"]["tasks"]["answer_calibration"]["skip_at_chance"]
    del recipe["gates"]
    calq.run(recipe, out=out, data_dir=tmp_path)
    answers = json.loads((out / "report.json").read_text())["answers"]
    for variant in variants:
        info = answers["variants"][variant]
        assert info["screened_out"] == ["fit_a", "fit_b", "fit_c"] and info["fitted_on"] == []
        assert info["selected"] == "none" and info["fit_seconds"] == {}
    assert "baseline: every fit task (fit_a, fit_b, fit_c) is at or below chance" in (out / "report.md").read_text()


@pytest.mark.parametrize("change, message", [
    ({"fit_tasks": ["fit_a", "eval_x"]}, "overlap: eval_x"),
    ({"fit_limit": 5}, "has 5 questions"),
    ({"fit_tasks": ["fit_a", "no_such_task"]}, "unknown task 'no_such_task'"),
    ({"use": ["ats"]}, "unknown calibrator 'ats'"),
    ({"targets": [1.5]}, "between 0 and 1"),
])
def test_bad_answer_calibration_is_one_line_before_any_model_loads(tiny_recipe, mc_tasks, tmp_path, change, message):
    with pytest.raises(CalqError, match=message):
        pipeline.plan(parse_recipe(answer_recipe(tiny_recipe, mc_tasks, **change)), tmp_path)


@pytest.mark.parametrize("gates, message", [
    ({"max_answer_ece": 0.1, "answer_calibrator": "ats"}, "unknown answer_calibrator 'ats'"),
    ({"min_coverage": 0.1, "coverage_target": 0.9}, "coverage_target 0.9 is not one of the targets"),
])
def test_bad_answer_gates_fail_before_any_model_loads(tiny_recipe, mc_tasks, tmp_path, gates, message):
    with pytest.raises(CalqError, match=message):
        pipeline.plan(parse_recipe({**answer_recipe(tiny_recipe, mc_tasks), "gates": gates}), tmp_path)


def test_answer_gates_need_answer_calibration(tiny_recipe, mc_tasks, tmp_path):
    recipe = answer_recipe(tiny_recipe, mc_tasks)
    del recipe["evaluation"]["tasks"]["answer_calibration"]
    with pytest.raises(CalqError, match="max_answer_ece needs answer calibration"):
        pipeline.plan(parse_recipe({**recipe, "gates": {"max_answer_ece": 0.1}}), tmp_path)


def test_split_task_stages_keep_the_features_answer_calibration_reads(tiny_recipe, mc_tasks, tmp_path):
    recipe = answer_recipe(tiny_recipe, mc_tasks, use=["answer_temperature"])
    recipe["evaluation"]["tasks"]["split"] = True
    out = tmp_path / "run"
    calq.run(recipe, out=out, data_dir=tmp_path)
    from safetensors.torch import load_file

    merged = load_file(str(out / "tasks" / "baseline.safetensors"))
    parts = {t: load_file(str(out / "tasks" / "baseline" / f"{t}.safetensors")) for t in ("eval_x", "eval_y")}
    for task, part in parts.items():
        assert (merged[f"{task}.prompt_hidden"] == part[f"{task}.prompt_hidden"]).all()
    rows = json.loads((out / "report.json").read_text())["answers"]["results"]
    assert {(r["variant"], r["task"]) for r in rows if r["calibrator"] == "answer_temperature"} == {
        (v, t) for v in ("baseline", "minmax-w4a16-g32") for t in ("eval_x", "eval_y")}
