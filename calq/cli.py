"""The `calq` command line: a thin layer over calq.api (progress bars, one-line errors, exit codes).

Each command imports what it needs inside its function: torch, transformers and llm-compressor take seconds to
import, and `calq --help` should not wait for them."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from calq.errors import CalqError

if not {"--debug", "--verbose"} & set(sys.argv):
    # The libraries' own tqdm bars interleave with ours; tqdm reads this when it is first imported.
    os.environ.setdefault("TQDM_DISABLE", "1")
    # llm-compressor warns "No accelerator available!" on import, before calq can route its logs to the run folder
    os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "ERROR")

HELP = """\
calq: quantize a causal LM several ways and check that its probabilities stay calibrated.

A YAML recipe drives a run. A minimal one:

\b
    name: quickstart
    model: {id: smollm2-135m}            # bundled; or a HF id, a model folder, a .gguf file
    calibration:
      data: {source: "@data/wikitext2/wikitext2_train_5k_HyperTensor.txt", fallback: "builtin:pydoc"}
      num_samples: 128                   # 128-512
      seq_len: 256
    variants:
      - {method: minmax, scheme: w8a8}
      - {method: minmax, scheme: w4a16, group_size: 64}
    evaluation:
      tokens: {data: {source: "@data/wikitext2/wiki.test.raw", fallback: "builtin:pydoc", split: test}}

`calq keys` lists every recipe key with its default and meaning. `@data/...` paths are read from
--data-dir (or $CALQ_DATA_DIR).

