"""Calibrators (base.py: the contract and registry; calibrators.py: all of them, fit, load, parse), the hidden-state
cache they are fitted from (hidden.py), and activation ranges for quantization (ranges.py)."""
