"""The baseline check (calq.evaluation.baseline) and BOS handling on every path that turns text into model input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from tiny import make_tiny_llama, train_tiny_llama

from calq import data, models
from calq.errors import CalqError
from calq.evaluation.baseline import check_baseline, unigram


def _topics(start: int, stop: int) -> str:
    from pydoc_data.topics import topics

    names = sorted(topics)
    return "\n".join(topics[n] for n in names[start:stop])


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """The tiny Llama after 100 training steps on one part of the pydoc text (seed 0)."""
    return train_tiny_llama(make_tiny_llama(tmp_path_factory.mktemp("trained")), _topics(0, 40))


@pytest.fixture(scope="session")
def heldout() -> str:
    return _topics(40, 60)  # disjoint from the training text


def _load(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


# ---- the check -------------------------------------------------------------------------------------

def test_unigram_bound_is_the_best_context_free_model():
    targets = torch.tensor([5, 5, 5, 7, 7, 9, 11, 5])
    counts = torch.bincount(targets, minlength=16).double()
    for p in (counts / counts.sum(), (counts + 1) / (counts + 1).sum(), torch.full((16,), 1 / 16, dtype=torch.double)):
        assert unigram(targets)["ppl"] <= math.exp(float(-p[targets].log().mean())) + 1e-9
    assert unigram(targets)["top1"] == 0.5


def test_a_slightly_trained_tiny_model_passes(trained, heldout):
    model, tokenizer = _load(trained)
    result = check_baseline(model, data.token_stream([heldout], tokenizer), tokens=512)
    assert result["passed"] and result["problem"] is None
    assert result["tokens"] == 512
    assert result["ppl"] < result["unigram_ppl"]
    assert result["top1"] > result["unigram_top1"]


def test_a_random_model_is_refused(tiny_model, heldout):
    model, tokenizer = _load(tiny_model)
    with pytest.raises(CalqError, match="not a working language model.*unigram.*fix: check the tokenizer"):
        check_baseline(model, data.token_stream([heldout], tokenizer), tokens=512)


def test_a_tokenizer_with_a_shifted_vocabulary_is_refused(trained, heldout):
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    model, tokenizer = _load(trained)
    # The tiny tokenizer's byte vocabulary, every character one id further on (the special tokens stay).
    shifted = {"<pad>": 0, "<s>": 1, "</s>": 2, **{chr(i): 3 + (i - 2) % 253 for i in range(3, 256)}}
    backend = Tokenizer(WordLevel(vocab=shifted, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    wrong = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    assert wrong("ab")["input_ids"] == [i + 1 for i in tokenizer("ab")["input_ids"]]
    with pytest.raises(CalqError, match="worse than the unigram model"):
        check_baseline(model, data.token_stream([heldout], wrong), tokens=512)


def test_two_swapped_layers_are_refused(trained, heldout):
    model, tokenizer = _load(trained)
    first, last = model.model.layers[0], model.model.layers[-1]
    kept = {k: v.clone() for k, v in first.state_dict().items()}
    first.load_state_dict(last.state_dict())
    last.load_state_dict(kept)
    with pytest.raises(CalqError, match="worse than the unigram model"):
        check_baseline(model, data.token_stream([heldout], tokenizer), tokens=512)


def test_override_records_the_failure_and_max_ppl_is_a_second_bound(trained, tiny_model, heldout):
    model, tokenizer = _load(tiny_model)
    stream = data.token_stream([heldout], tokenizer)
    result = check_baseline(model, stream, tokens=256, enforce=False)
    assert not result["passed"] and "unigram" in result["problem"]
    model, tokenizer = _load(trained)
    with pytest.raises(CalqError, match="above max_ppl 2.0"):
        check_baseline(model, data.token_stream([heldout], tokenizer), tokens=256, max_ppl=2.0)


def test_too_little_text_is_bad_input(trained):
    model, tokenizer = _load(trained)
    with pytest.raises(CalqError, match="fewer than the 512"):
        check_baseline(model, data.token_stream(["short text"], tokenizer), tokens=512)


def test_windows_follow_the_models_context(trained, heldout):
    model, tokenizer = _load(trained)  # max_position_embeddings 512
    result = check_baseline(model, data.token_stream([heldout], tokenizer), tokens=600)
    assert (result["seq_len"], result["windows"]) == (512, 2)
    assert result["tokens"] == 600


# ---- BOS on every path -----------------------------------------------------------------------------

@pytest.fixture(scope="session")
def bos_folder(tiny_model, tmp_path_factory):
    """The tiny model with a tokenizer configured to start every text with BOS (<s>, id 1)."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("bos")
    shutil.copytree(tiny_model, folder, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_bos_token = True
    tokenizer.save_pretrained(folder)
    return folder


def test_bos_policy_follows_the_tokenizer_configuration(tiny_model, bos_folder):
    from transformers import AutoTokenizer

    assert models.bos_policy(AutoTokenizer.from_pretrained(tiny_model)) is None
    tokenizer = AutoTokenizer.from_pretrained(bos_folder)
    assert models.bos_policy(tokenizer) == 1
    assert models.with_bos([1, 5], 1) == [1, 5] and models.with_bos([5], 1) == [1, 5]
    assert models.with_bos([5], None) == [5]


def test_token_stream_starts_each_following_document_with_bos(tiny_model, bos_folder):
    from transformers import AutoTokenizer

    plain = data.token_stream(["ab", "cd"], AutoTokenizer.from_pretrained(tiny_model)).tolist()
    assert plain == [ord("a"), ord("b"), 2, ord("c"), ord("d"), 2]
    with_bos = data.token_stream(["ab", "cd"], AutoTokenizer.from_pretrained(bos_folder)).tolist()
    assert with_bos == [ord("a"), ord("b"), 2, 1, ord("c"), ord("d"), 2, 1]


def test_windows_and_calibration_samples_start_with_bos():
    stream = torch.arange(10, 40)
    assert torch.equal(data.windows(stream, 5), stream[:30].view(6, 5))  # no BOS: unchanged
    w = data.windows(stream, 5, bos=1)
    assert w.shape == (7, 5) and (w[:, 0] == 1).all()
    assert torch.equal(w[:, 1:].flatten(), stream[:28])  # every text token once, in order
    samples = data.sample_windows(stream, 3, 5, seed=0, where="calibration", bos=1)
    assert (samples[:, 0] == 1).all() and all(any(torch.equal(s, r) for r in w) for s in samples)
    assert torch.equal(data.sample_windows(stream, 3, 5, 0, "calibration"),
                       stream[:30].view(6, 5)[sorted(__import__("random").Random(0).sample(range(6), 3))])


def test_evaluation_windows_start_with_bos(bos_folder, heldout):
    from calq.evaluation import tokens as token_eval

    model, tokenizer = _load(bos_folder)
    bos = models.bos_policy(tokenizer)
    stream = data.token_stream([heldout], tokenizer, max_tokens=4 * 63)
    seen = []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["input_ids"]), with_kwargs=True)
    # what the evaluate stage passes: the windows, flattened; token_eval.evaluate cuts them at seq_len again
    result = token_eval.evaluate(model, data.windows(stream, 64, bos).flatten(), 64, batch_size=2)
    assert result["windows"] == 4 and all((batch[:, 0] == 1).all() for batch in seen)
    assert torch.equal(torch.cat(seen)[:, 1:].flatten(), stream)  # every text token scored once, after its BOS


