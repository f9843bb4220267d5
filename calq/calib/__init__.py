"""Calibrators (base.py: the contract; registry.py: the registry and the calibrators' settings, without torch;
calibrators.py: all of them, fit, load, parse), the hidden-state cache they are fitted from (hidden.py), and
activation ranges for quantization (ranges.py)."""
