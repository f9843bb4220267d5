"""Text sources: local .txt/.jsonl/.json files, Hugging Face datasets, and offline prose shipped with Python.

Every source becomes a list of documents (strings). Alpaca-style records (instruction/input/output)
are rendered with the tokenizer's chat template when it has one.
"""

from __future__ import annotations

import itertools
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from calq.errors import CalqError
from calq.models import bos_policy
from calq.runs import content_sha256

if TYPE_CHECKING:
    import torch

DATA_PREFIX = "@data/"


class DataSpec(BaseModel):
    """Where text comes from. `source` takes one of:
    a local file (`.txt`, `.jsonl`, `.json`; `@data/…` is relative to --data-dir),
    `hf:DATASET_ID` (Hugging Face datasets; needs network), or `builtin:pydoc` (offline prose shipped with Python).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(min_length=1, description="local file, '@data/<path under --data-dir>', 'hf:<dataset id>' or "
                                                  "'builtin:pydoc'")
    split: str | None = Field(
        None, description="dataset split for hf: sources (default 'train'); 'train'/'test' halves for builtin:pydoc")
    subset: str | None = Field(None, description="dataset config name for hf: sources (e.g. 'wikitext-2-raw-v1')")
    text_field: str | None = Field(
        None, description="record field holding the text (default: 'text'; Alpaca records with "
                          "'instruction'/'output' are detected)")
    fallback: str | None = Field(
        None, description="source used instead when `source` is unavailable offline (e.g. 'builtin:pydoc'); "
                          "the report names the one used")
    max_records: int | None = Field(None, gt=0, description="read at most this many records")


class SourceUnavailable(CalqError):
    """The source cannot be read here (no network, no data folder); a recipe `fallback` may stand in."""


@dataclass
class Texts:
    name: str  # the source actually read, for reports
    docs: list[str]
    note: str | None = None  # e.g. why a fallback was used


def data_dir(cli_value: str | None = None) -> Path | None:
    value = cli_value or os.environ.get("CALQ_DATA_DIR")
    return Path(value).expanduser() if value else None


def load_texts(spec: DataSpec, where: str, data_root: Path | None, tokenizer=None) -> Texts:
    """Documents (strings) from the source; records become text (Alpaca records through the chat template)."""
    name, records, note = load_records(spec, where, data_root)
    docs = [d for d in _records_to_docs(records, spec, where, tokenizer) if d.strip()]
    if not docs:
        raise CalqError(f"no text in {name}", where, "point the source at a file or dataset that holds text")
    return Texts(name, docs, note)


def load_records(spec: DataSpec, where: str, data_root: Path | None) -> tuple[str, list, str | None]:
    """(source actually read, records: strings or dicts, note on a fallback used); `max_records` applied."""
    try:
        name, records = _load(spec.source, spec, where, data_root)
        note = None
    except SourceUnavailable as exc:
        if not spec.fallback:
            raise
        name, records = _load(spec.fallback, spec, f"{where}.fallback", data_root)
        note = f"{spec.source} unavailable ({exc.what}); used fallback {name}"
    if not records:
        raise CalqError(f"no records in {name}", where, "point the source at a file or dataset that holds data")
    return name, records, note


def _load(source: str, spec: DataSpec, where: str, data_root: Path | None) -> tuple[str, list]:
    if source.startswith("builtin:"):
        records = _builtin(source, spec.split, where)
    elif source.startswith("hf:"):
        records = list(_hf_records(source[3:], spec, where))
    else:
        path = _local_path(source, where, data_root)
        records, source = _read_file(path, where), str(path)
    return source, records[: spec.max_records] if spec.max_records else records


def _local_path(source: str, where: str, data_root: Path | None) -> Path:
    if source.startswith(DATA_PREFIX):
        if data_root is None:
            raise SourceUnavailable(f"{source} needs a data folder", where, "pass --data-dir or set CALQ_DATA_DIR")
        path = data_root / source[len(DATA_PREFIX):]
        if not path.is_file():
            raise SourceUnavailable(f"{path} does not exist", where, "check --data-dir / CALQ_DATA_DIR and the path")
        return path
    path = Path(source).expanduser()
    if not path.is_file():
        raise CalqError(f"data file not found: {path}", where, "give an existing .txt, .jsonl or .json file")
    return path


def _read_file(path: Path, where: str) -> list:
    suffix = path.suffix.lower()
    if suffix in (".txt", ".raw", ""):
        return [path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")]
    try:
        if suffix == ".jsonl":
            return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if suffix == ".json":
            records = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(records, dict):
                records = next((v for v in records.values() if isinstance(v, list)), [records])
            return records
    except json.JSONDecodeError as exc:
        raise CalqError(f"malformed JSON in {path} (line {exc.lineno}: {exc.msg})", where, "fix the file") from None
    raise CalqError(f"unsupported file type '{suffix}'", where, "use .txt, .jsonl or .json")


def _hf_records(dataset_id: str, spec: DataSpec, where: str):
    import datasets

    try:
        if spec.max_records:  # stream: read only the records needed, not the whole split
            ds = datasets.load_dataset(dataset_id, spec.subset, split=spec.split or "train", streaming=True)
            return list(itertools.islice(ds, spec.max_records))
        return datasets.load_dataset(dataset_id, spec.subset, split=spec.split or "train")
    except Exception as exc:  # offline, unknown id, missing split: all mean "not readable here"
        raise SourceUnavailable(f"cannot load dataset '{dataset_id}' "
                                f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]})",
                                where, "check the id, subset and split, or give a local file") from None


def _records_to_docs(records, spec: DataSpec, where: str, tokenizer) -> list[str]:
    docs = []
    for i, rec in enumerate(records):
        if isinstance(rec, str):
            docs.append(rec)
            continue
        if spec.text_field:
            if spec.text_field not in rec:
                raise CalqError(f"record {i} has no field '{spec.text_field}' (fields: {', '.join(rec)})", where,
                                "set text_field to one of those fields")
            docs.append(str(rec[spec.text_field]))
        elif "text" in rec:
            docs.append(str(rec["text"]))
        elif "instruction" in rec and "output" in rec:
            docs.append(render_instruction(rec, tokenizer))
        else:
            raise CalqError(f"record {i} has no 'text' field and is not an Alpaca record (fields: {', '.join(rec)})",
                            where,
                            "set text_field to the field holding the text")
    return docs


def render_instruction(rec: dict, tokenizer) -> str:
    prompt = rec["instruction"] + (f"\n\n{rec['input']}" if rec.get("input") else "")
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": rec["output"]}]
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return f"### Instruction:\n{prompt}\n\n### Response:\n{rec['output']}"


def _builtin(source: str, split: str | None, where: str) -> list[str]:
    if source != "builtin:pydoc":
        raise CalqError(f"unknown builtin source '{source}'", where, "use 'builtin:pydoc'")
    from pydoc_data.topics import topics

    docs = sorted(set(topics.values()))  # some topics share one text
    # Every fifth text is held out, so 'train' and 'test' never share text.
    if split in (None, "train"):
        return [d for i, d in enumerate(docs) if i % 5 != 0]
    if split == "test":
        return [d for i, d in enumerate(docs) if i % 5 == 0]
    raise CalqError(f"builtin:pydoc has splits 'train' and 'test', not '{split}'", where,
                    "set split: train or split: test")


def token_stream(docs: list[str], tokenizer, max_tokens: int | None = None, piece_chars: int = 200_000) -> torch.Tensor:
    """Documents tokenized and joined with EOS (then BOS, when the tokenizer starts every text with it), in order,
    stopping once `max_tokens` are gathered. Windows cut from the stream get their own BOS (`windows`)."""
    import torch

    bos = bos_policy(tokenizer)
    separator = [t for t in (tokenizer.eos_token_id, bos) if t is not None]
    ids: list[int] = []
    for doc in docs:
        for start in range(0, len(doc), piece_chars):
            ids.extend(tokenizer(doc[start:start + piece_chars], add_special_tokens=False)["input_ids"])
            if max_tokens and len(ids) >= max_tokens:
                return torch.tensor(ids[:max_tokens], dtype=torch.long)
        ids.extend(separator)
    return torch.tensor(ids[:max_tokens] if max_tokens else ids, dtype=torch.long)


def windows(stream: torch.Tensor, seq_len: int, bos: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows of `seq_len` tokens [n, seq_len]. With a BOS id (`models.bos_policy`),
    every window is BOS followed by the next seq_len - 1 tokens of the stream, as the model saw text in training."""
    import torch

    step = seq_len - (bos is not None)
    n = stream.numel() // step
    body = stream[: n * step].view(n, step)
    if bos is None:
        return body
    return torch.cat([torch.full((n, 1), bos, dtype=stream.dtype), body], dim=1)


