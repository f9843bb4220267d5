"""Export a variant (calibrator fused) to an edge format, and re-verify it on that format's own runtime.

`get(name)` returns the exporter of a format (`EXPORTERS`: onnx, gguf, and plugins'), discovering them all first;
see calq.export.base for the contract and `verify`. No optional runtime package is imported until a format is used.
"""

from calq.export.base import EXPORTERS, Exporter, get, register, verify

__all__ = ["EXPORTERS", "Exporter", "get", "register", "verify"]
