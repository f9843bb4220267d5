"""GGUF models of other architectures read as llama.cpp reads them (calq.gguf_reading): the same token ids (BOS
included), the configuration llama.cpp uses, the same predictions on the same ids. Every file is a tiny one written
here with the `gguf` package; llama.cpp (llama-cpp-python) is the reference reader."""

from __future__ import annotations

import time

import numpy as np
import pytest

from calq import gguf_reading, models
from calq.errors import CalqError
from calq.tiny_gguf import write_tiny_gguf

SPACE = "\u2581"


def _topics(start: int, stop: int) -> str:
    from pydoc_data.topics import topics

    names = sorted(topics)
    return "\n".join(topics[n] for n in names[start:stop])


@pytest.fixture(scope="module")
def text() -> str:
    return _topics(0, 40)


@pytest.fixture(scope="module")
def heldout() -> str:
    return _topics(40, 60)  # disjoint from the text the vocabularies are built from


def _llama_cpp_ids(path, text: str) -> list[int]:
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
    finally:
        llm.close()


def test_metadata_is_what_the_gguf_package_reads(tmp_path, text):
    from gguf import GGUFReader

    path = write_tiny_gguf(tmp_path / "tiny.gguf", text, arch="qwen2", add_bos=False)
    fields = GGUFReader(str(path)).fields
    theirs = {key: field.contents() for key, field in fields.items() if not key.startswith("GGUF.")}
    assert gguf_reading.metadata(path) == theirs


@pytest.mark.parametrize("arch, vocab_size, add_bos", [
    ("gemma3", 262_144, None),  # Gemma 3's vocabulary size; no add_bos_token key: llama.cpp adds BOS
    ("llama", 32_768, False),  # Mistral 7B v0.3's size, BOS off as the file says
])
def test_sentencepiece_ids_are_llama_cpps_at_full_vocabulary_size(tmp_path, text, heldout, arch, vocab_size,
                                                                   add_bos):
    path = write_tiny_gguf(tmp_path / "big.gguf", text, arch=arch, vocab_size=vocab_size, add_bos=add_bos,
                           user_defined=("<table>", SPACE * 4), hidden=16, layers=1, heads=1, kv_heads=1)
    start = time.perf_counter()
    tokenizer = models.load_tokenizer(models.resolve(str(path)))
    print(f"{arch}: {vocab_size} tokens, tokenizer built in {time.perf_counter() - start:.1f} s")
    sample = heldout + f"\n<table>  {SPACE * 4} <b>"  # user-defined tokens match as written, never a space run
    ours = tokenizer(sample)["input_ids"]
    assert len(tokenizer) == vocab_size
    assert ours == _llama_cpp_ids(path, sample)
    assert (ours[0] == tokenizer.bos_token_id) == (add_bos is not False)
    assert tokenizer.decode(tokenizer(heldout)["input_ids"], skip_special_tokens=True) == heldout


@pytest.mark.parametrize("add_bos, bos", [(True, 2), (False, None), (None, 2)])  # absent: SentencePiece adds BOS
def test_the_tokenizer_keeps_the_files_bos_when_saved_and_reloaded(tmp_path, text, heldout, add_bos, bos):
    from transformers import AutoTokenizer

    path = write_tiny_gguf(tmp_path / "g.gguf", text, arch="gemma3", add_bos=add_bos, words=40)
    tokenizer = models.load_tokenizer(models.resolve(str(path)))
    assert models.bos_policy(tokenizer) == bos and (tokenizer.bos_token, tokenizer.eos_token) == ("<bos>", "<eos>")
    tokenizer.save_pretrained(tmp_path / "saved")  # the base_model stage saves it; every later stage reloads it
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert models.bos_policy(reloaded) == bos and reloaded(heldout)["input_ids"] == tokenizer(heldout)["input_ids"]


