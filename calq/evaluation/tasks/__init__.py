"""calq's lm-eval tasks: one `calq_<name>.yaml` per task, reading the offline data folder.

calq names a task `<name>`; lm-eval knows it as `calq_<name>` (the prefix keeps it apart from lm-eval's own
tasks of the same name when both are on the search path). The data folder is a setting, not part of the
YAML: lm-eval hands task metadata to `custom_dataset`, so `data_dir` comes from
`TaskManager(metadata={"data_dir": ...})` (calq), `--metadata '{"data_dir": "..."}'` (lm-eval's CLI),
or $CALQ_DATA_DIR.

Adding a task is one YAML here (its first metric is the task's headline accuracy); a new file format
needs one loader in `sources.py`. A group YAML (`calq_mmlu_subjects.yaml`) names several tasks at once; its tasks
go by their calq names (`mmlu_anatomy`). Several tasks may read one data file (`mmlu` and `mmlu_anatomy`,
`truthfulqa_mc1` and `truthfulqa_mc2`): `shared_data` tells, so that fitting and evaluation never share questions.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import yaml

TASKS_DIR = Path(__file__).parent
PREFIX = "calq_"


def available() -> dict[str, Path]:
    """calq task name -> its YAML file."""
    return {p.stem.removeprefix(PREFIX): p for p in sorted(TASKS_DIR.glob(f"{PREFIX}*.yaml"))}


class _Loader(yaml.SafeLoader):
    """lm-eval's `!function` tags read as plain strings: only the data keys matter here."""


_Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def _config(path: Path) -> dict:
    config = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    if "include" in config:
        config = {**_config(path.parent / config["include"]), **config}
    return config


@functools.cache  # the YAMLs are read once per process; check_split asks for every fit x evaluation pair
def data_source(name: str) -> tuple[str, str | None] | None:
    """(data file or folder, subject or None for all of it) that calq task `name` reads; None for another task."""
    path = available().get(name)
    if path is None:
        return None
    kwargs = _config(path).get("dataset_kwargs") or {}
    return kwargs.get("source", name), kwargs.get("subject")


def listing() -> list[str]:
    """calq's task names for a message: a group's tasks as the group, e.g. `mmlu_subjects (57 tasks mmlu_*)`."""
    names = available()
    groups = {name: [t.removeprefix(PREFIX) for t in config["task"]] for name, path in names.items()
              if "group" in (config := _config(path))}
    members = {t for tasks in groups.values() for t in tasks}
    return [f"{name} ({len(groups[name])} tasks {os.path.commonprefix(groups[name])}*)" if name in groups else name
            for name in names if name not in members]


def shared_data(a: str, b: str) -> str | None:
    """The data two tasks both read (e.g. `mmlu` for mmlu and mmlu_anatomy), None when they share none."""
    if a == b:
        return a
    first, second = data_source(a), data_source(b)
    if first is None or second is None or first[0] != second[0]:
        return None
    if first[1] is None or second[1] is None or first[1] == second[1]:
        return first[0] + (f" ({first[1] or second[1]})" if first[1] or second[1] else "")
    return None