def test_ats_data_starts_with_bos_once(bos_folder, tiny_model):
    from transformers import AutoTokenizer

    from calq.calib.hidden import encode

    record = {"instruction": "say hi", "input": "", "output": "hi there"}
    tokenizer = AutoTokenizer.from_pretrained(bos_folder)
    bos = models.bos_policy(tokenizer)
    ids, targets = encode(record, tokenizer, 256, bos)
    plain_ids, plain_targets = encode(record, AutoTokenizer.from_pretrained(tiny_model), 256)
    assert ids[0] == 1 and torch.equal(ids[1:], plain_ids) and torch.equal(targets[1:], plain_targets)
    tokenizer.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    ids, targets = encode(record, tokenizer, 256, bos)
    assert ids[0] == 1 and ids[1] != 1  # the template's BOS, not a second one
    assert "".join(tokenizer.convert_ids_to_tokens(targets[targets != -100].tolist())).startswith("hi there")
    ids, _ = encode(record, tokenizer, 8, bos)
    assert ids.numel() == 8


def test_the_check_scores_windows_that_start_with_bos(trained, heldout):
    model, tokenizer = _load(trained)
    stream = data.token_stream([heldout], tokenizer)
    result = check_baseline(model, stream, bos=1, tokens=300)
    assert result["bos"] == 1 and result["tokens"] == 300 and result["seq_len"] == 301


# ---- GGUF: special tokens as the file says, architectures transformers reads wrongly ---------------

@pytest.mark.parametrize("add_bos, expected", [(True, 1), (False, None), (None, 1)])  # absent: SentencePiece adds BOS
def test_gguf_tokenizer_follows_the_files_bos_and_eos(tmp_path, add_bos, expected):
    from transformers import AutoTokenizer

    from calq.tiny_gguf import write_tiny_gguf

    path = write_tiny_gguf(tmp_path / "tiny.gguf", _topics(0, 5), add_bos=add_bos, words=40)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    assert tokenizer.eos_token == "<s>"  # transformers 5.17 takes EOS from bos_token_id; when this fails, it is fixed
    models.match_gguf_special_tokens(tokenizer, models.gguf_tokenizer_facts(path))
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<s>", "</s>")
    assert models.bos_policy(tokenizer) == expected
    tokenizer.save_pretrained(tmp_path / "saved")  # the base_model stage saves it; every later stage reloads it
    assert models.bos_policy(AutoTokenizer.from_pretrained(tmp_path / "saved")) == expected


