"""Answer-level calibrators on synthetic multiple-choice scores whose true answer distribution is known."""

import math

import pytest
import torch

from calq.calib import answer_adaptive, answer_temperature, parent
from calq.calib.answer_features import AnswerSet, nll, top_choice
from calq.errors import CalqError
from calq.metrics import ece


def synthetic(n: int, seed: int, overconfidence, choices: int = 4, hidden: int = 8) -> tuple[AnswerSet, torch.Tensor]:
    """Gold drawn from softmax(z); the model reports z * overconfidence (a number or one per question).
    The hidden state carries the per-question overconfidence in its first coordinate, the rest is noise."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, choices, generator=g, dtype=torch.float64) * 1.5
    gold = torch.multinomial(torch.softmax(z, 1), 1, generator=g)[:, 0]
    factor = torch.as_tensor(overconfidence, dtype=torch.float64).expand(n)
    h = torch.randn(n, hidden, generator=g)
    h[:, 0] = factor.float()
    lengths = [[3, 4, 5, 6][:choices]] * n
    return AnswerSet((z * factor[:, None]).tolist(), [[int(k)] for k in gold], h.half(), lengths), torch.softmax(z, 1)


def ece_of(probs, answers):
    return ece(*top_choice(probs, answers.gold))


def test_answer_temperature_fitted_on_overconfident_scores_lowers_ece_on_held_out_data(tmp_path):
    fit_set, _ = synthetic(3000, seed=0, overconfidence=3.0)
    held, _ = synthetic(3000, seed=1, overconfidence=3.0)
    calibrator = answer_temperature.fit([fit_set])
    assert calibrator.temperature == pytest.approx(3.0, rel=0.1)
    before, after = ece_of(held.probabilities(), held), ece_of(calibrator.apply(held), held)
    assert after < before / 3 and after < 0.03
    # accuracy never changes: the top choice is the same
    assert torch.equal(calibrator.apply(held).argmax(1), held.probabilities().argmax(1))
    calibrator.save(tmp_path / "t")
    assert answer_temperature.AnswerTemperature.load(tmp_path / "t").temperature == calibrator.temperature
    assert not calibrator.fit_info["at_bound"]


def test_a_temperature_fitted_on_a_task_below_chance_stops_at_its_bound_and_says_so(tmp_path):
    below = AnswerSet([[2.0, 1.0, 0.0, 0.0]] * 40, [[3]] * 40)  # the top choice is never right
    calibrator = answer_temperature.fit([below])
    assert calibrator.temperature == pytest.approx(math.exp(answer_temperature.LOG_BOUND))
    assert calibrator.fit_info["at_bound"]
    calibrator.save(tmp_path / "t")
    assert answer_temperature.AnswerTemperature.load(tmp_path / "t").fit_info["at_bound"]


def test_several_gold_answers_count_the_mass_on_all_of_them():
    answers = AnswerSet([[0.0, 0.0, -100.0]], [[0, 1]])
    probs = answers.probabilities()
    assert float(nll(probs, answers.gold_mask())) == pytest.approx(0.0, abs=1e-9)
    assert top_choice(probs, answers.gold)[1].tolist() == [1.0]
    ragged = AnswerSet([[0.0, 1.0], [0.0, 1.0, 2.0, 3.0]], [[1], [0]])
    assert ragged.probabilities()[0, 2:].tolist() == [0.0, 0.0]  # padding gets no probability
    assert answer_temperature.fit([ragged]).temperature > 0


def tasks_with_varying_overconfidence():
    """Four fit tasks, each with questions whose overconfidence (1 to 4) is visible in the features."""
    g = torch.Generator().manual_seed(5)
    return {f"task{i}": synthetic(600, seed=10 + i, overconfidence=1 + 3 * torch.rand(600, generator=g,
                                                                                         dtype=torch.float64))[0]
            for i in range(4)}


def test_adaptive_head_learns_a_per_question_temperature_and_beats_one_temperature(tmp_path):
    tasks = tasks_with_varying_overconfidence()
    g = torch.Generator().manual_seed(99)
    held, _ = synthetic(3000, seed=50, overconfidence=1 + 3 * torch.rand(3000, generator=g, dtype=torch.float64))
    adaptive = answer_adaptive.fit(tasks, seed=0)
    single = answer_temperature.fit(list(tasks.values()))
    info = adaptive.info
    assert info["kept"] and info["validation_task"] == "task3"
    assert info["validation_nll_head"] < info["validation_nll_temperature"]
    mask = held.gold_mask()
    assert float(nll(adaptive.apply(held), mask)) < float(nll(single.apply(held), mask)) - 0.02
    assert ece_of(adaptive.apply(held), held) < ece_of(single.apply(held), held)
    assert torch.equal(adaptive.apply(held).argmax(1), held.probabilities().argmax(1))
    # predicted inverse temperatures follow the true 1 / overconfidence
    beta = adaptive.inverse_temperatures(held)
    assert torch.corrcoef(torch.stack([beta, 1 / held.hidden[:, 0].double()]))[0, 1] > 0.8
    adaptive.save(tmp_path / "a")
    loaded = answer_adaptive.AnswerAdaptive.load(tmp_path / "a")
    assert torch.allclose(loaded.apply(held), adaptive.apply(held))
    assert torch.allclose(loaded.apply(held, per_task_mean=True), adaptive.apply(held, per_task_mean=True))


def test_adaptive_keeps_the_share_of_its_head_that_leave_one_task_out_chooses():
    # the same overconfidence everywhere: features carry nothing a single temperature does not already capture
    tasks = {f"t{i}": synthetic(300, seed=20 + i, overconfidence=2.5)[0] for i in range(3)}
    adaptive = answer_adaptive.fit(tasks, seed=0, epochs=30)
    info, held = adaptive.info, synthetic(500, seed=40, overconfidence=2.5)[0]
    scores = info["shrinkage_mean_ece"]
    assert info["shrinkage"] == min(answer_adaptive.SHRINKAGE, key=lambda s: scores[str(s)])
    assert info["kept"] == (info["shrinkage"] > 0) == (adaptive.head is not None)
    single = answer_temperature.fit(list(tasks.values()))
    assert torch.allclose(adaptive.apply(held, shrinkage=0), single.apply(held))
    if not info["kept"]:
        assert torch.allclose(adaptive.apply(held), single.apply(held))
    # two fit tasks leave none to choose a shrinkage on: one temperature, said so
    two = answer_adaptive.fit({k: tasks[k] for k in ("t0", "t1")}, seed=0, epochs=30)
    assert two.head is None and not two.info["kept"] and "too few" in two.info["shrinkage_reason"]
    assert torch.allclose(two.apply(held), answer_temperature.fit([tasks["t0"], tasks["t1"]]).apply(held))
    with pytest.raises(CalqError, match="at least two fit tasks"):
        answer_adaptive.fit({"only": tasks["t0"]})


def test_task_folds_hold_out_one_task_or_one_group_of_many():
    from calq.calib.answer_base import task_folds

    assert task_folds(["a", "b", "c"]) == [["a"], ["b"], ["c"]]
    folds = task_folds([f"t{i}" for i in range(12)], most=5)
    assert len(folds) == 5 and sorted(sum(folds, [])) == sorted(f"t{i}" for i in range(12))


def test_selection_takes_a_flexible_calibrator_only_when_it_is_no_worse_than_none_and_one_t_on_every_held_out_task():
    from calq.evaluation.answer_calibration import select

    def scored(**per_task):
        return {name: {"per_task": dict(enumerate(values)), "mean": sum(values) / len(values)}
                for name, values in per_task.items()}

    candidates = ["none", "answer_temperature", "answer_adaptive"]
    # a lower mean from one lucky task, worse on the others: one temperature stays
    noisy = scored(none=[0.5, 0.5, 0.5, 0.5], answer_temperature=[0.1, 0.1, 0.1, 0.3],
                   answer_adaptive=[0.12, 0.12, 0.12, 0.1])
    assert noisy["answer_adaptive"]["mean"] < noisy["answer_temperature"]["mean"]
    assert select(noisy, candidates) == "answer_temperature"
    # better on every held-out task: taken
    clear = scored(none=[0.5, 0.5, 0.5, 0.5], answer_temperature=[0.1, 0.1, 0.1, 0.3],
                   answer_adaptive=[0.05, 0.06, 0.04, 0.2])
    assert select(clear, candidates) == "answer_adaptive"
    # a clearly lower mean, but worse than one T on one held-out task: one temperature stays
    one_loss = scored(none=[0.5, 0.5, 0.5, 0.5], answer_temperature=[0.1, 0.1, 0.1, 0.1],
                      answer_adaptive=[0.02, 0.02, 0.02, 0.11])
    assert select(one_loss, candidates) == "answer_temperature"
    # the references compete on their mean alone
    assert select(scored(none=[0.2, 0.1], answer_temperature=[0.3, 0.05]), ["none", "answer_temperature"]) == "none"


def test_parent_calibrates_a_variant_without_labels():
    # the baseline is calibrated (T = 2 fixes its 2x overconfidence); the variant is 3x overconfident and noisier
    baseline, _ = synthetic(3000, seed=3, overconfidence=2.0)
    base_probs = answer_temperature.AnswerTemperature(2.0).apply(baseline)
    g = torch.Generator().manual_seed(4)
    noisy = baseline.scores() * 1.5 + 0.2 * torch.randn(baseline.scores().shape, generator=g, dtype=torch.float64)
    variant = AnswerSet(noisy.tolist())  # no gold answers at all
    fitted = parent.fit(variant, base_probs)
    assert fitted.kind == "parent" and fitted.temperature == pytest.approx(3.0, rel=0.15)
    assert 0.5 < fitted.info["agreeing"] / fitted.info["prompts"] <= 1
    labelled = AnswerSet(noisy.tolist(), baseline.gold)
    assert ece_of(fitted.apply(labelled), labelled) < ece_of(labelled.probabilities(), labelled) / 3
    with pytest.raises(CalqError, match="agree on only"):
        parent.fit(AnswerSet((-noisy[:30]).tolist()), base_probs[:30])


def test_answer_calibrators_have_a_registry_of_their_own(tmp_path):
    from calq.calib import calibrators, registry
    from calq.calib.answer_base import AnswerFitData

    assert {"answer_temperature", "answer_adaptive", "parent"} <= set(registry.names("answer"))
    assert not {"answer_temperature", "answer_adaptive", "parent"} & set(registry.names("token"))
    tasks = tasks_with_varying_overconfidence()
    data = AnswerFitData(tasks, seed=0)
    held, _ = synthetic(500, seed=60, overconfidence=2.0)
    for name in ("answer_temperature", "answer_adaptive"):
        cls = calibrators.ANSWER.get(name)
        fitted = cls.fit(data, cls.Config(**({"epochs": 20} if name == "answer_adaptive" else {})))
        fitted.save(tmp_path / name)
        loaded = cls.load(tmp_path / name, None)
        assert torch.allclose(loaded.apply(held), fitted.apply(held)) and fitted.fit_info
        with pytest.raises(CalqError, match=f"unknown calibrator '{name}'"):  # not one that rescales logits
            calibrators.parse(f"{name}:{tmp_path / name}", None)
    base = calibrators.ANSWER.get("answer_temperature").fit(data)
    unlabelled = {k: AnswerSet(s.loglikelihoods) for k, s in tasks.items()}
    parent_data = AnswerFitData(unlabelled, parent_probabilities={k: base.apply(s) for k, s in tasks.items()})
    fitted = calibrators.ANSWER.get("parent").fit(parent_data)
    assert fitted.temperature == pytest.approx(base.temperature, rel=1e-3)  # the same scores: the parent's own T
    fitted.save(tmp_path / "parent")
    assert calibrators.ANSWER.get("parent").load(tmp_path / "parent").info["agreeing"] == 2400


def test_answer_section_fits_on_fit_tasks_and_reports_unseen_tasks():
    from calq.evaluation import answer_calibration as ac

    sets = tasks_with_varying_overconfidence()
    sets["unseen"], _ = synthetic(800, seed=70, overconfidence=2.5)
    fit_tasks, eval_tasks = ["task0", "task1", "task2", "task3"], ["unseen"]
    ac.check_split(fit_tasks, eval_tasks, {t: len(sets[t]) for t in sets}, ["answer_temperature", "answer_adaptive"])
    fitted, seconds = ac.fit_answer_calibrators({t: sets[t] for t in fit_tasks},
                                                {"answer_temperature": None, "answer_adaptive": None})
    assert set(seconds) == {"answer_temperature", "answer_adaptive"}
    section = ac.answer_section(fitted, sets, fit_tasks, eval_tasks, targets=[0.7], n_boot=50)
    rows = {r["calibrator"]: r for r in section["rows"]}
    assert list(rows) == ["none", "answer_temperature", "answer_adaptive"]
    assert rows["answer_temperature"]["ece"] < rows["none"]["ece"]
    assert rows["answer_adaptive"]["ece"] < rows["none"]["ece"]
    assert rows["none"]["accuracy"] == rows["answer_temperature"]["accuracy"] == rows["answer_adaptive"]["accuracy"]
    assert section["selective"]["answer_temperature"]["0.7"]["tasks"]["unseen"]["coverage"] > 0
    for fit, evaluation, counts, names, message in [
            (["a", "b"], ["b"], None, [], "overlap: b"),
            (["a"], ["b"], {"a": 5}, [], "fit task 'a' has 5 questions"),
            (["a"], ["b"], None, ["answer_adaptive"], "answer_adaptive needs 2 or more fit tasks"),
            (["a"], ["b"], None, ["ats"], "unknown answer calibrator 'ats'")]:
        with pytest.raises(CalqError, match=message):
            ac.check_split(fit, evaluation, counts, names)


def test_fit_tasks_at_or_below_chance_are_left_out_of_fitting_and_all_at_chance_fits_nothing():
    from calq.evaluation import answer_calibration as ac

    sets = {name: s for name, s in tasks_with_varying_overconfidence().items() if name in ("task0", "task1")}
    below = AnswerSet([[2.0, 1.0, 0.0, 0.0]] * 40, [[3]] * 40)  # the top choice is never right
    unseen, _ = synthetic(300, seed=71, overconfidence=2.5)
    fitted, section = ac.calibrate_answers({**sets, "below": below}, {"unseen": unseen}, {"answer_temperature": None},
                                           n_boot=50)
    assert section["screened_out"] == ["below"] and section["fitted_on"] == ["task0", "task1"]
    assert section["fit_accuracy"]["below"]["at_chance"] and "below" not in section["selection"]["none"]["per_task"]
    alone = answer_temperature.fit(list(sets.values()))
    assert fitted["answer_temperature"].temperature == alone.temperature and not alone.fit_info["at_bound"]

    fitted, section = ac.calibrate_answers({"below": below, "also_below": below}, {"unseen": unseen},
                                           {"answer_temperature": None, "answer_adaptive": None}, n_boot=50)
    assert fitted == {} and section["selected"] == "none" and section["fitted_on"] == []
    assert section["not_fitted"] == dict.fromkeys(["answer_temperature", "answer_adaptive"],
                                                  "every fit task is at or below chance for this variant")
    assert [r["calibrator"] for r in section["rows"]] == ["none"]
