"""Divergence from the baseline: the evaluate stage's streamed numbers against a direct computation, the baseline's
own (its calibrators against itself), export re-verification, the gates max_kld / min_same_top1 and the report."""

import pytest
import torch
from tiny import make_tiny_llama

from calq import models
from calq.calib.base import identity
from calq.calib.temperature import Temperature
from calq.evaluation import tokens
from calq.export.base import verify
from calq.metrics import DivergenceStats
from calq.report import render, sections
from calq.report.gates import Gates, evaluate_gates

SEQ = 32


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """Two different tiny random models (seeds 0 and 1) and a token stream of four windows."""
    folder = tmp_path_factory.mktemp("divergence")
    baseline = models.load(models.ModelSource(str(make_tiny_llama(folder / "a", seed=0)), kind="folder"))[0]
    variant = models.load(models.ModelSource(str(make_tiny_llama(folder / "b", seed=1)), kind="folder"))[0]
    stream = torch.randint(3, 256, (4 * SEQ + 5,), generator=torch.Generator().manual_seed(0))
    return baseline, variant, stream


def direct(reference: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> dict:
    """All positions in one update (one chunk), the streamed accumulator's reference value."""
    stats = DivergenceStats(chunk_elements=reference.numel())
    stats.update(reference.reshape(-1, reference.shape[-1]), logits.reshape(-1, logits.shape[-1]), targets.flatten())
    return stats.summary()


@torch.no_grad()
def test_evaluate_streams_the_divergence_from_the_baseline_window_by_window(two_models):
    baseline, variant, stream = two_models
    cals = {"none": identity, "temperature": Temperature(2.0)}
    result = tokens.evaluate(variant, stream, SEQ, batch_size=3, calibrators=cals, baseline=baseline)
    windows = stream[: 4 * SEQ].view(4, SEQ)
    ref, var = baseline(input_ids=windows).logits[:, :-1], variant(input_ids=windows).logits[:, :-1]
    for name, calibrate in cals.items():
        expected = direct(ref, calibrate(var, None), windows[:, 1:])
        assert result["divergence"][name] == pytest.approx(expected, rel=1e-4, abs=1e-7), name
    assert result["divergence"]["none"]["tokens"] == 4 * (SEQ - 1)
    # the token-level metrics are those of an evaluation without a baseline
    assert result["calibrators"] == tokens.evaluate(variant, stream, SEQ, 3, calibrators=cals)["calibrators"]


@torch.no_grad()
def test_the_baseline_against_itself_shows_only_its_calibrators(two_models):
    baseline, _, stream = two_models
    result = tokens.evaluate(baseline, stream, SEQ, 4, calibrators={"none": identity, "t2": Temperature(2.0)},
                             baseline=baseline)
    none, t2 = result["divergence"]["none"], result["divergence"]["t2"]
    assert none["max_kld"] < 1e-6 and none["same_top1"] == 1.0 and none["rms_delta_p"] == 0.0
    # a temperature keeps every argmax and changes every distribution that is not uniform
    assert t2["same_top1"] == 1.0 and t2["mean_kld"] > 0 and t2["rms_delta_p"] > 0
    assert "divergence" not in tokens.evaluate(baseline, stream, SEQ, 4)


@torch.no_grad()
def test_export_verification_reports_the_artifact_divergence_from_pytorch(two_models):
    baseline, variant, stream = two_models

    def reference(ids):
        return baseline(input_ids=ids).logits

    def artifact(ids):
        return variant(input_ids=ids).logits

    result = verify(reference, artifact, stream, SEQ, batch_size=2)
    windows = stream[: 4 * SEQ].view(4, SEQ)
    expected = direct(reference(windows)[:, :-1], artifact(windows)[:, :-1], windows[:, 1:])
    assert result["divergence"] == pytest.approx(expected, rel=1e-4, abs=1e-7)
    same = verify(reference, reference, stream, SEQ)["divergence"]
    assert same["same_top1"] == 1.0 and same["max_kld"] < 1e-6


def divergence(mean_kld: float, same_top1: float) -> dict:
    return {"tokens": 100, "mean_kld": mean_kld, "median_kld": mean_kld / 2, "p99_kld": mean_kld * 5,
            "max_kld": mean_kld * 20, "same_top1": same_top1, "mean_delta_p": -0.01, "rms_delta_p": 0.05}


REPORT = {"variants": [
    {"variant": "baseline", "ece": 0.02, "divergence": {"none": divergence(0.0, 1.0), "ats": divergence(0.03, 1.0)}},
    {"variant": "q8", "ece": 0.03, "divergence": {"none": divergence(0.01, 0.95), "ats": divergence(0.04, 0.95)}},
    {"variant": "q4", "ece": 0.05, "divergence": {"none": divergence(0.2, 0.74), "ats": divergence(0.25, 0.74)}}],
    "evaluation": {"tokens": {"tokens": 100, "source": "wiki.test.raw"}}}


def test_divergence_gates_check_every_candidate_variant_and_calibrator():
    results = {(r.gate, r.variant, r.calibrator): r for r in evaluate_gates(Gates(max_kld=0.05, min_same_top1=0.9),
                                                                            REPORT)}
    assert set(results) == {(g, v, c) for g in ("max_kld", "min_same_top1") for v in ("q8", "q4")
                            for c in ("none", "ats")}  # the baseline is not a candidate by default
    assert results["max_kld", "q8", "ats"].passed and results["max_kld", "q8", "ats"].margin == pytest.approx(0.01)
    assert not results["max_kld", "q4", "none"].passed
    low = results["min_same_top1", "q4", "none"]
    assert not low.passed and low.value == 0.74 and low.margin == pytest.approx(-0.16)
    assert results["min_same_top1", "q8", "none"].passed
    only = evaluate_gates(Gates(variant="q8", calibrator="none", max_kld=0.01), REPORT)
    assert [(r.variant, r.calibrator, r.passed) for r in only] == [("q8", "none", True)]  # at the threshold
    nothing = evaluate_gates(Gates(min_same_top1=0.5), {"variants": [{"variant": "q4", "ece": 0.1}]})
    assert len(nothing) == 1 and nothing[0].value is None and not nothing[0].passed  # never a pass by matching nothing


def test_report_shows_the_divergence_per_variant_and_calibrator_and_per_artifact():
    section = sections.divergence(REPORT)
    table = section.blocks[1]
    assert [row[:2] for row in table.rows] == [[v, c] for v in ("baseline", "q8", "q4") for c in ("none", "ats")]
    assert table.rows[-2][2:4] == ["0.2", "0.1"] and table.rows[-2][6] == "74.0%" and table.rows[-2][7] == "5.00%"
    assert sections.divergence({"variants": [{"variant": "baseline"}]}) is None  # runs evaluated before it existed
    md = render.markdown("t", [section])
    assert "## Divergence from the baseline" in md and "| q4 | ats |" in md
    deployed = sections.deployed_divergence([{"variant": "q4", "format": "gguf", "divergence": divergence(0.01, 0.99)},
                                             {"variant": "q8", "format": "onnx"}])
    assert [row[:3] for row in deployed.rows] == [["q4", "gguf", "0.01"]]


def test_calq_evaluate_adds_the_divergence_from_a_baseline(two_models):
    import calq

    baseline, variant, stream = two_models
    metrics = calq.evaluate(variant, None, stream, SEQ, batch_size=4, baseline=baseline)
    expected = tokens.evaluate(variant, stream, SEQ, 4, baseline=baseline)["divergence"]["none"]
    assert metrics["none"]["divergence"] == expected
    assert "divergence" not in calq.evaluate(variant, None, stream, SEQ)["none"]
