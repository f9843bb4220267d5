"""The Ray executor on a local two-CPU Ray: the same folder and report as the local executor, stages side by side,
a killed worker retried, and runs that resume each other across executors."""

import json
import logging
import re

import pytest

import calq
from calq.errors import CalqError

ray = pytest.importorskip("ray")
from calq.ray_executor import KILL_ENV, RayExecutor  # noqa: E402

W4 = "quantize/minmax-w4a16-g32"  # a stage of the tiny recipe


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    yield
    ray.shutdown()


def numbers(out) -> dict:
    """report.json without what differs between two runs of one recipe: the time it was made, and timings."""
    report = json.loads((out / "report.json").read_text())
    for v in report["variants"]:
        v.pop("calibration_seconds")
    return {k: v for k, v in report.items() if k not in ("created", "stages")}


def markers(out) -> dict:
    folder = out / ".calq" / "stages"
    return {str(p.relative_to(folder))[:-5]: json.loads(p.read_text())["key"] for p in sorted(folder.rglob("*.json"))}


def lines() -> tuple[list, callable]:
    seen = []
    return seen, seen.append


def test_ray_run_writes_the_local_runs_folder_and_report(tiny_recipe, tmp_path):
    local = calq.run(tiny_recipe, out=tmp_path / "local")
    executor = RayExecutor()
    on_ray = calq.run(tiny_recipe, out=tmp_path / "ray", executor=executor)
    assert numbers(tmp_path / "ray") == numbers(tmp_path / "local") and on_ray.exit_code == local.exit_code == 0
    assert markers(tmp_path / "ray") == markers(tmp_path / "local")

    # the two quantize stages need nothing: Ray ran them (or another independent pair) side by side
    spans = executor.timings
    assert set(spans) == set(markers(tmp_path / "ray"))  # every stage ran on Ray
    overlapping = [(a, b) for a in spans for b in spans
                   if a < b and spans[a][0] < spans[b][1] and spans[b][0] < spans[a][1]]
    assert overlapping, spans


def test_a_killed_worker_is_retried_and_the_run_finishes(tiny_recipe, tmp_path, monkeypatch):
    flag = tmp_path / "killed"
    monkeypatch.setenv(KILL_ENV, f"{W4}={flag}")
    calq.run(tiny_recipe, out=tmp_path / "run", executor="ray", until="quantize")
    assert flag.exists()  # the worker died once, after writing the outputs and before the marker
    assert (tmp_path / "run" / ".calq" / "stages" / f"{W4}.json").is_file()
    assert not list((tmp_path / "run").rglob(".*.tmp-*"))


def test_runs_resume_across_executors(tiny_recipe, tmp_path, monkeypatch):
    # Ray gives up on a stage whose worker dies on every try: a one-line error, and the local executor resumes
    recipe = {**tiny_recipe, "resources": {"evaluate": {"max_retries": 0}}}
    last = "evaluate/minmax-w4a16-g32"  # its worker dies after its inputs are done
    monkeypatch.setenv(KILL_ENV, f"{last}={tmp_path / 'killed'}")
    with pytest.raises(CalqError, match=re.escape(f"resources.evaluate: stage {last} failed on Ray after 0 retries")):
        calq.run(recipe, out=tmp_path / "a", executor="ray")
    monkeypatch.delenv(KILL_ENV)
    done_on_ray = set(markers(tmp_path / "a"))
    seen, log = lines()
    calq.run(recipe, out=tmp_path / "a", log=log)
    assert {"eval_tokens", W4} <= done_on_ray and last not in done_on_ray
    assert all(f"{name} [dim](reused)" in " ".join(seen) for name in done_on_ray)

    # and the other way: stopped locally, finished on Ray
    calq.run(recipe, out=tmp_path / "b", until="ranges")
    seen, log = lines()
    calq.run(recipe, out=tmp_path / "b", executor="ray", log=log)
    assert "✓[/] ranges [dim](reused)" in " ".join(seen)
    assert numbers(tmp_path / "b") == numbers(tmp_path / "a")


def test_resources_name_stages_and_must_fit_the_cluster(tiny_recipe, tmp_path):
    with pytest.raises(CalqError, match=re.escape("resources.quantise: 'quantise' names no stage")):
        calq.run({**tiny_recipe, "resources": {"quantise": {"num_gpus": 1}}}, out=tmp_path / "a", executor="ray")
    with pytest.raises(CalqError, match="asks for 1 CPUs and 1 GPUs; the Ray cluster has 2 CPUs and 0 GPUs"):
        calq.run({**tiny_recipe, "resources": {"quantize": {"num_gpus": 1}}}, out=tmp_path / "b", executor="ray")


def test_device_map_reaches_from_pretrained_and_leaves_the_keys(tiny_recipe, tiny_model, monkeypatch):
    from transformers import AutoModelForCausalLM

    from calq import api, models

    placed = {**tiny_recipe, "model": {**tiny_recipe["model"], "device_map": "auto"}}
    assert api.prepare(placed).plan.keys == api.prepare(tiny_recipe).plan.keys  # placement reruns nothing
    given = []
    load = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **kw: given.append(kw) or load(*a, **kw))
    models.load(models.resolve(str(tiny_model)), device_map="auto")  # accelerate places it (on the CPU here)
    assert given[0]["device_map"] == "auto"


def test_tasks_split_per_task_merge_into_the_same_results(tiny_recipe, tmp_path):
    data = tmp_path / "data"
    (data / "mc").mkdir(parents=True)
    for task in ("arc_easy", "arc_challenge"):
        questions = [{"query": f"Question: {task} {i}?", "choices": ["red", "green", "blue"], "gold": i % 3}
                     for i in range(4)]
        (data / "mc" / f"{task}.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    tiny_recipe["variants"] = tiny_recipe["variants"][1:]
    tiny_recipe["evaluation"]["tasks"] = {"names": ["arc_easy", "arc_challenge"], "limit": 4, "bootstrap": 20}
    whole = calq.run(tiny_recipe, out=tmp_path / "whole", data_dir=data)
    tiny_recipe["evaluation"]["tasks"]["split"] = True
    split = calq.run(tiny_recipe, out=tmp_path / "split", data_dir=data)
    assert {"tasks/baseline/arc_easy", "tasks/baseline/arc_challenge"} <= set(markers(tmp_path / "split"))
    for v in ("baseline", "minmax-w4a16-g32"):
        one, merged = (json.loads((tmp_path / run / "tasks" / f"{v}.json").read_text()) for run in ("whole", "split"))
        assert list(merged["tasks"]) == list(one["tasks"]) == ["arc_easy", "arc_challenge"]
        for task, entry in one["tasks"].items():
            for cal, r in entry["calibrators"].items():
                got = merged["tasks"][task]["calibrators"][cal]
                assert got["scores"] == r["scores"]  # batches differ (one task per pass): log-likelihoods to rounding
                assert [x for q in got["loglikelihoods"] for x in q] == pytest.approx(
                    [x for q in r["loglikelihoods"] for x in q], rel=1e-5)
    assert split.exit_code == whole.exit_code


def test_cli_refuses_an_unknown_executor_or_a_stray_address(tiny_recipe, write_recipe):
    from typer.testing import CliRunner

    from calq.cli import app

    path = write_recipe(tiny_recipe)
    for args, text in ((["--executor", "dask"], "unknown executor 'dask'"),
                       (["--address", "auto"], "an address is for the Ray executor")):
        result = CliRunner().invoke(app, ["run", str(path), *args])
        assert result.exit_code == 2 and text in result.output, result.output
