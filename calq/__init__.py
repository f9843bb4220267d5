"""calq: quantize a causal LM and keep its probabilities calibrated."""
__version__ = "0.1.0"
