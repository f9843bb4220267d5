"""Calibration wall time per quantization method on a random-weight Llama-shaped model (issue 4's GPU table).

    python benchmarks/bench_calibration.py                       # ~1.1B (TinyLlama shape), 128 x 512 samples, GPU
    python benchmarks/bench_calibration.py --size tiny --samples 16 --seq-len 64     # a check that runs on a CPU

Every method goes through calq's own registry (calq.quant.methods), the code path `calq run` takes, on a fresh copy
of the same random model (loaded from one saved folder, so each starts from identical weights), with the same
random-token calibration samples. The model is loaded on the CPU, as `calq run` does; llm-compressor's sequential
pipeline moves one layer at a time to the GPU, and AutoAWQ moves its layers itself. Random weights are fine for
timing: the work is the same whatever the values. Prints a markdown table; wall time is perf_counter around the
method call, after a synchronize.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

os.environ.setdefault("TQDM_DISABLE", "1")  # the libraries' bars; the table goes to stdout

SIZES = {  # Llama-shaped configs; "1b" is TinyLlama-1.1B's shape
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
    "tiny": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024),
}
VARIANTS = {
    "minmax-w4a16-g128": dict(method="minmax", scheme="w4a16", group_size=128),
    "minmax-w8a8": dict(method="minmax", scheme="w8a8"),
    "smoothquant-w8a8": dict(method="smoothquant", scheme="w8a8"),
    "awq-w4a16-g128": dict(method="awq", scheme="w4a16", group_size=128),
    "autoawq-w4a16-g128": dict(method="autoawq", scheme="w4a16", group_size=128),
}


def save_random_model(size: str, dtype: torch.dtype, folder: Path) -> int:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(**SIZES[size], max_position_embeddings=4096, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(folder)
    save_tokenizer(folder)
    return sum(p.numel() for p in model.parameters())


def save_tokenizer(folder: Path) -> None:
    """llm-compressor wants a processor beside the model even for pre-tokenized samples; any tokenizer does."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)


def time_method(folder: Path, dtype: torch.dtype, samples: torch.Tensor, name: str) -> float | str:
    from transformers import AutoModelForCausalLM

    from calq.quant import llmc, methods

    spec = methods.config(VARIANTS[name])
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    llmc.quiet_logs(None)
    try:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        spec.apply(model, samples)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - start
    except methods.MethodUnavailable as err:
        return f"skipped: {err.what}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="1b")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                        help="default: bfloat16 with a GPU, float32 without")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from: {', '.join(VARIANTS)}")
    args = parser.parse_args()
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {', '.join(sorted(unknown))}; choose from {', '.join(VARIANTS)}")
    dtype = getattr(torch, args.dtype or ("bfloat16" if torch.cuda.is_available() else "float32"))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    samples = torch.randint(0, SIZES[args.size]["vocab_size"], (args.samples, args.seq_len),
                            generator=torch.Generator().manual_seed(0))

    with tempfile.TemporaryDirectory() as tmp:
        params = save_random_model(args.size, dtype, Path(tmp))
        print(f"{date.today()}, {device}, {platform.machine()}, torch {torch.__version__}; random Llama "
              f"'{args.size}' ({params / 1e6:,.0f} M parameters, {dtype}); {args.samples} x {args.seq_len} samples")
        print("\n| variant | calibration wall (s) |\n|---|---:|")
        for name in args.variants.split(","):
            seconds = time_method(Path(tmp), dtype, samples, name)
            print(f"| {name} | {seconds if isinstance(seconds, str) else f'{seconds:.1f}'} |", flush=True)


if __name__ == "__main__":
    main()
