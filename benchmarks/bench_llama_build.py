"""llama.cpp built portable (GGML_NATIVE=OFF, what `make` installs) against built for this CPU (GGML_NATIVE=ON):
prefill and decode tokens/s on the bundled SmolLM2-135M GGUF. Each build runs in its own process, the builds
alternate round by round, and the medians and their ratio come from one run.

Build the two side by side first (about 8 minutes each on 2 cores):
  for b in portable:OFF native:ON; do CMAKE_ARGS="-DGGML_NATIVE=${b#*:}" .venv/bin/pip install -q --no-deps \
      --no-cache-dir --target /tmp/llama-${b%%:*} llama-cpp-python==0.3.36; done
  .venv/bin/python benchmarks/bench_llama_build.py portable=/tmp/llama-portable native=/tmp/llama-native
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def worker(threads: int, prefill: int, decode: int, repeats: int) -> dict:
    import llama_cpp

    from calq import models

    source = models.resolve("smollm2-135m")
    path = os.path.join(source.location, source.gguf_file)
    llm = llama_cpp.Llama(model_path=path, n_ctx=prefill + decode, n_batch=prefill, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    ids = [(i * 7919) % 40000 + 100 for i in range(prefill)]
    out = {"prefill": [], "decode": [], "system_info": llama_cpp.llama_print_system_info().decode()}
    llm.eval(ids)  # warm-up
    for _ in range(repeats):
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids)
        out["prefill"].append(prefill / (time.perf_counter() - start))
        start = time.perf_counter()
        for i in range(decode):
            llm.eval([ids[i]])
        out["decode"].append(decode / (time.perf_counter() - start))
    llm.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("builds", nargs="*", help="NAME=FOLDER: a folder holding a llama_cpp package (pip --target)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count()])
    parser.add_argument("--prefill", type=int, default=256)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="measurements per process")
    parser.add_argument("--rounds", type=int, default=3, help="processes per build and thread count, alternated")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.threads[0], args.prefill, args.decode, args.repeats)))
        return
    builds = dict(b.split("=", 1) for b in args.builds)
    results = {(name, t): {"prefill": [], "decode": []} for name in builds for t in args.threads}
    info = {}
    for _ in range(args.rounds):
        for threads in args.threads:
            for name, folder in builds.items():
                env = {**os.environ, "PYTHONPATH": os.pathsep.join([folder, os.environ.get("PYTHONPATH", "")])}
                proc = subprocess.run([sys.executable, __file__, "--worker", "--threads", str(threads),
                                       "--prefill", str(args.prefill), "--decode", str(args.decode),
                                       "--repeats", str(args.repeats)], env=env, capture_output=True, text=True,
                                      check=True)
                got = json.loads(proc.stdout.strip().splitlines()[-1])
                info[name] = got["system_info"].strip()
                for kind in ("prefill", "decode"):
                    results[name, threads][kind] += got[kind]
    first = next(iter(builds))
    print(f"llama-cpp-python builds on {os.cpu_count()} CPUs; prefill {args.prefill} tokens, decode {args.decode}; "
          f"medians of {args.rounds} x {args.repeats} runs (tokens/s)\n")
    for name in builds:
        print(f"- {name}: {info[name]}")
    print(f"\n| build | threads | prefill tok/s | decode tok/s | prefill vs {first} | decode vs {first} |")
    print("|---|---:|---:|---:|---:|---:|")
    for threads in args.threads:
        base = {k: statistics.median(results[first, threads][k]) for k in ("prefill", "decode")}
        for name in builds:
            med = {k: statistics.median(results[name, threads][k]) for k in ("prefill", "decode")}
            print(f"| {name} | {threads} | {med['prefill']:.0f} | {med['decode']:.1f} | "
                  f"{med['prefill'] / base['prefill']:.2f}x | {med['decode'] / base['decode']:.2f}x |")


if __name__ == "__main__":
    main()
