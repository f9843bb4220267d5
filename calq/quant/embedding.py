"""`embedding: int8`: the token embedding and the output head held as int8 in GGUF's Q8_0 layout.

Each row of the matrix is cut into blocks of 32 values along the hidden dimension; a block holds int8 values q and one
float16 scale d = float16(max |w| / 127), w ~ q * d (llama.cpp's Q8_0; symmetric, q in -127..127). The weight in the
model is replaced by q * d computed in float32, which is exact (an 8-bit integer times an 11-bit float16 mantissa), so
the PyTorch variant evaluates exactly what a GGUF Q8_0 tensor holds, and `blocks` recovers q and d from the float
weight without loss. compressed-tensors is not used: with a tied head its Embedding quantization would have to hold
one matrix for two modules. The checkpoint keeps the float32 weight on the Q8_0 grid, and the readers recognise it by
that alone (`on_grid`: a trained float matrix is never exactly on it), so no marker is needed (llm-compressor rewrites
config.json from the original model's when it saves, which would drop one).

A tied head (SmolLM2: lm_head.weight is embed_tokens.weight) is quantized once, with the embedding; an untied head is
quantized the same way on its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from calq.errors import CalqError

if TYPE_CHECKING:
    import torch

BLOCK = 32


def blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [V, H], d float16 [V, H / 32]) of a float matrix [V, H] in Q8_0's layout."""
    import torch

    rows, width = weight.shape
    grouped = weight.detach().float().reshape(rows, width // BLOCK, BLOCK)
    d = (grouped.abs().amax(-1) / 127).to(torch.float16)
    safe = torch.where(d == 0, torch.ones_like(d), d).float()
    q = torch.round(grouped / safe[..., None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(rows, width), d


def dequantize(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    rows, width = q.shape
    return (q.float().reshape(rows, -1, BLOCK) * d.float()[..., None]).reshape(rows, width)


def on_grid(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(q, d) when the float32 matrix is exactly its own Q8_0 dequantization (what `quantize_embeddings` leaves),
    else None."""
    import torch

    if weight.dtype != torch.float32 or weight.ndim != 2 or weight.shape[1] % BLOCK:
        return None
    q, d = blocks(weight)
    return (q, d) if torch.equal(dequantize(q, d), weight.detach()) else None


def matrices(model) -> dict[str, torch.Tensor]:
    """{parameter name: weight} of the input embedding and, when it is a separate matrix, the output head."""
    found = {}
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is None or any(module.weight is w for w in found.values()):
            continue
        name = next(n for n, p in model.named_parameters(remove_duplicate=False) if p is module.weight)
        found[name] = module.weight
    return found


def quantize_embeddings(model) -> list[str]:
    """Replace the embedding (and an untied head) by its Q8_0 values in place; returns their parameter names."""
    import torch

    found = matrices(model)
    for name, weight in found.items():
        if weight.dtype != torch.float32:
            raise CalqError(f"embedding: int8 needs a float32 model ({name} is {weight.dtype}): q * d is exact only "
                            "there", "embedding", "set model.dtype: float32, or embedding: float")
        if weight.shape[1] % BLOCK:
            raise CalqError(f"{name} has width {weight.shape[1]}, not a multiple of Q8_0's block of {BLOCK}",
                            "embedding", "use embedding: float for this model")
    for weight in found.values():
        with torch.no_grad():
            weight.copy_(dequantize(*blocks(weight)))
    return sorted(found)
