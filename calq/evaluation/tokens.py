"""Token-level calibration of next-token prediction on held-out text: batched and streaming."""

from __future__ import annotations

import torch

from calq.calib.base import identity
from calq.metrics import CalibrationStats


@torch.no_grad()
def evaluate(model, stream: torch.Tensor, seq_len: int, batch_size: int, bins: int = 15,
             calibrators: dict | None = None, progress=None) -> dict:
    """Non-overlapping windows of `seq_len` tokens; every position but the window's first is scored.

    One forward pass per batch serves every calibrator (calq.calib.base). Memory is one batch of logits
    plus fixed-size histograms, whatever the number of tokens.
    Returns {"windows", "seq_len", "calibrators": {name: metrics + reliability bins}}.
    """
    calibrators = calibrators or {"none": identity}
    needs_hidden = any(c.needs_hidden for c in calibrators.values())
    windows = stream[: stream.numel() // seq_len * seq_len].view(-1, seq_len)
    if windows.shape[0] == 0:
        raise ValueError(f"the evaluation text has {stream.numel()} tokens, fewer than one window of {seq_len}")
    stats = {name: CalibrationStats(bins) for name in calibrators}
    device = next(model.parameters()).device  # the first layer's, when a device_map spreads the model
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start:start + batch_size].to(device)
        out = model(input_ids=batch, output_hidden_states=needs_hidden)
        logits = out.logits[:, :-1]
        hidden = out.hidden_states[-1][:, :-1] if needs_hidden else None
        for name, calibrate in calibrators.items():
            stats[name].update_from_logits(calibrate(logits, hidden), batch[:, 1:].to(logits.device))
        if progress:
            progress(min(start + batch_size, windows.shape[0]))
    return {"windows": windows.shape[0], "seq_len": seq_len,
            "calibrators": {name: {**s.summary(), "reliability": s.reliability()} for name, s in stats.items()}}
