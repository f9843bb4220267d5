"""Token-level calibration of next-token prediction on held-out text: batched and streaming."""

from __future__ import annotations

import torch

from calq.calib.base import identity
from calq.metrics import CalibrationStats, DivergenceStats


@torch.no_grad()
def evaluate(model, stream: torch.Tensor, seq_len: int, batch_size: int, bins: int = 15,
             calibrators: dict | None = None, progress=None, baseline=None) -> dict:
    """Non-overlapping windows of `seq_len` tokens; every position but the window's first is scored.

    One forward pass per batch serves every calibrator (calq.calib.base). `baseline`: the unquantized model, run on
    the same windows, or `model` itself (its own uncalibrated logits, no second pass); each calibrator's logits are
    then compared with the baseline's uncalibrated ones (calq.metrics.DivergenceStats). Memory is one batch of
    logits per model plus fixed-size histograms, whatever the number of tokens.
    Returns {"windows", "seq_len", "calibrators": {name: metrics + reliability bins}} and, with a baseline,
    "divergence": {name: KL(baseline || calibrated model) and the rest}.
    """
    calibrators = calibrators or {"none": identity}
    needs_hidden = any(c.needs_hidden for c in calibrators.values())
    windows = stream[: stream.numel() // seq_len * seq_len].view(-1, seq_len)
    if windows.shape[0] == 0:
        raise ValueError(f"the evaluation text has {stream.numel()} tokens, fewer than one window of {seq_len}")
    stats = {name: CalibrationStats(bins) for name in calibrators}
    divergence = {name: DivergenceStats() for name in calibrators} if baseline is not None else {}
    device = next(model.parameters()).device  # the first layer's, when a device_map spreads the model
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start:start + batch_size].to(device)
        out = model(input_ids=batch, output_hidden_states=needs_hidden)
        logits = out.logits[:, :-1]
        hidden = out.hidden_states[-1][:, :-1] if needs_hidden else None
        reference = None
        if baseline is model:
            reference = logits
        elif baseline is not None:
            reference = baseline(input_ids=batch.to(next(baseline.parameters()).device)).logits[:, :-1]
        for name, calibrate in calibrators.items():
            calibrated = calibrate(logits, hidden)
            stats[name].update_from_logits(calibrated, batch[:, 1:].to(logits.device))
            if reference is not None:
                divergence[name].update(reference, calibrated, batch[:, 1:])
        if progress:
            progress(min(start + batch_size, windows.shape[0]))
    result = {"windows": windows.shape[0], "seq_len": seq_len,
              "calibrators": {name: {**s.summary(), "reliability": s.reliability()} for name, s in stats.items()}}
    if divergence:
        result["divergence"] = {name: d.summary() for name, d in divergence.items()}
    return result
