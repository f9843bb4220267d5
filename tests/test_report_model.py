"""The report model: sections built once from report.json's content, rendered as report.md and report.html."""

from calq.report import render, sections
from calq.report.model import Plot, Plots, Section, Table, Text, num

BINS = [{"lo": 0.0, "hi": 0.5, "count": 1, "confidence": 0.4, "accuracy": 0.0},
        {"lo": 0.5, "hi": 1.0, "count": 3, "confidence": 0.8, "accuracy": 1.0}]
METRICS = {"ppl": 12.5, "accuracy": 0.75, "confidence": 0.7, "ece": 0.05, "adaptive_ece": 0.06, "brier": 0.2,
           "tokens": 4, "reliability": BINS}
REPORT = {
    "recipe": "tiny", "created": "2026-01-01T00:00:00",
    "model": {"source": "tiny-llama", "dtype": "float32", "note": None},
    "calibration": {"source": "calib.txt", "num_samples": 8, "seq_len": 32, "seed": 0},
    "evaluation": {"tokens": {"source": "heldout.txt", "tokens": 4, "seq_len": 64, "bins": 2}},
    "variants": [{"variant": "baseline", "method": "none", "scheme": "float32", "group_size": None,
                  "size_bytes": 1000, "calibration_seconds": None, **METRICS, "calibrated": {}},
                 {"variant": "w8", "method": "minmax", "scheme": "w8a8", "group_size": None, "size_bytes": 500,
                  "calibration_seconds": 1.5, **METRICS, "calibrated": {}}],
    "outliers": [], "stages": {"samples": {"seconds": 0.1, "peak_rss_mb": 500.0}}, "versions": {"calq": "0"},
    "machine": {"platform": "test", "cpus": 2}, "recipe_content": {"name": "tiny"},
}


def test_a_section_is_one_function_shown_in_both_renderings(monkeypatch):
    monkeypatch.setattr(sections, "SECTIONS", list(sections.SECTIONS))  # the registration below is undone after

    @sections.section
    def sizes(report: dict) -> Section:
        return Section("Sizes", [
            Text("Bytes per variant, from `size_bytes`."),
            Table(["variant", "bytes"], [[v["variant"], num(v["size_bytes"])] for v in report["variants"]], {1}),
            Plots([Plot(lambda: b"png", "sizes chart")])])

    built = sections.build(REPORT)
    assert built[-1].title == "Sizes"
    md = render.markdown("calq report: tiny", built)
    page = render.html("calq report: tiny", built)
    assert md.endswith("## Sizes\n\nBytes per variant, from `size_bytes`.\n\n| variant | bytes |\n|---|---:|\n"
                       "| baseline | 1,000 |\n| w8 | 500 |\n")  # no plots in markdown
    assert page.endswith("<h2>Sizes</h2><p>Bytes per variant, from <code>size_bytes</code>.</p>"
                         '<table><tr><th>variant</th><th>bytes</th></tr><tr><td>baseline</td><td class="n">1,000</td>'
                         '</tr><tr><td>w8</td><td class="n">500</td></tr></table>'
                         '<img alt="sizes chart" src="data:image/png;base64,cG5n"></body></html>')


def test_both_renderings_show_every_section_and_markup():
    report = {**REPORT, "model": {**REPORT["model"], "note": "a <b> note with **weight**"}}
    built = sections.build(report)
    titles = [s.title for s in built]
    assert titles == ["", "Summary", "Token-level calibration", "Size and quality", "Activation outliers", "Methods",
                      "Stages", "Versions", "Recipe"]  # no gates, calibrators, tasks, answers or deployed artifacts
    md = render.markdown("calq report: tiny", built)
    page = render.html("calq report: tiny", built)
    assert all(f"## {t}" in md and f"<h2>{t}</h2>" in page for t in titles[1:])
    assert "Note: a <b> note with **weight**." in md
    assert "Note: a &lt;b&gt; note with <strong>weight</strong>." in page
    assert "No gates configured" in md and '<div class="verdict none">No gates configured' in page
    assert "| w8 | minmax | w8a8 | – | 0.0 | 1.5 |" in md  # Methods: size in MiB, calibration seconds
    assert page.count("<img ") == 2 and "```yaml\nname: tiny\n```" in md  # reliability; size against quality


