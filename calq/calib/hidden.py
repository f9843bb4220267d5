"""Hidden states of the frozen model on instruction records, cached once so that fitting a calibrator costs only the
head.

The cache is one safetensors file. For every token of every record it holds the last hidden state (after the
final norm) in float16, the next-token target (-100 where the next token is not part of the response) and
whether the frozen model's argmax was that target; `offsets` marks where each record starts. Full-vocabulary
logits are never stored, nor held for more than a chunk of positions: `Logits` recomputes them from hidden states
through the model's own output layer, at most LOGITS_BUDGET values at a time (with a 262,144-token vocabulary a
batch of 4 x 512 positions alone is 2 GB of float32 logits, and fitting holds several copies of a chunk).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from calq.data import render_instruction
from calq.errors import CalqError
from calq.metrics import CalibrationStats
from calq.models import bos_policy, with_bos

LOGITS_BUDGET = 2**24  # logits values per chunk (64 MB in float32): 64 positions of a 262,144-token vocabulary


class Logits:
    """The model's output layer (lm_head, then any final logit soft-capping) applied to hidden states.

    Keeps a reference to lm_head only, so the rest of the model can be freed after caching.
    """

    def __init__(self, model):
        self.lm_head = model.get_output_embeddings()
        self.softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
        param = next(self.lm_head.parameters())
        self.device, self.dtype, self.vocab = param.device, param.dtype, param.shape[0]

    def rows(self, chunk: int) -> int:
        """Positions per chunk: at most `chunk`, and at most LOGITS_BUDGET logits values."""
        return max(1, min(chunk, LOGITS_BUDGET // self.vocab))

    @torch.no_grad()
    def argmax(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [n, H] -> the top token of each position [n], a chunk at a time."""
        step = self.rows(len(hidden))
        return torch.cat([self(hidden[i:i + step]).argmax(-1) for i in range(0, len(hidden), step)])

    @torch.no_grad()
    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] -> float32 logits [..., V]."""
        z = self.lm_head(hidden.to(self.device, self.dtype)).float()
        if self.softcap:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z


def encode(record: dict, tokenizer, max_len: int, bos: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """An Alpaca record rendered with the chat template: (input ids [T], next-token targets [T], -100 outside the
    response).

    The response is the answer text and everything after it (the end-of-turn tokens), located by its characters,
    so it works with any template that keeps the answer verbatim. `bos` (`models.bos_policy`) goes first unless the
    template already put it there.
    """
    text = render_instruction(record, tokenizer)
    answer = str(record["output"]).strip()  # templates may trim the answer
    start = text.rfind(answer)
    if start < 0:
        raise ValueError("the rendered text does not contain the answer verbatim")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=True, max_length=max_len)
    ids = with_bos(enc["input_ids"], bos)
    offsets = enc["offset_mapping"] if len(ids) == len(enc["input_ids"]) else [(0, 0), *enc["offset_mapping"]]
    ids, offsets = torch.tensor(ids[:max_len], dtype=torch.long), offsets[:max_len]
    in_response = torch.tensor([end > start for _, end in offsets])
    targets = torch.full_like(ids, -100)
    targets[:-1] = torch.where(in_response[1:], ids[1:], -100)
    return ids, targets


@torch.no_grad()
def cache_hidden(model, tokenizer, records: list[dict], path: str | Path, max_len: int = 512, batch_size: int = 4,
                 progress: Callable[[int], None] | None = None, where: str = "ats.data") -> dict:
    """Run the frozen model once over `records` and write the cache to `path`; returns a summary.

    Records whose response is cut off entirely by `max_len` are skipped.
    """
    encoded, bos = [], bos_policy(tokenizer)
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or "instruction" not in rec or "output" not in rec:
            raise CalqError(f"record {i} is not an Alpaca record (instruction, input, output)", where,
                            "give instruction data with 'instruction' and 'output' fields")
        try:
            ids, targets = encode(rec, tokenizer, max_len, bos)
        except ValueError as exc:
            raise CalqError(f"record {i}: {exc}", where,
                            "use a tokenizer whose chat template keeps the answer text") from None
        if (targets != -100).any():
            encoded.append((ids, targets))
    if not encoded:
        raise CalqError(f"none of the {len(records)} records has response tokens within {max_len} tokens", where,
                        "give records with non-empty 'output', or raise max_len")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    info = _cache(model, encoded, path, pad, batch_size, progress)
    return {"records": len(encoded), "skipped": len(records) - len(encoded), **info, "max_len": max_len}


@torch.no_grad()
def cache_windows(model, windows: torch.Tensor, path: str | Path, batch_size: int = 4,
                  progress: Callable[[int], None] | None = None) -> dict:
    """The same cache for windows of plain text [n, T]: one record per window, every next token scored (as the
    token-level evaluation scores them)."""
    encoded = []
    for ids in windows:
        targets = torch.full_like(ids, -100)
        targets[:-1] = ids[1:]
        encoded.append((ids, targets))
    return {"records": len(encoded), **_cache(model, encoded, path, 0, batch_size, progress)}


def _cache(model, encoded: list[tuple[torch.Tensor, torch.Tensor]], path: str | Path, pad: int, batch_size: int,
           progress: Callable[[int], None] | None) -> dict:
    """One forward pass over (ids, targets) sequences, right-padded in batches of similar length; writes the cache."""
    logits_fn = Logits(model)
    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))  # similar lengths share a batch
    hidden, targets, correct = [None] * len(encoded), [None] * len(encoded), [None] * len(encoded)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        width = max(len(encoded[i][0]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for b, i in enumerate(batch):
            n = len(encoded[i][0])
            ids[b, :n], mask[b, :n] = encoded[i][0], 1
        # the model's own logits at the last position only (to check the output layer): not [B, T, V]
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True,
                    use_cache=False, logits_to_keep=1)
        h = out.hidden_states[-1]
        if start == 0:
            _check_output_layer(logits_fn(h[:, -1:]), out.logits, mask[:, -1:].to(device).bool())
        for b, i in enumerate(batch):
            n = len(encoded[i][0])
            hidden[i] = h[b, :n].to(torch.float16).cpu()
            targets[i] = encoded[i][1]
            correct[i] = logits_fn.argmax(h[b, :n]).cpu() == encoded[i][1]
        if progress:
            progress(min(start + batch_size, len(order)))

    lengths = torch.tensor([len(t) for t in targets])
    tensors = {"hidden": torch.cat(hidden), "targets": torch.cat(targets), "correct": torch.cat(correct),
               "offsets": torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])}
    config = model.config.get_text_config()
    info = {"tokens": int(lengths.sum()), "response_tokens": int((tensors["targets"] != -100).sum()),
            "model_type": config.model_type, "hidden_size": config.hidden_size, "vocab_size": config.vocab_size}
    save_file(tensors, str(path), metadata={k: str(v) for k, v in info.items()})
    return info


def _check_output_layer(recomputed: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> None:
    # Calibrators are fitted on logits recomputed from hidden states: they must be the logits the model returns.
    diff = (recomputed - logits.float())[mask].abs().max()
    if diff > max(1e-3, 8 * torch.finfo(logits.dtype).eps) * logits[mask].float().abs().max() + 1e-4:
        raise CalqError(f"lm_head(last hidden state) differs from the model's logits by {float(diff):.3g}",
                        "ats", "this architecture post-processes its logits in a way calq does not reproduce; "
                               "use temperature scaling")


@dataclass
class Cached:
    """A loaded cache: flat per-token tensors, record i spanning offsets[i]:offsets[i+1]."""

    hidden: torch.Tensor  # [L, H] float16
    targets: torch.Tensor  # [L] next-token ids, -100 where not scored
    correct: torch.Tensor  # [L] bool: the frozen model's argmax == target
    offsets: torch.Tensor  # [records + 1]
    info: dict

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    def response_tokens(self, records: torch.Tensor | None = None) -> int:
        if records is None:
            return int((self.targets != -100).sum())
        return sum(int((self.targets[self.offsets[i]:self.offsets[i + 1]] != -100).sum()) for i in records.tolist())

    def batch(self, records: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded (hidden float32 [B, T, H], targets [B, T] with -100 on padding, correct [B, T])."""
        spans = [(int(self.offsets[i]), int(self.offsets[i + 1])) for i in records.tolist()]
        width = max(end - start for start, end in spans)
        hidden = torch.zeros(len(spans), width, self.hidden.shape[1])
        targets = torch.full((len(spans), width), -100, dtype=torch.long)
        correct = torch.zeros(len(spans), width, dtype=torch.bool)
        for b, (start, end) in enumerate(spans):
            hidden[b, :end - start] = self.hidden[start:end].float()
            targets[b, :end - start] = self.targets[start:end]
            correct[b, :end - start] = self.correct[start:end]
        return hidden.to(device), targets.to(device), correct.to(device)


