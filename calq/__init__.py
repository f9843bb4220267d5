"""calq: quantize a causal LM and keep its probabilities calibrated.

The Python API (calq.api) is imported on first use, so `calq --help` stays fast:
`calq.run`, `calq.report`, `calq.quantize`, `calq.calibrate`, `calq.evaluate`.
"""

__version__ = "0.1.0"
__all__ = ["run", "report", "quantize", "calibrate", "evaluate", "Report"]


def __getattr__(name: str):
    if name in __all__:
        from calq import api  # lazy: it imports torch, transformers and llm-compressor

        return getattr(api, name)
    raise AttributeError(f"module 'calq' has no attribute '{name}'")
