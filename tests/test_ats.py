import math

import pytest
import torch

from calq.calib import ats, calibrators, hidden
from calq.calib.base import CalibratedLM, FitData, split
from calq.calib.select import select
from calq.calib.temperature import Temperature, fit_temperature
from calq.errors import CalqError


@pytest.fixture(scope="module")
def tiny(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(tiny_model))


def records(n: int, seed: int = 0) -> list[dict]:
    rng = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        a, b = torch.randint(0, 100, (2,), generator=rng).tolist()
        out.append({"instruction": "Add the two numbers.", "input": f"{a} and {b}" if i % 2 else "",
                    "output": f"The sum of {a} and {b} is {a + b}."})
    return out


@pytest.fixture(scope="module")
def cached(tiny, tmp_path_factory):
    model, tok = tiny
    path = tmp_path_factory.mktemp("ats") / "fit.safetensors"
    hidden.cache_hidden(model, tok, records(12), path, max_len=128, batch_size=5)
    return hidden.load_cached(path)


def random_head(config, seed: int = 0) -> ats.AtsHead:
    torch.manual_seed(seed)
    head = ats.AtsHead(config).eval()
    torch.nn.init.normal_(head.out.weight, std=0.5)
    return head


def hidden_and_logits(model, batch: int = 3, length: int = 10, seed: int = 1):
    ids = torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    return ids, out.hidden_states[-1], out.logits


def test_identity_head_reproduces_logits_exactly(tiny):
    model, _ = tiny
    _, h, logits = hidden_and_logits(model)
    with torch.no_grad():
        calibrated = ats.AtsHead(model.config)(logits, h)
    assert torch.equal(calibrated, logits)


def test_calibration_never_changes_the_argmax(tiny):
    model, _ = tiny
    _, h, logits = hidden_and_logits(model)
    head = random_head(model.config)
    with torch.no_grad():
        scale = head.scale(h)
        calibrated = head(logits, h)
    assert not torch.allclose(scale, torch.ones_like(scale))  # the test means something only if scales differ
    assert (scale > 0).all() and (scale <= ats.MAX_SCALE).all()
    assert torch.equal(calibrated.argmax(-1), logits.argmax(-1))
    assert torch.equal(Temperature(1.7)(logits).argmax(-1), logits.argmax(-1))


def test_head_is_causal_and_padding_does_not_change_real_positions(tiny):
    model, _ = tiny
    _, h, _ = hidden_and_logits(model, batch=1, length=8)
    head = random_head(model.config)
    with torch.no_grad():
        full = head.log_scale(h)
        prefix = head.log_scale(h[:, :5])
        left = head.log_scale(torch.cat([torch.randn(1, 3, h.shape[-1]), h], 1), torch.tensor([[0] * 3 + [1] * 8]))
    torch.testing.assert_close(full[:, :5], prefix)
    torch.testing.assert_close(left[:, 3:], full, rtol=1e-4, atol=1e-5)  # RoPE is relative: shifted positions agree


def test_loss_matches_a_hand_computation():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0],   # argmax 0, target 0: right
                           [0.5, 1.5, 0.0, 0.0],    # argmax 1, target 2: wrong
                           [0.0, 0.0, 3.0, 1.0]])   # argmax 2, target 2: right
    scale = torch.tensor([0.5, 2.0, 1.5])
    targets = torch.tensor([0, 2, 2])

    def log_p(row, s):
        u = [s * v for v in logits[row].tolist()]
        lse = math.log(sum(math.exp(x) for x in u))
        return [x - lse for x in u]

    nll0, nll2 = -log_p(0, 0.5)[0], -log_p(2, 1.5)[2]
    uniform1 = -sum(log_p(1, 2.0)) / 4
    top2_1 = -(log_p(1, 2.0)[1] + log_p(1, 2.0)[0]) / 2  # the model's two largest logits in row 1: tokens 1 and 0

    cfg = ats.AtsConfig(alpha=0.3, smoothing="uniform", reweight=False)
    expected = (0.7 * nll0 + 0.3 * uniform1 + 0.7 * nll2) / 3
    assert ats.selective_smoothing_loss(logits, scale, targets, cfg).item() == pytest.approx(expected, rel=1e-6)

    cfg = ats.AtsConfig(alpha=0.3, smoothing="top_k", top_k=2, reweight=True)
    expected = 0.7 * (nll0 + nll2) / 2 + 0.3 * top2_1 / 1
    assert ats.selective_smoothing_loss(logits, scale, targets, cfg).item() == pytest.approx(expected, rel=1e-6)


