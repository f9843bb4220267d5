"""lm-eval model `calq`: a causal LM (plain or compressed-tensors folder) whose scores go through a calibrator.

From the command line, `python -m calq.evaluation.harness` is lm-eval's own CLI (same arguments as `lm_eval`)
with the `calq` model registered and calq's task folder added as `--include_path` (lm-eval 0.4.13 has no
plugin discovery, so a bare `lm_eval --model calq` cannot see a model registered outside lm-eval):

    python -m calq.evaluation.harness --model calq \\
        --model_args pretrained=runs/quickstart/variants/minmax-w8a8,calibrator=temperature:1.2 \\
        --tasks calq_arc_easy,calq_mmlu --metadata '{"data_dir": "../shared/data"}' --limit 50

The same works from Python once this module is imported (`simple_evaluate(model="calq", ...)`); pass
`--include_path` (or `TaskManager(include_path=TASKS_DIR)`) to see the `calq_*` tasks, and the data folder as
task metadata `data_dir` or $CALQ_DATA_DIR.

model_args:
    pretrained   model folder (save_pretrained or compressed-tensors checkpoint), .gguf file, hub id,
                 or a bundled name such as smollm2-135m
    calibrator   none (default) | temperature:<T> | <name>:<folder of a fitted calibrator> (temperature, ats,
                 or any registered calibrator: calq.calib.base)
    dtype        float32 (default) | bfloat16 | float16
    device       default cuda when available, else cpu
    batch_size   model inputs per forward pass (a whole number; no "auto"); here or as --batch_size, and when
                 both are given model_args wins (so does `device` over --device)
    any other HFLM argument (max_length, add_bos_token, ...) passes through.

Where lm-eval scores, the scores are calibrated: every log-likelihood (multiple choice, loglikelihood and
rolling perplexity tasks) is computed from `calibrator(logits, last_hidden)`. Generation is greedy in every
calq task, and a calibrator multiplies each position's logits by a positive scale (see calq.calib), so the
argmax and therefore the generated text are the same with or without it (for `ats` too): generation runs the
plain model once and the text is shared by all calibrators. Sampling with a calibrator other than `none`
is refused.

One forward pass for all calibrators: `CalqLM` holds several calibrators. For each batch it runs the model
once (logits and last hidden state), applies every calibrator to that output, and caches each request's
(log-likelihood, is-greedy) per calibrator. `run_tasks` then runs lm-eval once per calibrator: the first
run does the forward passes, the later ones read the cache (they only re-tokenize and score). Requests whose
model input is identical (the one-token answers A/B/C/D of one MMLU question) share one input row.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.utils import simple_parse_args_string
from tqdm import tqdm

from calq import data as data_mod
from calq import models
from calq.calib import calibrators as calibrators_mod
from calq.calib.base import Calibrator
from calq.errors import CalqError
from calq.evaluation.tasks import PREFIX, TASKS_DIR, available, listing

Progress = Callable[[str, int, int], None]  # (description, done, total)


def parse_calibrator(spec: str | None, model) -> tuple[str, Calibrator]:
    """'temperature:1.2' -> ('temperature', calibrator); None or 'none' -> ('none', identity).
    `model` is the model the calibrator will serve (a fitted head is checked against its config)."""
    return calibrators_mod.parse(spec, model.config)


def _key(context: list[int], continuation: list[int]) -> bytes:
    # A digest, not the token tuples: a five-shot MMLU run holds tens of thousands of long requests.
    ids = np.asarray([*context, -1, *continuation], dtype=np.int64)
    return hashlib.blake2b(ids.tobytes(), digest_size=16).digest()


def _bars_off() -> bool:
    """lm-eval passes `disable=` to its progress bars itself, which wins over TQDM_DISABLE (tqdm's environment variables
    only change its defaults), so CalqLM passes this on: `calq run` sets TQDM_DISABLE unless --verbose."""
    return bool(os.environ.get("TQDM_DISABLE"))


def _samples(gen_kwargs: dict) -> bool:
    do_sample = gen_kwargs.get("do_sample")
    return bool(do_sample) or (do_sample is None and float(gen_kwargs.get("temperature") or 0) > 0)


@register_model("calq")
class CalqLM(HFLM):
    """HFLM whose log-likelihoods come from calibrated logits; `active` picks the calibrator lm-eval sees."""

    def __init__(self, pretrained: str, calibrator: str | None = None, calibrators: dict[str, Calibrator] | None = None,
                 dtype: str = "float32", device: str | None = None, batch_size: int | str = 1, **kwargs):
        if dtype not in ("float32", "bfloat16", "float16"):
            raise CalqError(f"unsupported dtype '{dtype}'", "dtype", "use float32, bfloat16 or float16")
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise CalqError(f"batch_size must be a positive whole number, got '{batch_size}'", "batch_size",
                            "e.g. batch_size=8")
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model, tokenizer = models.load(models.resolve(str(pretrained)), dtype)
        super().__init__(pretrained=model.to(device), tokenizer=tokenizer, backend="causal", batch_size=int(batch_size),
                         **kwargs)
        self.calibrators = dict(calibrators) if calibrators else dict([parse_calibrator(calibrator, model)])
        for cal in self.calibrators.values():
            cal.to(device).eval()
        self.active = next(iter(self.calibrators))
        self.progress: Progress | None = None
        self._scores: dict[bytes, dict[str, tuple[float, bool]]] = {}
        # Per request, from the same forward pass: the last hidden state at the last context token (float16)
        # and the continuation's token count; `_request_keys` maps lm-eval's (context, continuation) strings to it.
        self.prompt_hidden: dict[bytes, torch.Tensor] = {}
        self.continuation_tokens: dict[bytes, int] = {}
        self._request_keys: dict[tuple[str, str], bytes] = {}
        self._generations: dict[tuple[str, str], str] = {}

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> CalqLM:
        # lm-eval adds its --batch_size (1 when not given), --max_batch_size and --device to the model_args: passing
        # one twice is a TypeError in lm-eval's LM, so a key given in model_args wins over the command-line option.
        extra = {k: v for k, v in (additional_config or {}).items() if k not in arg_dict}
        return super().create_from_arg_obj(arg_dict, extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> CalqLM:
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    def _forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, last hidden state after the final norm): everything any calibrator needs."""
        with torch.no_grad():
            out = self.model(ids, output_hidden_states=True)
        return out.logits, out.hidden_states[-1]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm or _bars_off())

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        return super().loglikelihood_rolling(requests, disable_tqdm or _bars_off())

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None) -> list[tuple[float, bool]]:
        keys = [_key(ctx, cont) for _, ctx, cont in requests]
        self._request_keys.update((tuple(strings), key) for (strings, _, _), key in zip(requests, keys) if strings)
        todo = {key: (ctx, cont) for key, (_, ctx, cont) in zip(keys, requests) if key not in self._scores}
        if todo:
            self._score(todo, disable_tqdm)
        return [self._scores[key][self.active] for key in keys]

    def _score(self, todo: dict[bytes, tuple[list[int], list[int]]], disable_tqdm: bool) -> None:
        """One forward pass per batch of inputs; every calibrator's (log-likelihood, is_greedy) per request."""
        rows: dict[tuple[int, ...], list[tuple[bytes, list[int]]]] = {}
        for key, (ctx, cont) in todo.items():
            whole = (ctx + cont)[-(self.max_length + 1):]  # too long: cut from the left, as HFLM does
            rows.setdefault(tuple(whole[:-1]), []).append((key, cont))
        inputs = sorted(rows, key=len, reverse=True)  # longest first: little padding, out-of-memory at once
        pad = self.tokenizer.pad_token_id or 0
        bar = tqdm(total=len(todo), desc="calq: scoring", disable=disable_tqdm or self.progress is not None)
        done = 0
        for start in range(0, len(inputs), self.batch_size):
            batch = inputs[start:start + self.batch_size]
            ids = torch.full((len(batch), len(batch[0])), pad, dtype=torch.long)
            for i, inp in enumerate(batch):
                ids[i, :len(inp)] = torch.tensor(inp)  # right padding: causal attention never looks at it
            logits, hidden = self._forward(ids.to(self.device))
            for i, inp in enumerate(batch):
                for key, cont in rows[inp]:
                    # input position len(inp) - len(cont) holds the last context token (it predicts cont[0])
                    self.prompt_hidden[key] = hidden[i, len(inp) - len(cont)].to("cpu", torch.float16)
                    self.continuation_tokens[key] = len(cont)
            for name, calibrator in self.calibrators.items():
                calibrated = calibrator(logits, hidden)
                for i, inp in enumerate(batch):
                    for key, cont in rows[inp]:
                        # position j predicts token j + 1: the continuation is predicted by the last len(cont) inputs
                        logp = F.log_softmax(calibrated[i, len(inp) - len(cont):len(inp)].float(), dim=-1)
                        target = torch.tensor(cont, device=logp.device)
                        ll = logp.gather(-1, target[:, None]).sum()
                        greedy = bool((logp.argmax(-1) == target).all())
                        self._scores.setdefault(key, {})[name] = (float(ll), greedy)
            n = sum(len(rows[inp]) for inp in batch)
            done += n
            bar.update(n)
            if self.progress:
                self.progress("score requests", done, len(todo))
        bar.close()

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        disable_tqdm = disable_tqdm or _bars_off()
        if any(_samples(r.args[1]) for r in requests):
            if not self.calibrators[self.active].identity:
                raise CalqError("sampled generation with a calibrator is not supported", "generation_kwargs",
                                "use greedy decoding (do_sample: false), which no calibrator changes")
            return super().generate_until(requests, disable_tqdm)
        # Greedy text is the same under every calibrator (positive per-position scales keep the argmax).
        keys = [(r.args[0], repr(sorted(r.args[1].items()))) for r in requests]
        todo = {}
        for key, request in zip(keys, requests):
            if key not in self._generations:
                todo.setdefault(key, request)
        if todo:
            texts = super().generate_until(list(todo.values()), disable_tqdm)
            self._generations.update(zip(todo, texts))
            # Answer-level confidence of generative tasks: every calibrator's log-probability of the greedy answer,
            # scored like a multiple-choice continuation (one more forward pass per question, shared by all).
            pairs = [((context, text), *self._encode_pair(context, text))
                     for (context, _), text in zip(todo, texts) if context and text]
            if pairs:
                self._loglikelihood_tokens(pairs, disable_tqdm=True)
        return [self._generations[key] for key in keys]

    def answer_score(self, context: str, text: str) -> dict | None:
        """{calibrator: (log-probability of the generated `text` after `context`, is_greedy)} and its token count,
        or None when nothing was generated (an empty answer has no probability to read)."""
        key = self._request_keys.get((context, text))
        if key is None:
            return None
        return {"logprob": {name: ll for name, (ll, _) in self._scores[key].items()},
                "tokens": self.continuation_tokens[key]}


