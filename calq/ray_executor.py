"""Run a plan's stage table on Ray: one Ray task per stage, on a local Ray or on a cluster.

    calq run RECIPE --executor ray                    # a local Ray on this machine's CPUs
    calq run RECIPE --executor ray --address auto     # the cluster `ray start --head` started
    calq.run(recipe, executor="ray", address="ray://head:10001")

A stage's task gets the ObjectRefs of the stages it needs (`Stage.needs`) as arguments, so Ray starts it when
they have finished and runs independent ones (variants) side by side; stages finished earlier are reused by the
driver and not sent. In the worker the stage runs through `RunDir.run_stage`, as under LocalExecutor: same markers,
keys and atomic writes, so a Ray run and a local run of a recipe write the same folder and resume each other. The
run folder (and the data folder) must be on storage every worker sees, at the same path.

Resources come from the recipe's `resources:` section (`pipeline.stage_resources`). Ray reruns a stage whose worker
died, up to `max_retries` times; an exception raised by a stage is not retried (it would fail the same way) and
stops the run as it does locally.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import ray
from ray.exceptions import RayError, RayTaskError

from calq import models, pipeline
from calq.errors import CalqError

# Fault injection for the retry tests, read on the driver: "<stage name>=<flag file>" kills the worker right after
# that stage's outputs are written (before its marker), once: the flag file records that it happened.
KILL_ENV = "CALQ_RAY_KILL_AFTER"
# Passed on to every worker, so workers on other machines are as quiet as this process.
WORKER_ENV = ("TQDM_DISABLE", "LLM_COMPRESSOR_LOG_LEVEL", "TOKENIZERS_PARALLELISM", "TRITON_INTERPRET")


def run_stage(root: str, source: models.ModelSource, data_root: str | None, kill: str, stage: pipeline.Stage,
              *upstream):
    """The body of one stage's Ray task (`upstream`: the records of the stages it needs, only there for ordering).
    Returns the stage record and the wall-clock start and end of the stage in this worker."""
    start = time.time()
    ctx = pipeline.worker_context(root, source, Path(data_root) if data_root else None)
    rec = ctx.run.run_stage(stage.name, stage.key, _with_fault(stage, kill), ctx, *stage.args)
    return rec, start, time.time()


def _with_fault(stage: pipeline.Stage, kill: str):
    name, _, flag = kill.partition("=")
    if name != stage.name or Path(flag).exists():
        return stage.fn

    def killed_after(*args):
        result = stage.fn(*args)
        Path(flag).touch()
        os.kill(os.getpid(), signal.SIGKILL)
        return result

    return killed_after


class RayExecutor:
    """Runs the stage table as Ray tasks. Without an address it starts a local Ray with `num_cpus` CPUs (default:
    all) and stops it at the end; with one (auto, ray://host:port) it joins that cluster, or uses the Ray this
    process already initialized. `timings` holds each stage's (start, end) wall-clock seconds in its worker."""

    def __init__(self, address: str | None = None, num_cpus: int | None = None):
        self.address, self.num_cpus = address, num_cpus
        self.timings: dict[str, tuple[float, float]] = {}

    def run(self, ctx: pipeline.Context, stages: list[pipeline.Stage]) -> None:
        started = not ray.is_initialized()
        if started:
            self._init(ctx.debug)
        try:
            self._run(ctx, stages)
        finally:
            if started:
                ray.shutdown()

    def _init(self, debug: bool) -> None:
        try:
            ray.init(address=self.address, num_cpus=None if self.address else self.num_cpus, include_dashboard=False,
                     logging_level=logging.INFO if debug else logging.ERROR, log_to_driver=debug)
        except (ConnectionError, ValueError, RuntimeError) as err:
            raise CalqError(f"cannot reach the Ray cluster at {self.address} ({str(err).splitlines()[0]})", "--address",
                            "start one with `ray start --head`, or leave --address out for a local Ray") from None

    def _run(self, ctx: pipeline.Context, stages: list[pipeline.Stage]) -> None:
        _check_fits(ctx, stages)
        task = ray.remote(run_stage)
        env = {"env_vars": {k: os.environ[k] for k in WORKER_ENV if k in os.environ}}
        root = str(ctx.run.root.resolve())
        data_root = str(ctx.data_root.resolve()) if ctx.data_root else None
        kill = os.environ.get(KILL_ENV, "")
        refs, sent = {}, {}
        for stage in stages:
            rec = ctx.run.finished(stage.name, stage.key)
            if rec is not None:
                ctx.run.records[stage.name] = rec
                ctx.log(f"[green]✓[/] {stage.name} [dim](reused)[/]")
                continue
            _, res = pipeline.stage_resources(ctx.recipe, stage)
            upstream = [refs[n] for n in stage.needs if n in refs]  # the others are finished or not selected
            refs[stage.name] = task.options(name=stage.name, num_cpus=res.num_cpus, num_gpus=res.num_gpus,
                                            max_retries=res.max_retries, retry_exceptions=False, runtime_env=env,
                                            memory=int(res.memory_gb * 2**30) if res.memory_gb else None,
                                            ).remote(root, ctx.source, data_root, kill, stage, *upstream)
            sent[refs[stage.name]] = stage
        bar = ctx.progress.add_task(f"{len(sent)} stages on Ray", total=len(sent)) if ctx.progress and sent else None
        pending = list(sent)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                stage = sent[done[0]]
                try:
                    rec, start, end = ray.get(done[0])
                except RayError as err:
                    raise _stage_error(ctx, stage, err) from None
                ctx.run.records[stage.name], self.timings[stage.name] = rec, (start, end)
                if rec.redone:
                    ctx.log(f"[yellow]note:[/] {rec.redone}")
                state = "reused" if rec.reused else f"{rec.seconds:.1f} s, peak {rec.peak_rss_mb:,.0f} MB"
                ctx.log(f"[green]✓[/] {stage.name} [dim]({state})[/]")
                if bar is not None:
                    ctx.progress.advance(bar)
        except BaseException:
            for ref in pending:  # running stages are interrupted; their atomic writes leave nothing half-written
                ray.cancel(ref)
            raise
        finally:
            if bar is not None:
                ctx.progress.remove_task(bar)


def _stage_error(ctx: pipeline.Context, stage: pipeline.Stage, err: RayError) -> BaseException:
    """What a failed stage raises on the driver: the stage's own exception (a CalqError prints as one line, exit 2),
    or a CalqError when Ray gave up on it (its worker died on every try)."""
    if isinstance(err, RayTaskError):
        return err.cause if isinstance(err.cause, CalqError) else err
    key, res = pipeline.stage_resources(ctx.recipe, stage)
    return CalqError(f"stage {stage.name} failed on Ray after {res.max_retries} retries ({type(err).__name__}: "
                     f"{str(err).splitlines()[0]})", f"resources.{key or stage.name}",
                     "see the Ray logs (/tmp/ray/session_latest/logs on the worker), give the stage more memory or "
                     "retries, and run the same command again: finished stages are kept")


def _check_fits(ctx: pipeline.Context, stages: list[pipeline.Stage]) -> None:
    """Refuse a stage that asks for more CPUs or GPUs than the whole cluster has (Ray would wait forever)."""
    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0), total.get("GPU", 0)
    for stage in stages:
        key, res = pipeline.stage_resources(ctx.recipe, stage)
        if res.num_cpus > cpus or res.num_gpus > gpus:
            raise CalqError(f"stage {stage.name} asks for {res.num_cpus:g} CPUs and {res.num_gpus:g} GPUs; the Ray "
                            f"cluster has {cpus:g} CPUs and {gpus:g} GPUs", f"resources.{key or stage.name}",
                            "ask for less, or add machines to the cluster")
