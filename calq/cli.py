"""The `calq` command line."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from calq.errors import CalqError

if "--debug" not in sys.argv:
    # The libraries' own tqdm bars interleave with ours; tqdm reads this when it is first imported.
    os.environ.setdefault("TQDM_DISABLE", "1")

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
--data-dir (or $CALQ_DATA_DIR). Bad input exits with code 2 and one line saying what to fix.
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
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="run folder (default: the recipe's `output`, else runs/<name>)"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="folder that '@data/...' sources are read from [default: $CALQ_DATA_DIR]"),
    dry_run: bool = typer.Option(False, "--dry-run", help="validate the recipe and list the stages (done or to run); load no model"),
    until: Optional[str] = typer.Option(None, "--until", help="stop after this group of stages: ranges, quantize, calibrate or evaluate (tasks included); no report"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks and llm-compressor's logs"),
):
    """Run a recipe: calibration samples, activation ranges, quantized variants, token-level evaluation, report.

    Finished stages are reused when their inputs are unchanged, so an interrupted run resumes where it stopped
    and an edited recipe reruns only what depends on the edit.
    """
    from calq import data as data_mod
    from calq.pipeline import UNTIL, Context, make_plan, without_unavailable_data
    from calq.recipe import load_recipe
    from calq.runs import RunDir

    _quiet_libraries(debug)
    try:
        if until is not None and until not in UNTIL:
            raise CalqError(f"unknown stage group '{until}'", "--until", f"use one of: {', '.join(UNTIL)}")
        r = load_recipe(recipe)
        if until == "calibrate" and r.calibrators is None:
            raise CalqError("the recipe has no `calibrators` section to fit", str(recipe), "add one (`calq keys` lists its keys)")
        root = out or Path(r.output or Path("runs") / r.name)
        root_data = data_mod.data_dir(str(data_dir) if data_dir else None)
        if root_data is not None and not root_data.is_dir():
            raise CalqError(f"data folder not found: {root_data}", "--data-dir", "pass an existing folder (e.g. ../shared/data)")
        r, notes = without_unavailable_data(r, root_data)
        plan = make_plan(r, root_data)
        plan.notes = notes
        for note in notes:
            console.print(f"[yellow]note:[/] {note}")
        run_dir = RunDir(root)
        if dry_run:
            _show_plan(r, plan, run_dir)
            return
        run_dir.claim(r.name)
        from calq.runs import write_text

        write_text(run_dir.path("recipe.yaml"), recipe.read_text())
        report = _execute(Context(r, run_dir, root_data, debug=debug, until=until), plan)
    except CalqError as err:
        _fail(err, debug)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: finished stages are kept; run the same command again to resume")
        raise typer.Exit(130)
    if report is None:
        Console().print(f"stopped after '{until}' as asked; results in {root} (run again without --until to finish)")
        return
    _print_summary(report, root)
    _exit_on_gates(report)


@app.command("fit-ats")
def fit_ats(
    recipe: Path = typer.Argument(..., help="YAML recipe with a `calibrators` section"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="run folder (default: the recipe's `output`, else runs/<name>)"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="folder that '@data/...' sources are read from [default: $CALQ_DATA_DIR]"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks and llm-compressor's logs"),
):
    """Fit the calibrators (global temperature, ATS head) of every variant and stop: `calq run --until calibrate`.

    Each variant's calibrators land in RUN/calibrators/<variant>/ (ats_head/ with head.safetensors + config.json,
    calibrators.json with the temperature, the validation metrics and the selected calibrator).
    """
    run(recipe, out, data_dir, False, "calibrate", debug)


def _exit_on_gates(report: dict):
    gates = report.get("gates")
    if gates and not gates["passed"]:
        failed = [r["name"] for r in gates["results"] if not r["passed"]]
        Console().print(f"[bold red]gates failed[/]: {', '.join(failed)}")
        raise typer.Exit(1)
    if gates:
        Console().print("[green]all gates passed[/]")


def _quiet_libraries(debug: bool):
    """Our progress bars replace the libraries' own; --debug brings theirs back."""
    if debug:
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import transformers

    from calq.quant.llmc import quiet_logs

    quiet_logs(None)  # the run folder's log file is set once the run starts
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()


def _execute(ctx, plan):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from calq import pipeline

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        ctx.progress = progress
        ctx.log = lambda msg: progress.console.print(msg, highlight=False)
        return pipeline.run(ctx, plan)


def _show_plan(r, plan, run_dir):
    console.print(f"recipe '{r.name}' is valid. model: {plan.source.describe()}; run folder: {run_dir.root}")
    table = Table("stage", "status")
    for name, key in plan.keys.items():
        table.add_row(name, "done (will be reused)" if run_dir.finished(name, key) else "to run")
    console.print(table)
    console.print(f"variants: {', '.join(plan.variants)}")


def _print_summary(report: dict, root: Path):
    table = Table("variant", "size MB", "ppl", "acc", "conf", "ECE", "Brier", title=f"token-level calibration ({report['evaluation']['tokens']['tokens']:,} tokens)")
    for v in report["variants"]:
        size = f"{v['size_bytes'] / 2**20:,.1f}" if v["size_bytes"] else "–"
        table.add_row(v["variant"], size, f"{v['ppl']:.2f}", f"{v['accuracy']:.4f}", f"{v['confidence']:.4f}", f"{v['ece']:.4f}", f"{v['brier']:.4f}")
    Console().print(table)
    Console().print(f"report: {root / 'report.html'} ({root / 'report.md'}; all numbers: {root / 'report.json'})")


@app.command()
def report(run_dir: Path = typer.Argument(..., help="a finished run folder"),
           debug: bool = typer.Option(False, "--debug", help="show tracebacks")):
    """Rebuild report.json and report.md from a run folder's stored results, without recomputing."""
    from calq import data as data_mod
    from calq.pipeline import Context, make_plan, without_unavailable_data
    from calq.recipe import load_recipe
    from calq.report.build import write_reports
    from calq.runs import RunDir

    try:
        if not (run_dir / ".calq" / "run.json").is_file():
            raise CalqError("not a calq run folder", str(run_dir), "pass the folder a `calq run` wrote")
        r = load_recipe(run_dir / "recipe.yaml")
        r, notes = without_unavailable_data(r, data_mod.data_dir())
        ctx = Context(r, RunDir(run_dir), data_mod.data_dir())
        missing = [s for s in ("samples", "eval_tokens") if not (run_dir / ".calq" / "stages" / f"{s}.json").is_file()]
        if missing or not (run_dir / "eval").is_dir():
            raise CalqError("the run has not finished its evaluation", str(run_dir), "finish it with `calq run`")
        plan = make_plan(r, ctx.data_root)
        plan.notes = notes
        rep = write_reports(ctx, plan)
    except (CalqError, FileNotFoundError) as err:
        _fail(err if isinstance(err, CalqError) else CalqError(f"missing result file {err.filename}", str(run_dir), "finish the run with `calq run`"), debug)
    _print_summary(rep, run_dir)
    _exit_on_gates(rep)


@app.command()
def keys():
    """List every recipe key with its default and meaning."""
    from calq.quant.methods import METHODS
    from calq.quant.schemes import SCHEMES
    from calq.recipe import describe_keys

    table = Table("key", "default", "meaning", show_lines=False)
    for key, default, text in describe_keys():
        table.add_row(key, default, text)
    Console().print(table)
    Console().print(f"methods: {', '.join(METHODS)}; schemes: {', '.join(SCHEMES)}")


def main():
    app()


if __name__ == "__main__":
    main()