# ---- tasks ------------------------------------------------------------------------------------------

def _task_manager(root, include_path: list | None, defaults: bool):
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR), *(str(p) for p in include_path or [])]
    return TaskManager(include_path=paths, include_defaults=defaults,
                       metadata={"data_dir": str(root)} if root is not None else {})


def _check_include_path(include_path: list | None, where: str) -> None:
    for folder in include_path or []:
        path = Path(folder)
        if not path.is_dir():
            raise CalqError(f"include_path folder not found: {path}", where, "give a folder of lm-eval task YAMLs")
        if not any(path.rglob("*.yaml")):
            raise CalqError(f"include_path folder {path} holds no task YAML", where,
                            "add lm-eval task YAMLs (*.yaml) to it")


def resolve_tasks(tasks: list[str], data_dir, include_path: list | None = None,
                  where: str = "evaluation.tasks") -> dict:
    """calq task name (or the user's / lm-eval's task name) -> its lm-eval Task, with its documents loaded.

    Order: calq's own tasks (`arc_easy` is `calq_arc_easy`), then the `include_path` folders, then lm-eval's
    registry (indexed only when a name is not found before). Every failure is a one-line CalqError, raised
    before any model loads: an unknown name, a missing folder, data that cannot be read (lm-eval's registry
    tasks read the Hugging Face hub, which needs network).
    """
    known = available()
    if not tasks:
        raise CalqError("no tasks listed", where, f"list one or more of: {', '.join(listing())}")
    _check_include_path(include_path, where)
    manager = _task_manager(data_dir, include_path, defaults=False)
    lm_names = {name: PREFIX + name if name in known else name for name in dict.fromkeys(tasks)}
    if any(n not in manager.all_tasks for n in lm_names.values()):
        with _quiet_lm_eval():
            manager = _task_manager(data_dir, include_path, defaults=True)
    for name, lm_name in lm_names.items():
        if lm_name not in manager.all_tasks:
            raise CalqError(f"unknown task '{name}'", where, f"use one of: {', '.join(listing())}, a task of an "
                            "include_path folder, or a name from lm-eval's registry (`lm_eval ls tasks`)")
    resolved = {}
    for name, lm_name in lm_names.items():
        try:
            with _quiet_lm_eval():
                leaves = manager.load([lm_name])["tasks"]  # a group: its tasks
        except CalqError as err:
            raise CalqError(f"task '{name}': {err.what}", where, err.fix) from None
        except Exception as err:  # noqa: BLE001 - lm-eval and datasets raise anything, ConnectionError to ValueError
            detail = " ".join(f"{type(err).__name__}: {err}".split())[:300]
            raise CalqError(f"task '{name}' could not load its data ({detail})", where,
                            "tasks from lm-eval's registry read the Hugging Face hub (needs network); offline, "
                            "use calq's tasks or an include_path task with local data") from None
        for leaf, task in leaves.items():
            own = leaf.removeprefix(PREFIX)  # a calq group's tasks go by their calq names, as when listed one by one
            resolved[name if len(leaves) == 1 else own if own in known else leaf] = (leaf, task)
    return {"manager": manager, "tasks": resolved}


