"""`embedding: int8 | int4`: the token embedding and the output head held in GGUF's Q8_0 or Q4_0 layout.

Each row of the matrix is cut into blocks of 32 values along the hidden dimension; a block holds integers q and one
float16 scale d, w ~ q * d. Q8_0 (int8): d = float16(max |w| / 127), q in -127..127. Q4_0 (int4): d = float16(m / -8)
with m the block's value of largest magnitude (sign kept, as llama.cpp does, so that value lands on -8 and the
range -8..7 is used whole), q in -8..7. The weight in the model is replaced by q * d computed in float32, which is
exact (an 8-bit integer times an 11-bit float16 mantissa), so the PyTorch variant evaluates exactly what a GGUF
tensor holds, and `blocks` recovers q and d from the float weight without loss. compressed-tensors is not used: with
a tied head its Embedding quantization would have to hold one matrix for two modules. The checkpoint keeps the
float32 weight on the grid, and the readers recognise it by that alone (`on_grid`: a trained float matrix is never
exactly on either grid, and a matrix on one grid is not on the other), so no marker is needed (llm-compressor
rewrites config.json from the original model's when it saves, which would drop one).

A tied head (SmolLM2: lm_head.weight is embed_tokens.weight) is quantized once, with the embedding; an untied head is
quantized the same way on its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from calq.errors import CalqError

if TYPE_CHECKING:
    import torch

BLOCK = 32
BITS = {"int8": 8, "int4": 4}  # the recipe's `embedding` value -> bits per value
GGUF_TYPE = {8: "Q8_0", 4: "Q4_0"}


def blocks(weight: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [V, H], d float16 [V, H / 32]) of a float matrix [V, H] in Q8_0's (bits 8) or Q4_0's (bits 4) layout."""
    import torch

    rows, width = weight.shape
    grouped = weight.detach().float().reshape(rows, width // BLOCK, BLOCK)
    if bits == 8:
        d, low, high = (grouped.abs().amax(-1) / 127).to(torch.float16), -127, 127
    else:
        extreme = grouped.gather(-1, grouped.abs().argmax(-1, keepdim=True))[..., 0]
        d, low, high = (extreme / -8).to(torch.float16), -8, 7
    safe = torch.where(d == 0, torch.ones_like(d), d).float()
    q = torch.round(grouped / safe[..., None]).clamp(low, high).to(torch.int8)
    return q.reshape(rows, width), d


def dequantize(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    rows, width = q.shape
    return (q.float().reshape(rows, -1, BLOCK) * d.float()[..., None]).reshape(rows, width)


def on_grid(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """(q, d, bits) when the float32 matrix is exactly its own Q4_0 or Q8_0 dequantization (what `quantize_embeddings`
    leaves), else None."""
    import torch

    if weight.dtype != torch.float32 or weight.ndim != 2 or weight.shape[1] % BLOCK:
        return None
    for bits in (4, 8):
        q, d = blocks(weight, bits)
        if torch.equal(dequantize(q, d), weight.detach()):
            return q, d, bits
    return None


def matrices(model) -> dict[str, torch.Tensor]:
    """{parameter name: weight} of the input embedding and, when it is a separate matrix, the output head."""
    found = {}
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is None or any(module.weight is w for w in found.values()):
            continue
        name = next(n for n, p in model.named_parameters(remove_duplicate=False) if p is module.weight)
        found[name] = module.weight
    return found


def quantize_embeddings(model, bits: int = 8) -> list[str]:
    """Replace the embedding (and an untied head) by its Q8_0 (bits 8) or Q4_0 (bits 4) values in place; returns
    their parameter names."""
    import torch

    setting = f"embedding: int{bits}"
    found = matrices(model)
    for name, weight in found.items():
        if weight.dtype != torch.float32:
            raise CalqError(f"{setting} needs a float32 model ({name} is {weight.dtype}): q * d is exact only there",
                            "embedding", "set model.dtype: float32, or embedding: float")
        if weight.shape[1] % BLOCK:
            raise CalqError(f"{name} has width {weight.shape[1]}, not a multiple of {GGUF_TYPE[bits]}'s block of "
                            f"{BLOCK}", "embedding", "use embedding: float for this model")
    for weight in found.values():
        with torch.no_grad():
            weight.copy_(dequantize(*blocks(weight, bits)))
    return sorted(found)
