"""The kinds of stage a run has, each declared once: its name pattern, group, what it does in a word, and the files
it writes (paths in the run folder). The stage functions (`pipeline.py`) write there and every reader (later
stages, `report/build.py`) asks for a file by its stage kind and output name, never by typing its path again.
README.md's stage table and docs/architecture.md's diagram list every kind (tests/test_stages.py checks them)."""

from __future__ import annotations

from dataclasses import dataclass

GROUPS = ("prepare", "ranges", "quantize", "calibrate", "evaluate", "export")  # `--until` stops after one of 2-5


@dataclass(frozen=True)
class StageSpec:
    kind: str  # the first part of a stage's name
    pattern: str  # the stage name, with <variant>, <task>, <format> where one stage per value is added
    group: str  # one of GROUPS
    words: str  # what it does, for messages ("... sampling redone")
    outputs: dict[str, str]  # output name -> path in the run folder, with {variant}, {task}, {format}, {output}

    def output(self, name: str, **parts: str) -> str:
        return self.outputs[name].format(**parts)


SPECS: dict[str, StageSpec] = {s.kind: s for s in (
    StageSpec("base_model", "base_model", "prepare", "dequantization", {"model": "base_model"}),
    StageSpec("samples", "samples", "prepare", "sampling", {"samples": "samples.safetensors"}),
    StageSpec("baseline_check", "baseline_check", "prepare", "baseline check", {"result": "baseline_check.json"}),
    StageSpec("ranges", "ranges", "ranges", "range collection",
              {"ranges": "ranges.safetensors", "outliers": "outliers.json"}),
    # a method's own outputs (MethodConfig.extra_outputs) are `{output}/{variant}.json`
    StageSpec("quantize", "quantize/<variant>", "quantize", "quantization",
              {"checkpoint": "variants/{variant}", "method": "{output}/{variant}.json"}),
    StageSpec("instructions", "instructions", "calibrate", "instruction split", {"records": "instructions.json"}),
    StageSpec("validation_text", "validation_text", "calibrate", "validation text",
              {"windows": "validation_text.safetensors"}),
    StageSpec("calibrate", "calibrate/<variant>", "calibrate", "calibration", {"calibrators": "calibrators/{variant}"}),
    StageSpec("eval_tokens", "eval_tokens", "evaluate", "tokenization", {"tokens": "eval_tokens.safetensors"}),
    StageSpec("evaluate", "evaluate/<variant>", "evaluate", "evaluation", {"result": "eval/{variant}.json"}),
    # evaluation.tasks.split: tasks/<variant>/<task> per task (the `task*` outputs), merged by tasks/<variant>
    StageSpec("tasks", "tasks/<variant>", "evaluate", "task evaluation",
              {"result": "tasks/{variant}.json", "features": "tasks/{variant}.safetensors",
               "task_result": "tasks/{variant}/{task}.json", "task_features": "tasks/{variant}/{task}.safetensors"}),
    StageSpec("fit_tasks", "fit_tasks/<variant>", "calibrate", "fit task evaluation",
              {"result": "fit_tasks/{variant}.json", "features": "fit_tasks/{variant}.safetensors"}),
    StageSpec("answers", "answers/<variant>", "evaluate", "answer calibration",
              {"calibrators": "answers/{variant}", "result": "answers/{variant}.json"}),
    StageSpec("export", "export/<variant>/<format>", "export", "export",
              {"artifact": "export/{variant}/{format}", "result": "export/{variant}/{format}.json"}),
)}


def spec_of(stage: str) -> StageSpec:
    """The spec of a stage by its name (`quantize/w8a8` -> the quantize spec)."""
    return SPECS[stage.split("/")[0]]


def output(kind: str, name: str, **parts: str) -> str:
    """The path in the run folder of output `name` of stage kind `kind` (`parts` fill the pattern)."""
    return SPECS[kind].output(name, **parts)
