import json

import pytest
import torch
from conftest import data_dir

from calq.data import DataSpec, load_texts, sample_windows, token_stream
from calq.errors import CalqError


def test_txt_jsonl_and_alpaca_json(tmp_path):
    (tmp_path / "a.txt").write_text("line one\r\nline two\r\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "first"}) + "\n" + json.dumps({"text": "second"}) + "\n")
    (tmp_path / "c.json").write_text(json.dumps([{"instruction": "Add", "input": "2+2", "output": "4"}]))
    assert load_texts(DataSpec(source=str(tmp_path / "a.txt")), "w", None).docs == ["line one\nline two\n"]
    assert load_texts(DataSpec(source=str(tmp_path / "b.jsonl")), "w", None).docs == ["first", "second"]
    doc = load_texts(DataSpec(source=str(tmp_path / "c.json")), "w", None).docs[0]
    assert "Add\n\n2+2" in doc and doc.endswith("4")


def test_alpaca_uses_the_chat_template_when_there_is_one(tmp_path):
    class Tok:
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize):
            return "|".join(f"{m['role']}:{m['content']}" for m in messages)

    (tmp_path / "c.json").write_text(json.dumps([{"instruction": "Hi", "output": "Hello"}]))
    assert load_texts(DataSpec(source=str(tmp_path / "c.json")), "w", None, Tok()).docs == ["user:Hi|assistant:Hello"]


def test_unknown_field_names_the_fields(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(CalqError, match="fields: body"):
        load_texts(DataSpec(source=str(tmp_path / "d.jsonl")), "w", None)
    assert load_texts(DataSpec(source=str(tmp_path / "d.jsonl"), text_field="body"), "w", None).docs == ["x"]


def test_hf_datasets_loading_code_on_a_local_folder(tmp_path):
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(5)))
    texts = load_texts(DataSpec(source=f"hf:{folder}", split="train"), "w", None)
    assert texts.docs == [f"doc {i}" for i in range(5)]
    streamed = load_texts(DataSpec(source=f"hf:{folder}", split="train", max_records=2), "w", None)
    assert streamed.docs == ["doc 0", "doc 1"]


def test_unreachable_hub_dataset_uses_the_fallback(monkeypatch):
    import datasets
    import huggingface_hub

    # as on a machine without network: no request leaves (the flags are read at import, so patch them too)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    spec = DataSpec(source="hf:no-such-org/no-such-dataset-calq", fallback="builtin:pydoc")
    texts = load_texts(spec, "w", None)
    assert texts.name == "builtin:pydoc" and "unavailable" in texts.note


def test_builtin_pydoc_splits_are_disjoint():
    train = load_texts(DataSpec(source="builtin:pydoc", split="train"), "w", None).docs
    test = load_texts(DataSpec(source="builtin:pydoc", split="test"), "w", None).docs
    assert len(train) > 3 * len(test) > 0
    assert not set(train) & set(test)


def test_windows_are_seeded_distinct_and_checked(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    stream = token_stream(["abcdefghij" * 10, "klmnop" * 10], tok)
    assert stream.numel() == 100 + 1 + 60 + 1  # EOS after each document
    a = sample_windows(stream, 4, 16, seed=3, where="w")
    assert torch.equal(a, sample_windows(stream, 4, 16, seed=3, where="w"))
    assert len({tuple(r.tolist()) for r in a}) == 4
    with pytest.raises(CalqError, match="at most 10 samples of 16"):
        sample_windows(stream, 11, 16, seed=0, where="w")


@pytest.mark.skipif(data_dir() is None, reason="needs CALQ_DATA_DIR (../shared/data)")
def test_shared_data_files_load():
    root = data_dir()
    wiki = load_texts(DataSpec(source="@data/wikitext2/wiki.test.raw"), "w", root)
    assert "\r" not in wiki.docs[0] and len(wiki.docs[0]) > 1_000_000
    alpaca = load_texts(DataSpec(source="@data/llamafactory/alpaca_en_demo.json"), "w", root)
    assert len(alpaca.docs) == 999
