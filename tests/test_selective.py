"""Answer-level metrics and selective prediction on synthetic (confidence, correct) pairs."""

import pytest
import torch

from calq.calib.answer_features import AnswerSet
from calq.evaluation import selective


def calibrated(n: int, seed: int, lo: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
    """Confidence uniform on [lo, 1], correct drawn with exactly that probability: perfectly calibrated."""
    g = torch.Generator().manual_seed(seed)
    conf = lo + (1 - lo) * torch.rand(n, generator=g, dtype=torch.float64)
    return conf, (torch.rand(n, generator=g, dtype=torch.float64) < conf).double()


def test_ece_variants_separate_calibrated_from_overconfident():
    conf, correct = calibrated(2000, seed=0)
    over = (conf + 0.15).clamp(max=1.0)
    for metric in (selective.ece_mass, selective.smooth_ece):
        assert metric(conf, correct) < 0.03
        assert metric(over, correct) > 0.10
    # ten equal-mass bins, by hand: sorted predictions in ten groups of 200
    order = conf.argsort()
    gaps = [abs(float(conf[order][i:i + 200].sum() - correct[order][i:i + 200].sum())) for i in range(0, 2000, 200)]
    assert selective.ece_mass(conf, correct) == pytest.approx(sum(gaps) / 2000)


def test_auroc_and_aurc_rank_right_above_wrong():
    correct = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    perfect = correct * 0.5 + 0.4  # right answers always more confident
    assert selective.auroc(perfect, correct) == 1.0
    assert selective.auroc(1 - perfect, correct) == 0.0
    assert selective.auroc(perfect, torch.ones(6)) is None  # undefined without a wrong answer
    coverage, risk = selective.risk_coverage(perfect, correct)
    assert coverage[-1] == 1.0 and risk[:3].tolist() == [0.0, 0.0, 0.0] and risk[-1] == 0.5
    assert selective.aurc(perfect, correct) < selective.aurc(1 - perfect, correct)


def two_choices(conf, correct):
    """Probabilities [conf, 1 - conf] (conf >= 0.5, so choice 0 is the top one) and gold 0 exactly when correct."""
    return torch.stack([conf, 1 - conf], dim=1), [[0] if k else [1] for k in correct.tolist()]


def test_summary_has_every_metric_with_intervals_around_it():
    conf, correct = calibrated(400, seed=1, lo=0.5)
    probs, gold = two_choices(conf, correct)
    row = selective.summary(probs, AnswerSet(probs.log().tolist(), gold), n_boot=100, seed=0)
    assert row["confidence"] == pytest.approx(float(conf.mean()))
    assert row["accuracy"] == pytest.approx(float(correct.mean()))
    for key in ("accuracy", "ece", "brier", "ece_mass", "smece", "auroc", "aurc"):
        lo, hi = row[f"{key}_ci"]
        assert lo <= row[key] <= hi, key
    assert row["auroc"] > 0.6  # calibrated confidences that vary do separate right from wrong
    assert not row["collapsed"] and row["confidence_std"] > 0.1


def test_tied_confidences_are_ranked_by_the_raw_margin_and_a_uniform_calibrator_is_collapsed():
    # four questions, four choices; the raw margin (top-1 - top-2) is 3, 2, 1, 0.5 and the first and third are right
    scores = [[3.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0]]
    answers = AnswerSet(scores, [[0], [1], [0], [1]])
    margin = torch.tensor([3.0, 2.0, 1.0, 0.5])
    correct = torch.tensor([1.0, 0.0, 1.0, 0.0])
    flat = torch.full((4, 4), 0.25)
    flat[:, 0] += 1e-12  # a uniform calibrator: the top choice stays choice 0, every confidence the same to 1e-12
    row = selective.summary(flat, answers, n_boot=50)
    assert row["auroc"] == selective.auroc(margin, correct) == 0.75
    assert row["aurc"] == selective.aurc(margin, correct)
    assert row["collapsed"] and row["uniform_share"] == 1.0 and row["confidence_std"] < 1e-9
    # confidences that differ are ranked by themselves, not by the margin
    assert selective.auroc(selective.ranking(torch.tensor([0.4, 0.9, 0.3, 0.8]), margin), correct) == 0.0
    assert not selective.summary(answers.probabilities(), answers, n_boot=50)["collapsed"]


def test_fit_task_accuracy_against_chance():
    at_chance = AnswerSet([[1.0, 0.0, 0.0, 0.0]] * 40, [[0]] * 10 + [[1]] * 30)  # 0.25 right, chance 0.25
    above = AnswerSet([[1.0, 0.0]] * 40, [[0]] * 36 + [[1]] * 4)  # 0.9 right, chance 0.5
    low = selective.against_chance(at_chance, n_boot=200)
    assert low["accuracy"] == 0.25 and low["chance"] == 0.25 and low["at_chance"]
    high = selective.against_chance(above, n_boot=200)
    assert high["chance"] == 0.5 and high["accuracy_ci"][0] > 0.5 and not high["at_chance"]


def test_threshold_fitted_for_a_target_accuracy_reaches_it_on_held_out_data():
    fit_conf, fit_correct = calibrated(5000, seed=2)
    threshold = selective.fit_threshold(fit_conf, fit_correct, 0.8)
    # calibrated scores: answering conf >= c gives accuracy about (c + 1) / 2, so c is about 0.6
    assert threshold == pytest.approx(0.6, abs=0.05)
    held_conf, held_correct = calibrated(5000, seed=3)
    result = selective.apply_threshold(held_conf, held_correct, threshold, n_boot=500, seed=0)
    lo, hi = result["accuracy_ci"]
    assert lo <= 0.8 <= hi and hi - lo < 0.05
    assert result["coverage"] == pytest.approx(float((held_conf >= threshold).double().mean()))
    assert result["coverage_ci"][0] < result["coverage"] < result["coverage_ci"][1]
    assert selective.fit_threshold(fit_conf, fit_correct, 1.01) is None
    assert selective.apply_threshold(held_conf, held_correct, None)["coverage"] == 0.0


def test_selective_report_and_bands():
    fit_conf, fit_correct = calibrated(2000, seed=4, lo=0.5)
    held_conf, held_correct = calibrated(1000, seed=5, lo=0.5)
    fit_probs, fit_gold = two_choices(fit_conf, fit_correct)
    report = selective.selective_report([fit_probs], [fit_gold], {"held": two_choices(held_conf, held_correct)},
                                        [0.8, 0.9], n_boot=200)
    assert report["0.8"]["threshold"] < report["0.9"]["threshold"]
    assert report["0.8"]["tasks"]["held"]["coverage"] > report["0.9"]["tasks"]["held"]["coverage"]
    rows = selective.bands(*calibrated(1000, seed=6))
    assert [r["band"] for r in rows] == ["low", "medium", "high"] and sum(r["count"] for r in rows) == 1000
    assert rows[0]["accuracy"] < rows[1]["accuracy"] < rows[2]["accuracy"]
