"""Calibrators map a model's logits (and its last hidden states) to calibrated logits.

Every calibrator is a callable `calibrator(logits [B, T, V], hidden [B, T, H]) -> logits [B, T, V]`
that multiplies each position's logits by one positive scale, so the argmax and token-level accuracy never change
(a multiple-choice answer sums several tokens, so its ranking among choices can change):
- `none`:        identity
- `temperature`: logits / T, one global T fitted by NLL        (calq.calib.temperature)
- `ats`:         logits * exp(head(hidden)).clamp(max=10)        (calq.calib.ats)
`hidden` is the model's last hidden state after the final norm (`output_hidden_states=True`, last entry).
"""

CALIBRATORS = ("none", "temperature", "ats")


def identity(logits, hidden=None):
    return logits
