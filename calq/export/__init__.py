"""Export a variant (calibrator fused) to an edge format, and re-verify it on that format's own runtime.

`get(name)` returns the registered exporter of a format (`EXPORTERS`: onnx, gguf); see calq.export.base for the
contract and `verify`. Importing this package imports every format module (each registers itself) but none of the
optional runtime packages: those are imported when a format is used.
"""

from calq.export import gguf, onnx  # noqa: F401  (registers the formats)
from calq.export.base import EXPORTERS, Exporter, get, register, verify

__all__ = ["EXPORTERS", "Exporter", "get", "register", "verify"]
