"""Triton kernels against their plain-torch references, the references against compressed-tensors' own code, and
the kernel-backed model against transformers' decompressed one.

Without CUDA the kernels run on the CPU through Triton's interpreter: TRITON_INTERPRET=1 must be set before
calq.kernels defines them, so it is set here, first. Every check draws fresh random inputs and runs with
torch.empty poisoned (`poison`), so an output element the kernels never write shows up as NaN.
"""

import os

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

import importlib.abc  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

from calq.kernels import common, modules, w4a16, w8a8  # noqa: E402

if not (CUDA or common.INTERPRETING):
    raise RuntimeError("calq.kernels was imported before TRITON_INTERPRET=1 was set; run this module on its own")

DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Bounds on ||out - ref|| / ||ref|| with ref in float32. float32: tl.dot runs tf32 on GPUs (exact in the
# interpreter). float16/bfloat16: the dequantized weight tile and the output are rounded to the 16-bit type.
W4A16_TOL = {torch.float32: 1e-3 if CUDA else 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# int8 x int8 products are exact; only the float epilogue and the output rounding differ.
W8A8_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "unwritten (NaN) or non-finite output elements"
    return ((out.float() - ref).norm() / ref.norm()).item()


@pytest.fixture
def poison(monkeypatch):
    """Call it to make every later torch.empty (outputs, split-K partials, quantized activations, scales) start
    as NaN or -77 for the rest of the test."""
    empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else -77)

    return lambda: monkeypatch.setattr(torch, "empty", poisoned_empty)


def w4_checkpoint(n: int, k: int, group: int, symmetric: bool) -> dict:
    """One Linear layer's pack-quantized tensors, made by compressed-tensors itself, plus its own dequantized weight."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=group)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    weight = torch.randn(n, k) * 0.05
    groups = weight.reshape(n, k // group, group)
    scale, zero_point = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
    state = {"weight": weight, "weight_scale": scale, "weight_zero_point": zero_point}
    packed = PackedQuantizationCompressor.compress(state, scheme)
    decompressed = PackedQuantizationCompressor.decompress(packed, scheme)["weight"]
    return {"weight_packed": packed["weight_packed"], "weight_scale": packed["weight_scale"],
            "weight_zero_point": packed.get("weight_zero_point"), "decompressed": decompressed}


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("n,k,group", [(36, 64, 32), (64, 256, 64), (20, 384, 128)])
def test_w4a16_layout_matches_compressed_tensors(n, k, group, symmetric):
    ckpt = w4_checkpoint(n, k, group, symmetric)
    assert (ckpt["weight_zero_point"] is None) == symmetric
    weight = w4a16.dequantize(ckpt["weight_packed"], ckpt["weight_scale"], ckpt["weight_zero_point"], group)
    torch.testing.assert_close(weight, ckpt["decompressed"].float(), rtol=0, atol=0)


@pytest.mark.parametrize("rows,cols", [(5, 64), (36, 40), (3, 13)])
def test_pack_int4_matches_compressed_tensors(rows, cols):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    signed = torch.randint(-8, 8, (rows, cols), dtype=torch.int8)
    unsigned = (signed + 8).to(torch.uint8)
    assert torch.equal(w4a16.pack_int4(unsigned), pack_to_int32(signed, 4))
    assert torch.equal(w4a16.pack_int4(unsigned.t()).t(), pack_to_int32(signed, 4, packed_dim=0))
    assert torch.equal(w4a16.unpack_int4(w4a16.pack_int4(unsigned), cols), unsigned)


# (M, K, N, group, split_k): M on both sides of DECODE_MAX_M and of the 128-row prefill tile, N not a multiple
# of the N tiles (64 / 128), K spanning several K tiles, split-K forced to uneven splits.
W4A16_CASES = [(1, 64, 40, 32, None), (3, 192, 72, 64, 2), (16, 512, 100, 128, 3), (17, 96, 24, 32, None),
               (64, 384, 136, 128, 1), (130, 64, 24, 32, None)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,k,n,group,split_k", W4A16_CASES)
def test_w4a16_kernel_matches_reference(m, k, n, group, split_k, dtype, poison):
    symmetric = m % 2 == 0
    ckpt = w4_checkpoint(n, k, group, symmetric)
    qweight, scales, zeros = (t.to(DEVICE) for t in w4a16.repack(
        ckpt["weight_packed"], ckpt["weight_scale"], ckpt["weight_zero_point"], group, dtype))
    x = torch.randn(m, k, dtype=dtype)
    bias = torch.randn(n, dtype=dtype) if m % 3 == 0 else None
    ref = w4a16.w4a16_reference(x, ckpt["weight_packed"], ckpt["weight_scale"], ckpt["weight_zero_point"], group, bias)
    poison()
    out = w4a16.w4a16_matmul(x.to(DEVICE), qweight, scales, zeros, group, None if bias is None else bias.to(DEVICE),
                             split_k=split_k)
    assert out.shape == (m, n) and out.dtype == dtype
    assert rel_error(out.cpu(), ref) < W4A16_TOL[dtype]


@pytest.mark.parametrize("static", [False, True])
def test_activation_quantization_matches_compressed_tensors(static, poison):
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    x = torch.randn(2, 9, 200) * torch.rand(2, 9, 1) * 3
    x[0, 0, :7] = torch.tensor([0.5, -0.5, 1.5, 2.5, -2.5, 3.5, 0.0]) * 0.02  # ties to even at scale 0.02
    if static:
        args = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="tensor")
        scale, zero = torch.tensor([0.02]), torch.zeros(1)
    else:
        args = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
        scale, zero = compute_dynamic_scales_and_zp(x, args, module=None)
    expected = fake_quantize(x, scale, zero, args).reshape(-1, 200)

    input_scale = scale if static else None
    q_ref, s_ref = w8a8.quantize_activations_reference(x, input_scale)
    torch.testing.assert_close(q_ref.float() * s_ref, expected, rtol=0, atol=0)
    poison()
    q, s = w8a8.quantize_activations(x.to(DEVICE), None if input_scale is None else input_scale.to(DEVICE))
    assert torch.equal(q.cpu(), q_ref) and torch.equal(s.cpu().reshape(-1), s_ref.reshape(-1))


W8A8_CASES = [(1, 64, 40, None), (5, 200, 72, 2), (16, 300, 100, 3), (17, 96, 24, None), (64, 260, 136, 1),
              (130, 40, 24, None)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,k,n,split_k", W8A8_CASES)
def test_w8a8_kernel_matches_reference(m, k, n, split_k, dtype, poison):
    weight = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    weight_scale = torch.rand(n) * 0.01 + 1e-3
    x = torch.randn(m, k, dtype=dtype)
    input_scale = x.float().abs().amax().reshape(1) / 100 if m % 2 else None  # static, some values clipped
    bias = torch.randn(n, dtype=dtype) if m % 3 == 0 else None
    ref = w8a8.w8a8_reference(x, weight, weight_scale, input_scale, bias)
    def on(t):
        return None if t is None else t.to(DEVICE)

    poison()
    out = w8a8.w8a8_matmul(x.to(DEVICE), weight.to(DEVICE), weight_scale.to(DEVICE), on(input_scale), on(bias),
                           split_k=split_k)
    assert out.shape == (m, n) and out.dtype == dtype
    assert rel_error(out.cpu(), ref) < W8A8_TOL[dtype]


@pytest.mark.skipif(not CUDA, reason="a large multi-tile product is too slow for the interpreter")
@pytest.mark.parametrize("m,group", [(1, 32), (16, 64), (300, 128), (4096, 64)])
def test_large_shapes_on_gpu(m, group, poison):
    ckpt = w4_checkpoint(520, 2048, group, symmetric=False)
    poison()
    x = torch.randn(m, 2048, dtype=torch.bfloat16)
    parts = w4a16.repack(ckpt["weight_packed"], ckpt["weight_scale"], ckpt["weight_zero_point"], group, torch.bfloat16)
    out = w4a16.w4a16_matmul(x.to(DEVICE), *(t.to(DEVICE) for t in parts), group)
    ref = w4a16.w4a16_reference(x, ckpt["weight_packed"], ckpt["weight_scale"], ckpt["weight_zero_point"], group)
    assert rel_error(out.cpu(), ref) < W4A16_TOL[torch.bfloat16]
    weight = torch.randint(-127, 128, (520, 2048), dtype=torch.int8)
    scale = torch.rand(520) * 0.01
    out = w8a8.w8a8_matmul(x.to(DEVICE), weight.to(DEVICE), scale.to(DEVICE))
    assert rel_error(out.cpu(), w8a8.w8a8_reference(x, weight, scale)) < W8A8_TOL[torch.bfloat16]


def test_custom_ops_trace_and_compile():
    ckpt = w4_checkpoint(40, 64, 32, symmetric=False)
    w4 = [t.to(DEVICE) for t in w4a16.repack(ckpt["weight_packed"], ckpt["weight_scale"], ckpt["weight_zero_point"],
                                            32, torch.float32)]
    w8 = [torch.randint(-127, 128, (40, 64), dtype=torch.int8, device=DEVICE), torch.rand(40, device=DEVICE) * 0.01]
    x = torch.randn(3, 64, device=DEVICE)
    torch.library.opcheck(w4a16.w4a16_linear, (x, *w4, 32, None))
    torch.library.opcheck(w8a8.w8a8_linear, (x, *w8, None, torch.randn(40, device=DEVICE)))

    def both(x):
        return w4a16.w4a16_linear(x, *w4, 32) + w8a8.w8a8_linear(x, *w8, torch.tensor([0.02], device=DEVICE))

    compiled = torch.compile(both, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), both(x))


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("m", [1, 40])
def test_custom_ops_in_cuda_graphs(m):
    ckpt = w4_checkpoint(96, 256, 64, symmetric=False)
    w4 = [t.to(DEVICE) for t in w4a16.repack(ckpt["weight_packed"], ckpt["weight_scale"], ckpt["weight_zero_point"],
                                            64, torch.bfloat16)]
    w8 = [torch.randint(-127, 128, (96, 256), dtype=torch.int8, device=DEVICE), torch.rand(96, device=DEVICE) * 0.01]

    def both(x):
        return w4a16.w4a16_linear(x, *w4, 64) + w8a8.w8a8_linear(x, *w8)

    compiled = torch.compile(both, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # the first calls record the graph, the last replays it
        x = torch.randn(m, 256, dtype=torch.bfloat16, device=DEVICE)
        torch.testing.assert_close(compiled(x).clone(), both(x))


def test_bad_shapes_are_refused():
    qweight = torch.zeros(8, 40, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="not a multiple of 16"):
        w4a16.w4a16_matmul(torch.randn(2, 64, device=DEVICE), qweight, torch.ones(8, 40, device=DEVICE),
                           torch.zeros(8, 40, dtype=torch.uint8, device=DEVICE), 8)
    with pytest.raises(ValueError, match="does not match"):
        w8a8.w8a8_matmul(torch.randn(2, 63, device=DEVICE), torch.zeros(40, 64, dtype=torch.int8, device=DEVICE),
                         torch.ones(40, device=DEVICE))


# Whole models: calq's own quantization (llm-compressor) writes the checkpoint; transformers decompresses it.
VARIANTS = {"w4a16-g32": dict(scheme="w4a16", group_size=32),
            "w4a16-sym-g16-tied": dict(scheme="w4a16", group_size=16, symmetric=True),  # lm_head = embeddings
            "w8a8-static": dict(scheme="w8a8"),
            "w8a8-dynamic": dict(scheme="w8a8", dynamic_activations=True)}
# w8a8: a requantized activation within rounding of a .5 boundary can move by one int8 step between the two
# implementations (their float epilogues differ in the last bit), and the step travels through later layers.
MODEL_TOL = {"w4a16": 5e-3 if CUDA else 1e-5, "w8a8": 1e-2}


@pytest.fixture(scope="module")
def checkpoints(tiny_model, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    import calq

    folders = {}
    samples = torch.randint(3, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    for name, spec in VARIANTS.items():
        model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        if name.endswith("tied"):
            model.config.tie_word_embeddings = True
            model.tie_weights()
        calq.quantize(model, {"method": "minmax", **spec}, samples)
        folders[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(folders[name], save_compressed=True)
    return folders


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_load_quantized_matches_decompressed_model(variant, checkpoints, poison):
    from transformers import AutoModelForCausalLM

    folder = checkpoints[variant]
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(DEVICE)
    inputs = [torch.randint(3, 256, shape, device=DEVICE) for shape in [(2, 16), (1, 8)]]  # prefill- and decode-sized
    with torch.no_grad():
        expected = [reference(ids).logits for ids in inputs]
    model = modules.load_quantized(folder, DEVICE, torch.float32)
    kind = modules.W4A16Linear if variant.startswith("w4a16") else modules.W8A8Linear
    assert sum(isinstance(m, kind) for m in model.modules()) == 14  # 7 Linear layers x 2 blocks; lm_head ignored
    assert type(model.lm_head) is torch.nn.Linear
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == variant.endswith("tied")
    poison()
    for ids, ref in zip(inputs, expected):
        with torch.no_grad():
            assert rel_error(model(ids).logits, ref) < MODEL_TOL[variant.split("-")[0]]


def test_decoder_matches_transformers_generate(tiny_model):
    from transformers import AutoModelForCausalLM

    from calq.kernels.decode import Decoder

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).to(DEVICE).eval()
    prompt = torch.randint(3, 256, (2, 7), device=DEVICE)
    expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                              min_new_tokens=12, pad_token_id=0)[:, 7:]
    decoder = Decoder(model, max_len=7 + 12)
    tokens, seconds = decoder.generate(prompt, 12)
    assert torch.equal(tokens, expected) and seconds > 0
    assert torch.equal(decoder.generate(prompt, 12)[0], expected)  # the cache is reset between prompts
    with pytest.raises(ValueError, match="exceed the cache length"):
        decoder.generate(prompt, 13)
    with pytest.raises(ValueError, match="make another for batch 1"):
        decoder.generate(prompt[:1], 12)
    # compiled whole (fullgraph) with the static cache: on a GPU this is the CUDA-graph path the benchmarks time
    assert torch.equal(Decoder(model, max_len=7 + 12, compile=True).generate(prompt, 12)[0], expected)


@pytest.mark.parametrize("variant", ["w4a16-g32", "w8a8-dynamic"])
def test_kernel_model_decodes_the_same_tokens(variant, checkpoints):
    """Greedy decoding, 32 tokens for 2 prompts: kernels (static KV cache) against transformers' decompressed model."""
    from transformers import AutoModelForCausalLM

    from calq.kernels.decode import Decoder

    folder = checkpoints[variant]
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(DEVICE)
    model = modules.load_quantized(folder, DEVICE, torch.float32)
    prompt = torch.randint(3, 256, (2, 5), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(3))
    expected, _ = Decoder(reference, 5 + 32).generate(prompt, 32)
    tokens, _ = Decoder(model, 5 + 32).generate(prompt, 32)
    assert torch.equal(tokens, expected)


@pytest.mark.slow
@pytest.mark.skipif(not CUDA, reason="about 100 s per token of the bundled model in Triton's interpreter")
@pytest.mark.parametrize("scheme,dtype", [("w4a16", torch.bfloat16), ("w8a8", torch.float32)], ids=str)
def test_bundled_model_greedy_tokens_match_on_gpu(scheme, dtype, tmp_path):
    """SmolLM2-135M min-max quantized by calq: 64 greedy tokens from the kernels against transformers' decompressed
    model in the same dtype, from a real prompt. W8A8 (dynamic per-token int8 activations) runs in float32: in bf16
    the activation quantizer turns rounding into whole int8 steps, and transformers' own bf16 and float32 runs of
    the same decompressed checkpoint part after 1 token (max logit difference 2.4 against a top-2 gap of 0.75;
    measured on the CPU, BENCHMARKS.md). On an H200 in bf16: w4a16 64 of 64 tokens equal, w8a8 13 of 64."""
    from transformers import AutoModelForCausalLM

    import calq
    from calq import models
    from calq.kernels.bench import agreeing_prefix
    from calq.kernels.decode import Decoder

    source = models.resolve("smollm2-135m")
    model, tokenizer = models.load(source, "float32")
    calq.quantize(model, {"method": "minmax", "scheme": scheme,
                          **({"group_size": 64} if scheme == "w4a16" else {"dynamic_activations": True})})
    model.save_pretrained(tmp_path / scheme, save_compressed=True)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / scheme, dtype=dtype).cuda()
    kernels = modules.load_quantized(tmp_path / scheme, "cuda", dtype)
    prompt = tokenizer("The history of the city begins in the Middle Ages, when", return_tensors="pt").input_ids
    length = prompt.shape[1] + 64
    agree = agreeing_prefix(Decoder(kernels, length).generate(prompt, 64)[0],
                            Decoder(reference, length).generate(prompt, 64)[0])
    print(f"\n{scheme} in {dtype}: the kernels' first {agree} of 64 greedy tokens equal transformers'")
    assert agree >= 32