def test_a_gemma3_gguf_is_read_with_calqs_tokenizer_not_transformers(tmp_path):
    from transformers import AutoTokenizer

    from calq.tiny_gguf import write_tiny_gguf

    path = write_tiny_gguf(tmp_path / "tiny-gemma3.gguf", _topics(0, 5), arch="gemma3", words=40)
    # the upstream bug itself (huggingface/transformers#41494): frequent words come out as single characters; when
    # this fails, transformers fixed it and calq.gguf_reading.spm_tokenizer may go
    pieces = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name).tokenize("the function")
    assert pieces == ["t", "h", "e", "\u2581", "f", "u", "n", "c", "t", "i", "o", "n"]
    tokenizer = models.load_tokenizer(models.resolve(str(path)))
    assert tokenizer.tokenize(" the") == ["\u2581the"]  # one of the file's merged pieces
    assert models.load_config(models.resolve(str(path))).model_type == "gemma3_text"  # no longer refused


def test_verify_records_the_numbers_and_refuses_a_broken_baseline(trained, tiny_model, heldout):
    from calq.evaluation.trust import verify

    model, tokenizer = _load(trained)
    result = verify(model, tokenizer, [heldout], "heldout.txt", tokens=256)
    assert result["passed"] and result["llama_cpp"] is None and result["baseline"]["tokens"] == 256
    model, tokenizer = _load(tiny_model)
    with pytest.raises(CalqError, match="model.check: the baseline is not a working language model"):
        verify(model, tokenizer, [heldout], "heldout.txt", tokens=256)
    result = verify(model, tokenizer, [heldout], "heldout.txt", tokens=256, enforce=False)
    assert not result["passed"] and not result["enforced"]


# ---- llama.cpp reading the same GGUF (llama-cpp-python) ----------------------------------------------

