"""Triton kernels for the checkpoints calq saves (compressed-tensors format), and a loader that swaps them into a
transformers model. Importing the package registers the torch custom ops calq::w4a16_linear and calq::w8a8_linear.

Needs torch, triton, safetensors and transformers; never llm-compressor or compressed-tensors.
"""

from calq.kernels.modules import GroupWeightLinear, W4A16Linear, W8A8Linear, W8A16Linear, load_quantized
from calq.kernels.w4a16 import w4a16_linear, w4a16_matmul, w4a16_reference
from calq.kernels.w8a8 import quantize_activations, w8a8_linear, w8a8_matmul, w8a8_reference

__all__ = ["GroupWeightLinear", "W4A16Linear", "W8A8Linear", "W8A16Linear", "load_quantized", "quantize_activations",
           "w4a16_linear", "w4a16_matmul", "w4a16_reference", "w8a8_linear", "w8a8_matmul", "w8a8_reference"]