@pytest.mark.skipif(CUDA, reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("command", ["kernels", "decode"])
def test_bench_without_cuda_says_so(command):
    from typer.testing import CliRunner

    from calq.cli import app

    result = CliRunner().invoke(app, ["bench", command])
    assert result.exit_code == 2 and "no CUDA device is visible" in result.output
    result = CliRunner().invoke(app, ["bench", command, "--m" if command == "kernels" else "--batch", "1,x"])
    assert result.exit_code == 2 and "'1,x' is not a comma-separated list of integers" in result.output


class RefuseImports(importlib.abc.MetaPathFinder):
    def __init__(self, *packages: str):
        self.packages = packages

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.packages:
            raise ImportError(f"inference imported {name}")


def test_inference_imports_neither_llmcompressor_nor_compressed_tensors(checkpoints, monkeypatch):
    """Both are imported by now (the checkpoints were made with them): unload them and refuse any new import."""
    refuse = RefuseImports("llmcompressor", "compressed_tensors")
    for name in [m for m in sys.modules if m.split(".")[0] in refuse.packages]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [refuse, *sys.meta_path])
    model = modules.load_quantized(checkpoints["w4a16-g32"], DEVICE, torch.float32)
    model(torch.tensor([[5, 6, 7]], device=DEVICE))


def test_unsupported_scheme_names_the_group(checkpoints, tmp_path):
    from calq.errors import CalqError

    folder = tmp_path / "ckpt"
    folder.mkdir()
    for f in checkpoints["w4a16-g32"].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["actorder"] = "group"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CalqError, match="config_groups.group_0"):
        modules.load_quantized(folder, DEVICE, torch.float32)
