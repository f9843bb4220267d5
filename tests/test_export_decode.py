"""ONNX decode graph (decode.onnx, KV cache): a tiny random Llama, float with a temperature and W4A16 (calq's min-max
g32, MatMulNBits) with an ATS head, generates on ONNX Runtime exactly as the PyTorch variant does.

Bounds: float32 tolerance (1e-4 absolute on logits of magnitude ~1; measured about 1e-7). The decode graph is the
same model with the same MatMulNBits integers as model.onnx, run one position at a time over a float32 cache, so only
the summation order differs.
"""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from calq.calib.temperature import Temperature
from calq.errors import CalqError
from calq.export import get
from calq.export.base import DECODE_NEW, DECODE_PROMPT, export_and_verify
from calq.export.onnx import OnnxDecoder
from calq.quant import llmc, methods

PROMPT = torch.randint(3, 256, (DECODE_PROMPT,), generator=torch.Generator().manual_seed(4))
NEW = 12


def _ats_head(folder):
    from calq.calib.ats import AtsHead

    torch.manual_seed(0)
    head = AtsHead(AutoModelForCausalLM.from_pretrained(folder).config)
    torch.nn.init.normal_(head.out.weight, std=0.2)  # a fitted head starts at the identity: make it do something
    return head.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    """{name: (PyTorch variant, divisor of its logits in decode.onnx, export folder, export_and_verify result)}."""
    pytest.importorskip("onnxruntime")
    llmc.quiet_logs(str(tmp_path_factory.mktemp("logs") / "llmcompressor.log"))
    w4a16 = tmp_path_factory.mktemp("w4a16")
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    methods.config({"method": "minmax", "scheme": "w4a16", "group_size": 32}).apply(
        model, torch.randint(3, 256, (8, 32), generator=torch.Generator().manual_seed(0)))
    model.save_pretrained(w4a16, save_compressed=True)
    cases = {"baseline": (tiny_model, Temperature(1.7), 1.7), "w4a16": (w4a16, _ats_head(w4a16), 1.0)}
    stream = torch.randint(3, 256, (130,), generator=torch.Generator().manual_seed(5))
    result = {}
    for name, (folder, calibrator, divisor) in cases.items():
        variant = AutoModelForCausalLM.from_pretrained(folder).eval()
        out = tmp_path_factory.mktemp(f"onnx-{name}")

        def reference(ids, variant=variant, divisor=divisor):
            with torch.no_grad():
                return variant(input_ids=ids).logits / divisor

        verified = export_and_verify("onnx", folder, out, reference, stream, seq_len=64, calibrator=calibrator,
                                     threads=1)
        result[name] = (variant, divisor, out, verified)
    return result


@pytest.mark.parametrize("name", ["baseline", "w4a16"])
def test_decode_generates_what_pytorch_generates(name, exported):
    """Greedy tokens equal transformers' `generate` on the PyTorch variant; every prefill and decode step's logits
    equal the PyTorch variant's logits on the same sequence (divided by the temperature decode.onnx carries)."""
    variant, divisor, out, _ = exported[name]
    tokens, logits, _ = get("onnx").decoder(out).generate(PROMPT, NEW)
    with torch.no_grad():
        want = variant.generate(PROMPT[None], attention_mask=torch.ones(1, DECODE_PROMPT, dtype=torch.long),
                                max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)[0, DECODE_PROMPT:]
        sequence = torch.cat([PROMPT, tokens[:-1]])
        want_logits = variant(input_ids=sequence[None]).logits[0] / divisor
    assert torch.equal(tokens, want)
    assert logits.shape == (DECODE_PROMPT + NEW - 1, variant.config.vocab_size)
    torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["baseline", "w4a16"])
def test_verify_records_decode_agreement(name, exported):
    """export_and_verify's verify.json gets a `decode` entry: greedy tokens vs PyTorch, decode vs model.onnx."""
    _, _, out, verified = exported[name]
    decode = verified["verify"]["decode"]
    assert json.loads((out / "verify.json").read_text())["decode"] == decode
    assert decode["prompt_tokens"] == DECODE_PROMPT and decode["new_tokens"] == DECODE_NEW
    assert decode["greedy_tokens_equal"] and decode["greedy_token_agreement"] == 1.0
    assert decode["first_mismatch"] is None
    assert decode["max_abs_diff_vs_scoring"] < 1e-4
    # the speed of that run, on the threads asked for (a figure of this CPU: only its presence is checked)
    assert decode["threads"] == 1 and decode["prefill_tokens_per_second"] > 0 and decode["decode_tokens_per_second"] > 0
    assert verified["verify"]["load_seconds"] > 0  # the runtime's load of model.onnx, in its child process


def test_decode_logits_say_what_calibrator_they_carry(exported):
    """Temperature: decode.onnx's logits are model.onnx's calibrated `logits`; ATS: the raw logits, said so."""
    info = {name: json.loads((exported[name][2] / "export.json").read_text()) for name in exported}
    assert info["baseline"]["decode_graph"]["logits"] == "raw / temperature"
    assert info["w4a16"]["decode_graph"]["logits"] == "raw"
    assert "no KV cache of its own" in info["w4a16"]["decode_graph"]["note"]
    tokens, logits, _ = get("onnx").decoder(exported["w4a16"][2]).generate(PROMPT, 2)
    calibrated, raw = get("onnx").session(exported["w4a16"][2]).run(torch.cat([PROMPT, tokens[:-1]])[None])
    torch.testing.assert_close(logits, raw[0], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits, calibrated[0], rtol=1e-3, atol=1e-3)  # the ATS head is not in decode.onnx


def test_decode_graph_holds_calqs_int4_and_shares_the_weights(exported):
    """decode.onnx has the same MatMulNBits layers and reads every weight from model.onnx.data (no second copy)."""
    import onnx

    out = exported["w4a16"][2]
    info = json.loads((out / "export.json").read_text())
    scoring, decode = (onnx.load(str(out / f), load_external_data=False) for f in ("model.onnx", "decode.onnx"))
    assert sum(n.op_type == "MatMulNBits" for n in decode.graph.node) == 14
    assert sum(n.op_type == "MatMulNBits" for n in scoring.graph.node) == 14
    assert not (out / "decode.onnx.data").exists() and "decode.onnx.data" not in info["files"]
    assert info["decode_graph"]["weights_shared_with_model_onnx"] > 0
    locations = {e.value for i in decode.graph.initializer for e in i.external_data if e.key == "location"}
    assert locations == {"model.onnx.data"}


def test_missing_decode_graph_is_one_clear_error(tmp_path):
    pytest.importorskip("onnxruntime")
    with pytest.raises(CalqError, match="no ONNX decode graph"):
        OnnxDecoder(tmp_path / "decode.onnx")
