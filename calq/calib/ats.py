"""Adaptive Temperature Scaling (ATS, arXiv 2409.19817): a small head predicts one positive scale per position.

`AtsHead` is one causal decoder layer of the model's own architecture (transformers' own layer class and rotary
embedding, built from the model's config) followed by `Linear(hidden, 1)`. It maps the model's last hidden states
`h` (after the final norm) to `s`, and calibrated logits are `logits * exp(s).clamp(max=10)`: one positive scale per
position, so the argmax never changes. The final Linear starts at zero, so a fresh head is exactly the identity.

Fitting runs on cached hidden states (calq.calib.hidden), so the frozen model runs once per fit set. The loss is
the paper's selective smoothing: cross-entropy where the frozen model's argmax is the next token, and cross-entropy
against a smoothed target where it is not (uniform over the vocabulary as in the paper, or over the model's top-k
tokens), weighted 1 - alpha and alpha. The default target on wrong positions is the next token itself (smoothing
'none', so the loss is cross-entropy with the two groups balanced): on SmolLM2-135M with Alpaca data both smoothed
targets made calibration worse than a global temperature (uniform drives confidence down without end, top-k
pushed it up). The head starts at the fitted global temperature, trains with a small learning rate, and early-stops
on a validation split; the identity is a candidate too, so the returned head is never worse than no head on the
validation metric. `calq.calib.select` then picks among the fitted calibrators.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from calq.calib.base import Calibrator, FitData, identity, register
from calq.calib.hidden import Cached, Logits, evaluate_cached
from calq.calib.registry import AtsConfig
from calq.calib.temperature import Temperature, global_temperature
from calq.errors import CalqError

MAX_SCALE = 10.0
HEAD_FILE, CONFIG_FILE = "head.safetensors", "config.json"


def _layer_classes(config):
    """transformers' decoder layer and rotary embedding classes for this architecture (LlamaDecoderLayer, ...)."""
    from transformers import AutoModelForCausalLM

    try:
        model_cls = AutoModelForCausalLM._model_mapping[type(config)]
        module, prefix = sys.modules[model_cls.__module__], model_cls.__name__.removesuffix("ForCausalLM")
        return getattr(module, f"{prefix}DecoderLayer"), getattr(module, f"{prefix}RotaryEmbedding")
    except (KeyError, AttributeError):
        raise CalqError(f"ATS cannot build a decoder layer for model type '{config.model_type}'", "ats",
                        "use a Llama-, Qwen-, Mistral- or Gemma-style model, or the temperature calibrator") from None


