"""Token-level calibration of next-token prediction on held-out text: batched and streaming."""

from __future__ import annotations

import torch

from calq.evaluate.metrics import CalibrationStats


@torch.no_grad()
def evaluate(model, stream: torch.Tensor, seq_len: int, batch_size: int, bins: int = 15, progress=None) -> dict:
    """Non-overlapping windows of `seq_len` tokens; every position but the window's first is scored.

    Memory is one batch of logits plus fixed-size histograms, whatever the number of tokens.
    """
    windows = stream[: stream.numel() // seq_len * seq_len].view(-1, seq_len)
    if windows.shape[0] == 0:
        raise ValueError(f"the evaluation text has {stream.numel()} tokens, fewer than one window of {seq_len}")
    stats = CalibrationStats(bins)
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start:start + batch_size]
        logits = model(input_ids=batch).logits
        stats.update_from_logits(logits[:, :-1], batch[:, 1:])
        if progress:
            progress(min(start + batch_size, windows.shape[0]))
    return {**stats.summary(), "windows": windows.shape[0], "seq_len": seq_len, "reliability": stats.reliability()}