def load_cached(path: str | Path) -> Cached:
    with safe_open(str(path), "pt") as f:
        info = f.metadata() or {}
    t = load_file(str(path))
    return Cached(t["hidden"], t["targets"], t["correct"], t["offsets"], info)


class CachedLogits:
    """Re-iterable (logits [n, V], targets [n]) over the scored positions of some cached records, a chunk at a time."""

    def __init__(self, cached: Cached, records: torch.Tensor, logits: Logits, chunk: int = 1024):
        keep = torch.cat([torch.arange(int(cached.offsets[i]), int(cached.offsets[i + 1])) for i in records.tolist()])
        self.index = keep[cached.targets[keep] != -100]
        self.cached, self.logits, self.chunk = cached, logits, logits.rows(chunk)

    def __iter__(self):
        for start in range(0, self.index.numel(), self.chunk):
            idx = self.index[start:start + self.chunk]
            yield self.logits(self.cached.hidden[idx]), self.cached.targets[idx].to(self.logits.device)


@torch.no_grad()
def evaluate_cached(cached: Cached, records: torch.Tensor, logits: Logits, calibrators: dict,
                    batch_size: int = 8, chunk: int = 1024, bins: int = 15) -> dict[str, dict]:
    """Token-level metrics and reliability bins (calq.metrics, `bins` equal-width bins) of each calibrator
    (calq.calib.base) on the scored positions of `records`."""
    stats = {name: CalibrationStats(bins) for name in calibrators}
    chunk = logits.rows(chunk)
    for start in range(0, records.numel(), batch_size):
        hidden, targets, _ = cached.batch(records[start:start + batch_size], logits.device)
        keep = targets != -100
        # Each calibrator is one scale per position: compute it on full sequences, then apply it chunk by chunk.
        scales = {name: cal.scale(hidden)[keep] for name, cal in calibrators.items()}
        h, t = hidden[keep], targets[keep]
        for i in range(0, t.numel(), chunk):
            z = logits(h[i:i + chunk])
            for name, scale in scales.items():
                stats[name].update_from_logits(z * scale[i:i + chunk, None], t[i:i + chunk])
    return {name: {**s.summary(), "reliability": s.reliability()} for name, s in stats.items()}
