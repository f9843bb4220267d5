"""The cost of calq's durable writes: a checkpoint-like folder and many small JSON results written three ways.

    python benchmarks/bench_fsync.py [--mb 500] [--shards 4] [--small 200] [--dir /path/on/the/disk/to/test]
    python benchmarks/bench_fsync.py --model smollm2-135m     # the bundled model's save_pretrained instead

1. plain:   files written straight into place (no temporary name, no hash, no fsync): the floor;
2. atomic:  calq's atomic_path with durable=False: temporary name, sha256 of every file (for the stage marker), rename;
3. durable: atomic_path as calq runs it: the same plus fsync of every file and folder and of the parent after the
            rename (the data is on the disk when the stage is recorded).
The folder holds `--shards` safetensors files of random float16 (together `--mb` MB) and a config.json, like a
save_pretrained checkpoint; with `--model`, what the `base_model` stage writes: that model's save_pretrained
(weights, config, tokenizer) after dequantizing it once. One process; `--repeat` rounds of the three ways in
rotating order, each into a fresh folder; prints the fastest round of each (the machine may be shared: the minimum
is the least disturbed), its MB/s and the ratio to plain, and the sha256 speed alone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from calq.runs import atomic_path


def write_checkpoint(folder: Path, shards: list[torch.Tensor]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, shard in enumerate(shards):
        save_file({"weight": shard}, str(folder / f"model-{i:05d}-of-{len(shards):05d}.safetensors"))
    (folder / "config.json").write_text(json.dumps({"hidden_size": 576, "num_hidden_layers": 30}))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=500, help="checkpoint size in MB")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--small", type=int, default=200, help="number of small JSON results (~4 KB each)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--model", default=None, help="a calq model id (e.g. smollm2-135m): save it instead")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary folder)")
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(0)
    per_shard = args.mb * 2**20 // args.shards // 2  # float16: 2 bytes per element
    shards = [torch.randn(per_shard if not args.model else 1, generator=gen).half() for _ in range(args.shards)]
    small = {"ece": 0.0123, "bins": [{"confidence": i / 15, "accuracy": i / 16, "count": i} for i in range(60)]}
    root = Path(tempfile.mkdtemp(prefix="bench-fsync-", dir=args.dir))
    model = tokenizer = None
    if args.model:
        from calq import models

        model, tokenizer = models.load(models.resolve(args.model))

    def write(folder):
        if model is None:
            write_checkpoint(folder, shards)
        else:
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)

    def plain(i):
        write(root / f"plain-{i}")

    def atomic(i, durable):
        with atomic_path(root / f"{'durable' if durable else 'atomic'}-{i}", durable=durable) as tmp:
            write(tmp)

    def small_files(kind):
        for j in range(args.small):
            path = root / f"small-{kind}" / f"{j}.json"
            if kind == "plain":
                path.parent.mkdir(exist_ok=True)
                path.write_text(json.dumps(small))
            else:
                with atomic_path(path, durable=kind == "durable") as tmp:
                    tmp.write_text(json.dumps(small))

    try:
        timed(lambda: plain("warmup"))  # first touch of the disk and allocator
        shutil.rmtree(root / "plain-warmup")
        ways = {"plain": lambda: plain(0), "atomic": lambda: atomic(0, False), "durable": lambda: atomic(0, True)}
        big, tiny = {k: [] for k in ways}, {k: [] for k in ways}
        for r in range(args.repeat):
            for kind in list(ways)[r % 3:] + list(ways)[:r % 3]:
                big[kind].append(timed(ways[kind]))
                tiny[kind].append(timed(lambda kind=kind: small_files(kind)))
                files = [f for f in (root / "plain-0").rglob("*") if f.is_file()]
                if files:
                    size, nfiles = sum(f.stat().st_size for f in files) / 2**20, len(files)
                for leftover in root.iterdir():
                    shutil.rmtree(leftover)
        big, tiny = {k: min(v) for k, v in big.items()}, {k: min(v) for k, v in tiny.items()}
        blob = shards[0].numpy().tobytes()
        sha_mb_s = len(blob) / 2**20 / timed(lambda: hashlib.sha256(blob).hexdigest())
    finally:
        shutil.rmtree(root, ignore_errors=True)

    what = f"{args.model} save_pretrained + tokenizer" if args.model else f"{args.shards} safetensors files + config"
    what += f": {nfiles} files, {size:.0f} MB"
    print(f"{platform.node()} {platform.machine()}, python {platform.python_version()}, torch {torch.__version__}; "
          f"disk of {root.parent}; sha256 alone: {sha_mb_s:,.0f} MB/s; fastest of {args.repeat} rounds")
    print(f"\ncheckpoint folder: {what}")
    print("| write | seconds | MB/s | vs plain |\n|---|---:|---:|---:|")
    for kind, sec in big.items():
        print(f"| {kind} | {sec:.2f} | {size / sec:,.0f} | {sec / big['plain']:.2f}x |")
    print(f"\n{args.small} small JSON files ({len(json.dumps(small)) / 1024:.1f} KB each)")
    print("| write | total s | ms per file | vs plain |\n|---|---:|---:|---:|")
    for kind, sec in tiny.items():
        print(f"| {kind} | {sec:.2f} | {1000 * sec / args.small:.2f} | {sec / tiny['plain']:.2f}x |")


if __name__ == "__main__":
    main()
