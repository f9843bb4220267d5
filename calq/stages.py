"""The kinds of stage a run has. Each kind is one module in `calq/stage_kinds/` (or a plugin's, entry point group
`calq.stages`) holding a `StageKind` registered with `@KINDS.register`: its name pattern, group, what it does in a
word, the files it writes (paths in the run folder), its version, the stages it adds to a run's table (with what
each needs and the settings that enter its key) and the function each runs. The planner (`calq.pipeline`) asks every
kind for its stages; every reader (later stages, `report/build.py`) asks for a file by its stage kind and output
name, never by typing its path again. README.md's stage table and docs/architecture.md's diagram list every kind
(tests/test_stages.py checks them)."""

from __future__ import annotations

from typing import Any, ClassVar

from calq.registry import Registry

GROUPS = ("prepare", "ranges", "quantize", "calibrate", "evaluate", "export")  # `--until` stops after one of 2-5


class StageKind:
    kind: ClassVar[str]  # the first part of a stage's name
    pattern: ClassVar[str]  # the stage name, with <variant>, <task>, <format> where one stage per value is added
    group: ClassVar[str]  # one of GROUPS
    words: ClassVar[str]  # what it does, for messages ("... sampling redone")
    outputs: ClassVar[dict[str, str]]  # output name -> path in the run folder, with {variant}, {task}, {format} ...
    order: ClassVar[int]  # where its stages go in the table (run order): after those of every kind with a lower one
    version: ClassVar[int] = 1  # raise it when what its stages compute changes: they (and what reads them) rerun

    @classmethod
    def output(cls, name: str, **parts: str) -> str:
        return cls.outputs[name].format(**parts)

    @classmethod
    def check(cls, recipe: Any, data_root: Any, variants: list[str], config: Any) -> None:
        """Raise CalqError, before any long work, when the recipe asks this kind for what cannot be done (`variants`:
        the names of the variants that run, baseline first; `config`: the model's transformers config)."""

    @classmethod
    def add_stages(cls, table: Any) -> None:
        """Add this kind's stages to the run's table (a `calq.pipeline.Table`: `table.add(...)`), none when the
        recipe does not ask for them."""
        raise NotImplementedError


KINDS = Registry("stage kind", "calq.stage_kinds", "stages", key=lambda cls: cls.kind)


def specs() -> Registry:
    """Every stage kind: calq's own and the plugins'."""
    return KINDS.discover()


def in_order() -> list[type[StageKind]]:
    """Every stage kind in run order (`order`)."""
    return sorted(specs().values(), key=lambda kind: kind.order)


def spec_of(stage: str) -> type[StageKind]:
    """The kind of a stage by its name (`quantize/w8a8` -> the quantize kind)."""
    return specs().get(stage.split("/")[0])


def output(kind: str, name: str, **parts: str) -> str:
    """The path in the run folder of output `name` of stage kind `kind` (`parts` fill the pattern)."""
    return specs().get(kind).output(name, **parts)


def words(stage: str) -> str:
    """What a stage does, for messages: `evaluate/w8a8` -> evaluation (the stage's name for an unknown kind)."""
    kind = stage.split("/")[0]
    return specs().get(kind).words if kind in specs() else stage