Exit codes: 0 passed; 1 a gate failed (only that); 2 bad input or an unusable run folder (one line saying what
to fix: bad recipe, folder of another recipe or in use by another run, damaged results, disk full); 3 an internal
error (one line; the traceback is saved in RUN/logs/); 130 / 143 interrupted by Ctrl-C / SIGTERM (run the same
command again to resume).
"""

app = typer.Typer(help=HELP, no_args_is_help=True, rich_markup_mode=None, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]})
console = Console(stderr=True)


def _fail(err: CalqError, debug: bool):
    if debug:
        raise err
    console.print(f"[bold red]error:[/] {err.line()}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="YAML recipe (see `calq keys`)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="run folder (default: the recipe's `output`, "
                                                                 "else runs/<name>)"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="folder that '@data/...' sources are read from "
                                                                     "[default: $CALQ_DATA_DIR]"),
    dry_run: bool = typer.Option(False, "--dry-run", help="validate the recipe and list the stages (done or to run); "
                                                          "load no model"),
    until: Optional[str] = typer.Option(None, "--until", help="stop after this group of stages: ranges, quantize, "
                                                              "calibrate or evaluate (tasks included); no report"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks and llm-compressor's logs"),
    verbose: bool = typer.Option(False, "--verbose", help="show the libraries' own progress bars, warnings and logs"),
    executor: str = typer.Option("local", "--executor", help="local (this process) or ray (one Ray task per stage; "
                                 "the run folder must be on storage every worker sees)"),
    address: Optional[str] = typer.Option(None, "--address", help="with --executor ray: the cluster (auto, "
                                          "ray://host:10001); default: a local Ray"),
):
    """Run a recipe: calibration samples, activation ranges, quantized variants, calibrators, evaluation, report.

    Finished stages are reused when their inputs are unchanged, so an interrupted run resumes where it stopped
    and an edited recipe reruns only what depends on the edit.
    """
    from calq.recipe import load_recipe

    try:
        load_recipe(recipe)  # api imports torch and transformers (seconds): a bad recipe is reported before them
    except CalqError as err:
        _fail(err, debug)
    from calq import api
    from calq.interrupts import stop_signals

    _quiet_libraries(verbose or debug)
    prepared = None
    try:
        with stop_signals(lambda: prepared.run.current_stage if prepared else None):
            prepared = api.prepare(recipe, out, data_dir)
            if dry_run:
                for note in prepared.plan.notes:
                    console.print(f"[yellow]note:[/] {note}")
                _show_plan(prepared)
                return
            with _progress() as progress:
                report = api.run(prepared, until=until, progress=progress, debug=debug, executor=executor,
                                 address=address, log=lambda msg: progress.console.print(msg, highlight=False))
    except CalqError as err:
        _fail(err, debug)
    except KeyboardInterrupt as exc:
        _interrupted(exc, prepared.run if prepared else None)
    except Exception as exc:  # noqa: BLE001 - exit 3 with the traceback in a file, not on the console
        _crashed(exc, prepared.run if prepared else None, debug)
    if report is None:
        Console().print(f"stopped after '{until}' as asked; run again without --until to finish")
        return
    _print_summary(report.data, report.folder)
    _exit_on_gates(report)


@app.command("fit-ats")
def fit_ats(
    recipe: Path = typer.Argument(..., help="YAML recipe with a `calibrators` section"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="run folder (default: the recipe's `output`, "
                                                                 "else runs/<name>)"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="folder that '@data/...' sources are read from "
                                                                     "[default: $CALQ_DATA_DIR]"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks and llm-compressor's logs"),
    verbose: bool = typer.Option(False, "--verbose", help="show the libraries' own progress bars, warnings and logs"),
):
    """Fit the calibrators (global temperature, ATS head, ...) of every variant and stop: `calq run --until calibrate`.

    Each variant's calibrators land in RUN/calibrators/<variant>/<calibrator>/ (ats/: head.safetensors + config.json;
    temperature/: temperature.json), with calibrators.json holding the validation metrics and the selected one.
    """
    run(recipe, out, data_dir, False, "calibrate", debug, verbose, "local", None)


def _interrupted(exc: KeyboardInterrupt, run_dir):
    from calq.interrupts import interrupted_line

    line, code = interrupted_line(exc, run_dir.current_stage if run_dir else None)
    console.print(f"[yellow]{line}[/]", highlight=False, soft_wrap=True)
    raise typer.Exit(code) from None


def _crashed(exc: Exception, run_dir, debug: bool):
    """An unexpected error: one line, and the traceback saved under RUN/logs/ (exit 3); --debug raises it."""
    from calq.interrupts import crash_line, save_crash

    if debug:
        raise exc
    ours = run_dir is not None and (run_dir.meta / "run.json").is_file()  # never write into a folder calq did not make
    saved = save_crash(exc, run_dir.path("logs")) if ours else None
    console.print(f"[bold red]error:[/] {crash_line(exc, saved)}", highlight=False, soft_wrap=True)
    raise typer.Exit(3) from None


def _exit_on_gates(report):
    if report.passed is False:
        from rich.markup import escape

        # the names carry brackets ("max_kld [q4/none]") that rich would read as markup
        Console().print(f"[bold red]gates failed[/]: {escape(', '.join(report.failed_gates))}")
        raise typer.Exit(1)
    if report.passed:
        from calq.report.gates import CONSTANT

        constant = sum(r.get("note") == CONSTANT for r in report.data["gates"]["results"])
        Console().print("[green]all gates passed[/]" + (
            f" ({constant} rest on a constant predictor, allowed by allow_constant_answers: answer confidence "
            "collapsed to uniform, see the report)"
            if constant else ""))


def _quiet_libraries(verbose: bool):
    """Our progress bars replace the libraries' own, and their warnings and logs stay off the console; --verbose (or
    --debug) brings them back."""
    if verbose:
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging
    import warnings

    # torchao (installed beside executorch, imported by llm-compressor below): "Failed to load ..._C_cutlass_90a.so"
    # on every CPU, and torch's pytree warnings about its enums, both at import time
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

    import datasets
    import transformers

    from calq.quant.llmc import quiet_logs

    quiet_logs(None)  # the run folder's log file is set once the run starts
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    warnings.simplefilter("ignore")
    import torch  # noqa: F401  (its import sets the "torch" logger's level: set ours after it)

    logging.getLogger("torch").setLevel(logging.ERROR)  # torch.onnx: "torchvision is not installed. Skipping ..."


def _progress():
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    return Progress(*columns, console=console, transient=True)


def _show_plan(prepared):
    plan, run_dir = prepared.plan, prepared.run
    console.print(f"recipe '{prepared.recipe.name}' is valid. model: {plan.source.describe()}; "
                  f"run folder: {run_dir.root}")
    table = Table("stage", "needs", "status")
    for stage in plan.stages:
        table.add_row(stage.name, ", ".join(stage.needs) or "–",
                      "done (will be reused)" if run_dir.finished(stage.name, stage.key) else "to run")
    console.print(table)
    console.print(f"variants: {', '.join(plan.variants)}")
    for label, why in plan.skipped.items():
        console.print(f"[yellow]skipped[/] variant {label}: {why}")


def _print_summary(report: dict, root: Path):
    from calq.report.model import mb

    table = Table("variant", "size MB", "ppl", "acc", "conf", "ECE", "Brier",
                  title=f"token-level calibration ({report['evaluation']['tokens']['tokens']:,} tokens)")
    for v in report["variants"]:
        table.add_row(v["variant"], mb(v["size_bytes"]), f"{v['ppl']:.2f}", f"{v['accuracy']:.4f}",
                      f"{v['confidence']:.4f}", f"{v['ece']:.4f}", f"{v['brier']:.4f}")
    Console().print(table)
    Console().print(f"report: {root / 'report.html'} ({root / 'report.md'}; all numbers: {root / 'report.json'})")


@app.command()
def report(run_dir: Path = typer.Argument(..., help="a finished run folder"),
           debug: bool = typer.Option(False, "--debug", help="show tracebacks")):
    """Rebuild report.json, report.md and report.html from a run folder alone: its manifest and stored results
    (no model, data folder or network needed); exits as `calq run` did."""
    from calq import api
    from calq.runs import RunDir

    try:
        rep = api.report(run_dir)
    except CalqError as err:
        _fail(err, debug)
    except KeyboardInterrupt as exc:
        _interrupted(exc, None)
    except Exception as exc:  # noqa: BLE001 - exit 3 with the traceback in a file, not on the console
        _crashed(exc, RunDir(run_dir), debug)
    _print_summary(rep.data, run_dir)
    _exit_on_gates(rep)


@app.command("export")
def export_command(
    run_dir: Path = typer.Argument(..., help="a finished run folder"),
    format: Optional[list[str]] = typer.Option(None, "--format", "-f", help="onnx (ONNX Runtime), gguf (llama.cpp) or "
                                               "executorch (XNNPACK); repeat for several "
                                               "[default: the recipe's export.formats, else onnx]"),
    variant: Optional[list[str]] = typer.Option(None, "--variant", help="variant to export; repeat for several "
                                                "[default: the recipe's export.variants, else all]"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="where the data folder is now, if the run moved "
                                                                     "[default: where the run read it]"),
    model: Optional[str] = typer.Option(None, "--model", help="where the model is now, if the run moved "
                                                              "[default: the recipe's model.id]"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
    verbose: bool = typer.Option(False, "--verbose", help="show the libraries' own progress bars, warnings and logs"),
):
    """Export a finished run's variants, calibrator fused, to what runs on a device, and re-verify each artifact on its
    own runtime (top-1 agreement, perplexity, ECE drift). Artifacts land in RUN/export/<variant>/<format>/; the report
    gets a Deployed table and the deployed gates. Needs `pip install 'calq[edge]'`."""
    from calq import api

    _quiet_libraries(verbose or debug)
    try:
        with _progress() as progress:
            rep = api.export(run_dir, format, variant, progress=progress,
                             log=lambda msg: progress.console.print(msg, highlight=False), data_dir=data_dir,
                             model=model)
    except CalqError as err:
        _fail(err, debug)
    _print_summary(rep.data, run_dir)
    _exit_on_gates(rep)


@app.command("verify")
def verify_command(run_dir: Path = typer.Argument(..., help="a run folder"),
                   debug: bool = typer.Option(False, "--debug", help="show tracebacks")):
    """Check every finished stage's outputs against the sizes and sha256 recorded when they were written, running
    nothing. Exits 0 when all match, 2 when a file is missing or damaged (`calq run` again redoes those stages)."""
    from calq.runs import verify

    try:
        problems = verify(run_dir)
    except CalqError as err:
        _fail(err, debug)
    for problem in problems:
        console.print(f"[bold red]damaged:[/] {problem}", highlight=False, soft_wrap=True)
    if problems:
        console.print(f"{len(problems)} problem(s) in {run_dir}: run the same `calq run` again to redo those stages")
        raise typer.Exit(2)
    Console().print(f"{run_dir}: every finished stage's outputs match their checksums")


@app.command()
def keys():
    """List every recipe key with its default and meaning."""
    from calq.calib.registry import names
    from calq.quant.base import SCHEMES
    from calq.quant.methods import METHODS
    from calq.recipe import describe_keys

    table = Table("key", "default", "meaning", show_lines=False)
    for key, default, text in describe_keys():
        table.add_row(key, default, text)
    Console().print(table)
    Console().print(f"methods: {', '.join(METHODS)}; schemes: {', '.join(SCHEMES)}; calibrators: {', '.join(names())}")


@app.command()
def doctor(
    recipe: Optional[Path] = typer.Argument(None, help="a recipe: exit 2 unless everything it needs works here"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="the data folder to check "
                                                                     "[default: $CALQ_DATA_DIR]"),
    executor: str = typer.Option("local", "--executor", help="local or ray: ray needs the ray package"),
    as_json: bool = typer.Option(False, "--json", help="print the findings as JSON"),
):
    """Can this machine run calq, or RECIPE? Python and package versions, the CPU and its features, threads, the
    accelerator, the data folder, and each native runtime (llama.cpp, ONNX Runtime) probed for real on a tiny model in
    a child process: ok, missing, crashed (with the signal) or failed, each with the fix. llama.cpp also says what
    its build was compiled for (portable, or this CPU only). Exit 0 when everything RECIPE needs works (with no
    RECIPE: when nothing installed is broken), 2 otherwise."""
    import dataclasses
    import json

    from calq import doctor as doc
    from calq.data import data_dir as resolve_data_dir

    parsed = None
    if recipe is not None:
        from calq.recipe import load_recipe

        try:
            parsed = load_recipe(recipe)
        except CalqError as err:
            _fail(err, False)
    with console.status("probing the runtimes in child processes"):
        found = doc.diagnose(parsed, resolve_data_dir(str(data_dir) if data_dir else None), executor)
    if as_json:
        print(json.dumps([dataclasses.asdict(f) for f in found], indent=2))
    else:
        from rich.markup import escape

        colour = {doc.OK: "green", doc.WARN: "yellow", doc.MISSING: "yellow", doc.CRASHED: "red", doc.FAILED: "red"}
        out = Console()
        for f in found:
            status = f"[{colour.get(f.status, 'white')}]{f.status:<8}[/]"
            needed = " [bold](needed)[/]" if f.needed else ""
            out.print(f"{status} [bold]{escape(f.what)}[/]{needed}: {escape(f.detail)}", highlight=False)
            if f.fix and f.status != doc.OK:
                out.print(f"         fix: {escape(f.fix)}", highlight=False)
    raise typer.Exit(doc.exit_code(found))


bench_app = typer.Typer(help="Speed of the Triton kernels on a CUDA GPU, as ratio tables "
                             "(markdown, ready for BENCHMARKS.md).",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise CalqError(f"'{text}' is not a comma-separated list of integers", option, "write e.g. 1,16") from None
    if not values or min(values) < 1:
        raise CalqError(f"'{text}' has a value below 1", option, "give positive sizes, e.g. 1,16")
    return values


@bench_app.command("kernels")
def bench_kernels(
    group_size: int = typer.Option(128, "--group-size", help="int4 group size (tinygemm takes 32-256)"),
    m: str = typer.Option("1,16,256,4096", "--m", help="rows of the activation matrix: batch x tokens"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write every number to this file"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
):
    """W4A16 and W8A8 kernels against cuBLAS bf16, tinygemm int4 and torch._int_mm, on Llama-sized layers.

    For (K, N) in (4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192) and each M: median times (replays
    of a CUDA graph cycling through weight copies larger than L2, so no launch cost and no cache hits), speed-ups
    over bf16, each kernel's time over its floor (bytes / measured bandwidth or operations / measured rate), and
    the relative errors.
    """
    import json

    from calq.kernels import bench

    try:
        ms = _int_list(m, "--m")
        bench.require_cuda("calq bench kernels")
    except CalqError as err:
        _fail(err, debug)
    out = Console()
    out.print(f"device: {torch_device_name()}, group size {group_size}, {_versions()}")
    ceil = bench.ceilings()
    out.print(f"ceilings (measured): copy {ceil['bytes_per_s'] / 1e12:.2f} TB/s, "
              f"bf16 {ceil['bf16_ops_per_s'] / 1e12:.0f} TFLOP/s, int8 {ceil['int8_ops_per_s'] / 1e12:.0f} TOP/s")
    rows = []
    for k, n in bench.SHAPES:
        rows += bench.time_shape(k, n, group_size, ms, log=lambda msg: console.print(f"[yellow]note:[/] {msg}"))
        console.print(f"timed K={k} N={n}")
    for table in bench.kernel_tables(rows, ceil):
        out.print("\n" + bench.markdown(*table), highlight=False, soft_wrap=True)
    if json_out:
        json_out.write_text(json.dumps({"device": torch_device_name(), "ceilings": ceil, "rows": rows}, indent=1))


@bench_app.command("decode")
def bench_decode(
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="a calq variant folder (RUN/variants/NAME): "
                                              "its kernels against its own weights decompressed to bf16 "
                                              "[default: a random Llama-2-7B-shaped model, min-max quantized]"),
    layers: int = typer.Option(32, "--layers", help="decoder layers of the random model "
                                                    "(32 as Llama-2-7B; fewer for a quick look)"),
    batch: str = typer.Option("1,16", "--batch", help="batch sizes (rows decoded together)"),
    prompt: int = typer.Option(128, "--prompt", help="prompt tokens, prefilled untimed"),
    tokens: int = typer.Option(128, "--tokens", help="tokens generated per row; all but the first are timed"),
    group_size: int = typer.Option(128, "--group-size", help="int4 group size of the random model's W4A16"),
    compile: bool = typer.Option(True, "--compile/--eager", help="torch.compile each step with CUDA graphs"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
):
    """Greedy decoding tokens/s with a static KV cache: bf16 against the W4A16 and W8A8 kernels.

    Each row: generated tokens per second over all rows of the batch, after one untimed warm-up of the same
    shape; the speed-up is over bf16 in the same run. With --checkpoint, also the number of tokens for which
    the kernels' greedy output equals the bf16 model's.
    """
    import torch

    from calq.kernels import bench
    from calq.kernels.decode import Decoder, tokens_per_second

    try:
        batches = _int_list(batch, "--batch")
        if tokens < 2:
            raise CalqError(f"--tokens {tokens} leaves no decode step to time", "--tokens", "give 2 or more")
        if checkpoint is not None and not (checkpoint / "config.json").is_file():
            raise CalqError(f"no config.json in {checkpoint}", "--checkpoint",
                            "give a variant folder, RUN/variants/NAME")
        bench.require_cuda("calq bench decode")
        if checkpoint is not None:
            from transformers import AutoModelForCausalLM

            from calq.kernels import load_quantized

            quantized = load_quantized(checkpoint, "cuda", torch.bfloat16)
            base = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16).cuda().eval()
            models = {"bf16 (decompressed)": base, checkpoint.name: quantized}
        else:
            base = bench.random_llama(layers)
            models = {"bf16": base, **{s: bench.quantized_copy(base, s, group_size) for s in ("w4a16", "w8a8")}}
    except CalqError as err:
        _fail(err, debug)
    out = Console()
    what = checkpoint or f"random Llama-2-7B-shaped model, {layers} layers, W4A16 group {group_size}"
    out.print(f"device: {torch_device_name()}; {what}; prompt {prompt}, {tokens} tokens, "
              f"{'torch.compile + CUDA graphs' if compile else 'eager'}; {_versions()}")
    rows = []
    weight_gb = {name: bench.weight_bytes(model) / 1e9 for name, model in models.items()}
    for b in batches:
        rates = {}
        for name, model in models.items():
            rates[name] = tokens_per_second(model, b, prompt, tokens, compile)
            console.print(f"batch {b}, {name}: {rates[name]:.1f} tokens/s")
        reference = next(iter(rates.values()))
        for name, gb in weight_gb.items():
            per_row = rates[name] / b
            rows.append([str(b), name, f"{rates[name]:.1f}", f"{1e3 / per_row:.2f}", f"{rates[name] / reference:.2f}",
                         f"{gb:.2f}", f"{gb * per_row:.0f}"])
    out.print("\n" + bench.markdown("greedy decoding", ["batch", "model", "tokens/s", "ms/step", "speed-up",
                                                        "weights GB", "weight GB/s"], rows),
              highlight=False, soft_wrap=True)
    if checkpoint is not None:
        ids = torch.randint(0, base.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(1))
        outputs = [Decoder(m, prompt + tokens).generate(ids, tokens)[0] for m in models.values()]
        out.print(f"greedy agreement: the kernels' tokens equal bf16's for the first "
                  f"{bench.agreeing_prefix(*outputs)} of {tokens} tokens")


def torch_device_name() -> str:
    import torch

    return torch.cuda.get_device_name()


def _versions() -> str:
    import torch
    import triton

    return f"torch {torch.__version__}, triton {triton.__version__}"


def main():
    app()


if __name__ == "__main__":
    main()
