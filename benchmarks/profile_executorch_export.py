"""Where the ExecuTorch export's time goes: cProfile of calq's exporter on a tiny random asymmetric W4A16 g32 Llama.

    PYTHONPATH=. python benchmarks/profile_executorch_export.py --layers 2 --out /tmp/profile-executorch

Prints the cumulative seconds of the export's phases (torch.export, the edge program, XNNPACK's partition and its
per-delegate preprocessing, to_executorch) and the number of XNNPACK delegates; on one thread.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

PHASES = ["torch/export/__init__.py:export", "exir/program/_program.py:to_edge_transform_and_lower",
          "exir/program/_program.py:_gen_edge_manager_for_partitioners", "exir/program/_program.py:transform",
          "exir/program/_program.py:to_backend", "backends/xnnpack/partition/xnnpack_partitioner.py:partition",
          "backends/xnnpack/xnnpack_preprocess.py:preprocess", "backends/xnnpack/_passes/__init__.py:transform",
          "exir/program/_program.py:to_executorch"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("/tmp/profile-executorch"))
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from tiny import make_tiny_llama
    from transformers import AutoModelForCausalLM

    from calq.export import get
    from calq.quant import llmc, methods

    checkpoint = args.out / f"w4a16-{args.layers}-layers"
    if not (checkpoint / "config.json").is_file():
        llmc.quiet_logs(str(args.out / "llmcompressor.log"))
        model = AutoModelForCausalLM.from_pretrained(make_tiny_llama(args.out / "float", layers=args.layers)).eval()
        methods.config({"method": "minmax", "scheme": "w4a16", "group_size": 32}).apply(
            model, torch.randint(3, 256, (8, 32), generator=torch.Generator().manual_seed(0)))
        model.save_pretrained(checkpoint, save_compressed=True)
    torch.set_num_threads(1)
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    info = get("executorch").export(checkpoint, args.out / "executorch", None, max_seq_len=64)
    profile.disable()
    print(f"{args.layers} layers: export {time.perf_counter() - start:.1f} s, "
          f"{info['delegation']['subgraphs']} XNNPACK delegates")
    for (file, _, function), (_, calls, _, cumulative, _) in sorted(
            pstats.Stats(profile).stats.items(), key=lambda item: -item[1][3]):
        name = f"{file.split('site-packages/')[-1]}:{function}"
        if any(name.endswith(phase) for phase in PHASES):
            print(f"{cumulative:8.1f} s {calls:5d} calls  {name}")


if __name__ == "__main__":
    main()