CASES = {  # name: write_tiny_gguf arguments; each differs from transformers' own reading (test_baseline.py)
    "gemma3": dict(arch="gemma3", layers=7, heads=2, kv_heads=1, head_dim=16, rope_scaling=8.0, rope_freq_base=1e6,
                   user_defined=("<table>", SPACE * 4)),
    "qwen2": dict(arch="qwen2", add_bos=False),
    "qwen3": dict(arch="qwen3", add_bos=False),
    # Llama 2 and Mistral 7B files (convert_hf_to_gguf.py stores Mistral as llama): a SentencePiece vocabulary,
    # here with linear RoPE scaling
    "llama": dict(arch="llama", rope_scaling=4.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_gguf_model_agrees_with_llama_cpp(tmp_path, text, heldout, case):
    pytest.importorskip("llama_cpp")
    from calq.evaluation.gguf_check import cross_check

    path = write_tiny_gguf(tmp_path / f"{case}.gguf", text, **CASES[case])
    source = models.resolve(str(path))
    model, tokenizer = models.load(source)
    result = cross_check(path, model, tokenizer, heldout, tokens=128)
    assert result["tokens_equal"] and result["passed"], result["problem"]
    assert (result["ids_transformers"][0] == tokenizer.bos_token_id) == CASES[case].get("add_bos", True)


def test_the_configuration_is_llama_cpps(tmp_path, text):
    gemma = models.load_config(models.resolve(str(write_tiny_gguf(tmp_path / "g.gguf", text, **CASES["gemma3"]))))
    assert gemma.query_pre_attn_scalar == 16  # llama.cpp: 1/sqrt(head size); transformers' default is 256
    assert gemma.rope_parameters["full_attention"]["factor"] == 8.0
    assert gemma.rope_parameters["sliding_attention"]["rope_type"] == "default"
    big = models.load_config(models.resolve(str(write_tiny_gguf(tmp_path / "g27.gguf", text, arch="gemma3",
                                                                 layers=62, head_dim=32))))
    assert big.query_pre_attn_scalar == 64 // 4  # the 62-layer 27B: hidden / heads, as llama.cpp
    llama = models.load_config(models.resolve(str(write_tiny_gguf(tmp_path / "l.gguf", text, rope_scaling=4.0))))
    assert llama.rope_parameters["rope_type"] == "linear" and llama.rope_parameters["factor"] == 4.0
    assert models.load_config(models.resolve(str(write_tiny_gguf(tmp_path / "q.gguf", text, arch="qwen3",
                                                                 head_dim=32)))).head_dim == 32


def test_a_rope_scaling_calq_does_not_carry_is_refused(tmp_path, text):
    meta = gguf_reading.metadata(write_tiny_gguf(tmp_path / "q.gguf", text, arch="qwen2"))
    config = models.load_config(models.resolve(str(tmp_path / "q.gguf")))
    meta["qwen2.rope.scaling.type"] = "yarn"
    with pytest.raises(CalqError, match="RoPE scaling 'yarn' is not carried .* fix: use the model's original"):
        gguf_reading.complete_config(config, meta)


def _llama3_freqs(head_dim: int, theta: float, **params) -> np.ndarray:
    """What llama.cpp's converter writes as rope_freqs for these llama3 parameters (calq's GGUF writer's function)."""
    import gguf
    from transformers import LlamaConfig

    from calq.export.gguf import rope_factors

    config = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                         max_position_embeddings=131072,
                         rope_parameters={"rope_type": "llama3", "rope_theta": theta, **params})
    return next(iter(rope_factors(gguf, config).values()))


def test_a_llama3_rope_freqs_tensor_becomes_transformers_llama3_rope(tmp_path, text, heldout):
    pytest.importorskip("llama_cpp")
    from calq.evaluation.gguf_check import cross_check

    llama31 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    freqs = _llama3_freqs(16, 10000.0, **llama31)
    assert freqs.max() == 8.0 and freqs.min() == 1.0  # the tiny head size still has scaled low frequencies
    path = write_tiny_gguf(tmp_path / "l3.gguf", text, rope_freqs=freqs, words=60)
    source = models.resolve(str(path))
    config = models.load_config(source)
    assert {k: config.rope_parameters[k] for k in llama31} == llama31
    assert config.rope_parameters["rope_type"] == "llama3"
    model, tokenizer = models.load(source)
    result = cross_check(path, model, tokenizer, heldout, tokens=128)
    assert result["tokens_equal"] and result["passed"], result["problem"]


@pytest.mark.parametrize("params", [
    {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    {"factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 2.0, "original_max_position_embeddings": 4096}])
def test_llama3_parameters_are_recovered_from_rope_freqs(params):
    from transformers import LlamaConfig

    freqs = _llama3_freqs(128, 500000.0, **params)
    config = LlamaConfig(hidden_size=512, num_attention_heads=4, head_dim=128, max_position_embeddings=131072,
                         rope_parameters={"rope_theta": 500000.0})
    found = gguf_reading.llama3_rope(config, freqs)
    assert found.pop("rope_type") == "llama3" and found == pytest.approx(params, rel=1e-3)
    with pytest.raises(CalqError, match="rope_freqs tensor is not a Llama 3 rope scaling"):
        gguf_reading.llama3_rope(config, freqs[::-1].copy())
