import pytest
import torch

from calq.calib import ranges


@pytest.mark.parametrize("head_reads", ["last hidden state", "something else"])
def test_collected_ranges_match_a_direct_computation(tiny_model, tmp_path, head_reads):
    """Every Linear's input statistics, the output layer's included: read from the last hidden state (no full
    logits computed) when that is what the output layer receives, from a full forward pass when it is not."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    if head_reads == "something else":  # an architecture that transforms the hidden state before its output layer
        model.lm_head.register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    samples = torch.randint(3, 256, (6, 16), generator=torch.Generator().manual_seed(1))
    got = ranges.collect(model, samples, batch_size=4)  # two batches: the running statistics must merge

    names = ["model.layers.1.mlp.down_proj", "lm_head"]
    seen = {name: [] for name in names}
    handles = [model.get_submodule(name).register_forward_hook(
        lambda m, i, o, name=name: seen[name].append(i[0].reshape(-1, i[0].shape[-1]))) for name in names]
    with torch.no_grad():
        model(input_ids=samples)
    for handle in handles:
        handle.remove()
    for name in names:
        x = torch.cat(seen[name])
        torch.testing.assert_close(got[f"{name}.min"], x.amin(0))
        torch.testing.assert_close(got[f"{name}.max"], x.amax(0))
        torch.testing.assert_close(got[f"{name}.absmax"], x.abs().amax(0))
        torch.testing.assert_close(got[f"{name}.mean_abs"], x.abs().mean(0), rtol=1e-5, atol=1e-6)
        assert got[f"{name}.tokens"].item() == 6 * 16

    name = names[0]
    path = tmp_path / "ranges.safetensors"
    ranges.save(got, path, {"samples": "6"})
    loaded = ranges.load(path)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert len(loaded) == n_linear  # every Linear input, lm_head included
    assert set(loaded[name]) == {"min", "max", "absmax", "mean_abs", "tokens"}


def test_outlier_summary_ranks_by_absmax_over_median():
    flat = {"min": -torch.ones(8), "max": torch.ones(8), "absmax": torch.ones(8), "mean_abs": torch.ones(8),
            "tokens": torch.tensor([5])}
    spiky = {**flat, "absmax": torch.tensor([1.0] * 7 + [50.0])}
    rows = ranges.outlier_summary({"a": flat, "b": spiky}, top_k=2)
    assert [r["layer"] for r in rows] == ["b", "a"]
    assert rows[0]["ratio"] == 50.0 and rows[0]["channel"] == 7
    assert rows[1]["ratio"] == 1.0


def test_non_finite_activations_are_a_clear_error(tiny_model):
    from transformers import AutoModelForCausalLM

    from calq.errors import CalqError

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight[5] = float("nan")
    with pytest.raises(CalqError, match="non-finite activations.*layers.0.self_attn.q_proj"):
        ranges.collect(model, torch.tensor([[3, 4, 5, 6]]))
