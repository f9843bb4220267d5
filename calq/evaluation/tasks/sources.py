"""Loaders that lm-eval calls as `custom_dataset` (see the YAMLs next to this file).

lm-eval calls `loader(**task_metadata, **dataset_kwargs)`; the metadata also carries unrelated keys
(`version`, and on lm-eval's CLI the model arguments), hence the `**_`. Each loader returns
{"test": datasets.Dataset} and never touches the network.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from calq import data as data_mod
from calq.errors import CalqError

LETTERS = "ABCD"


def _path(data_dir, source: str) -> Path:
    root = data_mod.data_dir(str(data_dir) if data_dir else None)
    if root is None:
        raise CalqError("evaluation tasks read the offline data folder, and none was given", None,
                        "pass --data-dir or set CALQ_DATA_DIR (lm-eval's CLI: --metadata '{\"data_dir\": \"...\"}')")
    path = root / source
    if not path.exists():
        raise CalqError(f"data file not found: {path}", None,
                        "point the data folder at a copy of the shared data (see its README)")
    return path


def _dataset(records: list[dict]) -> dict:
    from datasets import Dataset

    return {"test": Dataset.from_list(records)}


def jsonl(data_dir=None, source: str = "", **_) -> dict:
    """One record per line, fields used as they are (e.g. query/choices/gold, context/continuation)."""
    with _path(data_dir, source).open(encoding="utf-8") as f:  # not splitlines(): texts hold U+2028
        return _dataset([json.loads(line) for line in f if line.strip()])


def _mmlu_rows(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as f:
        return [{"question": r["question"], "choices": [r[f"choice{i}"] for i in range(4)], "answer": int(r["answer"])}
                for r in csv.DictReader(f)]


def _mmlu_block(row: dict) -> str:
    return row["question"].strip() + "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, row["choices"]))


def mmlu(data_dir=None, source: str = "mmlu", shots: int = 0, subject: str | None = None, **_) -> dict:
    """All 57 subjects as one task, subjects interleaved round-robin so that a `limit` samples every subject;
    with `subject` (a test file's name without `_test.csv`), that subject alone.

    `shots` > 0 prefixes each question with the first `shots` dev examples of its own subject, in the format
    of lm-eval's `mmlu` tasks (lm-eval's samplers draw shots from the whole split, not per subject).
    """
    folder = _path(data_dir, source)
    per_subject = []
    for test_file in sorted((folder / "test").glob(f"{subject or '*'}_test.csv")):
        subject = test_file.name.removesuffix("_test.csv")
        prefix = ""
        if shots:
            dev = _mmlu_rows(_path(data_dir, f"{source}/dev/{subject}_dev.csv"))[:shots]
            prefix = "".join(f"{_mmlu_block(r)}\nAnswer: {LETTERS[r['answer']]}\n\n" for r in dev)
        per_subject.append([{**r, "subject": subject.replace("_", " "), "shots": prefix}
                            for r in _mmlu_rows(test_file)])
    longest = max((len(rows) for rows in per_subject), default=0)
    return _dataset([rows[i] for i in range(longest) for rows in per_subject if i < len(rows)])


def truthfulqa(data_dir=None, source: str = "truthfulqa/mc_task.json", targets: str = "mc1_targets", **_) -> dict:
    """TruthfulQA multiple choice: `targets` is mc1_targets (one true answer) or mc2_targets (several)."""
    records = json.loads(_path(data_dir, source).read_text(encoding="utf-8"))
    return _dataset([{"question": r["question"], "choices": list(r[targets]), "labels": list(r[targets].values())}
                     for r in records])


def mc2_score(doc: dict, results: list[tuple[float, bool]]) -> dict:
    """TruthfulQA MC2: the normalized probability mass on the true answers (as lm-eval's truthfulqa_mc2)."""
    ll = np.array([r[0] for r in results])
    probs = np.exp(ll - ll.max())
    return {"acc": float(probs[np.array(doc["labels"]) == 1].sum() / probs.sum())}
