import math

import pytest
import torch

from calq.metrics import CalibrationStats, DivergenceStats, adaptive_ece, brier_top_label, ece


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


def _direct_divergence(ref: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> dict:
    """KL(reference || model) and the rest computed on all positions at once, percentiles by torch.quantile."""
    ref_logp, logp = torch.log_softmax(ref.double(), -1), torch.log_softmax(logits.double(), -1)
    kld = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    dp = logp.gather(-1, targets[:, None]).exp() - ref_logp.gather(-1, targets[:, None]).exp()
    return {"tokens": kld.numel(), "mean_kld": float(kld.mean()), "median_kld": float(kld.quantile(0.5)),
            "p99_kld": float(kld.quantile(0.99)), "max_kld": float(kld.max()),
            "same_top1": float((ref.argmax(-1) == logits.argmax(-1)).double().mean()),
            "mean_delta_p": float(dp.mean()), "rms_delta_p": float(dp.pow(2).mean().sqrt())}


def test_streamed_divergence_matches_direct_computation():
    g = torch.Generator().manual_seed(0)
    batches, seq, vocab = 3, 41, 500
    ref = torch.randn(batches, 2, seq + 1, vocab, generator=g) * 3
    # a mix of small and large perturbations, so the KLDs span several decades
    noise = torch.randn(batches, 2, seq + 1, vocab, generator=g) * torch.rand(batches, 2, seq + 1, 1, generator=g) ** 3
    logits = ref + noise
    targets = torch.randint(0, vocab, (batches, 2, seq), generator=g)
    stats = DivergenceStats(chunk_elements=7 * vocab)  # chunks that do not divide a window
    for b in range(batches):  # each batch as a model returns it: [B, T, V] sliced to the scored positions
        stats.update(ref[b][:, :-1], logits[b][:, :-1], targets[b])
    streamed = stats.summary()
    direct = _direct_divergence(ref[:, :, :-1].reshape(-1, vocab), logits[:, :, :-1].reshape(-1, vocab),
                                targets.flatten())
    assert streamed["tokens"] == direct["tokens"] == batches * 2 * seq
    for key in ("mean_kld", "max_kld", "same_top1", "mean_delta_p", "rms_delta_p"):
        assert streamed[key] == pytest.approx(direct[key], rel=1e-4, abs=1e-7), key
    for key in ("median_kld", "p99_kld"):  # from the histogram: within a cell's width
        assert streamed[key] == pytest.approx(direct[key], rel=5e-3), key
    assert 0 < direct["same_top1"] < 1 and direct["median_kld"] < direct["p99_kld"] < direct["max_kld"]


def test_divergence_of_a_model_from_itself_and_skipped_positions():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 10, 64, generator=g)
    targets = torch.randint(0, 64, (2, 10), generator=g)
    targets[0, :4] = -100
    stats = DivergenceStats()
    stats.update(logits, logits.clone(), targets)
    s = stats.summary()
    assert s["tokens"] == 16
    assert s["median_kld"] == s["p99_kld"] == 0.0 and abs(s["mean_kld"]) < 1e-6 and s["max_kld"] < 1e-6
    assert s["same_top1"] == 1.0 and s["rms_delta_p"] == 0.0
    with pytest.raises(ValueError, match="no positions"):
        DivergenceStats().summary()


def test_divergence_of_a_large_vocabulary_in_chunks():
    """A 262k vocabulary: one chunk of probabilities at a time, the same numbers as with one chunk for all."""
    g = torch.Generator().manual_seed(2)
    vocab = 262_144
    ref = torch.randn(1, 6, vocab, generator=g)
    logits = ref + 0.3 * torch.randn(1, 6, vocab, generator=g)
    targets = torch.randint(0, vocab, (1, 6), generator=g)
    chunked, whole = DivergenceStats(chunk_elements=vocab), DivergenceStats(chunk_elements=6 * vocab)
    chunked.update(ref, logits, targets)
    whole.update(ref, logits, targets)
    assert chunked.summary() == pytest.approx(whole.summary(), rel=1e-9)
    assert chunked.summary()["mean_kld"] == pytest.approx(_direct_divergence(ref[0], logits[0], targets[0])["mean_kld"],
                                                         rel=1e-4)


def test_tempered_kld_is_the_divergence_left_at_the_best_temperature():
    from calq.metrics import tempered_kld

    torch.manual_seed(0)
    reference = torch.randn(2, 40, 300) * 3
    t, left = tempered_kld([(reference, reference * 0.5)])  # a colder copy: T = 0.5 repairs it entirely
    assert t == pytest.approx(0.5, rel=1e-4) and left < 1e-6
    noisy = reference * 1.7 + torch.randn_like(reference)
    t, left = tempered_kld([(reference[:1], noisy[:1]), (reference[1:], noisy[1:])])

    def kld_at(temperature):
        stats = DivergenceStats()
        stats.update(reference, noisy / temperature, torch.zeros(2, 40, dtype=torch.long))
        return stats.summary()["mean_kld"]

    grid = [0.5 + i * 0.005 for i in range(501)]  # T in [0.5, 3]
    best = min(grid, key=kld_at)
    assert t == pytest.approx(best, abs=0.006) and left == pytest.approx(kld_at(t), rel=1e-4)
    assert left <= kld_at(best) + 1e-6 and left < kld_at(1.0)