def test_temperature_fit_recovers_a_known_temperature():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(20000, 20, generator=gen) * 3
    targets = torch.multinomial(torch.softmax(logits / 2.0, -1), 1, generator=gen)[:, 0]
    chunks = [(logits[i:i + 5000], targets[i:i + 5000]) for i in range(0, 20000, 5000)]
    assert fit_temperature(chunks) == pytest.approx(2.0, rel=0.03)


class CountedPasses(list):
    passes = 0

    def __iter__(self):
        self.passes += 1
        return super().__iter__()


def test_temperature_fit_is_the_nll_minimum_in_a_few_passes():
    """Newton's method on 1/T stops where the NLL's derivative vanishes (checked against a finite difference), in a
    handful of passes; with logits that carry no signal the NLL falls all the way to T -> infinity, and the fit stops
    at its bound (T = e^5) instead of halving 1/T towards zero."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4000, 50, generator=gen) * 4
    targets = torch.multinomial(torch.softmax(logits / 0.7, -1), 1, generator=gen)[:, 0]
    targets[:7] = -100
    chunks = CountedPasses([(logits[i:i + 1000], targets[i:i + 1000]) for i in range(0, 4000, 1000)])
    t = fit_temperature(chunks)

    def nll(temperature):
        return torch.nn.functional.cross_entropy(logits.double() / temperature, targets, ignore_index=-100).item()

    slope = (nll(t * 1.001) - nll(t / 1.001)) / (nll(1.001) - nll(1 / 1.001))
    assert abs(slope) < 1e-3 and chunks.passes <= 6

    noise = CountedPasses([(logits, torch.randint(0, 50, (4000,), generator=gen))])
    assert fit_temperature(noise) == pytest.approx(math.exp(5)) and noise.passes <= 12


def test_cache_scores_only_response_tokens(tiny, cached):
    _, tok = tiny
    rec = records(1)[0]
    ids, targets = hidden.encode(rec, tok, 128)
    scored = "".join(tok.convert_ids_to_tokens(ids[1:][targets[:-1] != -100].tolist()))
    assert scored == rec["output"]  # no chat template here and no end-of-turn token: exactly the answer
    assert len(cached) == 12 and cached.hidden.dtype == torch.float16
    assert cached.response_tokens() == sum(len(r["output"]) for r in records(12))


def test_fit_trains_only_the_head_and_never_returns_worse_than_identity(tiny, cached):
    model, _ = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = ats.AtsConfig(min_response_tokens=50, epochs=2, lr=1e-2, batch_size=4)

    logits = hidden.Logits(model)
    head = ats.AtsHead(model.config)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2)
    ats._step(head, opt, cached, torch.arange(4), logits, cfg, 64)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in head.parameters())
    assert head.out.weight.abs().sum() > 0

    train, val = split(len(cached), 0.25, 0)
    data = FitData(cached, train, val, logits, model.config, chunk=64)
    fitted, domains, selected = calibrators.fit_all(data, {"temperature": None, "ats": cfg})
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    validation = domains["instructions"]  # the only validation domain without plain text
    assert validation["ats"]["ece"] <= validation["none"]["ece"] + 1e-9
    assert validation[selected]["ece"] == min(v["ece"] for v in validation.values())
    assert fitted["temperature"].temperature == data.memo["temperature"] > 0  # fitted once, shared with ATS
    assert fitted["ats"].fit_info["best_epoch"] in (None, 0, 1, 2)


def test_evaluate_cached_uses_the_bins_it_is_given(tiny, cached):
    model, _ = tiny
    cals = {"none": calibrators.TOKEN.get("none")()}
    ten = hidden.evaluate_cached(cached, torch.arange(len(cached)), hidden.Logits(model), cals, bins=10)["none"]
    fifteen = hidden.evaluate_cached(cached, torch.arange(len(cached)), hidden.Logits(model), cals)["none"]
    assert len(ten["reliability"]) == 10 and len(fifteen["reliability"]) == 15
    assert ten["reliability"][0]["hi"] == 0.1 and ten["nll"] == fifteen["nll"]


def test_selection_prefers_the_simpler_calibrator_on_ties():
    m = {"none": {"ece": 0.05, "nll": 2.0}, "temperature": {"ece": 0.03, "nll": 2.0}, "ats": {"ece": 0.03, "nll": 1.9}}
    assert select({"instructions": m}, "ece") == "temperature"
    assert select({"instructions": m}, "nll") == "ats"


def test_save_load_round_trip_and_calibrated_model(tiny, tmp_path):
    model, _ = tiny
    ids, h, logits = hidden_and_logits(model)
    head = random_head(model.config)
    head.fit_info = {"note": "test"}
    head.save(tmp_path / "ats")
    loaded = calibrators.TOKEN.get("ats").load(tmp_path / "ats", model.config)
    assert loaded.fit_info == {"note": "test"}
    wrapped = CalibratedLM(model, loaded)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(input_ids=ids).logits, head(logits, h))
    with pytest.raises(NotImplementedError, match="generation"):
        wrapped.generate(ids)


def test_head_for_another_model_is_a_clear_error(tiny, tmp_path):
    from transformers import LlamaConfig

    model, _ = tiny
    ats.save_head(ats.AtsHead(model.config), tmp_path / "ats_head")
    other = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(CalqError, match="hidden_size=64, but this model has hidden_size=32"):
        ats.load_head(tmp_path / "ats_head", other)
    bigger = model.config.__class__(**{**model.config.to_dict(), "intermediate_size": 200})
    with pytest.raises(CalqError, match="does not match this model's layer shapes"):
        ats.load_head(tmp_path / "ats_head", bigger)
    with pytest.raises(CalqError, match="no ATS head"):
        ats.load_head(tmp_path / "missing", model.config)


def test_too_little_fit_data_is_a_clear_error(tiny, cached, tmp_path):
    model, tok = tiny
    train, val = split(len(cached), 0.2, 0)
    with pytest.raises(CalqError, match="min_response_tokens=2000"):
        ats.AtsHead.fit(FitData(cached, train, val, hidden.Logits(model), model.config), ats.AtsConfig())
    empty = [{"instruction": "Say nothing.", "input": "", "output": ""}] * 3
    with pytest.raises(CalqError, match="none of the 3 records has response tokens"):
        hidden.cache_hidden(model, tok, empty, tmp_path / "x.safetensors")
    with pytest.raises(CalqError, match="record 0 is not an Alpaca record"):
        hidden.cache_hidden(model, tok, [{"text": "hi"}], tmp_path / "x.safetensors")


def test_logits_the_cache_cannot_reproduce_are_a_clear_error(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    # Logits would cap, the model does not
    monkeypatch.setattr(model.config, "final_logit_softcapping", 1.0, raising=False)
    with pytest.raises(CalqError, match="differs from the model's logits"):
        hidden.cache_hidden(model, tok, records(2), tmp_path / "x.safetensors")


@pytest.mark.parametrize("kind", ["qwen2", "gemma", "gemma3_text"])
def test_head_builds_for_other_architectures(kind):
    from transformers import AutoConfig

    config = AutoConfig.for_model(kind, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    head = random_head(config)
    h, logits = torch.randn(2, 6, 32), torch.randn(2, 6, 64)
    with torch.no_grad():
        out = head(logits, h)
    assert torch.equal(out.argmax(-1), logits.argmax(-1)) and torch.isfinite(out).all()


def test_fitting_never_holds_more_logits_than_the_budget(tiny, monkeypatch):
    """Over a large vocabulary (262,144 for Gemma 3) the [positions x vocabulary] logits are what fills memory:
    caching, the temperature fit, the ATS steps and validation all recompute them within hidden.LOGITS_BUDGET."""
    import calq

    model, tok = tiny
    settings = {"ats": {"epochs": 1, "min_response_tokens": 50, "batch_size": 4}}
    unbounded = calq.calibrate(model, tok, records(12), settings=settings)
    largest, call = [], hidden.Logits.__call__
    monkeypatch.setattr(hidden.Logits, "__call__", lambda self, h: largest.append(h[..., 0].numel()) or call(self, h))
    monkeypatch.setattr(hidden, "LOGITS_BUDGET", 8 * model.config.vocab_size)
    bounded = calq.calibrate(model, tok, records(12), settings=settings)
    assert max(largest) == 8  # positions per chunk: the budget, never the 1024 asked for
    for domain, metrics in unbounded.validation.items():  # the same numbers, a chunk at a time
        assert bounded.validation[domain]["none"]["nll"] == pytest.approx(metrics["none"]["nll"], rel=1e-5)
        assert bounded.validation[domain]["none"]["ece"] == pytest.approx(metrics["none"]["ece"], rel=1e-4)