def sample_windows(stream: torch.Tensor, num_samples: int, seq_len: int, seed: int, where: str,
                   bos: int | None = None) -> torch.Tensor:
    """`num_samples` distinct non-overlapping windows of `seq_len` tokens (BOS first when `bos` is given),
    chosen with `seed`: [num_samples, seq_len]."""
    all_windows = windows(stream, seq_len, bos)
    available = all_windows.shape[0]
    if available < num_samples:
        raise CalqError(
            f"the data has {stream.numel():,} tokens, fewer than num_samples × seq_len = "
            f"{num_samples} × {seq_len} = {num_samples * seq_len:,}",
            where, f"use a larger source, or lower num_samples/seq_len (at most {available} samples of {seq_len})")
    return all_windows[chosen_windows(available, num_samples, seed)].clone()


def chosen_windows(available: int, num_samples: int, seed: int) -> list[int]:
    """Which of `available` windows `sample_windows` takes with `seed` (sorted indices)."""
    return sorted(random.Random(seed).sample(range(available), num_samples))


def free_windows(stream: torch.Tensor, seq_len: int, taken: list[int], count: int, seed: int,
                 bos: int | None = None) -> torch.Tensor:
    """Up to `count` windows of `stream` (the `windows` grid, BOS first when given) other than the indices `taken`,
    chosen with `seed` and kept in stream order: text beside the windows another stage took, never overlapping
    them. [n, seq_len]; n is 0 when every window is taken."""
    all_windows = windows(stream, seq_len, bos)
    free = sorted(set(range(all_windows.shape[0])) - set(taken))
    chosen = sorted(random.Random(seed).sample(free, min(count, len(free))))
    return all_windows[chosen].clone()