def test_answer_tables_label_a_collapsed_calibrator_and_a_temperature_at_its_bound():
    from calq.report import answers

    def row(calibrator, collapsed, selected, **extra):
        return {"variant": "baseline", "calibrator": calibrator, "task": "arc", "n": 4, "accuracy": 0.5,
                "confidence": 0.25, "ece": 0.25, "ece_ci": [0.1, 0.4], "ece_mass": 0.25, "smece": 0.25, "brier": 0.3,
                "auroc": 0.75, "auroc_ci": [0.6, 0.9], "aurc": 0.4, "confidence_std": 0.0, "selected": selected,
                "ece_vs_baseline": None, "coverage": {}, "bands": [], "collapsed": collapsed, **extra}

    fit = {"obqa": {"n": 40, "accuracy": 0.18, "accuracy_ci": [0.08, 0.3], "chance": 0.25, "at_chance": True},
           "copa": {"n": 40, "accuracy": 0.8, "accuracy_ci": [0.7, 0.9], "chance": 0.5, "at_chance": False}}
    section = {"settings": {"fit_tasks": ["obqa", "copa"], "eval_tasks": ["arc"], "fit_limit": 40, "select_by": "ece",
                            "bins": 15, "seed": 0},
               "variants": {"baseline": {"selected": "answer_temperature", "selection": {},
                                         "fit_info": {"answer_temperature": {"temperature": 1096.6, "at_bound": True}},
                                         "fit_accuracy": fit}},
               "results": [row("none", False, False), row("answer_temperature", True, True)]}
    summary, every, chance = answers.tables(section)[:3]
    assert summary["rows"][0][-1] == "collapsed to uniform: confidence carries no information (1 of 1 tasks)"
    assert ("baseline / answer_temperature: temperature at its bound (T=1097, the fit allows e^±7): fit tasks obqa "
            "(0.18 [0.08, 0.30], chance 0.25) are at or below chance within their intervals") in summary["note"]
    assert [r[-1] for r in every["rows"]] == ["no", "yes"] and every["rows"][1][11] == "yes"  # ranks right above wrong
    assert [r[5] for r in chance["rows"]] == ["yes", "no"] and [r[6] for r in chance["rows"]] == ["–", "–"]
    del section["results"][1]["collapsed"]  # results stored before collapse was measured: unknown, not "no"
    assert answers.tables(section)[0]["rows"][0][-1] == "–"


def test_answer_tables_say_which_fit_tasks_were_screened_out_and_when_nothing_was_fitted():
    from calq.report import answers

    fit = {"obqa": {"n": 40, "accuracy": 0.18, "accuracy_ci": [0.08, 0.3], "chance": 0.25, "at_chance": True},
           "copa": {"n": 40, "accuracy": 0.8, "accuracy_ci": [0.7, 0.9], "chance": 0.5, "at_chance": False}}
    info = {"selected": "answer_temperature", "selection": {}, "fit_accuracy": fit, "fitted_on": ["copa"],
            "screened_out": ["obqa"], "fit_info": {"answer_temperature": {"temperature": 1096.6, "at_bound": True}}}
    section = {"settings": {"fit_tasks": ["obqa", "copa"], "eval_tasks": ["arc"], "fit_limit": 40, "select_by": "ece",
                            "bins": 15, "seed": 0}, "variants": {"baseline": info}, "results": []}
    summary, _, chance = answers.tables(section)[:3]
    assert "baseline: fit tasks obqa are at or below chance and were left out of fitting (fitted on copa)" in \
        summary["note"]
    # the bound is no longer blamed on a task the temperature never saw
    assert "no fit task's accuracy interval reaches down to chance" in summary["note"]
    assert [r[6] for r in chance["rows"]] == ["no", "yes"]
    info.update(fitted_on=[], screened_out=["obqa", "copa"], selected="none", fit_info={})
    assert ("baseline: every fit task (obqa, copa) is at or below chance, so no answer calibrator was fitted and the "
            "confidence shown is the uncalibrated one") in answers.tables(section)[0]["note"]
