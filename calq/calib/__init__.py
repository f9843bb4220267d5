"""Calibrators (base.py: the token-level contract; answer_base.py: the answer-level one; registry.py: their two
registries and the calibrators' settings, without torch; calibrators.py: all of them, fit, load, parse), the
hidden-state cache they are fitted from (hidden.py), and activation ranges for quantization (ranges.py)."""