def check_tasks(tasks: list[str], data_dir, limit: int | None, where: str = "evaluation.tasks",
                include_path: list | None = None, multiple_choice: bool = False) -> dict[str, dict]:
    """Fail fast, before any model loads: unknown task, missing data file, no examples, and with `multiple_choice`
    a task of another kind. Returns per task (a group's tasks one by one) {"n": examples, "sha256": of the examples
    evaluated}: what identifies the task's data in resume keys, wherever the data folder is."""
    root = data_mod.data_dir(str(data_dir) if data_dir else None)
    resolved = resolve_tasks(tasks, root, include_path, where)
    for name, (_, task) in resolved["tasks"].items():
        kind = task.config.output_type
        if multiple_choice and kind != "multiple_choice":
            raise CalqError(f"task '{name}' is {kind}, not multiple choice", where,
                            "answer calibrators are fitted on multiple-choice tasks only")
    return {name: {"n": n, "sha256": _docs_sha256(resolved["tasks"][name][1], n)}
            for name, n in _counts(resolved, limit, where).items()}


def _docs_sha256(task, n: int) -> str:
    digest = hashlib.sha256()
    for doc in itertools.islice(task.eval_docs, n):  # lm-eval's `limit` evaluates the first n
        digest.update(json.dumps(doc, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _counts(resolved: dict, limit: int | None, where: str) -> dict[str, int]:
    counts = {}
    for name, (_, task) in resolved["tasks"].items():
        n = len(task.eval_docs)
        if limit is not None:
            n = min(n, limit)
        if n < 1:
            raise CalqError(f"task '{name}' has no examples" + (f" with limit {limit}" if limit is not None else ""),
                            where, "set a limit of at least 1" if limit is not None else "check its data file")
        counts[name] = n
    return counts


@contextmanager
def _quiet_lm_eval():
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _metrics(task_results: dict) -> dict[str, float]:
    """{'acc,none': 0.5, 'acc_stderr,none': 'N/A', 'alias': ...} -> {'acc': 0.5}"""
    return {key.split(",")[0]: value for key, value in task_results.items()
            if "," in key and "_stderr" not in key and isinstance(value, (int, float))}


def gold_indices(task, doc: dict) -> list[int]:
    """The correct choices of one multiple-choice document, for every shape lm-eval has.

    Several true answers marked 0/1 per choice (`labels`, TruthfulQA MC2 in calq and lm-eval); several contexts with
    one continuation (winogrande: the gold is doc_to_text's index, the logged target is the continuation text);
    a target index, a list of indices or the text of the right choice (as lm-eval's process_results reads them).
    """
    choices = task.doc_to_choice(doc)
    mc2 = doc.get("mc2_targets")
    labels = doc.get("labels", mc2.get("labels") if isinstance(mc2, dict) else None)
    if labels is not None and len(labels) == len(choices):
        return [i for i, label in enumerate(labels) if label]
    gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
    return [choices.index(g) if isinstance(g, str) else int(g) for g in (gold if isinstance(gold, list) else [gold])]


def run_tasks(model_dir, calibrators: dict[str, Calibrator], tasks: list[str], limit: int | None, data_dir,
              batch_size: int, dtype: str = "float32", device: str | None = None, progress: Progress | None = None,
              include_path: list | None = None, features: bool = False) -> dict:
    """Every task under every calibrator, with one forward pass per batch for all calibrators together.

    Returns {"limit", "data_dir", "calibrators", "tasks": {task: {"lm_eval_task", "output_type", "metric", "n",
    "gold" (multiple choice: the correct choice indices per question, else None), "calibrators": {name:
    {"metrics": lm-eval's metrics, "scores": the headline metric per question, "loglikelihoods": the choices'
    log-likelihoods per question (multiple choice, else None)}}}}}. The headline metric is the task's first.
    Generative tasks also give "answer_logprobs" ({calibrator: log-probability of the greedy answer per question,
    None where the answer is empty}) and "answer_tokens" (its length in tokens): the answer's sequence probability
    is the confidence of a generative answer. Multiple choice also gives "choice_tokens" (each choice's continuation
    length in tokens) and, with
    `features`, "prompt_hidden": the model's last hidden state at the last context token, from the same forward
    pass that scored the choices, float16 [questions, hidden] (averaged over a question's requests when they have
    several contexts); not JSON: `split_features` takes these tensors out for a safetensors file.
    """
    from lm_eval import simple_evaluate

    root = data_mod.data_dir(str(data_dir) if data_dir else None)
    resolved = resolve_tasks(tasks, root, include_path)
    counts = _counts(resolved, limit, "evaluation.tasks")
    with _quiet_lm_eval():
        lm = CalqLM(pretrained=str(model_dir), calibrators=calibrators, dtype=dtype, batch_size=batch_size,
                    device=device)
    lm.progress = progress
    lm_names = {name: leaf for name, (leaf, _) in resolved["tasks"].items()}
    out = {name: {"lm_eval_task": lm_names[name], "n": n, "calibrators": {}} for name, n in counts.items()}
    for calibrator in calibrators:
        lm.active = calibrator
        with _quiet_lm_eval():
            results = simple_evaluate(model=lm, tasks=list(lm_names.values()), limit=limit,
                                      task_manager=resolved["manager"], log_samples=True, bootstrap_iters=0)
        for name, entry in out.items():
            task_obj = resolved["tasks"][name][1]
            config = results["configs"][lm_names[name]]
            samples = sorted(results["samples"][lm_names[name]], key=lambda s: s["doc_id"])
            metric = config["metric_list"][0]["metric"]
            choice = config["output_type"] == "multiple_choice"
            n_choices = [len(task_obj.doc_to_choice(s["doc"])) for s in samples] if choice else None
            entry.update(output_type=config["output_type"], metric=metric,
                         gold=[gold_indices(task_obj, s["doc"]) for s in samples] if choice else None)
            if choice and "choice_tokens" not in entry:
                keys = [[lm._request_keys[tuple(args)] for args in s["arguments"][:k]]
                        for s, k in zip(samples, n_choices)]
                entry["choice_tokens"] = [[lm.continuation_tokens[key] for key in row] for row in keys]
                if features:
                    entry["prompt_hidden"] = torch.stack([
                        torch.stack([lm.prompt_hidden[key].float() for key in row]).mean(0) for row in keys]).half()
            if config["output_type"] == "generate_until" and "answer_tokens" not in entry:
                answers = [lm.answer_score(s["arguments"][0][0], s["resps"][0][0]) for s in samples]
                entry["answer_tokens"] = [a["tokens"] if a else 0 for a in answers]
                entry["answer_logprobs"] = {cal: [a["logprob"][cal] if a else None for a in answers]
                                            for cal in calibrators}
            entry["calibrators"][calibrator] = {
                "metrics": _metrics(results["results"][lm_names[name]]),
                "scores": [float(s[metric]) for s in samples],
                "loglikelihoods": [[float(r[0]) for r in s["filtered_resps"][:k]] for s, k in zip(samples, n_choices)]
                if choice else None,
            }
    return {"limit": limit, "data_dir": str(root), "calibrators": list(calibrators), "tasks": out}


def join_features(results: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """The inverse of split_features: each task's "prompt_hidden" back from the tensors."""
    return {**results, "tasks": {name: {**entry, **({"prompt_hidden": tensors[f"{name}.prompt_hidden"]}
                                                   if f"{name}.prompt_hidden" in tensors else {})}
                                 for name, entry in results["tasks"].items()}}


def split_features(results: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """(run_tasks output without tensors, {"<task>.prompt_hidden": tensor}): the JSON part and a safetensors part."""
    tensors, tasks = {}, {}
    for name, entry in results["tasks"].items():
        tasks[name] = {k: v for k, v in entry.items() if k != "prompt_hidden"}
        if "prompt_hidden" in entry:
            tensors[f"{name}.prompt_hidden"] = entry["prompt_hidden"].contiguous()
    return {**results, "tasks": tasks}, tensors


def main() -> None:
    """lm-eval's CLI with the `calq` model registered (by importing this module) and calq's tasks included."""
    from lm_eval.__main__ import cli_evaluate

    if "--include_path" not in sys.argv:
        sys.argv += ["--include_path", str(TASKS_DIR)]
    cli_evaluate()


if __name__ == "__main__":
    main()
