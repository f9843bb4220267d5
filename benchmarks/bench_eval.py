"""Evaluation throughput through lm-eval: three calibrators from one shared forward pass vs three separate runs.

Needs a finished quickstart run (its baseline folder and fitted calibrators) and the offline data folder:
    python benchmarks/bench_eval.py --run runs/quickstart --data-dir ../shared/data --task arc_easy --limit 100
Prints examples/s for each design and their ratio, taken in one process, one after the other.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from calq.calib import calibrators as calibrators_mod
from calq.calib.base import identity
from calq.evaluation.harness import run_tasks
from calq.models import ModelSource, load_config


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("runs/quickstart"))
    parser.add_argument("--variant", default="baseline")
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--task", default="arc_easy")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    model_dir = args.run / ("base_model" if args.variant == "baseline" else f"variants/{args.variant}")
    folder = args.run / "calibrators" / args.variant
    config = load_config(ModelSource(str(model_dir), kind="folder"))
    calibrators = calibrators_mod.load_all(folder, config, ["none", "temperature", "ats"])

    def timed(cals):
        start = time.perf_counter()
        run_tasks(str(model_dir), cals, [args.task], args.limit, args.data_dir, args.batch_size)
        return time.perf_counter() - start

    timed({"none": identity})  # warm-up: imports, lm-eval task indexing, file caches
    shared = timed(calibrators)
    separate = sum(timed({name: cal}) for name, cal in calibrators.items())
    examples = args.limit * len(calibrators)  # example x calibrator scores produced by each design
    print(f"{platform.node()} {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; {args.variant} on {args.task}, {args.limit} examples x "
          f"{len(calibrators)} calibrators")
    print("| design | wall (s) | examples x calibrators / s |")
    print("|---|---:|---:|")
    print(f"| shared forward (one pass, three calibrators) | {shared:.1f} | {examples / shared:.1f} |")
    print(f"| three separate runs | {separate:.1f} | {examples / separate:.1f} |")
    print(f"speed-up of the shared design: {separate / shared:.2f}x")


if __name__ == "__main__":
    main()
