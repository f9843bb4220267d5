import math

import pytest
import torch

from calq.metrics import CalibrationStats, adaptive_ece, brier_top_label, ece


def test_ece_by_hand():
    # 3 bins: [0,1/3) [1/3,2/3) [2/3,1]
    conf = torch.tensor([0.1, 0.2, 0.5, 0.9, 0.95, 1.0])
    correct = torch.tensor([0, 1, 1, 1, 0, 1])
    # bin0: conf 0.15 mean, acc 0.5 -> |0.3|*2 ; bin1: |0.5-1|*1 ; bin2: mean conf 0.95, acc 2/3 -> |0.95-0.6667|*3
    expected = (abs(0.3 - 1.0) + abs(0.5 - 1.0) + abs(2.85 - 2.0)) / 6
    assert ece(conf, correct, bins=3) == pytest.approx(expected)


def test_adaptive_ece_by_hand():
    conf = torch.tensor([0.9, 0.1, 0.2, 0.8])
    correct = torch.tensor([1, 0, 1, 0])
    # sorted: 0.1(0) 0.2(1) | 0.8(0) 0.9(1): |0.3-1| + |1.7-1| over 4
    assert adaptive_ece(conf, correct, bins=2) == pytest.approx((0.7 + 0.7) / 4)


def test_brier_by_hand():
    conf = torch.tensor([0.8, 0.6, 1.0])
    correct = torch.tensor([1, 0, 1])
    assert brier_top_label(conf, correct) == pytest.approx((0.04 + 0.36 + 0.0) / 3)


def test_perfectly_calibrated_and_confidently_wrong():
    conf = torch.full((1000,), 0.99)
    assert ece(conf, torch.zeros(1000), bins=15) == pytest.approx(0.99)
    assert brier_top_label(conf, torch.zeros(1000)) == pytest.approx(0.99**2)
    assert ece(torch.ones(10), torch.ones(10)) == 0.0


def test_streaming_matches_direct_computation():
    g = torch.Generator().manual_seed(0)
    conf = torch.rand(5000, generator=g)
    correct = (torch.rand(5000, generator=g) < conf**2).long()
    stats = CalibrationStats(bins=15)
    for c, k in zip(conf.split(700), correct.split(700)):
        stats.update(c, k)
    s = stats.summary()
    assert s["ece"] == pytest.approx(ece(conf, correct, 15), abs=1e-9)
    assert s["brier"] == pytest.approx(brier_top_label(conf, correct), abs=1e-9)
    assert s["accuracy"] == pytest.approx(correct.float().mean().item())
    # adaptive bins are placed on a grid of 1/15000: close to the exact equal-mass computation
    assert s["adaptive_ece"] == pytest.approx(adaptive_ece(conf, correct, 15), abs=2e-3)
    assert sum(b["count"] for b in stats.reliability()) == 5000


def test_from_logits_nll_and_ignore_index():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0]]])
    targets = torch.tensor([[0, 2, -100]])
    stats = CalibrationStats(bins=10)
    stats.update_from_logits(logits, targets)
    s = stats.summary()
    logp = torch.log_softmax(logits[0, :2], -1)
    assert s["tokens"] == 2
    assert s["nll"] == pytest.approx(-(logp[0, 0] + logp[1, 2]).item() / 2)
    assert s["ppl"] == pytest.approx(math.exp(s["nll"]))
    assert s["accuracy"] == 0.5
    assert s["confidence"] == pytest.approx(logp.max(-1).values.exp().mean().item())