def fingerprint(spec: DataSpec, data_root: Path | None) -> dict:
    """What identifies the data for resume keys: the spec's settings, and for its source and fallback the sha256 of a
    local file (None when it is missing: the fallback is read), or the name of any other source. Never a path or a
    time, so the same data copied to another place, or touched, keeps its keys."""
    sources = {}
    for field in ("source", "fallback"):
        source = getattr(spec, field)
        if not source or source.startswith(("builtin:", "hf:")):
            sources[field] = source
            continue
        if source.startswith(DATA_PREFIX):
            path = data_root / source[len(DATA_PREFIX):] if data_root else None
        else:
            path = Path(source).expanduser()
        sources[field] = content_sha256(path) if path is not None and path.is_file() else None
    return {**spec.model_dump(exclude={"source", "fallback"}), **sources}


def check_available(spec: DataSpec, where: str, data_root: Path | None) -> None:
    """Fail fast (before any model loads) on a local file that is missing and has no fallback."""
    for i, source in enumerate((spec.source, spec.fallback)):
        if not source or source.startswith("hf:"):
            continue
        try:
            if source.startswith("builtin:"):
                _builtin(source, spec.split, where)
            else:
                _local_path(source, where, data_root)
            return
        except SourceUnavailable:
            if i == 0 and spec.fallback:
                continue
            raise