@register
class AtsHead(nn.Module, Calibrator):
    """One causal decoder layer shaped like the model's + Linear(hidden, 1). Calling it is the calibrator:
    `head(logits, hidden, attention_mask=None) -> logits * exp(s).clamp(max=10)`.
    """

    name = "ats"
    version = 2  # 2: warm-started from the temperature's Newton fit
    fuse = "ats"  # exporters run the head (an nn.Module) in the graph
    Config = AtsConfig

    def __init__(self, model_config):
        super().__init__()
        config = copy.deepcopy(model_config.get_text_config())
        config._attn_implementation = "sdpa"  # the head passes its own boolean mask
        layer_cls, rope_cls = _layer_classes(config)
        self.model_type, self.hidden_size, self.vocab_size = config.model_type, config.hidden_size, config.vocab_size
        self.layer = layer_cls(config, layer_idx=0)
        self.rotary = rope_cls(config=config)
        # Gemma 3 keeps one rotary table per attention type and takes the layer's type in forward.
        layer_types = getattr(config, "layer_types", None)
        takes_type = "layer_type" in inspect.signature(self.rotary.forward).parameters
        self.rope_args = (layer_types[0],) if takes_type and layer_types else ()
        self.out = nn.Linear(config.hidden_size, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def log_scale(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [B, T, H] -> s [B, T] (float32). attention_mask [B, T]: 1 on real tokens (padding on either side)."""
        batch, width, _ = hidden.shape
        x = hidden.to(self.out.weight.dtype)
        positions = torch.arange(width, device=x.device)[None].expand(batch, width)
        mask = torch.ones(width, width, dtype=torch.bool, device=x.device).tril()[None, None]
        if attention_mask is not None:
            # Every position also sees itself, so a padding row is never fully masked (which would give NaN).
            mask = mask & attention_mask.bool()[:, None, None, :] | torch.eye(width, dtype=torch.bool, device=x.device)
        rope = self.rotary(x, positions, *self.rope_args)
        x = self.layer(x, attention_mask=mask, position_ids=positions, position_embeddings=rope)
        x = x[0] if isinstance(x, tuple) else x
        return self.out(x)[..., 0]

    def scale(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.log_scale(hidden, attention_mask).exp().clamp(max=MAX_SCALE)

    def forward(self, logits: torch.Tensor, hidden: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return Calibrator.__call__(self, logits, hidden, attention_mask)

    @classmethod
    def fit(cls, data: FitData, config: AtsConfig | None = None) -> AtsHead:
        return fit(data, config or AtsConfig())

    def save(self, folder: str | Path) -> None:
        save_head(self, folder)

    @classmethod
    def load(cls, folder: str | Path, model_config) -> AtsHead:
        return load_head(folder, model_config)


# ---- loss ------------------------------------------------------------------------------------------

def _weights(correct: torch.Tensor, cfg: AtsConfig) -> torch.Tensor:
    """Per-position weights: 1 - alpha on right positions, alpha on wrong ones, normalized per group or overall."""
    right, wrong = (1 - cfg.alpha), cfg.alpha
    if cfg.reweight:
        right, wrong = right / max(int(correct.sum()), 1), wrong / max(int((~correct).sum()), 1)
    else:
        right, wrong = right / correct.numel(), wrong / correct.numel()
    return torch.where(correct, right, wrong)


def _terms(logits: torch.Tensor, scale: torch.Tensor, targets: torch.Tensor, correct: torch.Tensor,
           cfg: AtsConfig) -> torch.Tensor:
    """Per-position loss: cross-entropy of the scaled logits on right positions, cross-entropy against the smoothed
    target on wrong ones."""
    u = logits * scale[:, None]
    lse = torch.logsumexp(u, dim=-1)
    nll = lse - u.gather(-1, targets[:, None])[:, 0]
    if cfg.smoothing == "none":
        return nll
    # -sum_v q_v log p_v for q uniform over a set of tokens = logsumexp(u) - mean of u over that set
    smooth_set = u if cfg.smoothing == "uniform" else u.topk(cfg.top_k, dim=-1).values
    return torch.where(correct, nll, lse - smooth_set.mean(-1))


def selective_smoothing_loss(logits: torch.Tensor, scale: torch.Tensor, targets: torch.Tensor, cfg: AtsConfig,
                             correct: torch.Tensor | None = None) -> torch.Tensor:
    """The ATS loss on frozen logits [n, V], positive scales [n] and next tokens [n].

    `correct` (the frozen model's argmax == target) defaults to the argmax of `logits`.
    """
    if correct is None:
        correct = logits.argmax(-1) == targets
    return (_weights(correct, cfg) * _terms(logits, scale, targets, correct, cfg)).sum()


# ---- fit -------------------------------------------------------------------------------------------

def _step(head: AtsHead, opt, cached: Cached, records: torch.Tensor, logits: Logits, cfg: AtsConfig,
          chunk: int) -> float:
    hidden, targets, correct = cached.batch(records, logits.device)
    keep = targets != -100
    opt.zero_grad()
    s = head.log_scale(hidden)[keep]
    # Backpropagate the vocabulary-sized part chunk by chunk into a detached copy of s, then through the head once.
    s_leaf = s.detach().requires_grad_()
    h, t, c = hidden[keep], targets[keep], correct[keep]
    w = _weights(c, cfg)
    total, chunk = 0.0, logits.rows(chunk)
    for i in range(0, t.numel(), chunk):
        part = slice(i, i + chunk)
        scale = s_leaf[part].exp().clamp(max=MAX_SCALE)
        loss = (w[part] * _terms(logits(h[part]), scale, t[part], c[part], cfg)).sum()
        loss.backward()
        total += loss.item()
    s.backward(s_leaf.grad)
    nn.utils.clip_grad_norm_(head.parameters(), 1.0)
    opt.step()
    return total


def _short(summary: dict) -> dict:
    return {k: round(summary[k], 5) for k in ("nll", "ece", "adaptive_ece", "brier", "accuracy", "confidence")}


def fit(data: FitData, cfg: AtsConfig) -> AtsHead:
    """Fit the ATS head on `data.train`, early-stopped on `data.val`; the identity and the warm start are
    candidates too, so the head returned is never worse than no head on validation. `head.fit_info` keeps
    sizes, seed and the per-epoch validation metrics."""
    started = time.perf_counter()
    cached, logits, train, val = data.cached, data.logits, data.train, data.val
    tokens = cached.response_tokens()
    if len(cached) < 2 or tokens < cfg.min_response_tokens:
        raise CalqError(f"the ATS fit data has {len(cached)} records with {tokens} response tokens, fewer than "
                        f"2 records and min_response_tokens={cfg.min_response_tokens}", "calibrators.data",
                        "give more instruction records (a few hundred), or lower calibrators.ats.min_response_tokens")
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.randperm(len(cached), generator=gen)  # the record order continues after the draw of the validation split

    temperature = global_temperature(data)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        head = AtsHead(data.model_config).to(logits.device).eval()
    identity_state = copy.deepcopy(head.state_dict())
    if cfg.init_from_temperature:
        with torch.no_grad():
            head.out.bias.fill_(-math.log(temperature))
    by = cfg.early_stop_by
    base = evaluate_cached(cached, val, logits,
                           {"none": identity, "temperature": Temperature(temperature), "ats": head},
                           cfg.batch_size, data.chunk)
    best_epoch, best_state, best = None, identity_state, base["none"]
    if base["ats"][by] < best[by]:
        best_epoch, best_state, best = 0, copy.deepcopy(head.state_dict()), base["ats"]
    history = [{"epoch": 0, **_short(base["ats"])}]
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    for epoch in range(1, cfg.epochs + 1):
        head.train()
        perm = train[torch.randperm(train.numel(), generator=gen)]
        losses = [_step(head, opt, cached, perm[i:i + cfg.batch_size], logits, cfg, data.chunk)
                  for i in range(0, perm.numel(), cfg.batch_size)]
        head.eval()
        summary = evaluate_cached(cached, val, logits, {"ats": head}, cfg.batch_size, data.chunk)["ats"]
        history.append({"epoch": epoch, "train_loss": round(sum(losses) / len(losses), 5), **_short(summary)})
        if data.progress:
            data.progress("fit ATS head", epoch, cfg.epochs)
        if summary[by] < best[by]:
            best_epoch, best_state, best = epoch, copy.deepcopy(head.state_dict()), summary
        elif epoch - (best_epoch or 0) >= cfg.patience:
            break
    head.load_state_dict(best_state)
    head.eval().requires_grad_(False)
    head.fit_info = {"train_records": train.numel(), "val_records": val.numel(),
                     "train_tokens": cached.response_tokens(train), "val_tokens": cached.response_tokens(val),
                     "seed": cfg.seed, "start_temperature": temperature, "best_epoch": best_epoch, "history": history,
                     "settings": cfg.model_dump(), "seconds": round(time.perf_counter() - started, 1)}
    return head


# ---- save / load -----------------------------------------------------------------------------------

def save_head(head: AtsHead, folder: str | Path) -> Path:
    """`folder`/head.safetensors + config.json (sizes and model type it fits, how it was fitted)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}, str(folder / HEAD_FILE))
    meta = {"model_type": head.model_type, "hidden_size": head.hidden_size, "vocab_size": head.vocab_size,
            "fit": head.fit_info}
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    return folder


def load_head(folder: str | Path, model_config, where: str = "calibrator") -> AtsHead:
    """The head saved in `folder`, checked against the model it will calibrate."""
    folder = Path(folder)
    if not (folder / HEAD_FILE).is_file() or not (folder / CONFIG_FILE).is_file():
        raise CalqError(f"no ATS head in {folder} (needs {HEAD_FILE} and {CONFIG_FILE})", where, "fit the head first")
    try:
        meta = json.loads((folder / CONFIG_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise CalqError(f"malformed {folder / CONFIG_FILE} ({exc.msg})", where, "fit the head again") from None
    config = model_config.get_text_config()
    for key in ("model_type", "hidden_size", "vocab_size"):
        if meta.get(key) != getattr(config, key):
            raise CalqError(f"the ATS head in {folder} was fitted for {key}={meta.get(key)}, but this model has "
                            f"{key}={getattr(config, key)}", where, "fit the head on this model's hidden states")
    head = AtsHead(model_config)
    try:
        head.load_state_dict(load_file(str(folder / HEAD_FILE)))
    except RuntimeError as exc:
        raise CalqError(f"the ATS head in {folder} does not match this model's layer shapes "
                        f"({str(exc).splitlines()[-1].strip()})",
                        where, "fit the head on this model's hidden states") from None
    head.fit_info = meta.get("fit") or {}
    return head.eval().requires_grad_(False)  # for inference; fit() trains a head of its own