def _gguf_model(folder, name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    models.match_gguf_special_tokens(tokenizer, models.gguf_tokenizer_facts(folder / name))
    return model, tokenizer


def test_llama_cpp_agrees_with_transformers_on_a_tiny_llama_gguf(tmp_path, heldout):
    pytest.importorskip("llama_cpp")
    from calq.evaluation.gguf_check import cross_check
    from calq.tiny_gguf import write_tiny_gguf

    path = write_tiny_gguf(tmp_path / "tiny.gguf", _topics(0, 40))
    model, tokenizer = _gguf_model(tmp_path, path.name)
    result = cross_check(path, model, tokenizer, heldout, tokens=128)
    assert result["tokens_equal"] and result["ids_transformers"][0] == 1  # BOS, as the file says
    assert result["passed"], result["problem"]


def test_a_llama_cpp_crash_in_the_cross_check_is_one_line_or_could_not_run(tmp_path, heldout, monkeypatch):
    pytest.importorskip("llama_cpp")
    from standin_runtime import crash_while_reading

    from calq.evaluation import gguf_check
    from calq.evaluation.trust import verify
    from calq.isolation import RuntimeCrashed
    from calq.report.sections import baseline_check_lines
    from calq.tiny_gguf import write_tiny_gguf

    path = write_tiny_gguf(tmp_path / "tiny.gguf", _topics(0, 40))
    model, tokenizer = _gguf_model(tmp_path, path.name)
    monkeypatch.setattr(gguf_check, "llama_cpp_reading", crash_while_reading)
    with pytest.raises(RuntimeCrashed, match=r"model.check: llama.cpp crashed with SIGSEGV while cross-checking "
                                             r"tiny.gguf .* fix: rebuild llama-cpp-python .*enforce: false"):
        verify(model, tokenizer, [heldout], "heldout.txt", gguf_path=path, tokens=128, max_ppl=1e9)
    result = verify(model, tokenizer, [heldout], "heldout.txt", gguf_path=path, tokens=128, max_ppl=1e9,
                    enforce=False)
    assert "llama.cpp crashed with SIGSEGV" in result["llama_cpp"]["could_not_run"]
    lines = baseline_check_lines(result)
    assert any("could not run" in line for line in lines)


def test_llama_cpp_exposes_the_gemma3_tokenizer_bug(tmp_path, heldout):
    pytest.importorskip("llama_cpp")
    from calq.evaluation.gguf_check import cross_check
    from calq.tiny_gguf import write_tiny_gguf

    path = write_tiny_gguf(tmp_path / "tiny-gemma3.gguf", _topics(0, 40), arch="gemma3")
    model, tokenizer = _gguf_model(tmp_path, path.name)  # transformers' own reading, not calq's
    with pytest.raises(CalqError, match="the tokenizer.s ids match llama.cpp.s for .* first difference at token 1"):
        cross_check(path, model, tokenizer, heldout, tokens=128)


@pytest.mark.slow
def test_the_bundled_model_passes_and_agrees_with_llama_cpp():
    from conftest import data_dir

    from calq.evaluation.trust import verify

    root = data_dir()
    if root is None:
        pytest.skip("needs the offline data folder (CALQ_DATA_DIR) for the WikiText-2 test text")
    source = models.resolve("smollm2-135m")
    model, tokenizer = models.load(source)
    assert models.bos_policy(tokenizer) is None  # the file says add_bos_token = false: the README numbers stand
    text = (root / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8").replace("\r\n", "\n")
    gguf = Path(source.location) / source.gguf_file
    result = verify(model, tokenizer, [text], "wiki.test.raw", gguf_path=gguf, tokens=512)
    assert result["passed"] and result["baseline"]["ppl"] < result["baseline"]["unigram_ppl"]
    if result["llama_cpp"] is not None:
        assert result["llama_cpp"]["tokens_equal"] and result["llama_cpp"]["top1_agreement"] >= 0.9


@pytest.mark.parametrize("shape, agrees", [
    ({"head_dim": 256}, True),  # Gemma 3 270M/1B: transformers' weights and attention pattern match llama.cpp
    ({"head_dim": 16}, False),  # query_pre_attn_scalar stays 256 (llama.cpp scales by head_dim, 27B: hidden/heads)
    ({"head_dim": 256, "rope_scaling": 8.0}, False),  # rope.scaling is not read (Gemma 3 4B and larger)
])
def test_gemma3_gguf_weights_against_llama_cpp_on_the_same_ids(tmp_path, heldout, shape, agrees):
    """transformers' own configuration of a gemma3 GGUF, which calq.gguf_reading.complete_config completes
    (tests/test_gguf_reading.py); a failure here means transformers changed: re-verify."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoModelForCausalLM

    from calq.evaluation.baseline import score
    from calq.tiny_gguf import write_tiny_gguf

    path = write_tiny_gguf(tmp_path / "g3.gguf", _topics(0, 40), arch="gemma3", layers=7, heads=2, kv_heads=1, **shape)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=129, n_batch=129, n_ubatch=129, logits_all=True, verbose=False)
    ids = llm.tokenize(heldout[:3000].encode(), add_bos=True)[:129]
    llm.eval(ids)
    theirs = torch.from_numpy(llm.scores[:128].copy()).argmax(-1)
    agreement = float((score(model, torch.tensor(ids)[None])["predictions"] == theirs).float().mean())
    assert (agreement > 0.99) == agrees, agreement


# ---- the stage in a run ------------------------------------------------------------------------------

def test_a_run_on_a_broken_baseline_stops_before_any_long_work(tiny_recipe, tiny_model, write_recipe, tmp_path):
    from typer.testing import CliRunner

    from calq.cli import app

    tiny_recipe["model"]["id"] = str(tiny_model)  # untrained: not a working language model
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", str(write_recipe(tiny_recipe)), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "model.check: the baseline is not a working language model" in result.output
    assert not (out / "ranges.safetensors").exists() and not (out / "variants").exists()

    tiny_recipe["model"]["check"] = {"enforce": False, "tokens": 256}
    tiny_recipe["variants"] = tiny_recipe["variants"][:1]
    result = CliRunner().invoke(app, ["run", str(write_recipe(tiny_recipe)), "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    check = report["baseline_check"]
    assert not check["passed"] and not check["enforced"] and check["baseline"]["tokens"] == 256
    assert "## Baseline check" in (out / "report.md").read_text()
    assert "not enforced" in (out / "report.html").read_text()


def test_the_baseline_check_is_in_the_report_of_a_working_model(tiny_recipe, write_recipe, tmp_path):
    from typer.testing import CliRunner

    from calq.cli import app

    tiny_recipe["variants"] = tiny_recipe["variants"][:1]
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", str(write_recipe(tiny_recipe)), "--out", str(out), "--dry-run"])
    assert result.exit_code == 0 and "baseline_check" in result.output
    result = CliRunner().invoke(app, ["run", str(write_recipe(tiny_recipe)), "--out", str(out)])
    assert result.exit_code == 0, result.output
    check = json.loads((out / "report.json").read_text())["baseline_check"]
    assert check["passed"] and check["baseline"]["ppl"] < check["baseline"]["unigram_ppl"]
    assert "Verdict: passed." in (out / "report.md").read_text()
